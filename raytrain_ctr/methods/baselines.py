"""The baselines the papers compare against (AutoFT §4.2).

* **Target-only**: train and test on the target domain.
* **LR**: Target-only with logistic regression (backbone ``lr``: every table at dim 1, no cross or
  deep layers; the prediction layer over the ids' weights and the dense values).
* **Source-only**: train on the source, test on the target.
* **All**: train on source and target together, test on the target.
* **Fine-Tune** (Yosinski et al. 2014): initialise from a pre-trained model (Source-only or
  All, ``pretrain: source|all``) and fine-tune every parameter on the target (or all but
  those matching ``freeze`` patterns, e.g. ``[embedding.*]``).
* **L2-SP** (Xuhong et al. 2018): Fine-Tune plus ``α/2·‖W − W^S‖²`` toward the pre-trained
  weights. Embedding rows are penalised only where the step's batches touch them (sparse),
  never the whole table each step.
* **ProgressiveNN** (Rusu et al. 2016; AutoFT §4.2): the frozen pre-trained column and a column
  fine-tuned from it; each deep layer of the fine-tuned column also reads, through a lateral
  connection, the pre-trained column's previous layer: ``h_l = ReLU(W_l h_{l−1} + b_l +
  U_l ReLU(a_l · h^S_{l−1}))``, and the prediction layer reads the pre-trained column's last
  representation the same way (Rusu et al. eq. 2, without the dimension-reducing ``V``). ``U``
  starts at zero (the model starts as Fine-Tune), ``a`` at 1.
* **KEEP-style plug-in** (Zhang et al. 2022): the pre-trained user and item embeddings are
  frozen and plugged into a target model as extra features.
* **DIN** (Zhou et al. 2018; a single-domain baseline of MKT's Table 2): the target alone, its
  behaviour sequences pooled by target attention.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.layers.inputs import embedding_for
from raytrain_ctr.methods.base import Input, Method, Stage, StageContext, StageHooks
from raytrain_ctr.models.backbones import Backbone, CTRModel, build_model
from raytrain_ctr.models.din import DIN
from raytrain_ctr.spec import FieldSpec, SpecError, TableSpec, merge_tables

PRETRAIN_DOMAINS = {"source": ("source",), "all": ("source", "target")}


def pretrain_stage(args: dict) -> Stage:
    which = args["pretrain"]
    if which not in PRETRAIN_DOMAINS:
        raise SpecError(f"method_args.pretrain: '{which}' is not one of {list(PRETRAIN_DOMAINS)}")
    return Stage("pretrain", PRETRAIN_DOMAINS[which], plain=True)


def frozen_and_fine_tuned(args: dict, name: str, hooks: StageHooks) -> list[Stage]:
    """Pre-training, then a target stage holding two copies of the pre-trained model: ``pre.``
    frozen, ``fine.`` fine-tuned (AutoFT §3.2's equal copies; ProgressiveNN's two columns)."""
    both = {"pre": Input("pretrain", into="pre."), "fine": Input("pretrain", into="fine.")}
    return [pretrain_stage(args), Stage(name, ("target",), inputs=both, freeze=("pre.*",), hooks=hooks)]


class Plain(Method):
    """One plain supervised stage on ``domains``, evaluated on the target."""

    domains: tuple[str, ...] = ()
    baseline = True

    @property
    def stages(self) -> list[Stage]:
        return [Stage("train", self.domains, plain=True)]


class TargetOnly(Plain):
    name, domains = "target_only", ("target",)
    description = "train and test on the target domain"


class LRHooks(StageHooks):
    def build(self, ctx: StageContext) -> nn.Module:
        return build_model(list(ctx.specs.values()), replace(ctx.model_cfg, backbone="lr"))


class LR(Method):
    name = "lr"
    description = "logistic regression on the target domain (the DNN's one-layer special case)"
    baseline = True

    @property
    def stages(self) -> list[Stage]:
        return [Stage("train", ("target",), hooks=LRHooks())]


class SourceOnly(Plain):
    name, domains = "source_only", ("source",)
    description = "train on the source domain, test on the target"


class All(Plain):
    name, domains = "all", ("source", "target")
    description = "train on source and target together, test on the target"


class FineTune(Method):
    name = "finetune"
    description = "pre-train (source or all), then fine-tune on the target (every parameter unless frozen)"
    arg_defaults = {"pretrain": "source", "freeze": ()}
    baseline = True

    @property
    def stages(self) -> list[Stage]:
        return [pretrain_stage(self.args), Stage("finetune", ("target",), inputs={"pretrain": Input("pretrain")},
                                                 freeze=tuple(self.args["freeze"]), hooks=self.finetune_hooks())]

    def finetune_hooks(self) -> StageHooks:
        return StageHooks()


class L2SPHooks(StageHooks):
    """Fine-tuning with ``α/2·‖W − W^S‖²`` toward the loaded weights ``W^S``."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def prepare(self, model: nn.Module, ctx: StageContext) -> None:
        if ctx.model_cfg.embedding_backend != "local":
            raise SpecError("method 'l2sp' penalises embedding rows through their gradients; the torchrec "
                            "backend's fused optimizer takes none (use model.embedding_backend: local)")
        self.reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.tables = {name: e for name, e in model.named_modules() if isinstance(e, nn.Embedding)}

    def penalty(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> torch.Tensor | None:
        total = torch.zeros(())
        sparse_weights = set()
        for name, emb in self.tables.items():  # rows this step touches, with sparse gradients
            sparse_weights.add(f"{name}.weight")
            fields = [f for f in model.embedding.fields if f"embedding.tables.{f.table}" == name]
            ids = [b.sparse[f.name].reshape(-1) for b in batches.values() for f in fields if f.name in b.sparse]
            if not ids or not emb.weight.requires_grad:
                continue
            rows = torch.unique(torch.cat(ids))
            rows = rows[rows > 0]
            w = F.embedding(rows, emb.weight, sparse=emb.sparse)
            total = total + ((w - self.reference[f"{name}.weight"][rows]) ** 2).sum()
        for name, p in model.named_parameters():
            if p.requires_grad and name not in sparse_weights:
                total = total + ((p - self.reference[name]) ** 2).sum()
        return 0.5 * self.alpha * total


class L2SP(FineTune):
    name = "l2sp"
    description = "fine-tune with an L2 penalty toward the pre-trained weights"
    arg_defaults = {"pretrain": "source", "freeze": (), "alpha": 1e-3}
    search_space = {"alpha": {"loguniform": [1e-5, 1e-1]}}  # the penalty's weight (Li et al., 2018, eq. 3)

    def finetune_hooks(self) -> StageHooks:
        return L2SPHooks(float(self.args["alpha"]))


class Lateral(nn.Module):
    """``U ReLU(a · h)`` (Rusu et al. eq. 2): ``U`` starts at zero, so the column starts unchanged."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.a = nn.Parameter(torch.ones(()))
        self.u = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.zeros_(self.u.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.u(F.relu(self.a * h))


class ProgressiveModel(nn.Module):
    """The frozen pre-trained column ``pre``, the fine-tuned column ``fine``, and the lateral
    connections from each of ``pre``'s layers into the next layer of ``fine``."""

    def __init__(self, pre: CTRModel, fine: CTRModel):
        super().__init__()
        if fine.backbone.linear is not None:
            raise SpecError("method 'progressive_nn': lateral connections join deep layers; use backbone dnn, "
                            "dcn or dcnv2")
        self.pre, self.fine = pre, fine
        backbone = fine.backbone
        self.lateral = nn.ModuleList(Lateral(layer.linear.in_features, layer.linear.out_features)
                                     for layer in backbone.deep)
        self.lateral_head = Lateral(backbone.head.in_features, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        hs: list[torch.Tensor] = []  # the frozen column's input to each deep layer
        h = self.pre.backbone.representation(self.pre.inputs(batch)[0], taps=hs)
        deep = [lambda x, l=l, layer=layer: layer(x, self.lateral[l](hs[l]))
                for l, layer in enumerate(self.fine.backbone.deep)]
        return self.fine.backbone(*self.fine.inputs(batch), deep=deep) + self.lateral_head(h).squeeze(-1)


class ProgressiveHooks(StageHooks):
    def build(self, ctx: StageContext) -> nn.Module:
        specs = list(ctx.specs.values())
        return ProgressiveModel(build_model(specs, ctx.model_cfg), build_model(specs, ctx.model_cfg))


class ProgressiveNN(Method):
    name = "progressive_nn"
    description = "a column fine-tuned from the pre-trained one, with lateral connections from the frozen column"
    arg_defaults = {"pretrain": "source"}
    baseline = True

    @property
    def stages(self) -> list[Stage]:
        return frozen_and_fine_tuned(self.args, "progressive", ProgressiveHooks())


class PlugInModel(CTRModel):
    """A target model whose input also holds frozen pre-trained embeddings of some fields."""

    def __init__(self, base: CTRModel, plug: nn.Module, cfg):
        nn.Module.__init__(self)
        self.embedding, self.dense_fields, self.pooled_names = base.embedding, base.dense_fields, base.pooled_names
        self.plug = plug
        self.plug_names = [f.name for f in plug.fields]
        self.in_dim = base.in_dim + sum(plug.dim(n) for n in self.plug_names)
        self.backbone = Backbone(cfg, self.in_dim)

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        x0, _ = super().inputs(batch)
        plugged = self.plug(batch)
        return torch.cat([x0, *[plugged[n] for n in self.plug_names]], dim=-1), None


def id_fields(fields: list[FieldSpec], tables: dict[str, TableSpec]) -> list[FieldSpec]:
    """Per group (user, item), the categorical field of ``fields`` with the largest table: the id fields."""
    chosen = []
    for group in ("user", "item"):
        cands = [f for f in fields if f.group == group and f.type == "categorical"]
        if cands:
            chosen.append(max(cands, key=lambda f: tables[f.table].num_embeddings))
    return list({f.name: f for f in chosen}.values())


class PlugInHooks(StageHooks):
    """A target model with the pre-trained id embeddings plugged in (loaded into ``plug.``, frozen)."""

    def build(self, ctx: StageContext) -> nn.Module:
        if ctx.model_cfg.backbone == "deepfm":
            raise SpecError("method 'keep' plugs extra features into the deep input; use dnn, dcn or dcnv2")
        specs = list(ctx.specs.values())
        ids = id_fields([f for s in specs for f in s.sparse_fields], merge_tables(specs))
        return PlugInModel(super().build(ctx), embedding_for(specs, ids, ctx.model_cfg), ctx.model_cfg)


class KEEP(Method):
    name = "keep"
    description = "pre-trained user/item embeddings frozen and plugged into a target model"
    arg_defaults = {"pretrain": "source"}
    baseline = True

    @property
    def stages(self) -> list[Stage]:
        plug = Input("pretrain", include=("embedding.tables.*",), strip="embedding.", into="plug.")
        return [pretrain_stage(self.args),
                Stage("plugin", ("target",), inputs={"pretrain": plug}, freeze=("plug.*",), hooks=PlugInHooks())]


class DINHooks(StageHooks):
    """The evaluated domain's :class:`~raytrain_ctr.models.din.DIN`."""

    def __init__(self, args: dict):
        self.args = args

    def build(self, ctx: StageContext) -> nn.Module:
        return DIN(ctx.specs[ctx.stage.eval_domain], ctx.model_cfg, tuple(self.args["attention_hidden"]))


class DINMethod(Method):
    name = "din"
    description = "train and test on the target domain with DIN (target attention over the behaviour sequences)"
    arg_defaults = {"attention_hidden": (64, 32)}
    baseline = True
    search_space = {"attention_hidden": {"choice": [[32], [64, 32], [80, 40]]}}  # the activation unit's MLP

    @property
    def stages(self) -> list[Stage]:
        return [Stage("train", ("target",), hooks=DINHooks(dict(self.args)))]
