"""The per-worker training loop of one stage, run inside a Ray Train ``TorchTrainer``.

Per epoch: step through the stage's train domains together (one batch of each per
step, sized in proportion to the domains, every row once across workers), evaluate
the target's validation split exactly, report metrics and a checkpoint. Early stopping
on validation AUC; at the end the best epoch's model is evaluated on the test split
and reported as the stage's artifact.

A restarted worker group (``FailureConfig``) resumes from the last checkpoint: model,
optimizer state, RNG, best-so-far and history, at the next epoch. A stage given another run's
epoch checkpoint (``train.warm_start``) starts from it the same way, with its own hyperparameters.

With sharded tables (``model.embedding_backend: torchrec``) every forward pass is a
collective, so the workers step in lockstep: a worker whose shard ran out steps with an
empty batch until every worker is done.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray.train
import torch
import torch.distributed as dist

from raytrain_ctr.artifacts import latest_pointer, load_tensors
from raytrain_ctr.batch import Batch
from raytrain_ctr.config import ExperimentConfig, TrainConfig
from raytrain_ctr.data.dataset import join, resolve
from raytrain_ctr.data.encode import FeatureEncoder
from raytrain_ctr.data.ingest import CachedSplit, iter_domain
from raytrain_ctr.embedding import is_sharded, shard_model, sharded_parameter_ids, unsharded_state
from raytrain_ctr.embedding.collection import keep_padding_rows
from raytrain_ctr.methods import Method, Stage, StageContext
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.runtime import report
from raytrain_ctr.spec import DomainSpec, SpecError
from raytrain_ctr.train import metrics as M
from raytrain_ctr.train.checkpoint import (
    ORIGIN_FILE,
    STATE_FILE,
    restore,
    save_sharded,
    training_state,
    warm_start,
)
from raytrain_ctr.train.device import place, stage_device, to_device
from raytrain_ctr.train.state import freeze, load_filtered, train_mode
from raytrain_ctr.train.step import EmbeddingL2, GroupOptimizer
from raytrain_ctr.train.sync import GradientSync, all_reduce_sum, average_statistics, sparse_parameters, world_size
from raytrain_ctr.train.tracking import peak_rss_mb, trackers

MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"

def dataset_key(domain: str, split: str) -> str:
    return f"{domain}_{split}"


def sparse_optimizer(params: list[torch.nn.Parameter], tc: TrainConfig) -> torch.optim.Optimizer:
    """The local backend's optimizer of embedding rows (sparse gradients)."""
    lr = tc.sparse_lr or tc.lr
    if tc.sparse_optimizer == "adam":
        return torch.optim.SparseAdam(params, lr=lr, eps=tc.sparse_eps)
    if tc.sparse_optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=tc.sparse_eps)
    if tc.sparse_optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise SpecError(f"train.sparse_optimizer: '{tc.sparse_optimizer}' is fused into TorchRec's kernels; it needs "
                    f"model.embedding_backend: torchrec")


