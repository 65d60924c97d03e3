"""Ray Tune over any config keys of a method's last stage, ASHA on target-validation AUC.

A trial is a Tune function trainable (Ray Train V2): it applies its sampled overrides
(dotted keys: ``train.lr``, ``model.deep``, ``method_args.alpha``), runs the upstream
stages through the pipeline (content-addressed: trials that share them train them once),
then fits the tuned stage's ``TorchTrainer`` with ``TuneReportCallback`` so every epoch's
``valid_auc`` reaches the scheduler. A tuned stage already committed (an earlier sweep tried the same
values) is not trained again: its recorded epochs and final metrics are reported in their order.

The ``train.*`` keys a trial samples are the tuned stage's alone (``stage_train``): the stages
upstream keep the run's and are shared by every trial. ``model.*`` keys shape every stage (a
fine-tuned model loads its pre-trained tables): trials that sample the same value share them.

Search spaces are YAML: a key maps to ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``,
``{randint: [lo, hi]}``, ``{choice: [...]}`` or a fixed value. Each method declares the space of
its own arguments next to them (``Method.search_space``); ``COMMON_SPACE`` holds the keys every
method shares. An interrupted sweep resumes (``Tuner.restore``) without re-running finished trials.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from ray.train.v2.api.callback import UserCallback
from ray.tune.schedulers import PopulationBasedTraining

from raytrain_ctr import pipeline
from raytrain_ctr.config import ExperimentConfig
from raytrain_ctr.methods import get_method
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.checkpoint import ORIGIN_FILE, origin

# what every method shares, tuned alike for baselines and methods (equal budgets): the learning rates, the tables'
# width, the batch size, and the regularisation of id-heavy models (the looked-up rows' L2, dropout)
COMMON_SPACE: dict[str, Any] = {
    "train.lr": {"loguniform": [1e-4, 3e-3]}, "train.sparse_lr": {"loguniform": [1e-3, 5e-2]},
    "model.embedding_dim": {"choice": [8, 16, 32]}, "train.batch_size": {"choice": [512, 1024, 2048]},
    "train.embedding_l2": {"choice": [0.0, 1e-4, 1e-3, 1e-2]}, "model.dropout": {"choice": [0.0, 0.1, 0.3]}}


SCHEDULERS = ("asha", "pbt")
# the train keys a run can change between epochs and go on (not the optimizer's kind, the epochs, the seed, ...)
CONTINUABLE = ("lr", "sparse_lr", "weight_decay", "embedding_l2", "batch_size", "sparse_eps", "patience")
PBT_METRIC = "pbt_valid_auc"  # the validation AUC PBT ranks trials by
PBT_TIME = "pbt_epochs"  # PBT's clock: the epochs a trial's lineage has trained


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


def method_space(method: str, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shared keys and the method's own (``method_args.*``), less the arguments ``fixed`` by the caller."""
    own = {f"method_args.{k}": v for k, v in get_method(method, fixed).search_space.items()
           if k not in (fixed or {})}
    return {**COMMON_SPACE, **own}


