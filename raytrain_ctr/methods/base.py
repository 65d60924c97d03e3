"""Stages and methods: what a method declares, and what the training loop asks of it.

A :class:`Stage` says which domains it trains on, which it evaluates, what it loads from
which earlier stage (include/exclude patterns over ``state_dict`` keys), what it freezes,
and its training budget overrides. A :class:`Method` is an ordered list of stages plus
the hooks the loop calls: ``build`` (the stage's model), ``prepare`` (after loading and
freezing), ``logits``, ``loss`` (summed over the step's rows, per domain), ``penalty`` (a
per-step regulariser, e.g. L2-SP) and ``artifacts`` (extra files after the test split,
e.g. AutoFT's policy report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_ctr.data.encode import Batch
from raytrain_ctr.models.backbones import ModelConfig, build_model
from raytrain_ctr.spec import DomainSpec, SpecError


@dataclass(frozen=True)
class Stage:
    name: str
    train_domains: tuple[str, ...]
    eval_domain: str = "target"
    init_from: str | None = None
    load_include: tuple[str, ...] = ("*",)
    load_exclude: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)  # train-config keys for this stage
    plain: bool = False  # plain supervised training: same artifact whichever method declares it


@dataclass
class StageContext:
    """What a method's hooks may read: the stage, its config and the upstream model state."""

    stage: Stage
    specs: dict[str, DomainSpec]
    model_cfg: ModelConfig
    args: dict[str, Any]
    upstream: dict[str, torch.Tensor] | None = None


class Method:
    """A method: ``stages`` and the hooks. Subclasses override what differs."""

    name: str = ""
    description: str = ""
    arg_defaults: dict[str, Any] = {}

    def __init__(self, **args: Any):
        self.args = {**self.arg_defaults, **args}

    @property
    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise SpecError(f"method '{self.name}' has no stage '{name}' (stages: {[s.name for s in self.stages]})")

    def build(self, ctx: StageContext) -> nn.Module:
        """The model of a stage: by default one backbone over the fields of every domain."""
        return build_model(list(ctx.specs.values()), ctx.model_cfg)

    def logits(self, model: nn.Module, batch: Batch, ctx: StageContext) -> torch.Tensor:
        return model(batch)

    def loss(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> torch.Tensor:
        """Sum of per-row losses over the step's batches (the loop divides by the global row count)."""
        total = torch.zeros(())
        for batch in batches.values():
            total = total + F.binary_cross_entropy_with_logits(
                self.logits(model, batch, ctx), batch.label, reduction="sum")
        return total

    def penalty(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> torch.Tensor | None:
        """A per-step term added once to the mean loss (None for none)."""
        return None

    def artifacts(self, model: nn.Module, ctx: StageContext) -> dict[str, Any]:
        """Extra files for the stage's artifact, made right after the test evaluation (every
        worker calls it; rank 0's are written). ``*.json`` → JSON, ``bytes`` → raw."""
        return {}

    def prepare(self, model: nn.Module, ctx: StageContext) -> None:
        """Called once after the upstream state is loaded and parameters are frozen."""
