"""MKT (Guan et al. 2024; mkt.txt §3): multi-entity knowledge transfer in two stages.

**Feature groups** (§3.2.1), read from the spec: the *user profile* (fields of the ``user`` group),
the *behaviour sequences* (sequences of the ``user`` group, one per entity, each attention-pooled
against the row's item by one encoder shared by both entities), the *entity-shared* fields (the
other groups, ``scope: shared``: both domains must have them) and the *entity-specific* ones
(``scope: specific``). ``v = [v_u ‖ v_seq ‖ v_shared ‖ v_spec]`` (eqs. 1–2).

**MEM** (§3.2), trained on source and target rows together:

* **HFA** (§3.2.2, eqs. 3–8, :class:`~raytrain_ctr.layers.alignment.HFA`): one per entity, scores
  its specific fields in (0, 2), re-weights them and maps them to the common width ``d_hfa``. Eq. 8
  concatenates the result with "the shared features"; here that is everything both entities have,
  ``[v_u ‖ v_seq ‖ v_shared]`` (the common knowledge is "extracted from user-entity interactions",
  §3.2.3, so it must see the user), giving ``q^s``, ``q^t`` of one width.
* **CKE** (§3.2.3, eq. 9): PLE over ``q^s``, ``q^t``; ``g_com^p`` is entity ``p``'s output.
* **SKE / TKE** (§3.2.4, eq. 10): an MLP per entity over its whole ``v^p``, ``g_ind^p`` of CKE's width.
* Each entity's tower (§4.1.3: [64, 1]) reads ``[g_com^p ‖ g_ind^p]``.
* **PDL** (eqs. 11–12): ``cos(g_com^s, g_ind^s) + cos(g_com^t, g_ind^t)``, per row;
  ``Loss_MEM = Loss_src + Loss_tgt + γ·Loss_pdl`` (eq. 13, γ = 0.1).

**TEM** (§3.3), trained on target rows only, with the MEM loaded under ``mem.`` and frozen (eval
mode): both read the target batch; MEM's ``v_u^t``, ``v_seq^t``, ``v_shared^t`` and ``g_com^t`` each
pass a gate (GLU, eq. 14) and are added to TEM's own vector of the same meaning (eq. 15); TEM's
``g_cross`` is its deep network's second-to-last hidden layer (``tem_deep`` [1024, 512, 64] in §4:
``g_cross`` has width 512), the loss is BCE (eq. 16). The TEM stage's model holds exactly the MEM
parts it reads (the target's path: no source HFA, SKE, TKE, towers or source-only tables), so it
is also the serving model (§3.4).

Ablations (Table 4): ``tem: false`` serves the MEM's target tower ('w/o TEM fine-tune'),
``pdl: false`` (γ·Loss_pdl dropped), ``hfa: false`` (the specific fields only mapped to the common
width, no importance scores). ``gate``: ``glu`` (the paper), ``scalar`` or ``linear`` (no gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.layers.alignment import HFA, DenseEmbedding
from raytrain_ctr.layers.attention import BehaviourEncoder, attention_queries, behaviour_sequences, unpooled
from raytrain_ctr.layers.experts import PLE, expert
from raytrain_ctr.layers.gates import GATES, gate
from raytrain_ctr.layers.inputs import dense_columns, embedding_for, tables_with_dim
from raytrain_ctr.layers.mlp import MLP
from raytrain_ctr.methods.base import Input, Method, Stage, StageContext, StageHooks, bce
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.spec import DomainSpec, FieldSpec, SpecError
from raytrain_ctr.train.state import StateMismatchError

DOMAINS = ("source", "target")
MEM_ARGS: dict[str, Any] = {"gamma": 0.1, "pdl": True, "hfa": True, "d_hfa": 32, "cross_layers": 2, "d_cke": 64,
                            "experts": 2, "specific_experts": 1, "expert_depth": 1, "levels": 2, "tower": (64,),
                            "attention_hidden": (64, 32)}
TEM_ARGS: dict[str, Any] = {"tem": True, "tem_deep": (256, 128, 64), "gate": "glu"}
GROUPS = ("user", "seq", "shared")  # the vectors MEM hands to TEM beside g_com


@dataclass(frozen=True)
class FeatureGroups:
    """A domain's fields in §3.2.1's four groups (behaviour sequences read unpooled)."""

    user: tuple[FieldSpec, ...]
    sequences: tuple[FieldSpec, ...]
    shared: tuple[FieldSpec, ...]
    specific: tuple[FieldSpec, ...]

    @classmethod
    def of(cls, spec: DomainSpec) -> FeatureGroups:
        common = [f for f in spec.fields if f.scope == "shared"]
        seqs = behaviour_sequences(common)
        return cls(tuple(f for f in common if f.group == "user" and f not in seqs), tuple(unpooled(seqs)),
                   tuple(f for f in common if f.group != "user"),
                   tuple(f for f in spec.fields if f.scope == "specific"))

    @property
    def common(self) -> tuple[FieldSpec, ...]:
        """What both entities have: the profile, the sequences, the entity-shared fields."""
        return self.user + self.sequences + self.shared


def check_entities(specs: dict[str, DomainSpec]) -> None:
    """Both entities' non-specific fields agree (same name, type and table): they are read by one
    embedding layer, one sequence encoder and one CKE."""
    s, t = (FeatureGroups.of(specs[d]).common for d in DOMAINS)
    kind = lambda f: (f.type, f.table)  # noqa: E731
    a, b = {f.name: kind(f) for f in s}, {f.name: kind(f) for f in t}
    for name in sorted(set(a) ^ set(b)):
        has, lacks = ("source", "target") if name in a else ("target", "source")
        raise SpecError(f"method 'mkt': field '{name}' is entity-shared (scope: shared) in the {has} spec but the "
                        f"{lacks} has no such shared field; mark it scope: specific if only the {has} entity has it")
    for name in a:
        if a[name] != b[name]:
            raise SpecError(f"method 'mkt': entity-shared field '{name}' is {a[name]} in the source spec but "
                            f"{b[name]} in the target's")


class SpecificFields(nn.Module):
    """An entity's specific fields as ``V`` [B, n, d_e] (eq. 7): sparse ones embedded (tables of their own),
    dense ones by :class:`DenseEmbedding`."""

    def __init__(self, spec: DomainSpec, fields: tuple[FieldSpec, ...], cfg: ModelConfig, d_e: int):
        super().__init__()
        sparse = [f for f in fields if f.is_sparse]
        self.dense_names = [f.name for f in fields if f.type == "dense"]
        self.sparse_names = [f.name for f in sparse]
        self.embedding = embedding_for([spec], sparse, cfg) if sparse else None
        self.dense = DenseEmbedding(len(self.dense_names), d_e) if self.dense_names else None
        self.n, self.d_e = len(fields), d_e

    def forward(self, batch: Batch) -> torch.Tensor:
        parts = []
        if self.embedding is not None:
            emb = self.embedding(batch)
            parts.append(torch.stack([emb[n] for n in self.sparse_names], 1))
        if self.dense is not None:
            parts.append(self.dense(dense_columns(batch, self.dense_names)))
        return torch.cat(parts, 1) if parts else batch.label.new_zeros(batch.rows, 0, self.d_e)


@dataclass
class Vectors:
    """One batch's ``v_u``, ``v_seq``, ``v_shared`` [B, ·] and ``V_spec`` [B, n, d_e] (eqs. 1–2, 7)."""

    user: torch.Tensor
    seq: torch.Tensor
    shared: torch.Tensor
    spec: torch.Tensor

    @property
    def common(self) -> torch.Tensor:
        return torch.cat([self.user, self.seq, self.shared], -1)

    @property
    def whole(self) -> torch.Tensor:
        """``v`` (eq. 1)."""
        return torch.cat([self.common, self.spec.flatten(1)], -1)


