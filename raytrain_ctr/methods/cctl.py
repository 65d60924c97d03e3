"""CCTL (Zhang et al., KDD 2023; cctl.txt §2): a symmetric companion network, an information flow
network that weighs each source sample, and a representation enhancement network.

**SCN** (§2.3). Two towers of the same shape (§2.3.4): the *mixed* tower reads source and target
batches, ``Loss_mixed = Σ_s p_i·L(y_i, f(x_i; Θ_mixed)) + Σ_t L(y_i, f(x_i; Θ_mixed))`` (eq. 3);
the *pure* tower reads the same target batch, ``Loss_pure = Σ_t L(y_i, f(x_i; Θ_pure))`` (eq. 4).
The reward of a step is ``r = Loss_pure − Loss_tgt`` on its target rows (eq. 5; here per target
row, summed over workers). Every ``k`` steps the mixed tower's parameters, its tables included,
are copied into the pure tower (§2.3.5); both start equal.

**IFN** (§2.4). The source sample's semantic tokens (user, item, context: the spec's ``group`` s,
eq. 6) are mapped to the target's token sizes by the SAN, an MLP per token (eq. 7; identity where
a token has the same fields in both domains). The selector MLP ends in a sigmoid, ``p_i`` (eq. 8),
read on the aligned source vector; it gets no gradient from the towers' loss. Every ``n`` steps it
takes one REINFORCE step (eq. 9), ``Θ_ifn ← Θ_ifn + α·(1/N)·Σ_i ∇ log p_i · r^accu``, over the
source rows of the window (by Adam at the learning rate ``α·selector_lr``: α sizes the step, as in
eq. 9, where a factor on the loss would vanish in Adam's normalisation; α = 0 leaves the selector
at its start), each step's rows credited with the discounted reward that followed
them, ``r^accu_k = r_{k+1} + γ·r_{k+2} + …`` (a step's reward measures the updates before it).

``policy: sample`` is an option beyond the paper: each source row is selected with probability
``p_i`` (weight 1 or 0 in eq. 3) and REINFORCE scores the action taken, ``log p_i`` or
``log(1 − p_i)``, against the window's mean return as a baseline. As written (``weight``), every
row of a step shares one reward and eq. 9 moves every ``p_i`` the same way; sampling gives the
rows of a step different credit, the usual way a data selector is trained by policy gradient.

``reward: row`` is a second option beyond the paper: eq. 9's sum with a reward per source row in
place of the step's ``r^accu``: ``r_i = −L(y_i, f(x_i; Θ_pure))``, the row's loss under the pure
tower (the tower that has learnt from the target alone: SCN as the judge of single rows), scored
against the window's mean. As written, eq. 5 gives a step one scalar and the expected update moves
every ``p_i`` the same way (``E[∇] = E[r]·Σ_i ∇ log p_i``): the selector can tell rows apart only
through how a step's reward co-varies with its mix of rows, a signal far below the reward's noise
here (README, CCTL results). A first-order per-row reward (the row's prediction-layer gradient
projected on the target batch's) was tried and dropped: its sign followed the row's label, not its
noise.

**REN** (§2.5). Each domain has its own id tables (the id fields' tables, read by the ids and the
behaviour sequences: the dual embedding); the other fields of the source share the mixed tower's
tables, and fields only the source has get tables of their own (``ren: false`` drops the dual
embedding with the loss: the source then shares the id tables too). ``Loss_ren = sim(v_id^s, v_id^t) −
sim(v_seq^s, v_seq^t)`` (eqs. 10–12, cosine, eq. 11) over the id fields and the mean-pooled
behaviour sequences both domains have, per row of both batches, weighted by ``ren_weight``. The paper
pairs one user's two sequences, one per domain; here a row's own sequence is read through both
domains' tables (the same ids), since users need not occur in both domains (on MovieLens male →
female none do). ``ren_weight: 0`` keeps the dual tables without the loss, apart from ``ren: false``.

**Serving** (§3.4): the pure tower alone (``export``), with Target-only's interface; it is also
what the stage evaluates. The ablations of Table 3 are ``ifn: false`` (every source row weighted 1,
no selector) and ``ren: false``; α is Figure 5(b)'s sensitivity. The stage's artifact holds
``selector.json`` and ``selector.png`` (Figure 5(a)): the selector's weights over training, on
noisy and clean source rows apart where the data has the generator's ``is_noise`` column.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.layers.inputs import FieldInputs, dense_fields_of, embedding_for, tables_with_dim
from raytrain_ctr.layers.mlp import MLP
from raytrain_ctr.methods.base import Method, Stage, StageContext, StageHooks
from raytrain_ctr.methods.baselines import id_fields
from raytrain_ctr.models.backbones import Backbone, ModelConfig
from raytrain_ctr.spec import GROUPS, DomainSpec, SpecError
from raytrain_ctr.train.step import DiscountedReturn, ParamGroup, copy_parameters
from raytrain_ctr.train.sync import all_reduce_sum

SWITCHES = ("ifn", "ren")
POLICIES = ("weight", "sample")  # eq. 9 as written; or Bernoulli selection (see the module docstring)
REWARDS = ("batch", "row")  # eq. 5's r^accu a step, as written; or a reward per source row (beyond the paper)
BINS = 20  # the selector-weight histogram of Figure 5(a)


class Tokens(nn.Module):
    """A domain's semantic tokens (§2.4.1): per group (user, item, context), its fields' embeddings
    and dense values concatenated (eqs. 2, 6). The tables of ``own`` fields (default: all) are this
    module's; the other fields are read from a ``shared`` embedding layer passed to ``forward``."""

    def __init__(self, spec: DomainSpec, cfg: ModelConfig, own: list[str] | None = None):
        super().__init__()
        sparse = [f for f in spec.sparse_fields if own is None or f.name in own]
        self.inputs = FieldInputs(embedding_for([spec], sparse, cfg), dense_fields_of([spec]))
        tables = tables_with_dim(spec.tables, cfg.embedding_dim)
        pooled = [f for f in spec.sparse_fields if f.is_pooled]
        self.dim = {f.name: tables[f.table].dim for f in pooled}
        self.pooled = {g: [f.name for f in pooled if f.group == g] for g in GROUPS}
        group = {f.name: f.group for f in spec.fields}
        self.dense = {g: [i for i, n in enumerate(self.inputs.dense_fields) if group[n] == g] for g in GROUPS}
        self.dims = {g: sum(self.dim[n] for n in self.pooled[g]) + len(self.dense[g]) for g in GROUPS}

    def fields(self, g: str) -> list[str]:
        return self.pooled[g] + [self.inputs.dense_fields[i] for i in self.dense[g]]

    def forward(self, batch: Batch, shared: nn.Module | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(tokens by group, the field embeddings by name: this module's, else ``shared``'s)."""
        emb = self.inputs.embedding(batch)
        if shared is not None:
            emb = {**shared(batch), **emb}
        dense = self.inputs.dense(batch)
        tokens = {g: torch.cat([*(emb[n] for n in self.pooled[g]), dense[:, self.dense[g]]], -1) for g in GROUPS}
        return tokens, emb


class Tower(nn.Module):
    """The network ``f`` of a tower: target tokens → the configured backbone → the logit. The mixed and
    the pure tower are two of these; the pure one is what serving loads (Target-only's interface)."""

    def __init__(self, spec: DomainSpec, cfg: ModelConfig):
        super().__init__()
        self.tokens = Tokens(spec, cfg)
        self.backbone = Backbone(cfg, sum(self.tokens.dims.values()))

    def head(self, v: torch.Tensor) -> torch.Tensor:
        return self.backbone(v)

    def forward(self, batch: Batch) -> torch.Tensor:
        tokens, _ = self.tokens(batch)
        return self.head(torch.cat([tokens[g] for g in GROUPS], -1))


class SAN(nn.Module):
    """The semantic-align network (eq. 7): per token, an MLP from the source's size to the target's,
    or the identity where both domains' token has the same fields."""

    def __init__(self, source: Tokens, target: Tokens):
        super().__init__()
        self.align = nn.ModuleDict({g: nn.Identity() if (source.fields(g), source.dims[g]) == (target.fields(g),
                                                                                            target.dims[g]) else
                                    MLP(source.dims[g], [target.dims[g]], out_dim=target.dims[g])
                                    for g in GROUPS if target.dims[g]})

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.align[g](tokens[g]) for g in GROUPS if g in self.align], -1)


