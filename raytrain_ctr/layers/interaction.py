"""Explicit feature interactions: DCN cross layers (v1, v2) and the FM second-order term."""

from __future__ import annotations

import torch
from torch import nn


class CrossLayer(nn.Module):
    """DCN cross layer, ``x_{l+1} = x_0 x_l^T w_c + b_c + x_l`` (AutoFT eq. 5).

    ``x_0 x_l^T w_c`` is computed as ``x_0 · (x_l · w_c)``: O(d), never the d×d outer product.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(dim).normal_(std=dim**-0.5))
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * (x @ self.w).unsqueeze(-1) + self.b + x


class CrossLayerV2(nn.Module):
    """DCN-V2 cross layer, ``x_{l+1} = x_0 ⊙ (W x_l + b) + x_l``."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.normal_(self.linear.weight, std=dim**-0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


def fm_interaction(v: torch.Tensor) -> torch.Tensor:
    """FM second-order term ``sum_{i<j} <v_i, v_j>`` for field embeddings ``v`` [B, F, D] → [B]."""
    s = v.sum(1)
    return 0.5 * (s * s - (v * v).sum(1)).sum(1)