def make_optimizers(model: torch.nn.Module, tc: TrainConfig, ctx: StageContext | None = None
                    ) -> list[torch.optim.Optimizer]:
    """A sparse optimizer for local tables, Adam for dense parameters; sharded tables have
    their optimizer fused into the backward and take none here, the stage's parameter groups
    (``ctx``) their own."""
    skip = sharded_parameter_ids(model) | (ctx.group_parameter_ids() if ctx else set())
    sparse_ids = {id(p) for p in sparse_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    sparse = [p for p in params if id(p) in sparse_ids]
    dense = [p for p in params if id(p) not in sparse_ids]
    opts: list[torch.optim.Optimizer] = []
    if sparse:
        opts.append(keep_padding_rows(sparse_optimizer(sparse, tc), sparse))
    if dense:
        opts.append(torch.optim.Adam(dense, lr=tc.lr, weight_decay=tc.weight_decay))
    return opts


def build_stage_model(method: Method, stage: Stage, specs: dict[str, DomainSpec], model_cfg: ModelConfig,
                      inputs: str | dict[str, str] | None = None) -> tuple[torch.nn.Module, StageContext]:
    """Build the stage's model, load its inputs (each into its place), freeze, let the stage prepare,
    and set up its parameter groups. ``inputs``: a path per input name, or one path for every
    input (an input without a path is not loaded: dry builds, tests)."""
    paths = inputs if isinstance(inputs, dict) else {name: inputs for name in stage.inputs} if inputs else {}
    unknown = sorted(set(paths) - set(stage.inputs))
    if unknown:
        raise SpecError(f"stage '{stage.name}' has no input(s) {unknown} (inputs: {sorted(stage.inputs)})")
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for path in dict.fromkeys(paths.values()):
        loaded[path] = load_tensors(path, f"the run of the stage that wrote {path}")
    ctx = StageContext(stage, specs, model_cfg, method.args, {name: loaded[p] for name, p in paths.items()})
    hooks = stage.hooks
    model = hooks.build(ctx)
    for name, inp in stage.inputs.items():
        if name in paths and inp.include:
            load_filtered(model, ctx.inputs[name], inp.include, inp.exclude, source=paths[name], strip=inp.strip,
                          into=inp.into, exclude_modules=inp.exclude_modules)
    freeze(model, stage.freeze)
    hooks.prepare(model, ctx)
    ctx.groups = {g.name: GroupOptimizer(model, g) for g in hooks.param_groups(model, ctx)}
    train_mode(model)
    return model, ctx


def train_step(model: torch.nn.Module, ctx: StageContext, batches: dict[str, Batch],
               optimizers: list[torch.optim.Optimizer], sync: GradientSync,
               embedding_l2: EmbeddingL2 | None = None) -> tuple[float, int]:
    """One optimisation step over this worker's batches of the step (maybe none).

    The loss (with ``embedding_l2``'s penalty of the step's lookups, summed over rows like it) is
    divided by the step's *global* row count and the gradients summed over workers, so the update
    is that of the global mean loss; the stage's parameter groups take no part in it. Then the
    stage's ``after_step`` hook. Returns (this worker's loss sum, the global row count); nothing is
    done when no worker had rows left.
    """
    hooks = ctx.stage.hooks
    n_local = sum(len(b) for b in batches.values())
    (n_global,) = all_reduce_sum([n_local])
    if n_global == 0:
        return 0.0, 0
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    with ctx.main_loss():
        with embedding_l2.recording() if embedding_l2 else contextlib.nullcontext():
            step_loss = hooks.loss(model, batches, ctx) if batches else torch.zeros(())
        loss = (step_loss + (embedding_l2.penalty() if embedding_l2 else 0.0)) / n_global
        penalty = hooks.penalty(model, batches, ctx)
        if penalty is not None:
            loss = loss + penalty / world_size()
        if loss.requires_grad:
            loss.backward()
    sync()
    for opt in optimizers:
        opt.step()
    ctx.step += 1
    hooks.after_step(model, batches, ctx)
    return float(step_loss.detach()), int(n_global)


def lockstep(batches: Iterable[Batch], empty: Batch) -> Iterator[Batch]:
    """Yield ``batches``, then ``empty`` until every worker's are exhausted (sharded models:
    each forward pass is a collective)."""
    it = iter(batches)
    while True:
        b = next(it, None)
        (alive,) = all_reduce_sum([b is not None])
        if alive == 0:
            return
        yield empty if b is None else b


def evaluate(model: torch.nn.Module, ctx: StageContext, batches: Iterable[Batch], with_users: bool,
             empty: Batch | None = None, activity: M.Activity | None = None, split: str = "evaluation"
             ) -> dict[str, Any]:
    """Exact metrics over the whole split, each worker holding about its share of it (``evaluate_sharded``).
    With ``empty`` given, workers step in lockstep (sharded models); with ``activity``, also per
    user-activity bucket (``by_activity``). An empty or one-class split, or a non-finite prediction,
    stops the stage (:class:`~raytrain_ctr.train.metrics.MetricsError`) instead of reporting −1 or nan."""
    model.eval()
    probs, labels, users = [], [], []
    with torch.no_grad():
        for b in (batches if empty is None else lockstep(batches, empty)):
            probs.append(torch.sigmoid(ctx.stage.hooks.logits(model, b, ctx)).cpu())
            labels.append(b.label.cpu())
            if b.user is not None:
                users.append(b.user.cpu())
    train_mode(model)
    return M.evaluate_sharded(M.to_numpy(labels), M.to_numpy(probs), M.to_numpy(users, np.int64) if with_users else
                              None, split, activity)


def _maybe_fail(tc: TrainConfig, epoch: int, step: int, marker_dir: str) -> None:
    """Testing aid: the last worker dies once, mid-epoch ``fail_once_at_epoch`` (after its first step).

    It first waits a few seconds: Ray Train registers a reported checkpoint asynchronously,
    and a worker killed within the same instant could lose it (a real crash then loses one
    epoch more, never the run).
    """
    ctx = ray.train.get_context()
    if tc.fail_once_at_epoch != epoch or step != 1 or ctx.get_world_rank() != ctx.get_world_size() - 1:
        return
    marker = Path(marker_dir) / "failed-once"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(epoch))
        time.sleep(5)
        os._exit(1)


