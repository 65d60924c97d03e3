"""Ray Tune over any config keys of a method's last stage, ASHA on target-validation AUC.

A trial is a Tune function trainable (Ray Train V2): it applies its sampled overrides
(dotted keys: ``train.lr``, ``model.deep``, ``method_args.alpha``), runs the upstream
stages through the pipeline (content-addressed: trials that share them train them once),
then fits the tuned stage's ``TorchTrainer`` with ``TuneReportCallback`` so every epoch's
``valid_auc`` reaches the scheduler.

Search spaces are YAML: a key maps to ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``,
``{randint: [lo, hi]}``, ``{choice: [...]}`` or a fixed value. Methods add their own
spaces (``SPACES``); ``common`` holds the keys every method shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raytrain_ctr import pipeline
from raytrain_ctr.config import ExperimentConfig
from raytrain_ctr.methods import get_method
from raytrain_ctr.spec import SpecError

SPACES: dict[str, dict[str, Any]] = {
    "common": {"train.lr": {"loguniform": [1e-4, 3e-3]}, "train.sparse_lr": {"loguniform": [1e-3, 5e-2]},
               "model.embedding_dim": {"choice": [8, 16, 32]}, "train.batch_size": {"choice": [512, 1024, 2048]}},
    "l2sp": {"method_args.alpha": {"loguniform": [1e-5, 1e-1]}},
    # AutoFT §3.3: Gumbel temperature and its annealing, policy width (eq. 9), learning rate
    "autoft": {"method_args.tau": {"loguniform": [0.1, 5.0]}, "method_args.anneal_rate": {"choice": [0.0, 1e-4, 1e-3]},
               "method_args.policy_hidden": {"choice": [16, 64, 256]},
               "method_args.policy_output_relu": {"choice": [True, False]}},
}
SPACES["spottune"] = SPACES["autoft"]
# The joint baselines' architecture (CDAnet §5.1.3 grid-searches it for every model)
SPACES["share_bottom"] = {"method_args.d": {"choice": [32, 64, 128]}, "method_args.expert_depth": {"choice": [1, 2, 3]},
                          "method_args.tower_depth": {"choice": [1, 2, 3]}}
SPACES["mmoe"] = SPACES["ple"] = {**SPACES["share_bottom"], "method_args.experts": {"choice": [1, 2, 4, 8]}}
SPACES["star"] = SPACES["conet"] = SPACES["share_bottom"]
# CCTL §2 and §3.3: α (eq. 9, Figure 5(b)), γ, the sync period k, the selector period n, REN's weight, selector width;
# the selection policy and the reward (options beyond the paper, methods/cctl.py)
SPACES["cctl"] = {"method_args.alpha": {"uniform": [0.0, 1.0]}, "method_args.gamma": {"uniform": [0.5, 0.99]},
                  "method_args.k": {"choice": [5, 20, 100]}, "method_args.n": {"choice": [5, 10, 50]},
                  "method_args.ren_weight": {"loguniform": [1e-3, 1.0]},
                  "method_args.selector_hidden": {"choice": [16, 64, 256]},
                  "method_args.policy": {"choice": ["weight", "sample"]},
                  "method_args.reward": {"choice": ["batch", "row"]}}
# MKT §3.2–3.3: γ (eq. 13), d_HFA (eq. 8), the CKE's PLE experts and levels, the gate plugging MEM into TEM
SPACES["mkt"] = {"method_args.gamma": {"loguniform": [1e-3, 1.0]}, "method_args.d_hfa": {"choice": [8, 16, 32, 64]},
                 "method_args.experts": {"choice": [1, 2, 4]}, "method_args.specific_experts": {"choice": [1, 2]},
                 "method_args.levels": {"choice": [1, 2]}, "method_args.d_cke": {"choice": [32, 64, 128]},
                 "method_args.gate": {"choice": ["glu", "scalar", "linear"]}}
SPACES["din"] = {"method_args.attention_hidden": {"choice": [[32], [64, 32], [80, 40]]}}
# E-CDCTR §5.3: months of history (Table 5), the historical embeddings' dimension (Figure 4), BatchNorm
# reloaded or not (Table 6), attention heads
SPACES["e_cdctr"] = {"method_args.history": {"choice": [1, 2, 3]}, "method_args.tpm_dim": {"choice": [8, 16, 32]},
                     "method_args.load": {"choice": ["all_but_bn", "all"]}, "method_args.heads": {"choice": [1, 2]}}
# CDAnet §5.4.2 (Figure 6): α, β, K experts; and expert depth, tower depth, d
SPACES["cdanet"] = {**SPACES["mmoe"], "method_args.alpha": {"loguniform": [1e-3, 1.0]},
                    "method_args.beta": {"loguniform": [1e-3, 1.0]}}


class TuneError(RuntimeError):
    """A trial failed (its error is chained)."""


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    kinds = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint,
             "choice": tune.choice, "grid": tune.grid_search}
    out = {}
    for key, spec in space.items():
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in kinds:
            (kind, value), = spec.items()
            out[key] = kinds[kind](value) if kind in ("choice", "grid") else kinds[kind](*value)
        elif isinstance(spec, dict):
            raise SpecError(f"search space key '{key}': expected one of {sorted(kinds)}, got {sorted(spec)}")
        else:
            out[key] = spec
    return out


def load_space(path: str | None, method: str) -> dict[str, Any]:
    if path:
        raw = yaml.safe_load(Path(path).read_text())
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: a search space is a mapping of config keys")
        return raw
    return {**SPACES["common"], **SPACES.get(method, {})}


def _trial(params: dict[str, Any], base: dict) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = ExperimentConfig.with_overrides(base["cfg"], {**params, "name": f"trial-{tune.get_context().get_trial_id()}"})
    method = get_method(cfg.method, cfg.method_args)
    *upstream, last = method.stages
    for job in dict.fromkeys(s.job if s.job != last.job else s.name for s in upstream):  # transient stages skipped
        pipeline.run(cfg, stage=job)
    pipeline.run(cfg, stage=last.name, callbacks=[TuneReportCallback()])


def tune_method(cfg: ExperimentConfig, space: dict[str, Any], num_samples: int, max_concurrent: int,
                out: str, grace_epochs: int = 1) -> list[dict]:
    """Search ``space`` around ``cfg``; writes ``tune_results.md`` and returns the trials, best first."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    for key in space:  # fail before any trial on a key the config does not have
        cfg.with_overrides({key: _sample_value(space[key])})
    cfg.dataset()
    # trials run in their own working directories: relative local paths must not reach them
    cfg = cfg.with_overrides({k: str(Path(v).absolute()) for k, v in (("data", cfg.data), ("storage", cfg.storage))
                              if "://" not in v})
    # one report per epoch, then the stage's final report (test metrics, artifact): max_t leaves room for it
    scheduler = ASHAScheduler(metric="valid_auc", mode="max", max_t=cfg.train.epochs + 1,
                              grace_period=grace_epochs, time_attr="training_iteration")
    tuner = tune.Tuner(
        tune.with_parameters(_trial, base={"cfg": cfg}),
        param_space=to_tune(space),
        tune_config=tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=max_concurrent,
                                    scheduler=scheduler),
        run_config=tune.RunConfig(name=f"tune-{cfg.method}", storage_path=str(Path(out).absolute())),
    )
    grid = tuner.fit()
    trials, failed = [], [r for r in grid if r.error is not None]
    if failed and len(failed) == len(grid):
        raise TuneError(f"every trial failed; the first: {failed[0].error}") from failed[0].error
    for r in grid:
        if r.error is not None or not r.metrics or r.metrics.get("valid_auc") is None:
            continue
        trials.append({"valid_auc": r.metrics.get("valid_auc"), "reports": r.metrics.get("training_iteration"),
                       "test_auc": r.metrics.get("test_auc"),
                       **{k: r.config.get(k) for k in space}})
    trials.sort(key=lambda t: -(t["valid_auc"] or -1))
    lines = ["| valid AUC | test AUC | reports | " + " | ".join(space) + " |", "|---|---|---|" + "---|" * len(space)]
    for t in trials:
        test = "stopped early" if t["test_auc"] is None else f"{t['test_auc']:.4f}"
        lines.append(f"| {t['valid_auc']:.4f} | {test} | {t['reports']} | " + " | ".join(str(t[k]) for k in space)
                     + " |")
    if failed:
        lines.append(f"\n{len(failed)} trial(s) failed, e.g. {failed[0].path}: {failed[0].error}")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "tune_results.md").write_text("\n".join(lines) + "\n")
    return trials


def _sample_value(spec: Any) -> Any:
    """A representative value of a space entry (for checking keys up front)."""
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, value), = spec.items()
        return value[0]
    return spec
