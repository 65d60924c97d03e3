"""The embedding interface (DESIGN §5) as one declared contract, implemented by both backends.

An :class:`Embedding` holds tables and the sparse fields that read them (several fields may
share a table: ``item_id`` and ``hist_items``) and answers by field name:

* ``forward(batch)`` → ``{field: [B, dim]}`` for categorical fields and pooled sequences, and
  ``{field: [B, L, dim]}`` for unpooled sequences (``pooling: none``, read by attention). One call
  per batch: on the sharded backend each call is a collective with its own fused update.
* ``sequence(batch, field)`` → ``([B, L, dim], mask [B, L])`` of an unpooled sequence field.
* ``shard(...)`` places the tables on the workers (a no-op for replicated tables) and fuses
  their optimizer where the backend does; ``fused_optimizer`` is then that optimizer.

A field absent from a batch reads as zeros; row 0 of every table is padding/OOV: it reads as
zeros and is never updated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.spec import FieldSpec, SpecError, TableSpec


class Embedding(nn.Module, ABC):
    """Tables and the fields that read them, on one backend."""

    #: the sparse optimizers this backend offers (``train.sparse_optimizer``), and those it offers on GPUs only;
    #: checked on the driver
    optimizers: tuple[str, ...] = ()
    gpu_optimizers: tuple[str, ...] = ()
    #: whether, once sharded, the tables are updated inside backward (no optimizer of ours)
    fuses_optimizer: bool = False

    def __init__(self, tables: dict[str, TableSpec], fields: list[FieldSpec]):
        super().__init__()
        self.table_specs = dict(tables)
        self.fields = list(fields)

    @property
    def pooled_fields(self) -> list[FieldSpec]:
        """Fields read as one vector per row: categorical ones and pooled sequences."""
        return [f for f in self.fields if f.is_pooled]

    @property
    def sequence_fields(self) -> list[FieldSpec]:
        """Sequence fields read unpooled, ``[B, L, dim]`` (``pooling: none``)."""
        return [f for f in self.fields if f.type == "sequence" and not f.is_pooled]

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise SpecError(f"field '{name}' is not read by this embedding layer (fields: {[f.name for f in self.fields]})")

    def dim(self, field: str) -> int:
        return self.table_specs[self.field(field).table].dim

    @abstractmethod
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Pooled fields ``[B, dim]`` and unpooled sequence fields ``[B, L, dim]``, by name."""

    def sequence(self, batch: Batch, field: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, L, dim], mask [B, L])`` of an unpooled sequence field (mask: a real item)."""
        f = self.field(field)
        if f not in self.sequence_fields:
            raise SpecError(f"field '{field}': sequence() reads fields with type: sequence and pooling: none")
        ids = batch.sparse.get(field)
        mask = ids > 0 if ids is not None else torch.zeros(batch.rows, f.max_len, dtype=torch.bool,
                                                            device=batch.label.device)
        return self(batch)[field], mask

    @property
    def is_sharded(self) -> bool:
        return False

    def shard(self, world_size: int, sharding: dict[str, str] | None = None, row_wise_from_rows: int = 1_000_000,
              optimizer: str = "adagrad", lr: float = 0.01, eps: float = 1e-8, device: torch.device | None = None,
              process_group=None) -> Embedding:
        """Place the tables on the workers; replicated backends only move to ``device``."""
        if device is not None:
            self.to(device)
        return self

    @property
    def fused_optimizer(self):
        """The optimizer fused into backward (sharded backends), else None."""
        return None
