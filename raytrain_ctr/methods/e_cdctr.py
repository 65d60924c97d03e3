"""E-CDCTR (Liu et al., e-cdctr.txt §3): a tri-level asynchronous transfer framework.

* **TPM** (§3.3): a tiny model, the key fields only (the categorical fields of the user and item
  groups: ids, categories, profiles) and a shallow MLP, trained on the source month by month over
  six months (stages ``tpm.m6`` … ``tpm.m1``, each warm-started from the month before). A month's
  stage artifact is the snapshot of the tables at that month's end; the newest three
  (``tpm.m3`` … ``tpm.m1``, ``emb_3`` … ``emb_1`` of eq. 2, ``snapshots``) are kept and read downstream,
  the older months only warm the model up (§3.6.1): transient stages, deleted once the newest three
  exist.
* **No overlap** (§3.4, Figure 3): TPM's months end one month before its ``as_of``, so its newest
  snapshot ends where the month CPM trains on begins; a CPM or A-CTR reading the latest TPM never
  finds its own training rows in the snapshots.
* **CPM** (§3.4): the complete model (every field and behaviour sequence, the cross network, a
  larger MLP with BatchNorm) on the last month of source data, its input extended by the
  historical embeddings: per side (user, item), the id's rows in the last three snapshots,
  stacked (eq. 2), through self-attention and mean pooling (eq. 3).
* **A-CTR** (§3.5): the same model, initialised from the latest CPM except every BatchNorm
  (re-initialised), fine-tuned on the last month of target data with the same historical inputs:
  the snapshots CPM was trained with, loaded through CPM (a new month's TPM run starts from
  scratch, so its tables live in another space than the one CPM's attention and MLP learnt).
* **Cadence** (§3.6.1): the jobs ``tpm`` (monthly, on the 1st), ``cpm`` (weekly, on Mondays) and
  ``actr`` (daily), each reading the latest upstream artifact valid as of its date, each keeping
  only its newest artifact (the snapshots of the newest TPM run: three, plus its warm-up months).
* **Serving** (§3.6.2): the snapshots merged through the trained attention into one table per side
  (``export``); its predictions equal the unmerged model's.

Switches for the paper's ablations: ``tpm: false`` (+CPM, Table 3), ``cpm: false`` (+TPM),
both false (Target-only with the complete model), ``history`` months (Table 5), ``load``: which
parts of CPM A-CTR loads (Table 6), ``tpm_dim``: the historical embeddings' dimension (Figure 4).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.embedding import fields_of
from raytrain_ctr.layers.attention import SelfAttentionPooling
from raytrain_ctr.layers.inputs import FieldInputs, dense_fields_of, embedding_for
from raytrain_ctr.methods.base import Input, Method, Stage, StageContext, StageHooks
from raytrain_ctr.methods.baselines import id_fields
from raytrain_ctr.models.backbones import Backbone, CTRModel, ModelConfig
from raytrain_ctr.spec import DomainSpec, FieldSpec, SpecError, TableSpec, merge_tables
from raytrain_ctr.windows import Window

SNAPSHOTS = "history.snapshots.*"  # the TPM tables loaded into CPM and A-CTR: frozen, never loaded from CPM
BATCH_NORM = ("*BatchNorm*",)

# Table 6: what A-CTR loads from CPM; the TPM snapshots CPM was trained with come along in every case
LOADS: dict[str, dict] = {
    "all_but_bn": {"exclude_modules": BATCH_NORM},  # E-CDCTR
    "all": {},
    "embeddings": {"include": ("embedding.*", SNAPSHOTS)},
    "mlp": {"exclude": ("embedding.*",), "exclude_modules": BATCH_NORM},
}


# ---- TPM (§3.3) ----------------------------------------------------------------------------------

def tpm_fields(specs: list[DomainSpec], names: tuple[str, ...] = ()) -> list[FieldSpec]:
    """TPM's key fields: ``names``, or every categorical field of the user and item groups."""
    every = fields_of(specs)
    if not names:
        return [f for f in every if f.type == "categorical" and f.group in ("user", "item")]
    known = {f.name: f for f in every}
    missing = [n for n in names if n not in known]
    if missing:
        raise SpecError(f"method_args.tpm_fields: {missing} are not sparse fields of the data ({sorted(known)})")
    return [known[n] for n in names]


def tpm_config(cfg: ModelConfig, args: dict) -> ModelConfig:
    """An embedding layer and a shallow MLP (§3.3), its tables at ``tpm_dim`` if set."""
    return replace(cfg, backbone="dnn", deep=tuple(args["tpm_deep"]), cross_layers=0, dropout=0.0,
                   embedding_dim=args["tpm_dim"] or cfg.embedding_dim)


class TPMHooks(StageHooks):
    def build(self, ctx: StageContext) -> nn.Module:
        specs, cfg = list(ctx.specs.values()), tpm_config(ctx.model_cfg, ctx.args)
        return CTRModel(embedding_for(specs, tpm_fields(specs, tuple(ctx.args["tpm_fields"])), cfg), [], cfg)


