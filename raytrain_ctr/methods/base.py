"""Stages and methods: what a method declares, and what the training loop asks of each stage.

A :class:`Method` is an ordered list of :class:`Stage` s. A stage says which domains it trains
on and which it evaluates, its named upstream :class:`Input` s (which stage, which tensors, under
which prefix of this stage's model), what it freezes, its data :class:`Window` relative to the
run's ``as_of`` date, its training budget overrides, and its :class:`StageHooks`: the stage's
whole behaviour, read in one place.

    class FineTune(Method):
        name = "finetune"

        @property
        def stages(self):
            return [Stage("pretrain", ("source",), plain=True),
                    Stage("finetune", ("target",), inputs={"pretrain": Input("pretrain")},
                          hooks=L2SPHooks(alpha=1e-3))]

The loop's contract with the hooks: ``build`` the model; the inputs are loaded and the ``freeze``
patterns applied; ``prepare``; ``param_groups`` declares parameters the main loss never reaches
(they are updated by ``ctx.update(group, loss)`` only); each step minimises ``loss`` (summed over
the step's rows, per-row ``weights`` allowed; the loop divides by the step's global row count and
sums gradients over workers) plus ``penalty``, then calls ``after_step``; ``logits`` serve
evaluation; after the test split ``artifacts`` adds files, and ``export`` names the module that
serving loads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.models.backbones import ModelConfig, build_model
from raytrain_ctr.spec import DomainSpec, SpecError
from raytrain_ctr.train.step import GroupOptimizer, ParamGroup, without_grad
from raytrain_ctr.windows import UNITS, Window


@dataclass(frozen=True)
class Input:
    """Tensors a stage loads from the artifact of an upstream stage.

    ``include``/``exclude`` are globs over the upstream's ``state_dict`` keys; a key loses the
    prefix ``strip`` and gains ``into`` (MKT's TEM loads a whole MEM under ``mem.``); tensors of
    this model's modules whose class name matches ``exclude_modules`` stay as built (E-CDCTR's
    A-CTR re-initialises every ``*BatchNorm*``). ``latest``: the newest artifact of that stage
    valid as of the run's ``as_of`` date, from the artifact catalog (a daily job reading last
    week's model), instead of the one this run's own config makes. ``include=()`` loads nothing
    (the hooks read the state from ``ctx.inputs``).
    """

    stage: str
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    exclude_modules: tuple[str, ...] = ()
    strip: str = ""
    into: str = ""
    latest: bool = False


def bce(logit: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``BCE(σ(logit), y)`` summed over rows, each row weighted by ``weight`` if given."""
    return F.binary_cross_entropy_with_logits(logit, label, weight=weight, reduction="sum")


@dataclass
class StageContext:
    """What a stage's hooks may read: the stage, its config, the loaded inputs, the step count,
    and the stage's parameter groups (``update``)."""

    stage: Stage
    specs: dict[str, DomainSpec]
    model_cfg: ModelConfig
    args: dict[str, Any]
    inputs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # upstream states by input name
    step: int = 0  # optimisation steps of this stage so far: the same on every worker; resumes with the stage
    groups: dict[str, GroupOptimizer] = field(default_factory=dict)

    def update(self, group: str, loss: torch.Tensor) -> None:
        """One step of parameter group ``group`` on ``loss`` by its own optimizer and sync rule.
        Every worker calls it at the same step (a collective when the group syncs)."""
        self.groups[group].step(loss)

    def group_parameter_ids(self) -> set[int]:
        return {id(p) for g in self.groups.values() for p in g.group.params}

    @contextmanager
    def main_loss(self) -> Iterator[None]:
        """The main loss is built with the groups' parameters left out: no gradient reaches them."""
        with without_grad([p for g in self.groups.values() for p in g.group.params]):
            yield

    def dry_build(self) -> nn.Module:
        """The stage's model on the ``meta`` device: shapes only, no memory for (possibly huge) tables."""
        with torch.device("meta"):
            return self.stage.hooks.build(self)