class GroupInputs(nn.Module):
    """The common fields of both entities (one embedding layer, one sequence encoder) and each entity's
    specific fields (its own tables): a batch of entity ``p`` → its :class:`Vectors`."""

    def __init__(self, specs: dict[str, DomainSpec], entities: tuple[str, ...], cfg: ModelConfig, d_e: int,
                 attention_hidden: tuple[int, ...]):
        super().__init__()
        self.groups = {p: FeatureGroups.of(specs[p]) for p in entities}
        g = self.groups[entities[0]]
        sparse = [f for f in g.common if f.is_sparse]
        self.embedding = embedding_for([specs[p] for p in entities], sparse, cfg)
        common_tables = {f.table for f in sparse}
        for p in entities:
            for f in self.groups[p].specific:
                if f.table in common_tables:
                    raise SpecError(f"method 'mkt': specific field '{f.name}' reads table '{f.table}' of a shared "
                                    f"field; give it a table of its own")
                if f.is_sparse and (not f.is_pooled or self.embedding_dim(specs[p], f, cfg) != d_e):
                    raise SpecError(f"method 'mkt': specific field '{f.name}' must read one vector of dim {d_e} "
                                    f"(HFA stacks the specific fields, eq. 7; set model.embedding_dim)")
        dims = {f.name: self.embedding.dim(f.name) for f in g.sequences}
        self.sequences = BehaviourEncoder(attention_queries(list(sparse)), dims, tuple(attention_hidden))
        self.specific = nn.ModuleDict({p: SpecificFields(specs[p], self.groups[p].specific, cfg, d_e)
                                       for p in entities})
        width = lambda fs: sum(self.embedding.dim(f.name) if f.is_sparse else 1 for f in fs)  # noqa: E731
        self.dims = {"user": width(g.user), "seq": self.sequences.out_dim, "shared": width(g.shared)}

    @staticmethod
    def embedding_dim(spec: DomainSpec, f: FieldSpec, cfg: ModelConfig) -> int:
        return tables_with_dim(spec.tables, cfg.embedding_dim)[f.table].dim

    def group(self, emb: dict[str, torch.Tensor], batch: Batch, fields: tuple[FieldSpec, ...]) -> torch.Tensor:
        parts = [emb[f.name] for f in fields if f.is_sparse]
        dense = [f.name for f in fields if f.type == "dense"]
        return torch.cat([*parts, dense_columns(batch, dense)], -1)

    def forward(self, batch: Batch) -> Vectors:
        g = self.groups[batch.domain]
        emb = self.embedding(batch)
        return Vectors(self.group(emb, batch, g.user), self.sequences(emb, batch), self.group(emb, batch, g.shared),
                       self.specific[batch.domain](batch))


