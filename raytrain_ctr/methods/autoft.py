"""AutoFT (Yang et al., IJCAI 2021) and SpotTune (Guo et al., 2019): per-instance routing between a
frozen pre-trained copy of the backbone and a fine-tuned copy.

Stage 1 ``pretrain`` trains a backbone on the source (Source-only) or on every domain (All).
Stage 2 holds two copies of it (§3.2, Table 1): the frozen pre-trained one (V^S, cross^S,
deep^S) and a trainable one initialised from it (V̂^T, cross^T, deep^T). Lightweight policy
networks (eq. 9) decide, per instance,

* per field, which embedding to read: x̂_i = P_e^(i)(x^S)·V_i^S x_i + (1 − P_e^(i)(x^S))·V̂_i^T x_i (eq. 10),
  the policy reading the pre-trained embedding x^S;
* per cross layer and per deep layer, which copy computes it (eqs. 11, 12), the policies
  reading x̂^T.

The decisions are hard 0/1 in the forward pass and carry the Gumbel-softmax relaxation's
gradient in the backward pass (eqs. 13, 14: straight-through), with temperature τ, optionally
annealed after every step (``after_step``). Inference takes the argmax of the policy logits,
without noise; a tie (eq. 9's outer ReLU clipped both logits) goes to the fine-tuned copy
(``inference_tie``; docs/AUTOFT.md). The prediction layer is always fine-tuned (§3.2); the loss is eq. 8
(cross-entropy; λ‖W‖² is ``train.weight_decay``).

SpotTune is the same with the layer-wise policies only (AutoFT §4.2); the ablations of
AutoFT's Table 4 are ``method_args.policies`` subsets. A component without a policy uses
its fine-tuned copy.

After the test evaluation the stage writes ``policy.json`` and ``policy.png`` (AutoFT
Figure 3): per field and layer, the share of test instances routed to the pre-trained copy.
Every epoch's metrics carry the same shares on the validation split, the share of tied
decisions and τ (``epoch_metrics``): how the policies move over training.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.methods.base import Method, Stage, StageContext, StageHooks
from raytrain_ctr.methods.baselines import frozen_and_fine_tuned
from raytrain_ctr.models.backbones import CTRModel, build_model
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.sync import all_reduce_sum

POLICIES = ("embedding", "cross", "deep")
PRETRAINED = 0  # the Gumbel category of the frozen pre-trained copy; 1 is the fine-tuned one (§3.3)
TIES = ("fine_tuned", "pretrained")  # where inference sends a tied decision


class PolicyNet(nn.Module):
    """Eq. 9: p = G(ReLU(W_p² ReLU(W_p¹ x + b_p¹) + b_p²)), one two-way decision per output.

    With eq. 9's outer ReLU a decision whose two logits are both clipped to 0 is tied: it has no
    gradient, training draws it 50/50 (the Gumbel noise), and inference gives it to the
    fine-tuned copy (a plain argmax would give every tie to the first category, the frozen copy,
    which training never preferred; ``tie="pretrained"`` keeps that, for comparison).
    ``output_relu=False`` drops the outer ReLU ("other structures are possible", §3.2).
    """

    def __init__(self, in_dim: int, hidden: int, decisions: int, output_relu: bool = True, tie: str = "fine_tuned"):
        super().__init__()
        if tie not in TIES:
            raise SpecError(f"method_args.inference_tie: '{tie}' must be one of {list(TIES)}")
        self.decisions, self.tie_to_pretrained = decisions, tie == "pretrained"
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * decisions),
                                 nn.ReLU() if output_relu else nn.Identity())

    def forward(self, x: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, decisions]`` twice: 1 where the instance takes the pre-trained copy, else 0; and
        True where the decision's two logits (log α of eq. 13) are tied."""
        logits = self.net(x).view(x.shape[0], self.decisions, 2)
        return (choose(logits, tau, self.training, self.tie_to_pretrained),
                logits[..., 0] == logits[..., 1])


def choose(logits: torch.Tensor, tau: float, training: bool, tie_to_pretrained: bool = False) -> torch.Tensor:
    """Eq. 13 forward (argmax of log α + Gumbel noise), eq. 14 backward, in training; at inference
    the argmax without noise, a tie going to the fine-tuned copy (or the pre-trained one). 1 where
    the pre-trained copy is taken."""
    if training:
        return F.gumbel_softmax(logits, tau=tau, hard=True)[..., PRETRAINED]
    pre, fine = logits[..., PRETRAINED], logits[..., 1 - PRETRAINED]
    return (pre >= fine if tie_to_pretrained else pre > fine).to(logits.dtype)


