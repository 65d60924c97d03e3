"""Gradient synchronisation for replicated parameters (dense layers, ``local`` tables).

Each worker's loss is its rows' loss divided by the *global* row count of the step, so
the sum of the workers' gradients is the exact gradient of the global mean. Dense
gradients are summed with one flat ``all_reduce``; sparse embedding gradients (only the
rows a batch touched) are all-gathered and summed, never densified, every table's in the
same three collectives (a collective per table made the sync half of a 26-table step on
2 CPU workers). A worker whose shard ran out contributes zeros, which keeps the collectives
matched. Sharded tables are left out: TorchRec's backward sends their gradients to the
shards' owners.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raytrain_ctr.embedding import sharded_parameter_ids
from raytrain_ctr.train.device import collective_device


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(values: list[float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
    """Each value summed over the workers (``op``: another reduction, e.g. ``ReduceOp.MAX``)."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


def average_statistics(model: nn.Module) -> None:
    """Average the normalisation layers' running statistics (every ``running_*`` buffer: BatchNorm,
    STAR's partitioned norm) over the workers: each worker's come from its own batches, while the
    evaluation and the saved model must read one set. Every worker calls it (a collective)."""
    world = world_size()
    bufs = [b for m in model.modules() for n, b in m.named_buffers(recurse=False)
            if n.startswith("running_") and b.is_floating_point()]
    if world == 1 or not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= world
    for b, v in zip(bufs, torch.split(flat, [b.numel() for b in bufs])):
        b.copy_(v.view_as(b))


def _all_gather(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Every worker's ``t`` (1-D, worker r's holding ``sizes[r]`` entries), padded to the largest for gloo."""
    padded = t.new_zeros(max(sizes))
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[:n] for p, n in zip(parts, sizes)]


def sum_sparse(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each sparse row gradient (``sparse_coo``, one index dimension, one dtype) summed over the workers, never
    densified: the rows every worker touched, with three collectives for all of them together (the row counts,
    the row ids, the values) rather than three per table. Each worker coalesces its rows before sending them
    (fewer bytes; a sum over one sort of all tables' keys, tried instead, cost more than these ``coalesce``s)."""
    coalesced = [g.coalesce() for g in grads]
    idx = [g.indices()[0] for g in coalesced]
    widths = [max(1, g.shape[1:].numel()) for g in grads]
    device = collective_device()
    every = [torch.empty(len(grads), dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(every, torch.tensor([len(i) for i in idx], dtype=torch.long, device=device))
    counts = torch.stack(every).cpu()  # workers × tables
    floats = counts * torch.tensor(widths)
    rows = _all_gather(torch.cat(idx), counts.sum(1).tolist())
    values = _all_gather(torch.cat([g.values().reshape(-1) for g in coalesced]), floats.sum(1).tolist())
    parts = [(r.split(n), v.split(f)) for n, f, r, v in zip(counts.tolist(), floats.tolist(), rows, values)]
    summed = [torch.sparse_coo_tensor(torch.cat([ids[t] for ids, _ in parts]).unsqueeze(0),
                                      torch.cat([vals[t] for _, vals in parts]).view(-1, *g.shape[1:]), g.shape)
              for t, g in enumerate(grads)]
    return [g.coalesce() for g in summed]


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights of embeddings with sparse gradients (updated by a sparse optimizer)."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]


class GradientSync:
    """Sums gradients over workers after ``backward`` (no-op on one worker): of every trainable
    replicated parameter of ``model``, or only of those in ``include``, less those in ``exclude``
    (ids; a stage's parameter groups sync on their own)."""

    def __init__(self, model: nn.Module, include: set[int] | None = None, exclude: set[int] = frozenset()):
        sparse_ids, fused = {id(p) for p in sparse_parameters(model)}, sharded_parameter_ids(model)
        params = [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0])
                  if (p.requires_grad or include is not None) and id(p) not in fused and id(p) not in exclude
                  and (include is None or id(p) in include)]
        self.sparse = [p for p in params if id(p) in sparse_ids]
        self.dense = [p for p in params if id(p) not in sparse_ids]

    def __call__(self) -> None:
        if world_size() == 1:
            return
        if self.dense:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for p, g in zip(self.dense, grads):
                p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
                offset += g.numel()
        grads = [p.grad if p.grad is not None else torch.sparse_coo_tensor(
            torch.zeros(1, 0, dtype=torch.long), p.new_zeros(0, *p.shape[1:]), p.shape) for p in self.sparse]
        for dtype in dict.fromkeys(g.dtype for g in grads):  # one bucket per dtype (one per step in practice)
            bucket = [i for i, g in enumerate(grads) if g.dtype == dtype]
            for i, summed in zip(bucket, sum_sparse([grads[i] for i in bucket])):
                self.sparse[i].grad = summed
