"""A batch of one domain as tensors: what the encoder produces and every layer, model and method reads.

It lives outside ``data/`` so that layers and methods depend on it alone, never on the ingest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """One batch of one domain, as tensors.

    ``sparse`` maps field name → ``[B]`` (categorical) or ``[B, L]`` (sequence) row ids;
    ``dense`` is ``[B, n_dense]``; ``user`` is an int64 key per row for GAUC (or None).
    """

    domain: str
    sparse: dict[str, torch.Tensor]
    dense: torch.Tensor
    label: torch.Tensor
    user: torch.Tensor | None = None
    time: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_fields: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def rows(self) -> int | torch.SymInt:
        """The row count as a size: unlike ``len``, it stays symbolic when the batch dimension is
        (``torch.export`` with a dynamic batch size); model code sizes tensors by it."""
        return self.label.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            self.domain,
            {k: v.to(device, non_blocking=True) for k, v in self.sparse.items()},
            mv(self.dense), mv(self.label), mv(self.user), mv(self.time),
            {k: v.to(device, non_blocking=True) for k, v in self.extra.items()}, self.dense_fields,
        )

    def select(self, index: torch.Tensor | slice) -> Batch:
        """The rows at ``index`` (a slice or an index tensor)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Batch(self.domain, {k: v[index] for k, v in self.sparse.items()}, self.dense[index],
                     self.label[index], pick(self.user), pick(self.time),
                     {k: v[index] for k, v in self.extra.items()}, self.dense_fields)
