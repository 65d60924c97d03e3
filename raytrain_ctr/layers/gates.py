"""Gates that decide how much of a transferred representation to let through.

* :class:`GLU` (Dauphin et al. 2017; MKT eqs. 14–15): ``GLU(x) = (W x + b) ⊙ σ(V x + c)``; MKT
  passes each vector plugged in from the frozen pre-trained model through one and adds it to the
  target model's own vector of the same meaning.
* :class:`ScalarGate`: one sigmoid per vector, ``(W x + b)·σ(v·x + c)``, a coarser gate.
* ``linear``: ``W x + b``, no gate (the plug-in without filtering).
"""

from __future__ import annotations

import torch
from torch import nn


class GLU(nn.Module):
    """``(W x + b) ⊙ σ(V x + c)``: a linear map, gated per output unit by the input itself."""

    def __init__(self, in_dim: int, out_dim: int | None = None):
        super().__init__()
        out_dim = out_dim or in_dim
        self.value = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


class ScalarGate(nn.Module):
    """``(W x + b)·σ(v·x + c)``: a linear map, let through as a whole by one gate per row."""

    def __init__(self, in_dim: int, out_dim: int | None = None):
        super().__init__()
        self.value = nn.Linear(in_dim, out_dim or in_dim)
        self.gate = nn.Linear(in_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


GATES = {"glu": GLU, "scalar": ScalarGate, "linear": nn.Linear}


def gate(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """A gate of ``kind`` (one of :data:`GATES`) from ``in_dim`` to ``out_dim``."""
    return GATES[kind](in_dim, out_dim)