# ---- historical embeddings (eqs. 2–3) --------------------------------------------------------------

def field_ids(batch: Batch, field: FieldSpec) -> torch.Tensor:
    """A field's ids (row 0, the OOV row, where the batch's domain lacks the field)."""
    return batch.sparse[field.name] if field.name in batch.sparse else torch.zeros(batch.rows, dtype=torch.long,
                                                                                   device=batch.label.device)


class Snapshot(nn.Module):
    """One month's TPM tables of the id fields (loaded from ``tpm.mJ``, frozen)."""

    def __init__(self, tables: dict[str, tuple[int, int]]):
        super().__init__()
        self.tables = nn.ModuleDict({t: nn.Embedding(n, d, padding_idx=0) for t, (n, d) in tables.items()})


class History(nn.Module):
    """Per side (the user and the item id field), ``e = [emb_1, …, emb_M]`` (eq. 2: the id's rows in
    the last ``M`` monthly snapshots, newest first) → self-attention → mean pooling (eq. 3)."""

    def __init__(self, fields: list[FieldSpec], tables: dict[str, TableSpec], dim: int | None, months: int,
                 heads: int):
        super().__init__()
        self.fields = fields
        shapes = {f.table: (tables[f.table].num_embeddings, dim or tables[f.table].dim) for f in fields}
        self.snapshots = nn.ModuleDict({f"m{j}": Snapshot(shapes) for j in range(1, months + 1)})
        self.pool = nn.ModuleDict({f.name: SelfAttentionPooling(shapes[f.table][1], heads) for f in fields})
        self.out_dim = sum(shapes[f.table][1] for f in fields)

    @classmethod
    def of(cls, specs: list[DomainSpec], cfg: ModelConfig, args: dict) -> History:
        tables = merge_tables(specs)
        ids = id_fields(tpm_fields(specs, tuple(args["tpm_fields"])), tables)
        if not ids:
            raise SpecError("E-CDCTR's historical embeddings need a categorical user or item field among TPM's fields")
        return cls(ids, tables, tpm_config(cfg, args).embedding_dim, int(args["history"]), int(args["heads"]))

    def stacked(self, batch: Batch, field: FieldSpec) -> torch.Tensor:
        """``e`` of eq. 2: ``[B, M, d]``."""
        ids = field_ids(batch, field)
        return torch.stack([s.tables[field.table](ids) for s in self.snapshots.values()], 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return torch.cat([self.pool[f.name](self.stacked(batch, f)) for f in self.fields], -1)

    @torch.no_grad()
    def merged(self, chunk: int = 65_536) -> MergedHistory:
        """§3.6.2: every row's ``e_mean`` computed once through the (fixed) attention: one table per side."""
        tables, training = {}, self.training
        self.eval()
        for f in self.fields:
            weight = self.snapshots["m1"].tables[f.table].weight
            out = []
            for lo in range(0, weight.shape[0], chunk):
                rows = torch.arange(lo, min(lo + chunk, weight.shape[0]), device=weight.device)
                e = torch.stack([s.tables[f.table](rows) for s in self.snapshots.values()], 1)  # eq. 2, every id
                out.append(self.pool[f.name](e))
            tables[f.name] = nn.Embedding.from_pretrained(torch.cat(out), freeze=True)
        self.train(training)
        return MergedHistory(self.fields, tables, self.out_dim)


class MergedHistory(nn.Module):
    """The served historical input: one merged table per side, looked up by the id (§3.6.2)."""

    def __init__(self, fields: list[FieldSpec], tables: dict[str, nn.Embedding], out_dim: int):
        super().__init__()
        self.fields, self.out_dim = fields, out_dim
        self.tables = nn.ModuleDict(tables)

    def forward(self, batch: Batch) -> torch.Tensor:
        return torch.cat([self.tables[f.name](field_ids(batch, f)) for f in self.fields], -1)


# ---- CPM and A-CTR (§3.4–3.5) ----------------------------------------------------------------------

class CompleteModel(FieldInputs):
    """Every field's embedding and the dense fields, the historical embeddings (if any) beside them,
    and the backbone with BatchNorm in its deep layers."""

    def __init__(self, specs: list[DomainSpec], cfg: ModelConfig, history: nn.Module | None, batch_norm: bool):
        if cfg.backbone == "deepfm":
            raise SpecError("method 'e_cdctr' adds the historical embeddings to the deep input; use dnn, dcn or dcnv2")
        super().__init__(embedding_for(specs, fields_of(specs), cfg), dense_fields_of(specs))
        self.history = history
        self.backbone = Backbone(cfg, self.in_dim + (history.out_dim if history is not None else 0), batch_norm)

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, None]:
        x0, _ = super().inputs(batch)
        return (torch.cat([x0, self.history(batch)], -1) if self.history is not None else x0), None

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.backbone(*self.inputs(batch))

    def served(self) -> CompleteModel:
        """The serving model: the same modules, the snapshots replaced by the merged tables."""
        if not isinstance(self.history, History):
            return self
        out = copy.copy(self)
        out._modules = dict(self._modules)
        out.history = self.history.merged()
        return out


