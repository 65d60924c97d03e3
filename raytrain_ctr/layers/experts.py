"""Multi-domain layers: mixtures of experts (MMoE, PLE) and STAR's star-topology layers.

A sample belongs to one domain; each layer takes the domain's name and routes through
that domain's gate, experts or weights.

* :class:`Bottom`: one MLP for every domain (Share-Bottom; CDAnet's 'w/o MMoE').
* :class:`MMoE` (Ma et al. 2018; CDAnet eqs. 2–4): K shared experts, one softmax gate per
  domain, ``z = Σ_i g^i f^i``.
* :class:`PLE` (Tang et al. 2020): per level, shared experts and domain-specific experts;
  a domain's gate mixes its own and the shared experts, a shared gate mixes them all for
  the next level (progressive extraction). Inputs may differ per domain (MKT's CKE).
* :class:`CrossConnection` (CoNet, Hu et al. 2018): two domains' MLPs joined layer by layer
  through shared cross-connection matrices.
* :class:`StarLinear`, :class:`PartitionedNorm` (Sheng et al. 2021, STAR): a domain's
  weights are the shared weights times its own (``W ⊙ W_p``, ``b + b_p``); normalisation
  keeps statistics per domain and scales by shared times domain parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_ctr.layers.mlp import MLP


def expert(in_dim: int, out_dim: int, depth: int, dropout: float = 0.0) -> MLP:
    """An expert: a ``depth``-layer non-linear MLP ``R^in → R^out`` (CDAnet §4.2.2)."""
    return MLP(in_dim, [out_dim] * depth, dropout=dropout)


class Bottom(nn.Module):
    """A shared MLP (Share-Bottom; CDAnet's 'w/o MMoE' extractor): the same for every domain."""

    def __init__(self, d: int, depth: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = expert(d, d, depth, dropout)

    def forward(self, h: torch.Tensor, domain: str) -> torch.Tensor:
        return self.mlp(h)


class MMoE(nn.Module):
    """Shared experts ``F_i`` and one gate per domain (CDAnet eqs. 2–4).

    ``g_p = softmax(W_p^gate G_p(h))`` with ``G_p`` an MLP of ``depth`` layers ``R^d → R^d``
    (eq. 3); ``z = Σ_i g_p^i F_i(h)`` (eq. 4).
    """

    def __init__(self, in_dim: int, out_dim: int, experts: int, depth: int, domains: list[str],
                 dropout: float = 0.0):
        super().__init__()
        self.experts = nn.ModuleList(expert(in_dim, out_dim, depth, dropout) for _ in range(experts))
        self.gates = nn.ModuleDict({d: nn.Sequential(MLP(in_dim, [in_dim] * depth), nn.Linear(in_dim, experts,
                                                                                               bias=False))
                                    for d in domains})
        self.out_dim = out_dim

    def gate(self, h: torch.Tensor, domain: str) -> torch.Tensor:
        """``g_p`` [B, K] (eq. 3)."""
        return torch.softmax(self.gates[domain](h), dim=-1)

    def forward(self, h: torch.Tensor, domain: str) -> torch.Tensor:
        f = torch.stack([e(h) for e in self.experts], dim=1)  # [B, K, d] (eq. 2)
        return (self.gate(h, domain).unsqueeze(-1) * f).sum(1)  # eq. 4


class ExtractionLevel(nn.Module):
    """One level of PLE (a customised gate control): shared and per-domain experts and gates. A level
    may keep only some domains' gates (``outputs``: the domains whose output is read on) and specific
    experts (``experts``; every domain's where a shared gate mixes them for the next level)."""

    def __init__(self, in_dim: int, out_dim: int, domains: list[str], shared: int, specific: int, depth: int,
                 last: bool, dropout: float = 0.0, outputs: list[str] | None = None,
                 experts: list[str] | None = None):
        super().__init__()
        self.outputs = list(outputs or domains)
        self.experts = list(domains) if not last else list(experts or domains)
        self.shared = nn.ModuleList(expert(in_dim, out_dim, depth, dropout) for _ in range(shared))
        self.specific = nn.ModuleDict({d: nn.ModuleList(expert(in_dim, out_dim, depth, dropout)
                                                        for _ in range(specific)) for d in self.experts})
        self.gates = nn.ModuleDict({d: nn.Linear(in_dim, specific + shared) for d in self.outputs})
        self.shared_gate = None if last else nn.Linear(in_dim, shared + specific * len(domains))

    def forward(self, xs: dict[str, torch.Tensor], x_shared: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        shared = [e(x_shared) for e in self.shared]
        specific = {d: [e(xs[d]) for e in self.specific[d]] for d in self.experts}
        out = {}
        for d in self.outputs:
            f = torch.stack(specific[d] + shared, dim=1)
            out[d] = (torch.softmax(self.gates[d](xs[d]), -1).unsqueeze(-1) * f).sum(1)
        if self.shared_gate is None:
            return out, None
        f = torch.stack(shared + [e for d in self.experts for e in specific[d]], dim=1)
        return out, (torch.softmax(self.shared_gate(x_shared), -1).unsqueeze(-1) * f).sum(1)


class PLE(nn.Module):
    """Progressive layered extraction over ``levels`` levels; returns each domain's output. With
    ``outputs`` it computes those domains' alone and holds only what they read (serving one domain):
    the last level keeps the shared experts and theirs, and the last two levels only their gates; the
    levels below keep every domain's experts, which the shared gates mix for the next level."""

    def __init__(self, in_dim: int, out_dim: int, domains: list[str], shared: int = 1, specific: int = 1,
                 depth: int = 1, levels: int = 2, dropout: float = 0.0, outputs: list[str] | None = None):
        super().__init__()
        self.domains = list(domains)
        self.levels = nn.ModuleList(
            ExtractionLevel(in_dim if i == 0 else out_dim, out_dim, domains, shared, specific, depth,
                            last=i == levels - 1, dropout=dropout, outputs=outputs if i >= levels - 2 else None,
                            experts=outputs) for i in range(levels))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor], shared: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``x``: one input for every domain, or one per domain (then the shared stream starts at
        ``shared``, by default their mean)."""
        xs = x if isinstance(x, dict) else {d: x for d in self.domains}
        x_shared = shared if shared is not None else (x if not isinstance(x, dict)
                                                      else torch.stack(list(xs.values())).mean(0))
        for level in self.levels:
            xs, x_shared = level(xs, x_shared)
        return xs


class StarLinear(nn.Module):
    """``W* = W ⊙ W_p``, ``b* = b + b_p`` (STAR's star-topology FC); a domain's factors start at 1 and 0,
    so every domain starts from the shared layer."""

    def __init__(self, in_dim: int, out_dim: int, domains: list[str]):
        super().__init__()
        self.shared = nn.Linear(in_dim, out_dim)
        self.weight = nn.ParameterDict({d: nn.Parameter(torch.ones(out_dim, in_dim)) for d in domains})
        self.bias = nn.ParameterDict({d: nn.Parameter(torch.zeros(out_dim)) for d in domains})

    def forward(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        return F.linear(x, self.shared.weight * self.weight[domain], self.shared.bias + self.bias[domain])


class PartitionedNorm(nn.Module):
    """STAR's partitioned normalisation: batch statistics per domain (running ones at inference),
    scale ``γ ⊙ γ_p`` and shift ``β + β_p``."""

    def __init__(self, dim: int, domains: list[str], eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.gamma, self.beta = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.gamma_p = nn.ParameterDict({d: nn.Parameter(torch.ones(dim)) for d in domains})
        self.beta_p = nn.ParameterDict({d: nn.Parameter(torch.zeros(dim)) for d in domains})
        for d in domains:
            self.register_buffer(f"running_mean_{d}", torch.zeros(dim))
            self.register_buffer(f"running_var_{d}", torch.ones(dim))

    def forward(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        return F.batch_norm(x, getattr(self, f"running_mean_{domain}"), getattr(self, f"running_var_{domain}"),
                            self.gamma * self.gamma_p[domain], self.beta + self.beta_p[domain],
                            training=self.training and x.shape[0] > 1, momentum=self.momentum, eps=self.eps)


class CrossConnection(nn.Module):
    """CoNet's cross-connection units (Hu et al. 2018) between two domains' networks: one MLP per
    domain whose layers exchange information through shared matrices ``H^l``,
    ``a_p^{l+1} = ReLU(W_p^l a_p^l + H^l a_q^l)``; a batch of domain ``p`` runs both networks on its
    input and reads ``p``'s."""

    def __init__(self, dim: int, depth: int, domains: list[str], dropout: float = 0.0):
        super().__init__()
        if len(domains) != 2:
            raise ValueError(f"cross-connection units join two networks, got domains {domains}")
        self.domains = list(domains)
        self.layers = nn.ModuleDict({d: nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth)) for d in domains})
        self.cross = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(depth))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, h: torch.Tensor, domain: str) -> torch.Tensor:
        p, q = self.domains
        a = {p: h, q: h}
        for l, cross in enumerate(self.cross):
            a = {p: self.dropout(F.relu(self.layers[p][l](a[p]) + cross(a[q]))),
                 q: self.dropout(F.relu(self.layers[q][l](a[q]) + cross(a[p])))}
        return a[domain]