@dataclass(frozen=True)
class StageJob:
    """What the driver hands every worker of a stage, resolved once: the experiment, the method
    and the stage (with its hooks), the domains' specs, per-domain batch sizes, a local path per
    input, and where the stage's run keeps its files."""

    cfg: ExperimentConfig
    method: Method
    stage: Stage
    specs: dict[str, DomainSpec]
    batch_sizes: dict[str, int]
    inputs: dict[str, str]
    run_dir: str
    extra_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per train domain: diagnostics
    activity: M.Activity | None = None  # the test metrics are also broken down by user activity
    cached: dict[str, CachedSplit] = field(default_factory=dict)  # splits held whole, sliced by rank (no Ray Data)
    rebuild: str = "the stage's run with --force"  # the command that trains the stage afresh (in errors)
    artifact: str = ""  # the stage's artifact name (its trackers' run name, its checkpoints' pointer)
    checkpoints: str = ""  # where the stage's Ray Train runs keep their checkpoints (STORAGE/_ray)
    run: str = ""  # this training of the stage (its own Ray Train run's name), the same on any worker group
    fresh: bool = False  # resume only this training's checkpoints (a forced stage)
    shared: bool = False  # reported in a run that serves several stages (checkpoints named by the artifact)

    def shards(self, streams: dict[str, Any] | None = None) -> dict[str, Any]:
        """This worker's shard of every split: its slice of a cached table, else its Ray Data iterator
        (``streams``, else the run's ``ray.train.get_dataset_shard``)."""
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        keys = {dataset_key(d, "train") for d in self.stage.train_domains}
        keys |= {dataset_key(self.stage.eval_domain, s) for s in ("valid", "test")}
        keys |= {dataset_key(d, "valid") for d in selection_domains(self.stage, self.train)}
        return {k: self.cached[k].shard(rank, world) if k in self.cached else
                streams[k] if streams is not None else ray.train.get_dataset_shard(k) for k in keys}

    def resume_point(self) -> ray.train.Checkpoint | None:
        """The stage's latest epoch checkpoint, by its pointer (:func:`latest_pointer`, written as Ray Train
        registers each), whichever run wrote it (a fresh stage: only this training's). None when there is none, or the
        run that wrote it has since deleted it (``num_to_keep``)."""
        if not self.checkpoints:
            return None
        fs, path = resolve(latest_pointer(self.checkpoints, self.artifact))
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as f:
            pointer = json.loads(f.read())
        if self.fresh and pointer.get("stage_run") != self.run:
            return None
        cfs, root = resolve(self.checkpoints)
        directory = join(root, pointer["checkpoint"])
        if cfs.get_file_info(join(directory, STATE_FILE)).type == pafs.FileType.NotFound:
            return None
        return ray.train.Checkpoint(directory, filesystem=cfs)

    @property
    def tags(self) -> dict[str, str]:
        """What every report of the stage carries besides its metrics: whose it is (its pointer, the driver)."""
        return {"artifact": self.artifact, "stage_run": self.run}

    def checkpoint_name(self, epoch: int | str) -> str | None:
        """The checkpoint's directory name in a shared run (by the artifact; unique), else Ray Train's own."""
        return f"{self.artifact}.{epoch}.{time.time_ns()}" if self.shared else None

    @property
    def train(self) -> TrainConfig:
        return self.cfg.train_for(self.stage.name, self.stage.overrides)


