"""Joint-training baselines over heterogeneous inputs (CDAnet §5.1.2): Share-Bottom, MMoE, PLE, STAR, CoNet.

Every model trains one objective per domain on mixed source + target batches and is
evaluated on one domain (``eval_domain``, the target by default). Inputs go through
per-domain embedding layers ``H_p`` (CDAnet eq. 1: decoupled, so the domains' schemas may
differ) mapped to a common ``d``; ``shared_embedding: true`` shares one embedding layer
over the union of the fields instead (a field absent from a domain reads as zeros).

* **Share-Bottom** (CDAnet's *ShareMiddle*): a shared MLP after the embedding layers, one
  tower per domain.
* **MMoE** (Ma et al. 2018): shared experts, a gate per domain, a tower per domain.
* **PLE** (Tang et al. 2020): shared and per-domain experts, progressive extraction.
* **CoNet** (Hu et al. 2018; a CCTL Table 2 baseline): one MLP per domain, their layers joined by
  shared cross-connection matrices; a batch runs both and reads its own domain's.
* **STAR** (Sheng et al. 2021): partitioned normalisation, star-topology FC layers
  (shared ⊙ domain weights) down to the logit, plus an auxiliary network on the domain
  indicator.

A tower has ``tower_depth`` layers including the logit layer (CDAnet §5.1.3); it may differ
per domain (``tower_depth: {source: 3, target: 2}``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.layers.experts import PLE, Bottom, CrossConnection, MMoE, PartitionedNorm, StarLinear
from raytrain_ctr.layers.inputs import DomainInputs
from raytrain_ctr.layers.mlp import MLP, tower
from raytrain_ctr.methods.base import Method, Stage, StageContext, StageHooks
from raytrain_ctr.spec import SpecError

DOMAINS = ("source", "target")
JOINT_ARGS: dict[str, Any] = {"d": 64, "experts": 2, "expert_depth": 2, "tower_depth": 2,
                              "shared_embedding": False, "eval_domain": "target"}


def tower_depth(args: dict, domain: str) -> int:
    depth = args["tower_depth"]
    depth = depth.get(domain) if isinstance(depth, dict) else depth
    if not isinstance(depth, int) or depth < 1:
        raise SpecError(f"method_args.tower_depth: {domain}'s tower needs ≥ 1 layer (the logit layer), got {depth}")
    return depth


class Extraction(nn.Module):
    """PLE as a body: the domain's output of the last level."""

    def __init__(self, ple: PLE):
        super().__init__()
        self.ple = ple

    def forward(self, h: torch.Tensor, domain: str) -> torch.Tensor:
        return self.ple(h)[domain]


class Towers(nn.Module):
    """A shared body and one prediction tower per domain."""

    def __init__(self, body: nn.Module, towers: dict[str, nn.Module]):
        super().__init__()
        self.body = body
        self.towers = nn.ModuleDict(towers)

    def forward(self, h: torch.Tensor, domain: str) -> torch.Tensor:
        return self.towers[domain](self.body(h, domain)).squeeze(-1)


class Star(nn.Module):
    """STAR: partitioned normalisation, star-topology FC layers to the logit, and an auxiliary
    network on the domain indicator whose logit is added."""

    def __init__(self, d: int, layers: int, domains: list[str], dropout: float = 0.0):
        super().__init__()
        self.domains = list(domains)
        self.norm = PartitionedNorm(d, domains)
        self.layers = nn.ModuleList(StarLinear(d, d, domains) for _ in range(layers - 1))
        self.out = StarLinear(d, 1, domains)
        self.act = nn.Sequential(nn.ReLU(), nn.Dropout(dropout)) if dropout else nn.ReLU()
        self.indicator = nn.Embedding(len(domains), d)
        self.aux = MLP(2 * d, [d], out_dim=1)

    def forward(self, h: torch.Tensor, domain: str) -> torch.Tensor:
        x = self.norm(h, domain)
        for layer in self.layers:
            x = self.act(layer(x, domain))
        ind = self.indicator.weight[self.domains.index(domain)].expand(h.shape[0], -1)
        return (self.out(x, domain) + self.aux(torch.cat([ind, h], -1))).squeeze(-1)