def route(p: torch.Tensor, pretrained: torch.Tensor, fine_tuned: torch.Tensor) -> torch.Tensor:
    """``p·pretrained + (1 − p)·fine_tuned`` per instance (eqs. 10–12)."""
    p = p.unsqueeze(-1)
    return p * pretrained + (1 - p) * fine_tuned


def routed_layers(p: torch.Tensor | None, pretrained: nn.ModuleList, fine_tuned: nn.ModuleList) -> list:
    """Layer l of the routed network, p[:, l]·F_l(·) + (1 − p[:, l])·F̂_l(·) (eqs. 11, 12); without a
    policy, the fine-tuned layers."""
    if p is None:
        return list(fine_tuned)
    return [lambda *x, l=l: route(p[:, l], pretrained[l](*x), fine_tuned[l](*x)) for l in range(len(fine_tuned))]


class AutoFTModel(nn.Module):
    """The frozen pre-trained copy ``pre``, the fine-tuned copy ``fine``, and the policy networks."""

    def __init__(self, pre: CTRModel, fine: CTRModel, policies: tuple[str, ...], hidden: int, tau: float,
                 tau_min: float, anneal_rate: float, output_relu: bool = True, tie: str = "fine_tuned"):
        super().__init__()
        self.pre, self.fine = pre, fine
        self.tau, self.tau_min, self.anneal_rate = tau, tau_min, anneal_rate
        sizes = {"embedding": len(fine.pooled_names), "cross": len(fine.backbone.cross),
                 "deep": len(fine.backbone.deep)}
        for name in policies:
            if sizes[name] == 0:
                raise SpecError(f"method_args.policies: '{name}' has nothing to route with backbone "
                                f"'{fine.backbone.cfg.backbone}'")
        self.policy = nn.ModuleDict({name: PolicyNet(fine.in_dim, hidden, sizes[name], output_relu, tie)
                                     for name in policies})
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # τ annealing's steps; resumes with the model
        self.routes: dict[str, torch.Tensor] = {}  # evaluation: decisions for the pre-trained copy, summed
        self.ties: dict[str, torch.Tensor] = {}  # evaluation: decisions whose two logits were equal, summed
        self.routed = 0
        self.recording = True  # evaluation counts the routes (the policy report); serving does not

    @property
    def temperature(self) -> float:
        return max(self.tau_min, self.tau * math.exp(-self.anneal_rate * int(self.step)))

    def train(self, mode: bool = True) -> AutoFTModel:
        if not mode:  # each evaluation counts its own routes
            self.routes, self.ties, self.routed = {}, {}, 0
        return super().train(mode)

    def decide(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if name not in self.policy:
            return None
        p, tied = self.policy[name](x, self.temperature if self.training else 1.0)  # inference takes no τ (no noise)
        if not self.training and self.recording:
            self.routes[name] = self.routes.get(name, 0) + p.detach().sum(0).cpu()
            self.ties[name] = self.ties.get(name, 0) + tied.sum(0).cpu()
        return p

    def forward(self, batch: Batch) -> torch.Tensor:
        names, dense = self.fine.pooled_names, self.fine.dense(batch)
        emb_t = self.fine.embedding(batch)
        fields = [emb_t[n] for n in names]
        if "embedding" in self.policy:  # eq. 10, the policy reading the pre-trained embedding x^S
            emb_s = self.pre.embedding(batch)
            p_e = self.decide("embedding", torch.cat([*(emb_s[n] for n in names), dense], dim=-1))
            fields = [route(p_e[:, i], emb_s[n], x) for i, (n, x) in enumerate(zip(names, fields))]
        x0 = torch.cat([*fields, dense], dim=-1)  # x̂^T
        pre, fine = self.pre.backbone, self.fine.backbone
        cross = routed_layers(self.decide("cross", x0), pre.cross, fine.cross)  # eq. 11
        deep = routed_layers(self.decide("deep", x0), pre.deep, fine.deep)  # eq. 12
        v = torch.stack(fields, 1) if len({t.shape[-1] for t in fields}) == 1 else None
        if not self.training and self.recording:
            self.routed += len(batch)
        return fine(x0, v, deep=deep, cross=cross)  # the prediction layer is always fine-tuned


class AutoFTHooks(StageHooks):
    """Stage 2: both copies loaded from the pre-trained model (§3.2), the policies routing them;
    τ annealed after every step; the policy report after the test split."""

    def __init__(self, policies: tuple[str, ...], hidden: int, tau: float, tau_min: float, anneal_rate: float,
                 output_relu: bool, tie: str, title: str):
        self.policies, self.hidden, self.output_relu, self.tie, self.title = policies, hidden, output_relu, tie, title
        self.tau, self.tau_min, self.anneal_rate = tau, tau_min, anneal_rate

    def build(self, ctx: StageContext) -> nn.Module:
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise SpecError(f"method_args.policies: {list(self.policies)} must be a non-empty subset of "
                            f"{list(POLICIES)}")
        specs = list(ctx.specs.values())
        return AutoFTModel(build_model(specs, ctx.model_cfg), build_model(specs, ctx.model_cfg), self.policies,
                           self.hidden, self.tau, self.tau_min, self.anneal_rate, self.output_relu, self.tie)

    def after_step(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> None:
        model.step += 1  # the temperature of the next step (§3.3's annealing)

    def export(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        """Both copies and the policies, deciding by argmax (§3.3's inference), without the route counts."""
        served = copy.copy(model)
        served.recording = False
        return served

    def epoch_metrics(self, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        """The validation split's policy report, flat (``valid_pretrained_share/cross/cross_0``,
        ``valid_tied_share/…``), and the training temperature τ."""
        report = policy_report(model)
        return {"tau": model.temperature, **{f"valid_{kind}/{name}/{d}": share for kind in SHARES
                                             for name, shares in report[kind].items() for d, share in shares.items()}}

    def artifacts(self, model: nn.Module, ctx: StageContext) -> dict[str, Any]:
        report = policy_report(model)
        return {"policy.json": report, "policy.png": policy_figure(report, self.title)}


class AutoFT(Method):
    name = "autoft"
    description = "per-instance Gumbel-softmax routing between frozen pre-trained and fine-tuned fields and layers"
    arg_defaults: dict[str, Any] = {"pretrain": "source", "policies": POLICIES, "tau": 1.0, "tau_min": 0.1,
                                    "anneal_rate": 0.0, "policy_hidden": 64, "policy_output_relu": True,
                                    "inference_tie": "fine_tuned"}
    # §3.3: the Gumbel temperature and its annealing, the policy network's width (eq. 9), and eq. 9's outer ReLU
    search_space = {"tau": {"loguniform": [0.1, 5.0]}, "anneal_rate": {"choice": [0.0, 1e-4, 1e-3]},
                    "policy_hidden": {"choice": [16, 64, 256]}, "policy_output_relu": {"choice": [True, False]}}
    studied = {"tau": [0.1, 0.5, 1.0, 2.0, 5.0], "anneal_rate": [0.0, 1e-4, 1e-3]}  # §3.3's τ and its annealing

    @property
    def stages(self) -> list[Stage]:
        a = self.args
        hooks = AutoFTHooks(tuple(a["policies"]), int(a["policy_hidden"]), float(a["tau"]), float(a["tau_min"]),
                            float(a["anneal_rate"]), bool(a["policy_output_relu"]), str(a["inference_tie"]), self.name)
        return frozen_and_fine_tuned(a, self.name, hooks)  # §3.2: equal copies


class SpotTune(AutoFT):
    name = "spottune"
    description = "layer-wise routing only (cross and deep layers), embeddings fine-tuned (AutoFT §4.2)"
    arg_defaults = {**AutoFT.arg_defaults, "policies": ("cross", "deep")}
    baseline = True  # AutoFT Table 3


SHARES = ("pretrained_share", "tied_share")


def policy_report(model: AutoFTModel) -> dict[str, Any]:
    """Per policy and decision, the share of the last evaluation's instances routed to the
    pre-trained copy, and the share whose decision was tied (both logits equal: eq. 9's outer
    ReLU clipped both), summed over every worker (a collective)."""
    backbone = model.fine.backbone
    names = {"embedding": model.fine.pooled_names, "cross": [f"cross_{l}" for l in range(len(backbone.cross))],
             "deep": [f"deep_{l}" for l in range(len(backbone.deep))]}
    flat = [float(model.routed)]
    for counts in (model.routes, model.ties):
        for name in model.policy:
            flat += [float(c) for c in counts.get(name, torch.zeros(len(names[name])))]
    totals = all_reduce_sum(flat)
    n, offset = totals[0], 1
    out: dict[str, Any] = {"instances": int(n), **{kind: {} for kind in SHARES}}
    for kind in SHARES:
        for name in model.policy:
            k = len(names[name])
            out[kind][name] = {d: (c / n if n else 0.0) for d, c in zip(names[name], totals[offset: offset + k])}
            offset += k
    return out


def policy_figure(report: dict[str, Any], title: str) -> bytes:
    """AutoFT Figure 3: bars of the pre-trained share per field and layer, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report["pretrained_share"]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 + 3 * len(groups), 3.5), squeeze=False)
    for ax, (name, shares) in zip(axes[0], groups.items()):
        ax.bar(range(len(shares)), list(shares.values()), color="tab:blue")
        ax.set_xticks(range(len(shares)), list(shares), rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name} policy")
        ax.set_ylabel("share routed to pre-trained")
    fig.suptitle(f"{title}: {report['instances']:,} test instances")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
