"""The one embedding interface every model uses (DESIGN §5).

An :class:`EmbeddingCollection` is built from tables and the sparse fields that read
them (several fields may share one table: ``item_id`` and ``hist_items``). It answers
by field name:

* ``pooled(batch)`` → ``{field: [B, dim]}`` for categorical fields and pooled sequences
  (masked mean or sum; AutoFT eq. 3);
* ``sequence(batch, field)`` → ``([B, L, dim], mask [B, L])`` for attention.

A field absent from a batch (a field of the other domain) reads as zeros, so one model
serves domains with different schemas. Row 0 of every table is the padding/OOV row
(``padding_idx=0``: always zero, never updated).

This module is the ``local`` backend: one ``nn.Embedding`` per table with sparse
gradients (updated by a sparse optimizer, synchronised across workers sparsely).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from raytrain_ctr.data.encode import Batch
from raytrain_ctr.spec import DomainSpec, FieldSpec, TableSpec, merge_tables


def fields_of(specs: Iterable[DomainSpec]) -> list[FieldSpec]:
    """The union of sparse fields of several domains, first domain's order first."""
    seen: dict[str, FieldSpec] = {}
    for spec in specs:
        for f in spec.sparse_fields:
            if f.name in seen and seen[f.name].table != f.table:
                raise ValueError(f"field '{f.name}' reads table '{seen[f.name].table}' in one domain and "
                                 f"'{f.table}' in domain '{spec.domain}'")
            seen.setdefault(f.name, f)
    return list(seen.values())


class EmbeddingCollection(nn.Module):
    """Embedding tables and the fields that read them (local backend)."""

    def __init__(self, tables: dict[str, TableSpec], fields: list[FieldSpec], sparse: bool = True,
                 init_std: float = 0.01):
        super().__init__()
        self.table_specs = dict(tables)
        self.fields = list(fields)
        used = {f.table for f in fields}
        self.tables = nn.ModuleDict({
            name: nn.Embedding(t.num_embeddings, t.dim, padding_idx=0, sparse=sparse)
            for name, t in tables.items() if name in used
        })
        for e in self.tables.values():
            nn.init.normal_(e.weight, std=init_std)
            with torch.no_grad():
                e.weight[0].zero_()

    @classmethod
    def from_specs(cls, specs: list[DomainSpec], **kw) -> EmbeddingCollection:
        return cls(merge_tables(specs), fields_of(specs), **kw)

    @property
    def pooled_fields(self) -> list[FieldSpec]:
        return [f for f in self.fields if f.type == "categorical" or f.pooling != "none"]

    def dim(self, field: str) -> int:
        return self.table_specs[self._field(field).table].dim

    def _field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def sequence(self, batch: Batch, field: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = self._field(field)
        ids = batch.sparse.get(field)
        if ids is None:
            ids = torch.zeros(len(batch), f.max_len, dtype=torch.long, device=batch.label.device)
        return self.tables[f.table](ids), ids > 0

    def pooled(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = {}
        for f in self.pooled_fields:
            ids = batch.sparse.get(f.name)
            table = self.tables[f.table]
            if ids is None:
                out[f.name] = table.weight.new_zeros(len(batch), table.embedding_dim)
            elif ids.dim() == 1:
                out[f.name] = table(ids)
            else:
                emb, mask = table(ids), (ids > 0).unsqueeze(-1).to(table.weight.dtype)
                total = (emb * mask).sum(1)
                out[f.name] = total / mask.sum(1).clamp(min=1.0) if f.pooling == "mean" else total
        return out

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.pooled(batch)