class CompleteHooks(StageHooks):
    """CPM and A-CTR: the complete model; serving reads the merged historical tables."""

    def build(self, ctx: StageContext) -> nn.Module:
        specs = list(ctx.specs.values())
        history = History.of(specs, ctx.model_cfg, ctx.args) if ctx.args["tpm"] else None
        return CompleteModel(specs, ctx.model_cfg, history, bool(ctx.args["batch_norm"]))

    def export(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        return model.served()


# ---- the method --------------------------------------------------------------------------------------

TPM_ARGS = ("tpm_months", "snapshots", "tpm_fields", "tpm_deep", "tpm_dim", "tpm_epochs", "tpm_lr", "tpm_sparse_lr")


class ECDCTR(Method):
    name = "e_cdctr"
    description = "TPM (monthly, 6 months of source) → CPM (weekly, last month of source) → A-CTR (daily, target)"
    arg_defaults = {"tpm_months": 6, "snapshots": 3, "history": 3, "tpm_fields": (), "tpm_deep": (64,),
                    "tpm_dim": None, "tpm_epochs": 1, "tpm_lr": 0.005, "tpm_sparse_lr": 0.05, "heads": 1,
                    "batch_norm": True, "tpm": True, "cpm": True, "load": "all_but_bn"}
    # §5.3: months of history (Table 5), the historical embeddings' dimension (Figure 4), BatchNorm reloaded
    # or not (Table 6), attention heads
    search_space = {"history": {"choice": [1, 2, 3]}, "tpm_dim": {"choice": [8, 16, 32]},
                    "load": {"choice": ["all_but_bn", "all"]}, "heads": {"choice": [1, 2]}}
    studied = {"tpm_dim": [4, 8, 16, 32], "history": [1, 2, 3]}  # Figure 4, Table 5

    @property
    def stages(self) -> list[Stage]:
        a = self.args
        months, history, kept = int(a["tpm_months"]), int(a["history"]), int(a["snapshots"])
        if not 1 <= history <= kept <= months:
            raise SpecError(f"method_args: history {history}, snapshots {kept}, tpm_months {months}: the months read "
                            f"are among the snapshots kept, which are among TPM's months (1 ≤ history ≤ snapshots ≤ "
                            f"tpm_months)")
        if a["load"] not in LOADS:
            raise SpecError(f"method_args.load: '{a['load']}' is not one of {list(LOADS)} (Table 6)")
        stages = self.tpm_stages(months, kept) if a["tpm"] else []
        snapshots = {f"m{j}": Input(f"tpm.m{j}", include=("embedding.tables.*",), strip="embedding.",
                                    into=f"history.snapshots.m{j}.", latest=True)
                     for j in range(1, history + 1)} if a["tpm"] else {}
        freeze = (SNAPSHOTS,) if a["tpm"] else ()
        last = Window(-1)
        if a["cpm"]:
            stages.append(Stage("cpm", ("source",), eval_domain="source", inputs=snapshots, freeze=freeze,
                                window=last, eval_window=last, keep_last=1, every="week",
                                args=(*TPM_ARGS, "history", "heads", "batch_norm", "tpm"), hooks=CompleteHooks()))
        # A-CTR reads the snapshots its CPM was trained with (through CPM), or TPM's latest without CPM
        inputs = {"cpm": Input("cpm", latest=True, **LOADS[a["load"]])} if a["cpm"] else snapshots
        stages.append(Stage("actr", ("target",), inputs=inputs, freeze=freeze, window=last,
                            eval_window=last, keep_last=1, every="day", hooks=CompleteHooks()))
        return stages

    def tpm_train(self) -> dict:
        """TPM's training budget: one pass over each month at a higher learning rate than CPM's (§4.4 trains
        TPM at 50× CPM's rate on 50× larger batches; 5× here, measured on the drift preset: the newest
        month's source AUC 0.668 at the default rates, 0.727 at these)."""
        a = self.args
        return {"epochs": int(a["tpm_epochs"]), "lr": float(a["tpm_lr"]), "sparse_lr": float(a["tpm_sparse_lr"])}

    def tpm_stages(self, months: int, kept: int) -> list[Stage]:
        """Month ``-j-1`` of ``as_of`` for ``tpm.mJ``, oldest first, each warm-started from the month before;
        the snapshots beyond the newest ``kept`` only warm the model up (transient)."""
        out = []
        for j in range(months, 0, -1):
            month = Window(-j - 1, -j)
            warm = {"warm": Input(f"tpm.m{j + 1}")} if j < months else {}
            out.append(Stage(f"tpm.m{j}", ("source",), eval_domain="source", inputs=warm, window=month,
                             eval_window=month, overrides=self.tpm_train(), keep_last=1,
                             every="month", transient=j > kept, args=TPM_ARGS, hooks=TPMHooks()))
        return out