def specific_dim(specs: dict[str, DomainSpec], cfg: ModelConfig) -> int:
    """``d_e``, the width of every specific field's vector (eq. 7): their tables' one dim."""
    dims = {GroupInputs.embedding_dim(s, f, cfg) for s in specs.values() for f in FeatureGroups.of(s).specific
            if f.is_sparse}
    if len(dims) > 1:
        raise SpecError(f"method 'mkt': the specific fields' tables have dims {sorted(dims)}; HFA stacks them "
                        f"(eq. 7): set model.embedding_dim")
    return dims.pop() if dims else cfg.embedding_dim or 16


class MEM(nn.Module):
    """The multi-entity model (§3.2). ``entities``: whose paths to build; the TEM stage builds the
    target's alone, without the heads (``head=False``): exactly what TEM reads."""

    def __init__(self, specs: dict[str, DomainSpec], cfg: ModelConfig, a: dict[str, Any],
                 entities: tuple[str, ...] = DOMAINS, head: bool = True):
        super().__init__()
        d_e = specific_dim(specs, cfg)
        self.inputs = GroupInputs(specs, entities, cfg, d_e, tuple(a["attention_hidden"]))
        self.hfa = nn.ModuleDict({p: HFA(len(self.inputs.groups[p].specific), d_e, int(a["d_hfa"]),
                                         int(a["cross_layers"]), bool(a["hfa"])) for p in entities})
        d_q = sum(self.inputs.dims.values()) + int(a["d_hfa"])
        self.cke = PLE(d_q, int(a["d_cke"]), list(DOMAINS), shared=int(a["experts"]),
                       specific=int(a["specific_experts"]), depth=int(a["expert_depth"]), levels=int(a["levels"]),
                       dropout=cfg.dropout, outputs=None if head else list(entities))
        self.head = head
        if head:
            whole = {p: d_q - int(a["d_hfa"]) + self.inputs.specific[p].n * d_e for p in entities}
            self.ike = nn.ModuleDict({p: expert(whole[p], int(a["d_cke"]), int(a["expert_depth"]), cfg.dropout)
                                      for p in entities})  # SKE, TKE (eq. 10)
            self.towers = nn.ModuleDict({p: MLP(2 * int(a["d_cke"]), list(a["tower"]), out_dim=1, dropout=cfg.dropout)
                                         for p in entities})

    def knowledge(self, batch: Batch) -> tuple[Vectors, torch.Tensor]:
        """The batch's vectors and ``g_com`` (eqs. 8–9)."""
        v = self.inputs(batch)
        q = torch.cat([v.common, self.hfa[batch.domain](v.spec)], -1)
        return v, self.cke(q)[batch.domain]

    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logit, ``g_com``, ``g_ind``) of a batch of its entity."""
        v, g_com = self.knowledge(batch)
        g_ind = self.ike[batch.domain](v.whole)
        return self.towers[batch.domain](torch.cat([g_com, g_ind], -1)).squeeze(-1), g_com, g_ind

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.predict(batch)[0]


def polarized_distribution(g_com: torch.Tensor, g_ind: torch.Tensor) -> torch.Tensor:
    """``cos(g_com, g_ind)`` per row (eqs. 11–12: summed over the entities' rows)."""
    return F.cosine_similarity(g_com, g_ind, dim=-1)


class TEM(nn.Module):
    """The target-entity model (§3.3): its own embeddings and sequence encoder over the target's fields,
    MEM's vectors gated in (eqs. 14–15), a deep network whose second-to-last layer is ``g_cross``."""

    def __init__(self, specs: dict[str, DomainSpec], cfg: ModelConfig, a: dict[str, Any], mem: MEM):
        super().__init__()
        d_e = specific_dim(specs, cfg)
        self.inputs = GroupInputs(specs, ("target",), cfg, d_e, tuple(a["attention_hidden"]))
        deep = list(a["tem_deep"])
        self.gates = nn.ModuleDict({g: gate(a["gate"], mem.inputs.dims[g], self.inputs.dims[g])
                                    for g in GROUPS if self.inputs.dims[g]})
        self.gates["cross"] = gate(a["gate"], int(a["d_cke"]), deep[-2])
        width = sum(self.inputs.dims.values()) + self.inputs.specific["target"].n * d_e
        self.cross = MLP(width, deep[:-1], dropout=cfg.dropout)
        self.out = MLP(deep[-2], deep[-1:], out_dim=1, dropout=cfg.dropout)

    def forward(self, batch: Batch, mem: Vectors, g_com: torch.Tensor) -> torch.Tensor:
        v = self.inputs(batch)
        final = {g: getattr(v, g) + self.gates[g](getattr(mem, g)) if g in self.gates else getattr(v, g)
                 for g in GROUPS}  # v_u_final, v_seq_final, v_shared_final
        g_cross = self.cross(torch.cat([*final.values(), v.spec.flatten(1)], -1))
        return self.out(g_cross + self.gates["cross"](g_com)).squeeze(-1)  # eqs. 14–15, then the logit


class MKTModel(nn.Module):
    """The frozen MEM's target path (``mem.``) and TEM (``tem.``): the TEM stage's model, and the serving one."""

    def __init__(self, specs: dict[str, DomainSpec], cfg: ModelConfig, a: dict[str, Any]):
        super().__init__()
        self.mem = MEM(specs, cfg, a, entities=("target",), head=False)
        self.tem = TEM(specs, cfg, a, self.mem)

    def forward(self, batch: Batch) -> torch.Tensor:
        v, g_com = self.mem.knowledge(batch)
        return self.tem(batch, v, g_com)


class MEMHooks(StageHooks):
    """Mixed source + target batches; ``Loss_MEM`` (eq. 13)."""

    def __init__(self, args: dict[str, Any]):
        self.args = args

    def build(self, ctx: StageContext) -> nn.Module:
        check_entities(ctx.specs)
        return MEM(ctx.specs, ctx.model_cfg, self.args)

    def loss(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> torch.Tensor:
        total = torch.zeros(())
        for batch in batches.values():
            logit, g_com, g_ind = model.predict(batch)
            total = total + bce(logit, batch.label)
            if self.args["pdl"]:
                total = total + float(self.args["gamma"]) * polarized_distribution(g_com, g_ind).sum()
        return total


class TEMHooks(StageHooks):
    """Target batches through the frozen MEM and TEM; BCE (eq. 16)."""

    def __init__(self, args: dict[str, Any]):
        self.args = args

    def build(self, ctx: StageContext) -> nn.Module:
        check_entities(ctx.specs)
        return MKTModel(ctx.specs, ctx.model_cfg, self.args)

    def prepare(self, model: nn.Module, ctx: StageContext) -> None:
        """Every ``mem.`` tensor comes from the MEM artifact (none left at its initial value)."""
        state = ctx.inputs.get("mem")
        if state is None:  # a dry build
            return
        missing = sorted(k for k in model.state_dict() if k.startswith("mem.") and k[4:] not in state)
        if missing:
            raise StateMismatchError(f"the MEM artifact lacks {missing[:3]}{'…' if len(missing) > 3 else ''} "
                                     f"(was it trained with other method_args?)")


class MKT(Method):
    name = "mkt"
    description = "multi-entity model (HFA, PLE common extractor, PDL) on mixed data, then a gated target model"
    arg_defaults = {**MEM_ARGS, **TEM_ARGS}
    # §3.2–3.3: γ (eq. 13), d_HFA (eq. 8), the CKE's PLE experts and levels, the gate plugging MEM into TEM
    search_space = {"gamma": {"loguniform": [1e-3, 1.0]}, "d_hfa": {"choice": [8, 16, 32, 64]},
                    "experts": {"choice": [1, 2, 4]}, "specific_experts": {"choice": [1, 2]},
                    "levels": {"choice": [1, 2]}, "d_cke": {"choice": [32, 64, 128]},
                    "gate": {"choice": ["glu", "scalar", "linear"]}}
    studied = {"gamma": [0.01, 0.1, 1.0]}  # eq. 13's γ (0.1 throughout the paper)

    @property
    def stages(self) -> list[Stage]:
        a = self.args
        if a["gate"] not in GATES:
            raise SpecError(f"method_args.gate: '{a['gate']}' is not one of {list(GATES)}")
        if len(a["tem_deep"]) < 2:
            raise SpecError(f"method_args.tem_deep: at least two layers (g_cross is the second-to-last), "
                            f"got {list(a['tem_deep'])}")
        if float(a["gamma"]) < 0:
            raise SpecError(f"method_args.gamma: the PDL weight is ≥ 0, got {a['gamma']}")
        mem = Stage("mem", DOMAINS, hooks=MEMHooks(dict(a)), args=tuple(MEM_ARGS))
        if not a["tem"]:
            return [mem]
        tem = Stage("tem", ("target",), inputs={"mem": Input("mem", into="mem.")}, freeze=("mem.*",),
                    hooks=TEMHooks(dict(a)))
        return [mem, tem]
