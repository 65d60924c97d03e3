"""CDAnet (Chen et al., cdanet.txt §4): a translation network, then an augmentation network.

**Translation network** (§4.2, stage ``translation``, on mixed source + target batches):

* decoupled embedding layers ``h_s = H_s(x_s)``, ``h_t = H_t(x_t)`` (eq. 1): the domains'
  schemas may differ (:class:`~raytrain_ctr.layers.inputs.DomainInputs`);
* a shared MMoE feature extractor, experts ``F_i`` and a gate per domain → ``z_s``, ``z_t``
  (eqs. 2–4);
* cross-supervised translators ``W_s^tran``, ``W_t^tran`` (d×d): ``z'_s = W_t z_t`` goes
  through the *source* tower, supervised by the target label (eq. 5), and symmetrically
  (eq. 6); an orthogonality constraint ``‖W^T W z − z‖²`` on both (eq. 7);
* towers ``R_s``, ``R_t`` (their depths may differ), vanilla CTR losses (eq. 8);
* ``L_trans = L_vani + α·L_cross + β·L_orth`` (eq. 9).

**Augmentation network** (§4.3, stage ``augmentation``, on the served domain): the
embedding layer, the MMoE and the translator are loaded from the translation network, the
tower ``R^aug`` is new, on ``z_t^aug = z_t ⊕ W_t z_t`` (eq. 10); loss eq. 11 + β·L_orth.
``augment: source`` builds the source-side augmentation network instead (§4.3.2).

Ablations of Table 5 are switches: ``mmoe: false`` (a shared MLP replaces the MMoE),
``orth: false`` (β = 0), ``cross: false`` (α = 0), ``translation: false`` (the augmentation
network alone, randomly initialised), ``augmentation: false`` (the translation network
evaluated as is).

:func:`translated_neighbours` is the semantics probe of §5.3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.layers.experts import Bottom, MMoE
from raytrain_ctr.layers.inputs import DomainInputs
from raytrain_ctr.layers.mlp import tower
from raytrain_ctr.methods.base import Input, Method, Stage, StageContext, StageHooks, bce
from raytrain_ctr.methods.joint import DOMAINS, JOINT_ARGS, MMoENet, tower_depth
from raytrain_ctr.spec import SpecError

SWITCHES = ("mmoe", "orth", "cross", "translation", "augmentation")


def other(domain: str) -> str:
    return DOMAINS[1 - DOMAINS.index(domain)]


class CDAnetModel(nn.Module):
    """``H_p`` → extractor → ``z_p``; translators ``W_p^tran``; either the towers ``R_p`` of the
    translation network or the augmentation network's new tower ``R_p^aug`` on ``z_p ⊕ W_p z_p``."""

    def __init__(self, inputs: DomainInputs, extractor: nn.Module, d: int, domains: list[str],
                 towers: dict[str, nn.Module] | None = None, augmented: nn.Module | None = None):
        super().__init__()
        self.inputs, self.extractor = inputs, extractor
        self.translators = nn.ModuleDict({p: nn.Linear(d, d, bias=False) for p in domains})
        for w in self.translators.values():
            nn.init.orthogonal_(w.weight)  # starts where L_orth is 0 (eq. 7)
        self.towers = nn.ModuleDict(towers) if towers else None
        self.augmented = augmented

    def latent(self, batch: Batch) -> torch.Tensor:
        """``z_p`` of a batch of domain ``p`` (eqs. 1–4)."""
        return self.extractor(self.inputs(batch), batch.domain)

    def translate(self, z: torch.Tensor, domain: str) -> torch.Tensor:
        """``z' = W_p^tran z``: domain ``p``'s latent feature mapped into the other domain's space."""
        return self.translators[domain](z)

    def orth(self, z: torch.Tensor, domain: str) -> torch.Tensor:
        """``‖W^T (W z) − z‖²`` per row (eq. 7)."""
        w = self.translators[domain].weight
        return ((self.translate(z, domain) @ w - z) ** 2).sum(-1)

    def predict(self, z: torch.Tensor, domain: str) -> torch.Tensor:
        """The logit: ``R_p^aug(z_p ⊕ W_p z_p)`` (eqs. 10, 11) in the augmentation network,
        ``R_p(z_p)`` (eq. 8) in the translation network."""
        if self.augmented is not None:
            return self.augmented(torch.cat([z, self.translate(z, domain)], -1)).squeeze(-1)
        return self.towers[domain](z).squeeze(-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.predict(self.latent(batch), batch.domain)


class CDAnet(Method):
    name = "cdanet"
    description = "translation network (MMoE + cross-supervised translators), then augmentation network"
    arg_defaults = {**{k: v for k, v in JOINT_ARGS.items() if k not in ("shared_embedding", "eval_domain")},
                    "alpha": 0.01, "beta": 0.1, "augment": "target", "aug_tower_depth": None,
                    **{s: True for s in SWITCHES}}
    # §5.4.2 (Figure 6): α, β and K experts; the expert and tower depths and d, as for the joint baselines
    search_space = {**MMoENet.search_space, "alpha": {"loguniform": [1e-3, 1.0]}, "beta": {"loguniform": [1e-3, 1.0]}}
    studied = {"alpha": [1e-3, 1e-2, 1e-1, 1.0], "beta": [1e-3, 1e-2, 1e-1, 1.0], "experts": [1, 2, 4, 8]}  # Figure 6

    @property
    def served(self) -> str:
        p = self.args["augment"]
        if p not in DOMAINS:
            raise SpecError(f"method_args.augment: '{p}' is not one of {list(DOMAINS)}")
        return p

    @property
    def stages(self) -> list[Stage]:
        a, p = self.args, self.served
        if not (a["translation"] or a["augmentation"]):
            raise SpecError("method 'cdanet': translation and augmentation are both switched off")
        out = []
        if a["translation"]:
            out.append(Stage("translation", DOMAINS, eval_domain=p, hooks=CDAnetHooks(a, p, augmentation=False)))
        if a["augmentation"]:
            inputs = {"translation": Input("translation", include=carried_over(p))} if a["translation"] else {}
            out.append(Stage("augmentation", (p,), eval_domain=p, inputs=inputs,
                             hooks=CDAnetHooks(a, p, augmentation=True)))
        return out


class CDAnetHooks(StageHooks):
    """A CDAnet stage: the translation network (§4.2) or the augmentation network (§4.3) of the
    served domain ``served``, and its loss (eq. 9, or eq. 11 + β·L_orth)."""

    def __init__(self, args: dict, served: str, augmentation: bool):
        self.args, self.served, self.augmentation = args, served, augmentation

    def build(self, ctx: StageContext) -> nn.Module:
        a, d, dropout = self.args, self.args["d"], ctx.model_cfg.dropout
        domains = [self.served] if self.augmentation else list(DOMAINS)
        inputs = DomainInputs(ctx.specs, domains, ctx.model_cfg, d)
        extractor = (MMoE(d, d, a["experts"], a["expert_depth"], domains, dropout) if a["mmoe"]
                     else Bottom(d, a["expert_depth"], dropout))
        if not self.augmentation:
            towers = {p: tower(d, d, tower_depth(a, p), dropout) for p in domains}
            return CDAnetModel(inputs, extractor, d, domains, towers=towers)
        depth = a["aug_tower_depth"] or tower_depth(a, self.served)
        return CDAnetModel(inputs, extractor, d, domains, augmented=tower(2 * d, d, depth, dropout))

    def weights_of_terms(self) -> dict[str, float]:
        """The loss weights of eq. 9 after the ablation switches."""
        a = self.args
        return {"vani": 1.0, "cross": a["alpha"] if a["cross"] else 0.0, "orth": a["beta"] if a["orth"] else 0.0}

    def terms(self, model: CDAnetModel, batches: dict[str, Batch]) -> dict[str, torch.Tensor]:
        """The loss terms summed over the step's rows: ``vani`` (eq. 8; eq. 11 in the augmentation
        network), ``cross`` (eqs. 5, 6; translation only) and ``orth`` (eq. 7)."""
        out = {k: torch.zeros(()) for k in ("vani", "cross", "orth")}
        for p, batch in batches.items():
            z, y = model.latent(batch), batch.label
            out["vani"] = out["vani"] + bce(model.predict(z, p), y)
            if model.augmented is None:  # z'_q = W_p z_p through the other domain's tower (eqs. 5, 6)
                out["cross"] = out["cross"] + bce(model.towers[other(p)](model.translate(z, p)).squeeze(-1), y)
            out["orth"] = out["orth"] + model.orth(z, p).sum()
        return out

    def loss(self, model: nn.Module, batches: dict[str, Batch], ctx: StageContext) -> torch.Tensor:
        w = self.weights_of_terms()
        return sum(w[k] * v for k, v in self.terms(model, batches).items())


def carried_over(domain: str) -> tuple[str, ...]:
    """What the augmentation network loads from the translation network (§4.3): the domain's
    embedding layer, the extractor (experts and the domain's gate) and its translator; not the tower."""
    return (f"inputs.fields.{domain}.*", f"inputs.project.{domain}.*", "extractor.experts.*", "extractor.mlp.*",
            f"extractor.gates.{domain}.*", f"translators.{domain}.*")


@torch.no_grad()
def translated_neighbours(model: CDAnetModel, rows: Batch, pool: Batch, k: int = 5, metric: str = "euclidean",
                          translate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The semantics probe of §5.3: each row of ``rows`` (one domain) is translated into the other
    domain's latent space (``W_p z_p``) and its ``k`` nearest rows of ``pool`` (the other domain,
    by their own ``z``) are found. Returns (indices [N, k] into ``pool``, distances [N, k]).
    ``translate=False`` searches with ``z_p`` itself (the control: what the translator adds)."""
    model.eval()
    query = model.latent(rows)
    query = model.translate(query, rows.domain) if translate else query
    keys = model.latent(pool)
    if metric == "centered":  # cosine after removing each set's mean (latents share a large common offset)
        query, keys, metric = query - query.mean(0), keys - keys.mean(0), "cosine"
    if metric == "cosine":
        dist = 1 - F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
    elif metric == "euclidean":
        dist = torch.cdist(query, keys)
    else:
        raise SpecError(f"probe metric: '{metric}' is not one of ['euclidean', 'cosine', 'centered']")
    d, idx = dist.topk(min(k, len(pool)), dim=1, largest=False)
    return idx, d
