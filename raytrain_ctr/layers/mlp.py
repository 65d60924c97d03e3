"""Multi-layer perceptrons: the deep network of DCN (AutoFT eq. 6) and every tower."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    """``Linear → [BatchNorm] → ReLU → [Dropout]`` per hidden size; ``out_dim`` adds a final Linear."""

    def __init__(self, in_dim: int, hidden: list[int] | tuple[int, ...], out_dim: int | None = None,
                 dropout: float = 0.0, batch_norm: bool = False):
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        super().__init__(*layers)
        self.out_dim = d


class BatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` that normalises a batch of fewer than two rows (a worker's last or empty batch in
    lockstep training) by its running statistics, which it leaves as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class DeepLayer(nn.Module):
    """One deep layer, ``h_{l+1} = ReLU(W_d h_l + b_d)`` (AutoFT eq. 6), with optional BatchNorm
    before the ReLU (E-CDCTR's complete model) and dropout."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = BatchNorm(out_dim) if batch_norm else None
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, h, lateral=None):
        """``lateral``: a term added before the nonlinearity (ProgressiveNN's lateral connection)."""
        h = self.linear(h) if lateral is None else self.linear(h) + lateral
        return self.dropout(self.act(self.norm(h) if self.norm is not None else h))


def tower(in_dim: int, width: int, depth: int, dropout: float = 0.0) -> MLP:
    """A prediction tower ``R``: ``depth`` layers, the last one the logit mapping."""
    return MLP(in_dim, [width] * (depth - 1), out_dim=1, dropout=dropout)
