"""Attention over a set or a sequence of vectors, with a mask of which positions are real.

* :class:`SelfAttentionPooling` (E-CDCTR eqs. 2–3): multi-head self-attention over a set of
  vectors (e.g. a user's embeddings of the last three months), then the mean over the set.
* :class:`TargetAttention` (DIN, Zhou et al. 2018; MKT's sequence encoder): each behaviour is
  scored against the target item by a small MLP on ``[e_j, q, e_j − q, e_j ⊙ q]``, and the
  sequence is the score-weighted sum (DIN's raw scores, or softmax-normalised).
* :class:`BehaviourEncoder` (DIN; MKT's ``v_seq``, §3.2.1): every behaviour sequence of a row
  target-attention-pooled against the embedding of the row's item that reads the same table.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.layers.mlp import MLP
from raytrain_ctr.spec import FieldSpec, SpecError


def _full(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()


class SelfAttentionPooling(nn.Module):
    """``e_SA = SelfAttention(e)``, ``e_mean = MeanPooling(e_SA)`` (E-CDCTR eq. 3) over ``e`` [B, N, d]
    (eq. 2: the N vectors stacked). Masked positions are neither attended to nor averaged; a row
    with no real position pools to zeros."""

    def __init__(self, dim: int, heads: int = 1, dropout: float = 0.0):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, e: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _full(e, mask)
        empty = ~mask.any(1)
        attend = mask | empty.unsqueeze(1)  # a row with nothing real attends to all (then zeroed): no NaN
        out, _ = self.attention(e, e, e, key_padding_mask=~attend, need_weights=False)
        weights = mask.to(out.dtype).unsqueeze(-1)
        return (out * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TargetAttention(nn.Module):
    """A behaviour sequence ``e`` [B, L, d] pooled against a target ``q`` [B, d]:
    ``Σ_j a(e_j, q)·e_j`` with ``a`` an MLP on ``[e_j, q, e_j − q, e_j ⊙ q]`` (DIN's activation
    unit). ``softmax=True`` normalises the scores over the real positions (DIN keeps them raw, so
    the sum also carries how much of the history is relevant)."""

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 32), softmax: bool = False):
        super().__init__()
        self.score = MLP(4 * dim, list(hidden), out_dim=1)
        self.softmax = softmax

    def scores(self, e: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``a(e_j, q)`` [B, L]; masked positions 0 (softmax: over the real positions only)."""
        mask = _full(e, mask)
        q = q.unsqueeze(1).expand_as(e)
        s = self.score(torch.cat([e, q, e - q, e * q], -1)).squeeze(-1)
        if self.softmax:
            s = torch.softmax(s.masked_fill(~mask, float("-inf")), 1).nan_to_num(0.0)
        return s * mask.to(s.dtype)

    def forward(self, e: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return (self.scores(e, q, mask).unsqueeze(-1) * e).sum(1)


def behaviour_sequences(fields: list[FieldSpec]) -> list[FieldSpec]:
    """The behaviour sequences among ``fields``: sequences of the user group (a user's clicked items)."""
    return [f for f in fields if f.type == "sequence" and f.group == "user"]


def unpooled(fields: list[FieldSpec]) -> list[FieldSpec]:
    """``fields`` with every behaviour sequence read unpooled (``pooling: none``), for attention."""
    seqs = {f.name for f in behaviour_sequences(fields)}
    return [replace(f, pooling="none") if f.name in seqs else f for f in fields]


def attention_queries(fields: list[FieldSpec]) -> dict[str, str]:
    """Per behaviour sequence, the item field it is attended against: the categorical field of the
    item group that reads the same table (``hist_items`` → ``item_id``)."""
    queries = {}
    for seq in behaviour_sequences(fields):
        items = [f.name for f in fields if f.type == "categorical" and f.group == "item" and f.table == seq.table]
        if not items:
            raise SpecError(f"field '{seq.name}': target attention needs a categorical item field reading table "
                            f"'{seq.table}' (the row's item, the attention's query)")
        queries[seq.name] = items[0]
    return queries


class BehaviourEncoder(nn.Module):
    """Each behaviour sequence ``[B, L, d]`` pooled by :class:`TargetAttention` against its query field's
    embedding ``[B, d]``, concatenated in field order; read from an embedding layer's output that holds
    the sequences unpooled (``pooling: none``)."""

    def __init__(self, queries: dict[str, str], dims: dict[str, int], hidden: tuple[int, ...] = (64, 32),
                 softmax: bool = False):
        super().__init__()
        self.queries = dict(queries)
        self.attention = nn.ModuleDict({s: TargetAttention(dims[s], hidden, softmax) for s in queries})
        self.out_dim = sum(dims[s] for s in queries)

    def forward(self, emb: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        pooled = []
        for seq, query in self.queries.items():
            e, ids = emb[seq], batch.sparse.get(seq)
            mask = ids > 0 if ids is not None else torch.zeros(e.shape[:2], dtype=torch.bool, device=e.device)
            pooled.append(self.attention[seq](e, emb[query], mask))
        return torch.cat(pooled, -1) if pooled else batch.label.new_zeros(batch.rows, 0)
