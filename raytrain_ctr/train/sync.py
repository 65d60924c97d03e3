"""Gradient synchronisation for replicated parameters (dense layers, ``local`` tables).

Each worker's loss is its rows' loss divided by the *global* row count of the step, so
the sum of the workers' gradients is the exact gradient of the global mean. Dense
gradients are summed with one flat ``all_reduce``; sparse embedding gradients (only the
rows a batch touched) are all-gathered and summed, never densified. A worker whose
shard ran out contributes zeros, which keeps the collectives matched. Sharded tables are left out: TorchRec's backward
sends their gradients to the shards' owners.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raytrain_ctr.embedding import sharded_parameter_ids


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world_size() > 1:
        dist.all_reduce(t)
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


def _gather_sparse(grad: torch.Tensor) -> torch.Tensor:
    g = grad.coalesce()
    idx, val = g.indices()[0], g.values()
    n = torch.tensor([idx.numel()], dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    pad_idx = torch.zeros(top, dtype=idx.dtype)
    pad_val = val.new_zeros((top, *val.shape[1:]))
    pad_idx[: idx.numel()], pad_val[: idx.numel()] = idx, val
    all_idx = [torch.empty_like(pad_idx) for _ in sizes]
    all_val = [torch.empty_like(pad_val) for _ in sizes]
    dist.all_gather(all_idx, pad_idx)
    dist.all_gather(all_val, pad_val)
    idx = torch.cat([i[: s.item()] for i, s in zip(all_idx, sizes)])
    val = torch.cat([v[: s.item()] for v, s in zip(all_val, sizes)])
    return torch.sparse_coo_tensor(idx.unsqueeze(0), val, grad.shape).coalesce()


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
        for p in self.sparse:
            grad = p.grad if p.grad is not None else torch.sparse_coo_tensor(
                torch.zeros(1, 0, dtype=torch.long), p.new_zeros(0, *p.shape[1:]), p.shape)
            p.grad = _gather_sparse(grad)
