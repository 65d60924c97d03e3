"""Model inputs: a batch's field embeddings and dense features as one vector.

* :class:`FieldInputs`: an embedding layer over the fields of one or several domains and their
  dense fields → ``x_0`` (AutoFT eq. 4); a field a batch's domain lacks reads as zeros.
* :class:`DomainInputs`: one embedding layer ``H_p`` per domain mapped linearly to a common
  ``d`` (CDAnet eq. 1), so the domains' schemas may differ; or one shared layer over the union.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.embedding import Embedding, fields_of, make_embedding
from raytrain_ctr.spec import DomainSpec, TableSpec, merge_tables

if TYPE_CHECKING:
    from raytrain_ctr.models.backbones import ModelConfig


class FieldInputs(nn.Module):
    """An embedding layer and dense fields → ``x_0`` (AutoFT eq. 4). Fields of every domain it
    serves; absent ones read as zeros."""

    def __init__(self, embedding: Embedding, dense_fields: list[str]):
        super().__init__()
        self.embedding = embedding
        self.dense_fields = list(dense_fields)
        self.pooled_names = [f.name for f in embedding.pooled_fields]
        self.in_dim = sum(embedding.dim(n) for n in self.pooled_names) + len(self.dense_fields)

    @classmethod
    def of(cls, specs: list[DomainSpec], cfg: ModelConfig) -> FieldInputs:
        """Over the union of the fields of ``specs``, with their tables."""
        return cls(embedding_for(specs, fields_of(specs), cfg), dense_fields_of(specs))

    def dense(self, batch: Batch) -> torch.Tensor:
        """Dense features in this model's order; a field the batch's domain lacks reads as zero."""
        return dense_columns(batch, self.dense_fields)

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_0`` = concat of field embeddings and dense features (eq. 4), and ``v`` [B, F, D] if dims agree."""
        emb = self.embedding(batch)
        vs = [emb[n] for n in self.pooled_names]
        x0 = torch.cat([*vs, self.dense(batch)], dim=-1)
        v = torch.stack(vs, 1) if len({t.shape[-1] for t in vs}) == 1 else None
        return x0, v

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.inputs(batch)[0]


class DomainInputs(nn.Module):
    """``h_p = H_p(x_p)`` ∈ R^d (CDAnet eq. 1): a domain's field embeddings and dense features,
    concatenated and mapped linearly to ``d``; one embedding layer per domain unless ``shared``."""

    def __init__(self, specs: dict[str, DomainSpec], domains: list[str], cfg: ModelConfig, d: int,
                 shared: bool = False):
        super().__init__()
        self.shared = shared
        if shared:
            self.fields = nn.ModuleDict({"all": FieldInputs.of([specs[p] for p in domains], cfg)})
        else:
            self.fields = nn.ModuleDict({p: FieldInputs.of([specs[p]], cfg) for p in domains})
        self.project = nn.ModuleDict({p: nn.Linear(self.fields["all" if shared else p].in_dim, d) for p in domains})

    def forward(self, batch: Batch) -> torch.Tensor:
        fields = self.fields["all" if self.shared else batch.domain]
        return self.project[batch.domain](fields(batch))


def dense_columns(batch: Batch, names: list[str]) -> torch.Tensor:
    """The batch's dense fields ``names`` as ``[B, len(names)]``; a field the batch lacks reads as zero."""
    cols = [batch.dense[:, batch.dense_fields.index(n)] if n in batch.dense_fields
            else batch.label.new_zeros(batch.rows) for n in names]
    return torch.stack(cols, 1) if cols else batch.label.new_zeros(batch.rows, 0)


def tables_with_dim(tables: dict[str, TableSpec], dim: int | None) -> dict[str, TableSpec]:
    return tables if dim is None else {k: replace(t, dim=dim) for k, t in tables.items()}


def dense_fields_of(specs: list[DomainSpec]) -> list[str]:
    names: list[str] = []
    for s in specs:
        names += [f.name for f in s.dense_fields if f.name not in names]
    return names


def embedding_for(specs: list[DomainSpec], fields: list, cfg: ModelConfig) -> Embedding:
    """A collection over ``fields``, with the domains' tables, on the configured backend."""
    return make_embedding(tables_with_dim(merge_tables(specs), cfg.embedding_dim), fields, cfg.embedding_backend)
