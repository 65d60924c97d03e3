"""Single-domain CTR backbones over the embedding interface: DNN, DeepFM, DCN, DCN-V2, and LR.

Every backbone maps ``x_0`` (the concatenated field embeddings and dense features,
AutoFT eq. 4) and ``v`` (field embeddings stacked ``[B, F, D]``, for FM) to a logit.
Cross and deep layers are ``ModuleList`` s so that methods (AutoFT, SpotTune) can route
per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.embedding import BACKENDS, fields_of
from raytrain_ctr.layers.inputs import FieldInputs, dense_fields_of, embedding_for
from raytrain_ctr.layers.interaction import CrossLayer, CrossLayerV2, fm_interaction
from raytrain_ctr.layers.mlp import DeepLayer
from raytrain_ctr.spec import DomainSpec, SpecError, checked

BACKBONES = ("dnn", "deepfm", "dcn", "dcnv2", "lr")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "dcn"
    deep: tuple[int, ...] = (256, 128)
    cross_layers: int = 3
    dropout: float = 0.0
    embedding_dim: int | None = None  # overrides every table's dim when set
    embedding_backend: str = "local"  # local | torchrec (tables sharded across workers)
    sharding: dict[str, str] = field(default_factory=dict)  # torchrec: table -> table_wise|row_wise|column_wise|...
    row_wise_from_rows: int = 1_000_000  # torchrec: unconfigured tables this large are row-wise, others table-wise

    def __post_init__(self) -> None:
        if not isinstance(self.deep, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                                        for d in self.deep):
            raise SpecError(f"model.deep: a list of layer widths ≥ 1, got {self.deep!r}")
        object.__setattr__(self, "deep", tuple(self.deep))
        object.__setattr__(self, "cross_layers", checked(self.cross_layers, "model.cross_layers", int, 0))
        object.__setattr__(self, "dropout", checked(self.dropout, "model.dropout", float, 0, below=1))
        object.__setattr__(self, "embedding_dim", checked(self.embedding_dim, "model.embedding_dim", int, 1,
                                                          optional=True))
        object.__setattr__(self, "row_wise_from_rows", checked(self.row_wise_from_rows, "model.row_wise_from_rows",
                                                               int, 1))
        if self.backbone not in BACKBONES:
            raise SpecError(f"model.backbone: unknown backbone '{self.backbone}' (one of {list(BACKBONES)})")
        if self.backbone == "lr":  # logistic regression: the DNN's one-layer special case, a weight per id
            for key, value in (("deep", ()), ("cross_layers", 0), ("embedding_dim", 1)):
                object.__setattr__(self, key, value)
        if self.embedding_backend not in BACKENDS:
            raise SpecError(f"model.embedding_backend: unknown backend '{self.embedding_backend}' "
                            f"(one of {list(BACKENDS)})")


def deep_layers(in_dim: int, sizes: tuple[int, ...], dropout: float, batch_norm: bool = False) -> nn.ModuleList:
    dims = (in_dim, *sizes)
    return nn.ModuleList(DeepLayer(a, b, dropout, batch_norm) for a, b in zip(dims[:-1], dims[1:]))


class Backbone(nn.Module):
    """Cross layers (maybe none), deep layers (BatchNorm in each with ``batch_norm``), prediction
    layer (AutoFT eqs. 5–7)."""

    def __init__(self, cfg: ModelConfig, in_dim: int, batch_norm: bool = False):
        super().__init__()
        self.cfg = cfg
        cross = {"dcn": CrossLayer, "dcnv2": CrossLayerV2}.get(cfg.backbone)
        self.cross = nn.ModuleList(cross(in_dim) for _ in range(cfg.cross_layers)) if cross else nn.ModuleList()
        self.deep = deep_layers(in_dim, tuple(cfg.deep), cfg.dropout, batch_norm)
        deep_out = cfg.deep[-1] if cfg.deep else in_dim
        self.head = nn.Linear((in_dim if cross else 0) + deep_out, 1)  # eq. 7
        self.linear = nn.Linear(in_dim, 1, bias=False) if cfg.backbone == "deepfm" else None

    def representation(self, x0: torch.Tensor, deep: Sequence[Callable] | None = None,
                       cross: Sequence[Callable] | None = None, taps: list | None = None) -> torch.Tensor:
        """What the prediction layer reads: the cross and deep layers' outputs. ``deep`` / ``cross``
        replace the layers by callables of the same signature (AutoFT routes each layer between a
        frozen and a fine-tuned copy, eqs. 11–12); ``taps`` collects each deep layer's input."""
        h = x0
        for layer in deep if deep is not None else self.deep:  # eq. 6
            if taps is not None:
                taps.append(h)
            h = layer(h)
        if len(self.cross):
            xc = x0
            for layer in cross if cross is not None else self.cross:  # eq. 5
                xc = layer(x0, xc)
            h = torch.cat([xc, h], dim=-1)
        return h

    def forward(self, x0: torch.Tensor, v: torch.Tensor | None = None, deep: Sequence[Callable] | None = None,
                cross: Sequence[Callable] | None = None) -> torch.Tensor:
        """The logit (``deep`` / ``cross``: see :meth:`representation`)."""
        logit = self.head(self.representation(x0, deep, cross)).squeeze(-1)
        if self.linear is not None:  # DeepFM: first-order + FM second-order + deep
            logit = logit + self.linear(x0).squeeze(-1) + fm_interaction(v)
        return logit


class CTRModel(FieldInputs):
    """Embedding layer + backbone over the fields of every domain it serves."""

    def __init__(self, embedding: nn.Module, dense_fields: list[str], cfg: ModelConfig):
        super().__init__(embedding, dense_fields)
        if cfg.backbone == "deepfm" and len({embedding.dim(n) for n in self.pooled_names}) > 1:
            raise SpecError("model.backbone 'deepfm' needs one embedding dim for every field "
                            "(set model.embedding_dim)")
        self.backbone = Backbone(cfg, self.in_dim)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.backbone(*self.inputs(batch))


def build_model(specs: list[DomainSpec], cfg: ModelConfig) -> CTRModel:
    """One model over the union of the domains' fields (so every baseline shares one architecture)."""
    return CTRModel(embedding_for(specs, fields_of(specs), cfg), dense_fields_of(specs), cfg)