class JointModel(nn.Module):
    """Per-domain inputs ``H_p`` and a multi-domain network: the logit of a batch of its domain."""

    def __init__(self, inputs: DomainInputs, network: nn.Module):
        super().__init__()
        self.inputs, self.network = inputs, network

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.network(self.inputs(batch), batch.domain)


class JointHooks(StageHooks):
    """Per-domain inputs ``H_p`` (or one shared layer) and the method's multi-domain ``network``."""

    def __init__(self, args: dict, network: Callable[[int, float], nn.Module]):
        self.args, self.network = args, network

    def build(self, ctx: StageContext) -> nn.Module:
        a = self.args
        inputs = DomainInputs(ctx.specs, list(DOMAINS), ctx.model_cfg, a["d"], a["shared_embedding"])
        return JointModel(inputs, self.network(a["d"], ctx.model_cfg.dropout))


class Joint(Method):
    """One stage on source + target together, evaluated on ``eval_domain``."""

    arg_defaults = JOINT_ARGS
    baseline = True
    # the architecture, which CDAnet §5.1.3 grid-searches for every model
    search_space = {"d": {"choice": [32, 64, 128]}, "expert_depth": {"choice": [1, 2, 3]},
                    "tower_depth": {"choice": [1, 2, 3]}}

    @property
    def stages(self) -> list[Stage]:
        if self.args["eval_domain"] not in DOMAINS:
            raise SpecError(f"method_args.eval_domain: '{self.args['eval_domain']}' is not one of {list(DOMAINS)}")
        return [Stage("joint", DOMAINS, eval_domain=self.args["eval_domain"],
                      hooks=JointHooks(self.args, self.network))]

    @abstractmethod
    def network(self, d: int, dropout: float) -> nn.Module:
        """The multi-domain network on ``h_p`` ∈ R^d: the logit of a batch of its domain."""

    def towers(self, d: int, dropout: float) -> dict[str, nn.Module]:
        return {p: tower(d, d, tower_depth(self.args, p), dropout) for p in DOMAINS}


class ShareBottom(Joint):
    name = "share_bottom"
    description = "joint: per-domain embeddings, a shared bottom MLP, a tower per domain (ShareMiddle)"

    def network(self, d: int, dropout: float) -> nn.Module:
        return Towers(Bottom(d, self.args["expert_depth"], dropout), self.towers(d, dropout))


class MMoENet(Joint):
    name = "mmoe"
    description = "joint: per-domain embeddings, shared experts with a gate per domain, a tower per domain"
    search_space = {**Joint.search_space, "experts": {"choice": [1, 2, 4, 8]}}

    def network(self, d: int, dropout: float) -> nn.Module:
        a = self.args
        return Towers(MMoE(d, d, a["experts"], a["expert_depth"], list(DOMAINS), dropout), self.towers(d, dropout))


class PLENet(Joint):
    name = "ple"
    description = "joint: per-domain embeddings, shared and per-domain experts (progressive extraction)"
    arg_defaults = {**JOINT_ARGS, "specific_experts": 1, "levels": 2}
    search_space = MMoENet.search_space

    def network(self, d: int, dropout: float) -> nn.Module:
        a = self.args
        ple = PLE(d, d, list(DOMAINS), shared=a["experts"], specific=a["specific_experts"], depth=a["expert_depth"],
                  levels=a["levels"], dropout=dropout)
        return Towers(Extraction(ple), self.towers(d, dropout))


class STAR(Joint):
    name = "star"
    description = "joint: per-domain embeddings, partitioned norm, star-topology FC (shared ⊙ domain weights)"

    def network(self, d: int, dropout: float) -> nn.Module:
        depths = {tower_depth(self.args, p) for p in DOMAINS}
        if len(depths) > 1:
            raise SpecError("method 'star': its star-topology layers have one shape for every domain; "
                            "method_args.tower_depth must be one number")
        return Star(d, self.args["expert_depth"] + depths.pop(), list(DOMAINS), dropout)


class CoNet(Joint):
    name = "conet"
    description = "joint: per-domain embeddings, two domain MLPs joined by cross-connection units (CoNet)"

    def network(self, d: int, dropout: float) -> nn.Module:
        return Towers(CrossConnection(d, self.args["expert_depth"], list(DOMAINS), dropout), self.towers(d, dropout))