def load_space(path: str | None, method: str, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    if path:
        raw = yaml.safe_load(Path(path).read_text())
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: a search space is a mapping of config keys")
        return raw
    return method_space(method, fixed)


def tuned_overrides(cfg: ExperimentConfig, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled keys as config overrides: ``train.*`` keys go to the tuned (last) stage only."""
    last = get_method(cfg.method, cfg.method_args).stages[-1].name
    return {(f"stage_train.{last}.{k[6:]}" if k.startswith("train.") else k): v for k, v in params.items()}


def pbt_keyed(metrics: dict[str, Any], epochs: int) -> dict[str, Any]:
    """A report with PBT's metric and clock (``epochs``: what the trial's lineage has trained; 0 for a final)."""
    return {**metrics, PBT_METRIC: metrics.get("valid_auc"), PBT_TIME: epochs}


def _trial(params: dict[str, Any], base: dict) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = base["cfg"].with_overrides({**tuned_overrides(base["cfg"], params),
                                      "name": f"trial-{tune.get_context().get_trial_id()}"})
    method = get_method(cfg.method, cfg.method_args)
    *upstream, last = method.stages
    for job in dict.fromkeys(s.job if s.job != last.job else s.name for s in upstream):  # transient stages skipped
        pipeline.run(cfg, stage=job)
    if base.get("scheduler") == "pbt":
        result = _pbt_stage(cfg, last.name)
    else:
        result = pipeline.run(cfg, stage=last.name, callbacks=[TuneReportCallback()])[last.name]
    if result.get("skipped"):  # trained before (an earlier sweep, the same values): replay what it reported
        warm = (result.get("warm_start") or {}).get("epoch", -1)  # the epochs it took over were reported before
        for epoch in result.get("history", []):
            if epoch["epoch"] > warm:  # (no checkpoint: PBT clones no trial from a replay)
                tune.report(pbt_keyed(epoch, epoch["epoch"] + 1))
        final = {k: v for k, v in result.items() if k not in ("history", "skipped", "artifact", "inputs")}
        tune.report(pbt_keyed(final, 0))


def _pbt_stage(cfg: ExperimentConfig, stage: str) -> dict:
    """The tuned stage of a PBT trial: started from the checkpoint PBT restarts the trial with, if any (its own
    after a pause, or a better trial's, with this trial's new values: ``train.warm_start``); every epoch's
    report goes to Tune with its checkpoint, for PBT to clone. The stage runs in a thread while this one
    hands its reports (from the Train controller, through a queue actor) to ``tune.report``."""
    import shutil
    import tempfile
    import threading

    from ray import tune
    from ray.util.queue import Queue

    restarted, warm, epochs = tune.get_checkpoint(), None, 0
    if restarted is not None:
        warm = restarted.to_directory(tempfile.mkdtemp(prefix="warm-start-"))
        method = get_method(cfg.method, cfg.method_args)
        own = pipeline.artifact_name(method.stage(stage), pipeline.stage_keys(cfg, method))
        # paused, not cloned (this trial's run, under the key of its values): the stage resumes its own run's last
        # checkpoint; a final report's checkpoint has no origin: its stage is committed, and is replayed
        found = origin(warm) if (Path(warm) / ORIGIN_FILE).exists() else None
        if found is None or found["artifact"] == own and found.get("run") == cfg.run_name:
            shutil.rmtree(warm, ignore_errors=True)
            warm = None
        else:
            cfg = cfg.with_overrides({f"stage_train.{stage}.warm_start": warm})
            epochs = found["epoch"] + 1
    reports, persisted = (Queue(maxsize=1, actor_options={"num_cpus": 0}) for _ in range(2))
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = pipeline.run(cfg, stage=stage,
                                             callbacks=[ReportCheckpoints(reports, persisted)])[stage]
        except BaseException as e:  # noqa: BLE001 - raised again in the trial's thread
            outcome["error"] = e
        finally:
            reports.put(None)

    thread = threading.Thread(target=fit, daemon=True, name=f"stage-{stage}")
    thread.start()
    try:
        while (item := reports.get()) is not None:
            metrics, checkpoint = item
            # PBT's clock: the epochs the trial's lineage has trained (a cloned trial goes on from its donor's)
            epochs = metrics["epoch"] + 1 if "epoch" in metrics and not metrics.get("final") else epochs
            tune.report(pbt_keyed(metrics, epochs), checkpoint=checkpoint)
            persisted.put(True)
        thread.join()
    finally:
        if warm:
            shutil.rmtree(warm, ignore_errors=True)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class EpochPBT(PopulationBasedTraining):
    """PBT over a trial's epoch reports: its final one (the best epoch's AUC, the test metrics) ends the trial,
    and is never a time to clone another into it."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("final") or not result.get("should_checkpoint"):  # a final report, or a replayed epoch
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class ReportCheckpoints(UserCallback):
    """Ray Train's reports, each with its checkpoint, into a queue the Tune trial reads (Ray's
    ``TuneReportCallback`` passes the metrics alone); the stage waits until Tune has persisted the checkpoint
    (``persisted``), so Ray Train's ``num_to_keep`` never deletes one Tune is still copying."""

    def __init__(self, queue: Any, persisted: Any) -> None:
        self.queue, self.persisted = queue, persisted

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        self.queue.put((metrics[0], checkpoint))
        self.persisted.get()


def mutable_keys(cfg: ExperimentConfig, space: dict[str, Any]) -> list[str]:
    """The keys of ``space`` PBT may change in the middle of a trial: the tuned stage's own, which leave what it
    continues from as it is: its ``train.*`` keys in :data:`CONTINUABLE`, and a method argument that no upstream
    stage's key holds and that leaves the stage's parameter shapes as they are (built on the meta device at the
    space's ends). The others (the tables' width, dropout: the pre-training's too) are drawn once per trial and
    copied on exploit."""
    from raytrain_ctr.methods import StageContext

    method = get_method(cfg.method, cfg.method_args)
    upstream = method.stages[:-1]
    specs = cfg.dataset().specs()
    out = []
    for key, spec in space.items():
        if not isinstance(spec, dict) or "grid" in spec:
            continue
        if key.startswith("train."):
            if key.removeprefix("train.") in CONTINUABLE:
                out.append(key)
            continue
        arg = key.removeprefix("method_args.")
        if arg == key or any(not st.plain and (st.args is None or arg in st.args) for st in upstream):
            continue
        shapes = []
        for value in _ends(spec):
            m = get_method(cfg.method, {**cfg.method_args, arg: value})
            model = StageContext(m.stages[-1], specs, cfg.model, m.args).dry_build()
            shapes.append({k: tuple(v.shape) for k, v in model.state_dict().items()})
        if all(s == shapes[0] for s in shapes):
            out.append(key)
    return out


