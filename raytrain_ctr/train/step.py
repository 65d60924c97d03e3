"""The open parts of a training step (what CCTL's companion towers and selector need, once):

* :class:`ParamGroup`: parameters the main loss never reaches, stepped by their own optimizer
  under their own sync rule (``StageContext.update``), e.g. a REINFORCE-trained selector;
* :func:`copy_parameters`: one module's parameters and buffers into another of the same
  architecture, sharded tables shard by shard (e.g. the mixed tower into the pure one);
* :class:`DiscountedReturn`: ``G ← γ·G + r`` over steps, kept in the model so it resumes;
* :class:`EmbeddingL2`: the L2 penalty of the embedding vectors a step looks up (``train.embedding_l2``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from raytrain_ctr.embedding.base import Embedding
from raytrain_ctr.embedding.collection import keep_padding_rows
from raytrain_ctr.train.sync import GradientSync, sparse_parameters


@dataclass
class ParamGroup:
    """Parameters updated outside the main loss: left out of its graph (no gradient from it) and of
    the main optimizers; ``optimizer`` makes their own; ``sync``: sum their gradients over the
    workers before each of their steps (else each worker steps on its own gradient)."""

    name: str
    params: list[nn.Parameter]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    sync: bool = True


class GroupOptimizer:
    """A parameter group's optimizer and gradient sync."""

    def __init__(self, model: nn.Module, group: ParamGroup):
        self.model, self.group = model, group
        tables = {id(p) for p in sparse_parameters(model)}
        self.optimizer = keep_padding_rows(group.optimizer(group.params), [p for p in group.params if id(p) in tables])
        self.sync: GradientSync | None = None  # made at the first step: after the tables are sharded

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward(inputs=self.group.params)
        if self.group.sync:
            self.sync = self.sync or GradientSync(self.model, include={id(p) for p in self.group.params})
            self.sync()
        self.optimizer.step()


@contextmanager
def without_grad(params: list[nn.Parameter]) -> Iterator[None]:
    """``params`` take no part in autograd inside the block."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@torch.no_grad()
def copy_parameters(src: nn.Module, dst: nn.Module) -> None:
    """``dst ← src``, every parameter and buffer (same architecture); sharded tables shard by shard,
    which needs the same sharding plan on both (the shards are views of the tables)."""
    from raytrain_ctr.embedding.sharded import shards_of

    source = src.state_dict()
    for key, value in dst.state_dict().items():
        for (_, mine), (_, theirs) in zip(shards_of(value), shards_of(source[key]), strict=True):
            mine.copy_(theirs)


class DiscountedReturn(nn.Module):
    """The discounted accumulated reward ``G ← γ·G + r`` (CCTL eq. 9), a buffer of the model (it is
    checkpointed and resumes); ``pop`` reads and resets it."""

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("value", torch.zeros((), dtype=torch.float64))

    def add(self, reward: float | torch.Tensor) -> float:
        self.value.mul_(self.gamma).add_(float(reward))
        return float(self.value)

    def pop(self) -> float:
        out = float(self.value)
        self.value.zero_()
        return out


class EmbeddingL2:
    """``½·λ·Σ‖e‖²`` over the embedding vectors the main loss's forward passes look up: every row's
    fields (sequences as read: pooled, or per position with padding reading zeros). Summed over the
    rows like the loss, which the step divides by its global row count: a per-row penalty on the rows
    a step touches only — the tables' other rows decay nowhere, unlike weight decay on a whole table
    (the regularisation of id-heavy CTR models, e.g. DIN §4.3.1's mini-batch aware form, without its
    frequency scaling). It reaches the tables through the lookups' outputs, so it works on both
    backends (TorchRec's fused backward takes its gradient there); frozen tables read no penalty."""

    def __init__(self, model: nn.Module, weight: float):
        self.weight = weight
        self.looked_up: list[torch.Tensor] = []
        self.active = False
        self.handles = [m.register_forward_hook(self._record) for m in model.modules() if isinstance(m, Embedding)]

    def _record(self, module: nn.Module, args: tuple, out: dict[str, torch.Tensor]) -> None:
        if self.active and torch.is_grad_enabled():
            self.looked_up += [v for v in out.values() if v.requires_grad]

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the lookups of the forward passes inside the block (the main loss's)."""
        self.looked_up, self.active = [], True
        try:
            yield
        finally:
            self.active = False

    def penalty(self) -> torch.Tensor:
        """The recorded lookups' penalty (summed over rows); the record is then cleared."""
        total = sum(((v.float() ** 2).sum() for v in self.looked_up), torch.zeros(()))
        self.looked_up = []
        return 0.5 * self.weight * total