class CCTLModel(nn.Module):
    """SCN's mixed and pure towers, the source domain's tokens (its own id tables and the fields the
    target lacks; the other fields read the mixed tower's tables), SAN, and the selector."""

    def __init__(self, mixed: Tower, pure: Tower, source: Tokens, selector_hidden: int):
        super().__init__()
        self.mixed, self.pure, self.source = mixed, pure, source
        self.san = SAN(source, mixed.tokens)
        width = sum(mixed.tokens.dims.values())
        self.selector = MLP(width, [selector_hidden], out_dim=1)

    def aligned(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A source batch's aligned vector (eq. 7) and its embeddings by field."""
        tokens, emb = self.source(batch, shared=self.mixed.tokens.inputs.embedding)
        return self.san(tokens), emb

    def weight(self, v: torch.Tensor) -> torch.Tensor:
        """``p_i`` (eq. 8), read on the aligned source vector (no gradient reaches the towers)."""
        return torch.sigmoid(self.selector(v.detach())).squeeze(-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.pure(batch)


def bce_rows(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logit, label, reduction="none")


def shared_fields(specs: dict[str, DomainSpec], kind: str) -> list[str]:
    """Fields both domains have: the user/item id fields (``kind='id'``: each group's categorical field
    with the largest table) or the sequence fields (``kind='seq'``)."""
    both = [f for f in specs["target"].sparse_fields if f.name in {g.name for g in specs["source"].sparse_fields}]
    if kind == "seq":
        return [f.name for f in both if f.type == "sequence"]
    return [f.name for f in id_fields(both, specs["target"].tables)]


def own_fields(specs: dict[str, DomainSpec], dual: bool = True) -> list[str]:
    """The source fields with tables of their own: those the target lacks, and with REN's dual
    embedding (§2.5, ``dual``) those reading the id fields' tables (the ids and the behaviour
    sequences over them). The others share the mixed tower's tables, so the source rows train them."""
    target = {f.name: f.table for f in specs["target"].sparse_fields}
    id_tables = {specs["source"].field(n).table for n in shared_fields(specs, "id")} if dual else set()
    return [f.name for f in specs["source"].sparse_fields if f.table in id_tables or target.get(f.name) != f.table]


class CCTLHooks(StageHooks):
    """The CCTL stage: SCN losses and reward, IFN's REINFORCE window, REN, the k-step sync."""

    def __init__(self, args: dict):
        self.args = args

    def build(self, ctx: StageContext) -> nn.Module:
        cfg, a = ctx.model_cfg, self.args
        if cfg.backbone == "deepfm":
            raise SpecError("method 'cctl': its towers read token vectors; use backbone dnn, dcn or dcnv2")
        if a["ren"] and not (shared_fields(ctx.specs, "id") and shared_fields(ctx.specs, "seq")):
            raise SpecError("method 'cctl': REN needs an id field and a sequence field in both domains "
                            "(set method_args.ren: false)")
        source, target = ctx.specs["source"], ctx.specs["target"]
        own = own_fields(ctx.specs, dual=bool(a["ren"]))
        return CCTLModel(Tower(target, cfg), Tower(target, cfg), Tokens(source, cfg, own), int(a["selector_hidden"]))

    def prepare(self, model: nn.Module, ctx: StageContext) -> None:
        """The towers start equal (§2.3.4: they differ only by the source rows); the step state starts
        empty (in each worker: what the driver sent is read-only)."""
        copy_parameters(model.mixed, model.pure)
        self.id_fields, self.seq_fields = shared_fields(ctx.specs, "id"), shared_fields(ctx.specs, "seq")
        self.window: list[tuple | None] = []  # per step of the window: the selector's inputs (and sampled actions)
        self.rewards: list[float] = []  # per step of the window: its r (eq. 5)
        self.step_losses, self.step_source = (0.0, 0.0, 0), None
        self.trace: list[dict[str, Any]] = []  # per selector update: weight histograms (Figure 5(a))
        self.counts = np.zeros((2, BINS))  # rows per weight bin since the last update: clean, noise

    def param_groups(self, model: nn.Module, ctx: StageContext) -> list[ParamGroup]:
        if not self.args["ifn"]:
            return []
        lr = float(self.args["alpha"]) * float(self.args["selector_lr"])  # eq. 9's α: the step's size
        return [ParamGroup("selector", list(model.selector.parameters()), lambda ps: torch.optim.Adam(ps, lr=lr))]

    def logits(self, model: nn.Module, batch: Batch, ctx: StageContext) -> torch.Tensor:
        return model.pure(batch)

    def export(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        return model.pure

    def loss(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> torch.Tensor:
        total, a = torch.zeros(()), self.args
        target, source = batches.get("target"), batches.get("source")
        target_emb = source_emb = None
        if target is not None:
            tokens, target_emb = model.mixed.tokens(target)
            tgt = bce_rows(model.mixed.head(torch.cat([tokens[g] for g in GROUPS], -1)), target.label)  # eq. 3, target
            pure = bce_rows(model.pure(target), target.label)  # eq. 4
            total = total + tgt.sum() + pure.sum()
            self.step_losses = (float(pure.detach().sum()), float(tgt.detach().sum()), len(target))
        else:
            self.step_losses = (0.0, 0.0, 0)
        if source is not None:
            v, source_emb = model.aligned(source)
            p = model.weight(v) if a["ifn"] else torch.ones(len(source))
            act = torch.bernoulli(p.detach()) if a["ifn"] and a["policy"] == "sample" else None
            weight = p.detach() if act is None else act
            total = total + (weight * bce_rows(model.mixed.head(v), source.label)).sum()  # eq. 3, source
            self.step_source = (v.detach(), act, self.row_rewards(model, v.detach(), source))
            if a["ifn"]:
                self.observe(p.detach(), source.extra.get("is_noise"))
        else:
            self.step_source = None
        if a["ren"]:
            total = total + float(a["ren_weight"]) * self.ren(model, target, target_emb, source, source_emb)
        return total

    def row_rewards(self, model: CCTLModel, v: torch.Tensor, source: Batch) -> torch.Tensor | None:
        """``reward: row``: each source row's ``−L(y_i, f(x_i; Θ_pure))`` (see the module docstring)."""
        if not self.args["ifn"] or self.args["reward"] != "row":
            return None
        with torch.no_grad():
            return -bce_rows(model.pure.head(v), source.label)

    def ren(self, model: CCTLModel, target: Batch | None, target_emb: dict | None, source: Batch | None,
            source_emb: dict | None) -> torch.Tensor:
        """``Σ_rows sim(v_id^s, v_id^t) − sim(v_seq^s, v_seq^t)`` (eq. 12) over both batches' rows:
        each row's ids looked up in both domains' tables."""
        total = torch.zeros(())
        for batch, own, other in ((target, target_emb, model.source), (source, source_emb, model.mixed.tokens)):
            if batch is None or not len(batch):
                continue
            _, theirs = other(batch, shared=model.mixed.tokens.inputs.embedding if other is model.source else None)
            for names, sign in ((self.id_fields, 1.0), (self.seq_fields, -1.0)):
                for n in names:
                    total = total + sign * F.cosine_similarity(own[n], theirs[n], dim=-1).sum()
        return total

    def observe(self, p: torch.Tensor, noise: torch.Tensor | None) -> None:
        """Count the step's source rows per weight bin, noisy and clean apart (Figure 5(a))."""
        kind = noise.long().cpu().numpy() if noise is not None else np.zeros(len(p), dtype=np.int64)
        bins = np.minimum((p.cpu().numpy() * BINS).astype(np.int64), BINS - 1)
        np.add.at(self.counts, (kind, bins), 1)

    def after_step(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> None:
        a = self.args
        pure, tgt, rows = all_reduce_sum(list(self.step_losses))
        self.rewards.append((pure - tgt) / rows if rows else 0.0)  # eq. 5, per target row
        self.window.append(self.step_source if a["ifn"] else None)
        if ctx.step % int(a["k"]) == 0:
            copy_parameters(model.mixed, model.pure)  # §2.3.5
        if a["ifn"] and ctx.step % int(a["n"]) == 0:
            self.reinforce(model, ctx)

    def reinforce(self, model: CCTLModel, ctx: StageContext) -> None:
        """One REINFORCE step of the selector (eq. 9) over the window's steps but its last (whose
        reward has not come yet: it stays in the next window)."""
        a = self.args
        steps, rewards = self.window[:-1], self.rewards[1:]  # step k's rows, rewarded from step k + 1 on
        returns = [0.0] * len(steps)
        accu = DiscountedReturn(float(a["gamma"]))
        for k in reversed(range(len(steps))):  # r^accu_k = r_{k+1} + γ·r^accu_{k+1}
            returns[k] = accu.add(rewards[k])
        if a["policy"] == "sample" and returns:  # REINFORCE with the window's mean return as baseline
            returns = [r - float(np.mean(returns)) for r in returns]
        baseline = 0.0
        if a["reward"] == "row":  # per-row rewards, scored against the window's mean over all workers
            rows = [e[2] for e in steps if e is not None]
            total, count = all_reduce_sum([float(sum(r.sum() for r in rows)), float(sum(len(r) for r in rows))])
            baseline = total / count if count else 0.0
        (n_global,) = all_reduce_sum([sum(len(e[0]) for e in steps if e is not None)])
        loss = torch.zeros(())
        for entry, r in zip(steps, returns):
            if entry is None or not len(entry[0]):
                continue
            v, act, row = entry
            p = model.weight(v).clamp(1e-6, 1 - 1e-6)
            log_pi = torch.log(p) if act is None else act * torch.log(p) + (1 - act) * torch.log(1 - p)
            loss = loss - ((row - baseline if row is not None else r) * log_pi).sum()
        ctx.update("selector", loss / max(n_global, 1.0))  # stepped at α·selector_lr (param_groups)
        self.window, self.rewards = self.window[-1:], self.rewards[-1:]
        totals = all_reduce_sum(self.counts.reshape(-1).tolist())
        clean, noise = totals[:BINS], totals[BINS:]
        self.trace.append({"step": ctx.step, "clean": clean, "noise": noise,
                           "reward": float(np.mean(rewards)) if rewards else 0.0})
        self.counts[:] = 0

    def artifacts(self, model: nn.Module, ctx: StageContext) -> dict[str, Any]:
        if not self.args["ifn"] or not self.trace:
            return {}
        report = selector_report(self.trace)
        return {"selector.json": report, "selector.png": selector_figure(report)}


def mean_weight(counts: list[float]) -> float | None:
    n = sum(counts)
    centres = (np.arange(BINS) + 0.5) / BINS
    return float(np.dot(counts, centres) / n) if n else None


def selector_report(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """Per selector update, the mean weight (bin centres) on clean and noisy source rows; and over the
    last quarter of training, the mean weights and histograms (Figure 5(a))."""
    tail = trace[-max(1, len(trace) // 4):]
    last = {kind: [sum(t[kind][b] for t in tail) for b in range(BINS)] for kind in ("clean", "noise")}
    return {"steps": [t["step"] for t in trace], "reward": [t["reward"] for t in trace],
            "mean_clean": [mean_weight(t["clean"]) for t in trace],
            "mean_noise": [mean_weight(t["noise"]) for t in trace],
            "final": {"mean_clean": mean_weight(last["clean"]), "mean_noise": mean_weight(last["noise"]),
                      "rows_clean": int(sum(last["clean"])), "rows_noise": int(sum(last["noise"])),
                      "histogram_clean": last["clean"], "histogram_noise": last["noise"]}}


def selector_figure(report: dict[str, Any]) -> bytes:
    """Figure 5(a): the selector's weights over training, clean and noisy source rows apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for kind, colour in (("clean", "tab:blue"), ("noise", "tab:red")):
        means = [(s, m) for s, m in zip(report["steps"], report[f"mean_{kind}"]) if m is not None]
        if means:
            ax1.plot(*zip(*means), color=colour, label=f"{kind} source rows")
        hist = report["final"][f"histogram_{kind}"]
        if sum(hist):
            ax2.plot((np.arange(BINS) + 0.5) / BINS, np.asarray(hist) / sum(hist), color=colour, label=kind)
    ax1.set_xlabel("step")
    ax1.set_ylabel("mean selector weight p")
    ax1.legend()
    ax2.set_xlabel("selector weight p (last quarter of training)")
    ax2.set_ylabel("share of rows")
    ax2.legend()
    fig.suptitle("CCTL selector (Figure 5(a))")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


class CCTL(Method):
    name = "cctl"
    description = "symmetric companion towers, a REINFORCE-trained source-sample selector, contrastive REN"
    arg_defaults: dict[str, Any] = {"alpha": 1.0, "gamma": 0.8, "k": 20, "n": 10, "ren_weight": 0.1,
                                    "selector_hidden": 64, "selector_lr": 1e-3, "policy": "weight", "reward": "batch",
                                    **{s: True for s in SWITCHES}}
    # §2 and §3.3: α (eq. 9, Figure 5(b)), γ, the sync period k, the selector period n, REN's weight, the
    # selector's width; the selection policy and the reward (options beyond the paper, above)
    search_space = {"alpha": {"uniform": [0.0, 1.0]}, "gamma": {"uniform": [0.5, 0.99]}, "k": {"choice": [5, 20, 100]},
                    "n": {"choice": [5, 10, 50]}, "ren_weight": {"loguniform": [1e-3, 1.0]},
                    "selector_hidden": {"choice": [16, 64, 256]}, "policy": {"choice": ["weight", "sample"]},
                    "reward": {"choice": ["batch", "row"]}}
    studied = {"alpha": [0.0, 0.25, 0.5, 0.75, 1.0]}  # Figure 5(b): α ∈ [0, 1]

    @property
    def stages(self) -> list[Stage]:
        a = self.args
        for key in ("k", "n"):
            if not isinstance(a[key], int) or a[key] < 1:
                raise SpecError(f"method_args.{key}: a number of steps ≥ 1, got {a[key]!r}")
        if not 0 <= float(a["gamma"]) <= 1:
            raise SpecError(f"method_args.gamma: a discount in [0, 1], got {a['gamma']}")
        if a["policy"] not in POLICIES:
            raise SpecError(f"method_args.policy: '{a['policy']}' is not one of {list(POLICIES)}")
        if a["reward"] not in REWARDS:
            raise SpecError(f"method_args.reward: '{a['reward']}' is not one of {list(REWARDS)}")
        return [Stage("cctl", ("source", "target"), hooks=CCTLHooks(dict(a)), diagnostics=("is_noise",))]