class StageHooks:
    """A stage's behaviour. The defaults: one backbone over the fields of every domain (the union
    of their fields), binary cross-entropy, no penalty, no extra files; serving loads the model."""

    def build(self, ctx: StageContext) -> nn.Module:
        return build_model(list(ctx.specs.values()), ctx.model_cfg)

    def prepare(self, model: nn.Module, ctx: StageContext) -> None:
        """Once, after the inputs are loaded and the freeze patterns applied."""

    def param_groups(self, model: nn.Module, ctx: StageContext) -> list[ParamGroup]:
        """Parameters outside the main loss, each group with its own optimizer and sync rule."""
        return []

    def logits(self, model: nn.Module, batch: Batch, ctx: StageContext) -> torch.Tensor:
        return model(batch)

    def weights(self, model: nn.Module, batch: Batch, ctx: StageContext) -> torch.Tensor | None:
        """Per-row weights of a batch's loss (None: every row 1)."""
        return None

    def loss(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> torch.Tensor:
        """Sum of per-row losses over the step's batches (the loop divides by the global row count)."""
        total = torch.zeros(())
        for batch in batches.values():
            total = total + bce(self.logits(model, batch, ctx), batch.label, self.weights(model, batch, ctx))
        return total

    def penalty(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> torch.Tensor | None:
        """A per-step term added once to the mean loss (None for none)."""
        return None

    def after_step(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> None:
        """After the optimizers stepped (``ctx.step`` counts this step); every worker calls it at
        every step, with its batches of the step (maybe none)."""

    def epoch_metrics(self, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        """Diagnostics logged with each epoch's metrics, right after the eval domain's validation
        evaluation (every worker calls it; collectives allowed)."""
        return {}

    def artifacts(self, model: nn.Module, ctx: StageContext) -> dict[str, Any]:
        """Extra files for the stage's artifact, made right after the test evaluation (every
        worker calls it; rank 0's are written). ``*.json`` → JSON, ``bytes`` → raw."""
        return {}

    def export(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        """The module a serving system loads (CCTL: the pure tower only), in eval mode: its
        ``forward(batch)`` is ``logits(model, batch, ctx)`` for rows of the stage's eval domain.
        ``raytrain-ctr export`` turns it into a ``torch.export`` program (``raytrain_ctr.serving``)."""
        return model


@dataclass(frozen=True)
class Stage:
    name: str
    train_domains: tuple[str, ...]
    eval_domain: str = "target"
    inputs: dict[str, Input] = field(default_factory=dict)
    freeze: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)  # train-config keys for this stage
    plain: bool = False  # plain supervised training: same artifact whichever method declares it
    window: Window | None = None  # the train splits' rows, relative to the run's as_of
    eval_window: Window | None = None  # the valid/test splits' rows, relative to the run's as_of
    keep_last: int | None = None  # artifacts of this stage kept in the catalog (older ones pruned)
    every: str | None = None  # its job's cadence: "day", "week" (Mondays) or "month" (the 1st); see cadence.py
    transient: bool = False  # an intermediate artifact: deleted once the stages reading it have theirs, and not
    #                          trained again while they do (E-CDCTR's warm-up months)
    args: tuple[str, ...] | None = None  # the method arguments that shape this stage (None: all); its key
    #                                      hashes only these, so variants differing elsewhere share it
    diagnostics: tuple[str, ...] = ()  # train-split columns handed to the hooks in ``batch.extra`` where the
    #                                    data has them (ground truth such as ``is_noise``), never features
    hooks: StageHooks = field(default_factory=StageHooks, compare=False)

    def __post_init__(self) -> None:
        if self.every is not None and self.every not in UNITS:
            raise SpecError(f"stage '{self.name}': every '{self.every}' is not one of {list(UNITS)}")

    @property
    def job(self) -> str:
        """The job the stage belongs to: its name up to the first dot (``tpm.m3`` → ``tpm``)."""
        return self.name.split(".")[0]

    @property
    def identity(self) -> list[str]:
        """What a checkpoint's ``origin.json`` names the stage by: its name, training domains and eval domain."""
        return [self.name, *self.train_domains, self.eval_domain]

    @property
    def init_from(self) -> str | None:
        """The upstream stage of the first input (None without inputs)."""
        return next((i.stage for i in self.inputs.values()), None)

    @property
    def load_include(self) -> tuple[str, ...]:
        """What the first input loads (``()`` without inputs)."""
        return next((i.include for i in self.inputs.values()), ())


class Method(ABC):
    """A method: its name, its arguments and their defaults, its ``stages``, and the search space of
    its arguments (what its paper tunes or studies; ``raytrain_ctr.tune`` adds the keys every method shares)."""

    name: str = ""
    description: str = ""
    arg_defaults: dict[str, Any] = {}
    # argument → distribution, in the search-space YAML's form: {loguniform: [lo, hi]}, {choice: [...]}, …
    search_space: dict[str, Any] = {}
    # argument → the values its paper's sensitivity figure sweeps (raytrain-ctr sensitivity)
    studied: dict[str, list] = {}
    baseline: bool = False  # one of the baselines the papers compare against (a benchmark tests each method
    #                         against the best of them)

    def __init__(self, **args: Any):
        self.args = {**self.arg_defaults, **args}

    @property
    @abstractmethod
    def stages(self) -> list[Stage]:
        """The stages in order; resolving them checks the arguments' values."""

    def job(self, name: str) -> list[Stage]:
        """The stages a job runs: the stage ``name``, or every stage ``name.*`` (E-CDCTR's monthly
        ``tpm`` job runs ``tpm.m6`` … ``tpm.m1``)."""
        found = [s for s in self.stages if name in (s.name, s.job)]
        if not found:
            jobs = list(dict.fromkeys(s.job for s in self.stages))
            raise SpecError(f"method '{self.name}' has no stage or job '{name}' (jobs: {jobs})")
        return found

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise SpecError(f"method '{self.name}' has no stage '{name}' (stages: {[s.name for s in self.stages]})")