def tune_method(cfg: ExperimentConfig, space: dict[str, Any], num_samples: int, max_concurrent: int,
                out: str, grace_epochs: int = 1, scheduler: str = "asha", perturbation_interval: int = 1
                ) -> list[dict]:
    """Search ``space`` around ``cfg``, or resume the sweep an earlier call left unfinished in ``out``
    (its finished trials are kept, not re-run); writes ``tune_results.md`` and returns the trials, best
    first, each with its sampled keys (PBT: their values at the trial's end), its last ``valid_auc``, its
    reports, and its ``test_auc`` (None where ASHA stopped it early).

    ``scheduler``: ``asha`` stops the worse trials after ``grace_epochs``; ``pbt`` (population-based training)
    runs them all, and every ``perturbation_interval`` epochs a trial in the bottom quarter continues from a
    top-quarter trial's checkpoint with that trial's values perturbed (:func:`mutable_keys`)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.util import placement_group_table

    if scheduler not in SCHEDULERS:
        raise SpecError(f"scheduler: '{scheduler}' is not one of {list(SCHEDULERS)}")
    if perturbation_interval < 1:
        raise SpecError(f"perturbation interval: at least 1 epoch, got {perturbation_interval}")
    for key in space:  # fail before any trial on a key the config does not have
        cfg.with_overrides(tuned_overrides(cfg, {key: _sample_value(space[key])}))
    cfg.dataset()
    mutable = mutable_keys(cfg, space) if scheduler == "pbt" else []
    if scheduler == "pbt" and not mutable:
        raise SpecError(f"PBT needs a key it can change mid-trial (the tuned stage's train.* keys, or a method "
                        f"argument that leaves its parameters' shapes); the space has none: {sorted(space)}")
    # trials run in their own working directories: relative local paths must not reach them
    cfg = cfg.with_overrides({k: str(Path(v).absolute()) for k, v in (("data", cfg.data), ("storage", cfg.storage))
                              if "://" not in v})
    trainable = tune.with_parameters(_trial, base={"cfg": cfg, "scheduler": scheduler})
    experiment = Path(out).absolute() / f"tune-{cfg.method}"
    sweep = {"config": cfg.to_dict(), "space": space, "samples": num_samples, "grace_epochs": grace_epochs,
             **({"scheduler": scheduler, "perturbation_interval": perturbation_interval} if scheduler != "asha"
                else {})}
    recorded = Path(out) / "sweep.json"
    if recorded.exists() and json.loads(recorded.read_text()) != json.loads(json.dumps(sweep, default=str)):
        raise SpecError(f"{out} holds another sweep (its config, space or size differ: {recorded}); "
                        f"give another --out, or remove it to start afresh")
    Path(out).mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(sweep, indent=2, default=str))
    if tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        # one report per epoch, then the stage's final report (test metrics, artifact); max_t is one more, so a
        # trial that runs every epoch ends by itself, never stopped by the scheduler at its final report
        tuned = to_tune(space)
        chosen = (ASHAScheduler(metric="valid_auc", mode="max", max_t=cfg.train.epochs + 2,
                                grace_period=grace_epochs, time_attr="training_iteration") if scheduler == "asha" else
                  EpochPBT(time_attr=PBT_TIME, metric=PBT_METRIC, mode="max",
                           perturbation_interval=perturbation_interval,
                           hyperparam_mutations={k: tuned[k] for k in mutable}))
        tuner = tune.Tuner(
            trainable, param_space=tuned,
            tune_config=tune.TuneConfig(
                num_samples=num_samples, scheduler=chosen,
                # a trial PBT stops must take its stage's thread (and the stage's lease) down with its actor
                reuse_actors=False,
                # the config's own values first (a sweep never ends below its starting point on validation), then
                # seeded samples: the same seed draws the same configurations for every method. The cap on trials
                # at once goes to the generator: Ray 2.60 ignores TuneConfig's max_concurrent_trials beside one
                search_alg=BasicVariantGenerator(points_to_evaluate=[own_values(cfg, space)],
                                                 max_concurrent=max_concurrent, random_state=cfg.train.seed)),
            run_config=tune.RunConfig(name=experiment.name, storage_path=str(experiment.parent),
                                      # PBT clones a trial from its checkpoints: a few kept (Ray warns below 3)
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if mutable else None)))
    before = set(placement_group_table())
    try:
        grid = tuner.fit()
    finally:
        release_placement_groups(before)
    trials, failed = [], [r for r in grid if r.error is not None]
    if failed and len(failed) == len(grid):
        raise TuneError(f"every trial failed; the first: {failed[0].error}") from failed[0].error
    for r in grid:
        if r.error is not None or not r.metrics or r.metrics.get("valid_auc") is None:
            continue
        # a finished trial's final report has its best epoch's valid AUC; a stopped one, its best so far
        valid = r.metrics["valid_auc"] if r.metrics.get("final") else r.metrics.get("best_valid_auc",
                                                                                     r.metrics["valid_auc"])
        trials.append({"valid_auc": valid, "reports": r.metrics.get("training_iteration"),
                       "test_auc": r.metrics.get("test_auc"),
                       **{k: r.config.get(k) for k in space}})
    trials.sort(key=lambda t: -(t["valid_auc"] or -1))
    lines = ["| valid AUC | test AUC | reports | " + " | ".join(space) + " |", "|---|---|---|" + "---|" * len(space)]
    for t in trials:
        test = "stopped early" if t["test_auc"] is None else f"{t['test_auc']:.4f}"
        lines.append(f"| {t['valid_auc']:.4f} | {test} | {t['reports']} | " + " | ".join(str(t[k]) for k in space)
                     + " |")
    stopped = sum(t["test_auc"] is None for t in trials)
    lines.append(f"\n{len(trials)} trials, {stopped} stopped early by ASHA" if scheduler == "asha" else
                 f"\n{len(trials)} trials, population-based training (every {perturbation_interval} epoch(s) a "
                 f"bottom-quarter trial continues from a top-quarter one, perturbing {', '.join(mutable)}); "
                 f"{len(exploits(experiment))} exploits (trial ← trial it cloned, at report: "
                 f"{', '.join(f'{e[0]} ← {e[1]} at {e[2]}' for e in exploits(experiment))}); the keys are each "
                 f"trial's values at its end")
    if failed:
        lines.append(f"\n{len(failed)} trial(s) failed, e.g. {failed[0].path}: {failed[0].error}")
    # Tune returns normally on Ctrl-C, with the trials so far: a sweep is done only when every trial it draws is
    # (one per sample and grid point; the config's own values take the first sample's place)
    expected = num_samples * math.prod(len(s["grid"]) for s in space.values() if isinstance(s, dict) and "grid" in s)
    done = grid.num_terminated + grid.num_errors
    if done < expected:
        lines.append(f"\ninterrupted: {done} of {expected} trials finished")
    (Path(out) / "tune_results.md").write_text("\n".join(lines) + "\n")
    if done < expected:
        raise TuneError(f"the sweep in {out} was interrupted with {done} of its {expected} trials finished; "
                        f"the same command resumes it (finished trials are kept)")
    return trials


def exploits(experiment: Path) -> list[list]:
    """PBT's exploits so far (its ``pbt_global.txt``): [trial, trial it cloned, report, its report, its config,
    the new config] each."""
    logs = sorted(Path(experiment).rglob("pbt_global.txt"))
    return [json.loads(line) for f in logs[:1] for line in f.read_text().splitlines() if line.strip()]


def own_values(cfg: ExperimentConfig, space: dict[str, Any]) -> dict[str, Any]:
    """The config's values of the space's sampled keys, where they lie in the space (a choice's options, a
    range's bounds); the others are left to the sampler."""
    raw = {**cfg.to_dict(), "method_args": get_method(cfg.method, cfg.method_args).args}  # with the defaults
    own = {}
    for key, spec in space.items():
        if not (isinstance(spec, dict) and len(spec) == 1) or "grid" in spec:
            continue
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        (kind, value), = spec.items()
        if kind == "choice" and node in value or kind != "choice" and node is not None and value[0] <= node <= value[1]:
            own[key] = node
    return own


def release_placement_groups(before: set[str]) -> None:
    """Remove the placement groups created since ``before`` that are still reserved. Measured on Ray 2.60: a
    trial the scheduler stops (ASHA, or at ``max_t``) leaves its Train worker group's placement group reserved
    after the sweep; without this, a local cluster runs out of CPUs a few sweeps later and the next trial
    waits forever."""
    import ray
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    for pg_id, pg in placement_group_table().items():
        if pg_id not in before and pg["state"] == "CREATED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def _ends(spec: dict[str, Any]) -> list[Any]:
    """The values a space entry spans at its ends (every option of a choice)."""
    (kind, value), = spec.items()
    return list(value) if kind == "choice" else [value[0], value[1] - 1] if kind == "randint" else list(value)


def _sample_value(spec: Any) -> Any:
    """A representative value of a space entry (for checking keys up front)."""
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, value), = spec.items()
        return value[0]
    return spec
