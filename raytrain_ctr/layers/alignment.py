"""Aligning fields that only one domain has (MKT's entity-specific features, mkt.txt §3.2.2).

* :class:`DenseEmbedding`: a dense value as a vector, ``x·e_f`` with ``e_f`` learned per field, so
  dense fields stack with embedded ones into ``V`` [B, n, d_e].
* :class:`HFA`: heterogeneous feature alignment. Over one entity's specific fields ``v_spec``
  (eq. 3), two explicit cross layers ``v_{l+1} = v_l v_0^T w_l + b_l + v_0`` (eq. 4) and an implicit
  ``ReLU(W v_spec + b)`` (eq. 5) give one importance score per field, ``p = 2·σ(FC([v_ex,2, v_im]))``
  ∈ (0, 2) (eq. 6); the fields ``V`` (eq. 7) are re-weighted, flattened and mapped by ``ReLU(FC(·))``
  to a width shared by every entity (eq. 8).
"""

from __future__ import annotations

import torch
from torch import nn

from raytrain_ctr.layers.interaction import CrossLayer


class DenseEmbedding(nn.Module):
    """``n`` dense values ``[B, n]`` → ``[B, n, d]``: each value times its field's learned vector."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, dim).normal_(std=0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1) * self.weight


class HFA(nn.Module):
    """One entity's ``n`` specific fields ``V`` [B, n, d_e] → its aligned vector [B, ``out_dim``]
    (eqs. 3–8). ``score=False`` drops the importance scores (the 'w/o HFA' ablation, Table 4): the
    fields are only mapped to the common width. An entity without specific fields aligns to zeros."""

    def __init__(self, n: int, d_e: int, out_dim: int, cross_layers: int = 2, score: bool = True):
        super().__init__()
        d = n * d_e
        self.n, self.out_dim = n, out_dim
        self.scored = score and n > 0
        if self.scored:
            self.cross = nn.ModuleList(CrossLayer(d) for _ in range(cross_layers))
            self.implicit = nn.Sequential(nn.Linear(d, d), nn.ReLU())  # eq. 5
            self.score = nn.Linear(2 * d, n)  # eq. 6
        self.align = nn.Sequential(nn.Linear(d, out_dim), nn.ReLU()) if n else None  # eq. 8

    def importance(self, v: torch.Tensor) -> torch.Tensor:
        """``p`` [B, n] ∈ (0, 2) (eq. 6) of the flattened specific vector ``v`` [B, n·d_e]."""
        x = v
        for layer in self.cross:  # eq. 4: CrossLayer(a, b) = a·(b·w) + bias + b, so (v_l, v_0) in this order
            x = layer(x, v)
        return 2 * torch.sigmoid(self.score(torch.cat([x, self.implicit(v)], -1)))

    def forward(self, V: torch.Tensor) -> torch.Tensor:
        if self.align is None:
            return V.new_zeros(V.shape[0], self.out_dim)
        if self.scored:
            V = V * self.importance(V.flatten(1)).unsqueeze(-1)  # Multiply(V, p)
        return self.align(V.flatten(1))  # ReLU(FC(Flatten(·)))