def selection_domains(stage: Stage, tc: TrainConfig) -> tuple[str, ...]:
    """The domains whose validation AUC keeps the stage's best epoch (``train.select_on``)."""
    return stage.train_domains if tc.select_on == "train" else (stage.eval_domain,)


def train_stage(config: dict) -> None:
    """``train_loop_per_worker`` of a stage's own ``TorchTrainer``: ``config["job"]`` is its :class:`StageJob`;
    it resumes its run's last checkpoint (a restarted worker group, a resubmitted run of the same name), else the
    stage's latest wherever it was written (:meth:`StageJob.resume_point`)."""
    job: StageJob = config["job"]
    train_job(job, job.shards(), ray.train.get_checkpoint() or job.resume_point())


def train_job(job: StageJob, splits: dict[str, Any], checkpoint: ray.train.Checkpoint | None) -> None:
    """Train one stage on this worker: ``splits`` its shard of each split, ``checkpoint`` the epoch (or finished
    stage) it resumes from."""
    cfg, stage, specs, tc = job.cfg, job.stage, job.specs, job.train
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)

    torch.set_num_threads(tc.cpus_per_worker)
    device = stage_device(tc.use_gpu, in_ray_worker=True)
    model, ctx = build_stage_model(job.method, stage, specs, cfg.model, job.inputs)
    place(model, device)
    if cfg.model.embedding_backend == "torchrec":
        shard_model(model, world_size(), cfg.model.sharding, cfg.model.row_wise_from_rows, tc.sparse_optimizer,
                    tc.sparse_lr or tc.lr, tc.sparse_eps, device)
    optimizers = make_optimizers(model, tc, ctx)
    checkpointed = optimizers + [g.optimizer for g in ctx.groups.values()]
    sync = GradientSync(model, exclude=ctx.group_parameter_ids())
    embedding_l2 = EmbeddingL2(model, tc.embedding_l2) if tc.embedding_l2 else None
    encoders = {d: FeatureEncoder(specs[d], source=f"domain '{d}', an evaluation split") for d in specs}
    train_encoders = {d: FeatureEncoder(specs[d], job.extra_columns.get(d, ()), f"domain '{d}', train split")
                      for d in stage.train_domains}  # the driver adds the file and row (pipeline.locate)
    empties = {d: to_device(e.empty(), device) for d, e in encoders.items()} if is_sharded(model) else None
    train_empties = {d: to_device(e.empty(), device) for d, e in train_encoders.items()} if is_sharded(model) else None

    start_epoch, best, history, resumed_from = 0, {"auc": -1.0, "epoch": -1, "state": None, "bad": 0}, [], None
    saved, warm = None, None
    if checkpoint:
        with checkpoint.as_directory() as d:
            if (Path(d) / METRICS_FILE).exists():  # the stage had finished: report its files again
                files = {f.name: json.loads(f.read_text()) if f.suffix == ".json" else
                         load_tensors(f, job.rebuild) if f.suffix == ".pt" else
                         f.read_bytes() for f in Path(d).iterdir() if f.is_file()}
                report({**{k: v for k, v in files[METRICS_FILE].items() if k != "history"}, **job.tags},
                       files, directory=job.checkpoint_name("final"))
                return
            saved = restore(model, checkpointed, d, job.rebuild)
    elif tc.warm_start:  # another run's epoch, continued with this config's hyperparameters (PBT's exploit)
        saved = warm_start(model, checkpointed, tc.warm_start, job.rebuild)
        warm = saved["origin"]
    if saved is not None:
        start_epoch, best, history = saved["epoch"] + 1, saved["best"], saved["history"]
        ctx.step = int(saved.get("step", 0))
        resumed_from = start_epoch

    batch_sizes = job.batch_sizes
    eval_domain = stage.eval_domain
    select = selection_domains(stage, tc)

    epoch_trackers = trackers(cfg, job.artifact or stage.name, ray.train.get_context().get_world_rank())

    def eval_metrics(split: str, activity: M.Activity | None = None, domain: str = eval_domain) -> dict[str, Any]:
        batches = (to_device(b, device) for b in iter_domain(splits[dataset_key(domain, split)],
                                                              encoders[domain], max(batch_sizes.values())))
        average_statistics(model)
        return evaluate(model, ctx, batches, specs[domain].user_id is not None, empties[domain] if empties else None,
                        activity, f"{domain} {split}")

    def selection_auc(valid: dict[str, Any]) -> float:
        """The AUC the epoch is kept on: the eval domain's, or the mean over the train domains' (select_on)."""
        return float(np.mean([valid["auc"] if d == eval_domain else eval_metrics("valid", domain=d)["auc"]
                              for d in select]))

    for epoch in range(start_epoch, tc.epochs):
        if best["bad"] >= tc.patience:
            break
        t0 = time.perf_counter()
        its = {d: (to_device(b, device) for b in iter_domain(splits[dataset_key(d, "train")], train_encoders[d],
                                                             batch_sizes[d], shuffle_buffer=tc.shuffle_buffer,
                                                             seed=tc.seed + epoch))
               for d in stage.train_domains}
        loss_sum, rows, steps = 0.0, 0, 0
        while True:
            batches = {d: b for d, it in its.items() if (b := next(it, None)) is not None}
            if train_empties:
                batches = {d: batches[d] if d in batches else train_empties[d] for d in its}
            step_loss, n_global = train_step(model, ctx, batches, optimizers, sync, embedding_l2)
            if n_global == 0:
                break
            loss_sum, rows, steps = loss_sum + step_loss, rows + sum(len(b) for b in batches.values()), steps + 1
            _maybe_fail(tc, epoch, steps, job.run_dir)
        loss_sum, rows = all_reduce_sum([loss_sum, rows])
        train_seconds = time.perf_counter() - t0
        (peak_rss,) = all_reduce_sum([peak_rss_mb()], dist.ReduceOp.MAX)
        valid = eval_metrics("valid")
        diagnostics = stage.hooks.epoch_metrics(model, ctx)
        selected = selection_auc(valid)
        if selected > best["auc"]:
            best = {"auc": selected, "valid_auc": valid["auc"], "epoch": epoch,
                    "state": copy.deepcopy(model.state_dict()), "bad": 0}
        else:
            best["bad"] += 1
        metrics = {"epoch": epoch, "steps": steps, "train_loss": loss_sum / max(rows, 1), "train_rows": int(rows),
                   "train_seconds": train_seconds, "epoch_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss,
                   "resumed_from_epoch": resumed_from, "best_valid_auc": best.get("valid_auc", best["auc"]),
                   **({"select_auc": selected} if select != (eval_domain,) else {}),
                   **{f"valid_{k}": v for k, v in valid.items()}, **diagnostics}
        history.append(metrics)
        for tracker in epoch_trackers:
            tracker.log(metrics, epoch)
        meta, shards = training_state(model, checkpointed, epoch, best, history, ctx.step)
        report({**metrics, **job.tags},
               {STATE_FILE: meta, ORIGIN_FILE: {"artifact": job.artifact, "epoch": epoch, "stage": stage.identity,
                                                "run": cfg.run_name}},
               None if shards is None else lambda d, s=shards: save_sharded(s, d), directory=job.checkpoint_name(epoch))

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    test = eval_metrics("test", job.activity)
    extra = stage.hooks.artifacts(model, ctx)
    final = {"stage": stage.name, "method": job.method.name, "best_epoch": best["epoch"],
             "valid_auc": best.get("valid_auc", best["auc"]), "resumed_from_epoch": resumed_from, "final": True,
             **({"warm_start": warm} if warm else {}),
             **({"select_auc": best["auc"], "select_on": list(select)} if select != (eval_domain,) else {}),
             **{f"test_{k}": v for k, v in test.items()}}
    files = {MODEL_FILE: unsharded_state(model), METRICS_FILE: {**final, "history": history}, **extra}
    for tracker in epoch_trackers:
        tracker.log({k: v for k, v in final.items() if k.startswith("test_")}, best["epoch"])
        tracker.close()
    report({**final, **job.tags}, files, directory=job.checkpoint_name("final"))
