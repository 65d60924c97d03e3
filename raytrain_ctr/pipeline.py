"""Run a method's stages on one Ray Train worker group (:mod:`raytrain_ctr.train.group`; a stage of a Tune trial
in its own ``TorchTrainer.fit``), artifacts between stages.

Stage artifacts are content-addressed: ``STORAGE/stages/STAGE-KEY/{model.pt,metrics.json,manifest.json}``
(committed and verified by :mod:`raytrain_ctr.artifacts`; trained under a lease, :mod:`raytrain_ctr.lease`)
(``plain-KEY`` for plain supervised stages)
where KEY hashes everything that determines the result (data path and version: the specs and
every file's name, size and modification time; domains, model and train configs, the method's
arguments the stage declares where it is not plain supervised training, freeze rules, time
windows resolved against the run's ``as_of``, and each input's load rule and upstream artifact).
So a stage whose artifacts exist is skipped (a
re-submitted job resumes where it stopped), and Source-only's training is the very
artifact Fine-Tune, L2-SP and KEEP pre-train from. Inside a stage, a restarted worker group or
a resubmitted run resumes from the stage's last epoch checkpoint (named in ``STORAGE/_ray/STAGE-KEY/latest.json``).
``STORAGE/RUN/results.json`` maps the run's stages to their artifacts. ``stage=NAME`` runs one stage (or one
job: the stages ``NAME.*``) alone against its upstream artifacts (``force`` re-runs a finished stage from scratch).
Finished stages are recorded in the artifact catalog (:mod:`raytrain_ctr.catalog`) under their ``as_of`` date, so a
stage's ``latest`` input finds the newest upstream artifact valid as of its own date.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytrain_ctr.artifacts import ArtifactError, commit, verify
from raytrain_ctr.catalog import Catalog
from raytrain_ctr.config import ADDED_DEFAULTS, NOT_IN_KEY, ExperimentConfig, TrainConfig, storage_path
from raytrain_ctr.data.dataset import CTRDataset, DataError, join, resolve
from raytrain_ctr.data.ingest import CachedSplit, ExactlyOnceDataConfig, TimeWindow, read_split, user_clicks
from raytrain_ctr.lease import Lease, stage_lease
from raytrain_ctr.methods import METHODS, Method, Stage, StageContext, get_method
from raytrain_ctr.runtime import check_workers
from raytrain_ctr.spec import SpecError, check_keys
from raytrain_ctr.train.checkpoint import origin
from raytrain_ctr.train.group import LatestCheckpoint, SharedWorkerGroup
from raytrain_ctr.train.loop import METRICS_FILE, MODEL_FILE, StageJob, dataset_key, selection_domains, train_stage
from raytrain_ctr.train.metrics import Activity, MetricsError
from raytrain_ctr.train.tracking import Progress, progress_line
from raytrain_ctr.windows import Window

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A stage cannot run (e.g. its upstream artifact is missing)."""


def _read_json(fs: pafs.FileSystem, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def train_rows(dataset: CTRDataset, domain: str) -> int:
    return sum(pq.read_metadata(f, filesystem=dataset.filesystem).num_rows for f in dataset.files(domain, "train"))


def batch_sizes(dataset: CTRDataset, domains: tuple[str, ...], batch_size: int) -> dict[str, int]:
    """Per-domain batch sizes in proportion to the domains' sizes, so they run out together."""
    rows = {d: train_rows(dataset, d) for d in domains}
    total = sum(rows.values())
    return {d: max(1, round(batch_size * r / total)) for d, r in rows.items()}


def check_stage_inputs(cfg: ExperimentConfig, dataset: CTRDataset, method: Method, stage: Stage) -> None:
    """Fail before starting workers: unknown domains, a time window without a time field or an
    ``as_of``, inputs naming no earlier stage, and the model must build from the specs."""
    for d in (*stage.train_domains, stage.eval_domain):
        dataset.domain(d)
    check_keys(dict.fromkeys(cfg.windows), window_keys(), "config: windows")
    window, eval_window = stage_windows(cfg, stage)
    if (window or eval_window) and cfg.as_of is None:
        raise SpecError(f"stage '{stage.name}' of '{method.name}' reads a time window relative to as_of: set as_of "
                        f"(raytrain-ctr run --as-of YYYY-MM-DD)")
    windowed = set(stage.train_domains) if window else set()
    windowed |= {stage.eval_domain} if eval_window else set()
    for d in sorted(windowed):
        if not dataset.domain(d).spec.time:
            raise SpecError(f"stage '{stage.name}' reads a time window of domain '{d}', whose spec has no time field")
    earlier = [s.name for s in method.stages[: [s.name for s in method.stages].index(stage.name)]]
    for name, inp in stage.inputs.items():
        if inp.stage not in earlier:
            raise SpecError(f"stage '{stage.name}' of '{method.name}': input '{name}' reads stage '{inp.stage}', "
                            f"which is not an earlier stage (earlier: {earlier})")
    StageContext(stage, dataset.specs(), cfg.model, method.args).dry_build()


def window_keys() -> set[str]:
    """What ``windows`` may name: every split ("train", "eval"), or a stage of any method (one config serves
    several methods in a comparison)."""
    return {"train", "eval", *(s.name for m in METHODS.values() for s in m().stages)}


def stage_windows(cfg: ExperimentConfig, stage: Stage) -> tuple[Window | None, Window | None]:
    """The windows of a stage's train splits and of its valid/test splits: the stage's own, else the config's."""
    return cfg.window(stage.name, stage.window), cfg.window(stage.name, stage.eval_window, "eval")


@dataclass(frozen=True)
class Resolved:
    """A stage's identity: ``key`` (its artifact), ``family`` (the same stage on any date), and the
    artifact directory each of its inputs reads (None: no catalog entry valid as of the run's date)."""

    key: str
    family: str
    inputs: dict[str, str | None]


def _digest(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def as_of_date(cfg: ExperimentConfig) -> dt.date | None:
    return dt.date.fromisoformat(cfg.as_of) if cfg.as_of else None


def catalog(cfg: ExperimentConfig) -> Catalog:
    return Catalog(storage_path(cfg, "catalog"))


def resolve_stages(cfg: ExperimentConfig, method: Method, dataset: CTRDataset | None = None) -> dict[str, Resolved]:
    """Every stage's key, family and input artifacts. The key changes whenever anything that shapes
    the stage's result changes: data (its version too: rewritten data is new data), domains, model and
    train configs, the method's arguments the stage declares where it is not plain, the freeze rules,
    the time windows resolved against ``as_of``, and each
    input's load rule and upstream artifact (``latest`` inputs: the catalog's answer as of the date)."""
    as_of, cat, out = as_of_date(cfg), catalog(cfg), {}
    dataset = dataset or cfg.dataset()
    for name in cfg.stage_train:  # a key for a stage the method does not have is a typo, not a no-op
        method.stage(name)
    keys: dict[str, str] = {}
    for st in method.stages:
        tc = asdict(cfg.train_for(st.name, st.overrides))
        for k in NOT_IN_KEY:
            tc.pop(k)
        for k, v in ADDED_DEFAULTS.items():
            if tc[k] == v:
                tc.pop(k)
        if "warm_start" in tc:  # the checkpoint's origin, not its path: a content address
            tc["warm_start"] = warm_origin(st, tc["warm_start"])
        ident = {
            "data": cfg.data if "://" in cfg.data else str(Path(cfg.data).absolute()),
            "method": None if st.plain else [cfg.method, sorted((k, v) for k, v in method.args.items()
                                                                if st.args is None or k in st.args)],
            "stage": [st.name if not st.plain else None, st.train_domains, st.eval_domain, st.freeze],
            "model": asdict(cfg.model), "train": tc,
        }
        windows = stage_windows(cfg, st)
        fam_inputs, key_inputs, dirs = {}, {}, {}
        for name, inp in st.inputs.items():
            if inp.stage not in out:
                raise SpecError(f"stage '{st.name}' of '{method.name}': input '{name}' reads stage '{inp.stage}', "
                                f"which is not an earlier stage")
            rule = [inp.include, inp.exclude, inp.exclude_modules, inp.strip, inp.into, inp.latest]
            fam_inputs[name] = [*rule, out[inp.stage].family]
            if inp.latest:
                entry = cat.latest(out[inp.stage].family, cfg.as_of)
                key_inputs[name], dirs[name] = [*rule, entry and entry.artifact], entry and entry.path
            else:
                up = method.stage(inp.stage)
                key_inputs[name], dirs[name] = [*rule, artifact_name(up, keys)], stage_dir(cfg, up, keys)
        family = _digest({**ident, "windows": [w and asdict(w) for w in windows], "inputs": fam_inputs})
        resolved = [w and (w.dates(as_of) if as_of else None) for w in windows]
        bounds = [w.bounds(as_of) for w in windows if w] if as_of else []
        within = (min(b[0] for b in bounds), max(b[1] for b in bounds)) if bounds and all(windows) else None
        key = _digest({**ident, "windows": resolved, "inputs": key_inputs, "data_version": dataset.version(within)})
        out[st.name] = Resolved(key, family, dirs)
        keys[st.name] = key
    return out


def warm_origin(stage: Stage, directory: str) -> dict:
    """The origin (artifact, epoch) of the epoch checkpoint a stage is warm-started from, which must be a run of
    the same stage."""
    found = origin(directory)
    this = stage.identity
    if not str(found.get("artifact", "")).startswith(artifact_name(stage, "")) or found.get("stage", this) != this:
        raise SpecError(f"stage '{stage.name}': train.warm_start {directory} is a checkpoint of "
                        f"{found.get('artifact')} (stage {found.get('stage')}), not of this stage (its artifacts are "
                        f"{artifact_name(stage, 'KEY')}, stage {this})")
    return {k: found[k] for k in ("artifact", "epoch") if k in found}  # the run's name is not the content


def stage_keys(cfg: ExperimentConfig, method: Method) -> dict[str, str]:
    """A key per stage (see :func:`resolve_stages`)."""
    return {name: r.key for name, r in resolve_stages(cfg, method).items()}


def artifact_name(stage: Stage, key: str | dict[str, str]) -> str:
    """``STAGE-KEY``; plain stages are named ``plain-KEY`` whichever method declares them."""
    key = key[stage.name] if isinstance(key, dict) else key
    return f"{'plain' if stage.plain else stage.name}-{key}"


def stage_dir(cfg: ExperimentConfig, stage: Stage, keys: str | dict[str, str]) -> str:
    """Where a stage's artifact lives: ``STORAGE/stages/STAGE-KEY`` (a local path or a URI);
    ``keys``: the stage's key, or every stage's key by name."""
    return storage_path(cfg, "stages", artifact_name(stage, keys))


def rebuild(cfg: ExperimentConfig, stage: str, command: str | None = None) -> str:
    """The command that trains ``stage`` of ``cfg`` again from scratch (``command``: how this run was started)."""
    started = command or f"raytrain-ctr run --config CONFIG (this run's: {storage_path(cfg, cfg.run_name)}/config.json)"
    return f"{started} --stage {stage} --force"


def local_inputs(cfg: ExperimentConfig, stage: Stage, resolved: Resolved, command: str | None = None
                 ) -> dict[str, str]:
    """A local path of each input's model file (remote ones copied once), each verified against its artifact's
    manifest first; errors name the input, the file and the command that rebuilds it."""
    fs, _ = resolve(storage_path(cfg))
    paths: dict[str, str] = {}
    copies: dict[str, str] = {}
    for name, directory in resolved.inputs.items():
        inp = stage.inputs[name]
        if directory is None:
            raise PipelineError(f"stage '{stage.name}' of '{cfg.method}': input '{name}' needs the latest artifact of "
                                f"stage '{inp.stage}' valid as of {cfg.as_of or 'now'}, and the catalog at "
                                f"{storage_path(cfg, 'catalog')} has none; run that stage first")
        path = join(directory, MODEL_FILE)
        if verify(*resolve(directory), rebuild(cfg, inp.stage, command), (MODEL_FILE,)) is None:
            raise PipelineError(f"stage '{stage.name}' of '{cfg.method}' needs the artifact of stage '{inp.stage}' "
                                f"(input '{name}') at {path}; run that stage first")
        if not isinstance(fs, pafs.LocalFileSystem) and path not in copies:  # workers read a local copy
            copies[path] = str(Path(tempfile.mkdtemp()) / MODEL_FILE)
            pafs.copy_files(path, copies[path])
        paths[name] = copies.get(path, path)
    return paths


def diagnostic_columns(dataset: CTRDataset, domain: str, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The ``wanted`` columns that the domain's train split has (read from its first file's footer)."""
    if not wanted:
        return ()
    names = set(pq.read_schema(dataset.files(domain, "train")[0], filesystem=dataset.filesystem).names)
    return tuple(c for c in wanted if c in names)


def run_stage(cfg: ExperimentConfig, method: Method, dataset: CTRDataset, stage: Stage, resolved: Resolved,
              fresh: bool = False, callbacks: list | None = None, lease: Lease | None = None,
              command: str | None = None, group: SharedWorkerGroup | None = None) -> dict:
    """Train the stage, then commit its artifact (its files, then its manifest): on ``group`` (a worker group
    serving several stages), else in its own ``TorchTrainer.fit`` (with ``callbacks``: Tune's). It resumes its
    last epoch checkpoint unless ``fresh``. ``lease``: the stage's, checked before the commit."""
    fs, _ = resolve(storage_path(cfg))
    inputs = local_inputs(cfg, stage, resolved, command)
    tc = cfg.train_for(stage.name, stage.overrides)
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = tc.deterministic
    cache = tc.cache_mb << 20
    as_of = as_of_date(cfg)
    train_window, eval_window = (TimeWindow(*w.bounds(as_of)) if w else None for w in stage_windows(cfg, stage))
    extra = {d: diagnostic_columns(dataset, d, stage.diagnostics) for d in stage.train_domains}
    splits = {dataset_key(d, "train"): read_split(dataset, d, "train", window=train_window, extra_columns=extra[d],
                                                  shuffle_files=tc.shuffle_buffer > 0, seed=tc.seed,
                                                  cache_below_bytes=cache)
              for d in stage.train_domains}
    for domain, split in {(stage.eval_domain, "valid"), (stage.eval_domain, "test"),
                          *((d, "valid") for d in selection_domains(stage, tc))}:
        splits[dataset_key(domain, split)] = read_split(dataset, domain, split, window=eval_window,
                                                        cache_below_bytes=cache)
    activity = None
    if tc.activity_buckets and dataset.domain(stage.eval_domain).spec.user_id:
        activity = Activity(*user_clicks(dataset, stage.eval_domain, train_window, cache), tc.activity_buckets)
    cached = {k: v for k, v in splits.items() if isinstance(v, CachedSplit)}
    streamed = {k: v for k, v in splits.items() if k not in cached}
    name = artifact_name(stage, resolved.key)
    storage = storage_path(cfg, "_ray")
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if fresh else name
    job = StageJob(cfg=cfg, method=method, stage=stage, specs=dataset.specs(),
                   batch_sizes=batch_sizes(dataset, stage.train_domains, tc.batch_size), inputs=inputs,
                   extra_columns=extra, activity=activity, cached=cached, rebuild=rebuild(cfg, stage.name, command),
                   artifact=name, checkpoints=storage, run=run_name, fresh=fresh,
                   run_dir=str(Path(storage) / run_name) if "://" not in storage else tempfile.mkdtemp())
    try:
        if group is not None and not callbacks:
            _, checkpoint = group.fit(job, streamed, tc, on_epoch=(lambda m: print(
                progress_line(stage.name, m, tc.epochs), file=sys.stderr, flush=True)) if tc.progress else None)
        else:
            _, checkpoint = own_fit(job, streamed, tc, callbacks or [])
    except Exception as e:  # noqa: BLE001 - a worker's data or metrics error is the user's to fix: said plainly
        user = worker_error(e)
        if isinstance(user, DataError):
            raise locate(dataset, stage, user) from None
        if user is not None:
            raise user from None
        raise
    art = resolve(stage_dir(cfg, stage, resolved.key))[1]
    if lease is not None:
        lease.check()  # a run that lost its lease to another must not commit over it
    with checkpoint.as_directory() as d:  # model.pt, metrics.json and the method's own files
        commit({f.name: f for f in Path(d).iterdir() if f.is_file()}, fs, art,
               {"stage": stage.name, "method": cfg.method, "artifact": name, "config": cfg.to_dict()})
    return _read_json(fs, join(art, METRICS_FILE))


def own_fit(job: StageJob, datasets: dict, tc: TrainConfig, callbacks: list) -> tuple[dict, Any]:
    """The stage in a ``TorchTrainer.fit`` of its own (a Tune trial's: ``callbacks``): its final metrics and
    checkpoint; it resumes its run's last checkpoint (a run of the same name), else its pointer's."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_stage,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=tc.resources_per_worker),
        datasets=datasets,
        dataset_config=ExactlyOnceDataConfig(),
        run_config=RunConfig(name=job.run, storage_path=job.checkpoints,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[LatestCheckpoint(job.checkpoints), *callbacks]),
    )
    with Progress(job.stage.name, tc.epochs) if tc.progress else contextlib.nullcontext() as progress:
        if progress is not None:
            trainer.run_config.callbacks.append(progress.callback())
        result = trainer.fit()
    if result.checkpoint is None or not (result.metrics or {}).get("final"):
        raise PipelineError(f"stage '{job.stage.name}' ended without its final report: {result.error}")
    return result.metrics, result.checkpoint


def locate(dataset: CTRDataset, stage: Stage, error: DataError) -> DataError:
    """A worker's data error (it names the domain, split and row in its batch) with the file and row in the file:
    the first broken rule in the splits the stage reads, found by scanning their files here (on failure only)."""
    from raytrain_ctr.data.validate import scan_file

    reads = [(d, "train") for d in stage.train_domains] + [(stage.eval_domain, s) for s in ("valid", "test")]
    for domain, split in reads:
        dom = dataset.domain(domain)
        for file in dataset.files(domain, split):
            issues = scan_file(file, dom.spec, dom.where, dataset.filesystem).issues
            if issues:
                return DataError(f"{issues[0]} (a worker stopped at it: {error})")
    return error


def worker_error(error: BaseException) -> DataError | MetricsError | ArtifactError | None:
    """The first worker's :class:`DataError`, :class:`MetricsError` or :class:`ArtifactError` behind a failed
    ``fit`` (Ray wraps it), as that error with its message alone; None when the failure is something else."""
    for failure in getattr(error, "worker_failures", {}).values():
        seen: BaseException | None = failure
        for _ in range(8):  # Ray's wrappers are a few deep
            if seen is None:
                break
            for kind in (DataError, MetricsError, ArtifactError):
                if isinstance(seen, kind):
                    cause = getattr(seen, "cause", None)
                    message = str(cause if isinstance(cause, kind) else seen).strip().splitlines()
                    return kind(message[-1] if message else kind.__name__)
            seen = seen.__cause__ or getattr(seen, "cause", None)
    return None


def committed(cfg: ExperimentConfig, stage: Stage, key: str, command: str | None = None) -> str | None:
    """The directory (path or URI) of the stage's artifact when it is committed and intact, else None; an
    :class:`~raytrain_ctr.artifacts.ArtifactError` names a file that no longer matches its manifest."""
    directory = stage_dir(cfg, stage, key)
    manifest = verify(*resolve(directory), rebuild(cfg, stage.name, command), (MODEL_FILE, METRICS_FILE))
    return directory if manifest is not None else None


def _readers(stages: list[Stage], name: str) -> list[Stage]:
    return [s for s in stages if any(i.stage == name for i in s.inputs.values())]


def to_train(cfg: ExperimentConfig, method: Method, dataset: CTRDataset, stages: list[Stage], force: bool,
             named: str | None = None, command: str | None = None) -> set[str]:
    """The stages of a run that will train, from the keys before it starts: those without an artifact
    (all with ``force``), except a ``transient`` one (unless it is the stage ``named``) that no stage
    reading it in this run trains. Decides the transient stages (whose readers read them as they are,
    not as the ``latest`` of the catalog); the others train whenever their artifact is missing."""
    keys = resolve_stages(cfg, method, dataset)
    train: set[str] = set()
    for st in reversed(stages):
        if not force and committed(cfg, st, keys[st.name].key, command):
            continue
        readers = _readers(stages, st.name)
        if st.transient and st.name != named and readers and not any(r.name in train for r in readers):
            continue
        train.add(st.name)
    return train


def drop_transient(cfg: ExperimentConfig, method: Method, dataset: CTRDataset, stages: list[Stage]) -> None:
    """Delete the artifacts of transient stages once every stage of the method reading them has its own."""
    fs, _ = resolve(storage_path(cfg))
    keys = resolve_stages(cfg, method, dataset)
    for st in stages:
        art = resolve(stage_dir(cfg, st, keys[st.name].key))[1]
        readers = _readers(method.stages, st.name)
        if st.transient and readers and fs.get_file_info(art).type == pafs.FileType.Directory and all(
                committed(cfg, r, keys[r.name].key) for r in readers):
            fs.delete_dir(art)


def run(cfg: ExperimentConfig, stage: str | None = None, force: bool = False,
        callbacks: list | None = None, command: str | None = None,
        group: SharedWorkerGroup | None = None) -> dict[str, dict]:
    """Run every stage of ``cfg.method``, or only ``stage``; finished stages are skipped unless ``force``.

    A stage trains under its lease (:func:`~raytrain_ctr.lease.stage_lease`): a concurrent run of the same stage
    waits, then finds the artifact committed and skips it. ``command``: how this run was started (errors about
    a damaged artifact name the command that rebuilds it).

    Each finished stage is recorded in the artifact catalog under its ``as_of`` date (and the
    stage's older artifacts pruned to its ``keep_last``); a ``transient`` stage's artifact is deleted
    once the stages reading it have theirs, and not trained again while they do. ``callbacks`` go to the Ray Train
    ``RunConfig`` of the stages that run (Tune's report callback): each stage then has its own ``fit``; without
    them the stages train one after another on one worker group, ``group`` (a leaderboard's, serving all its
    runs) or the run's own (:mod:`raytrain_ctr.train.group`).
    """
    dataset = cfg.dataset()
    method = get_method(cfg.method, cfg.method_args)
    stages = method.stages if stage is None else method.job(stage)
    for st in stages:
        check_stage_inputs(cfg, dataset, method, st)
    for tc in {cfg.train_for(st.name, st.overrides) for st in stages}:
        check_workers(tc.workers, tc.resources_per_worker)
    fs, run_dir = resolve(storage_path(cfg, cfg.run_name))
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(join(run_dir, "config.json")) as f:
        f.write(json.dumps(cfg.to_dict(), indent=2, default=str).encode())
    results: dict[str, dict] = {}
    train = to_train(cfg, method, dataset, stages, force, named=stage, command=command)
    with contextlib.ExitStack() as stack:
        if group is None and not callbacks and train:
            group = stack.enter_context(SharedWorkerGroup())
        _run_stages(cfg, method, dataset, stages, train, results, force, callbacks, command, group)
    drop_transient(cfg, method, dataset, stages)
    if not results:
        raise DataError(f"method '{cfg.method}' has no stages")
    with fs.open_output_stream(join(run_dir, "results.json")) as f:
        f.write(json.dumps(results, indent=2, default=str).encode())
    return results


def _run_stages(cfg: ExperimentConfig, method: Method, dataset: CTRDataset, stages: list[Stage], train: set[str],
                results: dict[str, dict], force: bool, callbacks: list | None, command: str | None,
                group: SharedWorkerGroup | None) -> None:
    """:func:`run`'s stages in order: each trained (under its lease) or skipped, and recorded in the catalog."""
    fs, cat = resolve(storage_path(cfg))[0], catalog(cfg)
    for st in stages:
        resolved = resolve_stages(cfg, method, dataset)[st.name]  # after the stages before it: `latest` inputs see them
        directory = stage_dir(cfg, st, resolved.key)
        art = resolve(directory)[1]
        done = not force and committed(cfg, st, resolved.key, command) is not None
        if force or (not done and (not st.transient or st.name in train)):
            with stage_lease(storage_path(cfg), artifact_name(st, resolved.key)) as lease:
                done = not force and committed(cfg, st, resolved.key, command) is not None  # another run's, meanwhile
                if not done:
                    results[st.name] = run_stage(cfg, method, dataset, st, resolved, fresh=force, callbacks=callbacks,
                                                 lease=lease, command=command, group=group)
        if st.name not in results:
            log.info("stage %s: %s", st.name, f"artifact committed at {art}, skipped" if done else
                     "transient, and every stage reading it has its artifact: not trained")
            results[st.name] = ({**_read_json(fs, join(art, METRICS_FILE)), "skipped": True} if done else
                                {"skipped": True, "transient": True})
        results[st.name]["artifact"] = art
        results[st.name]["inputs"] = dict(resolved.inputs)  # the upstream artifact each input read
        if st.transient:
            continue
        cat.record(resolved.family, artifact_name(st, resolved.key), directory, cfg.as_of)
        if st.keep_last:
            cat.prune(resolved.family, st.keep_last)


def final_metrics(results: dict[str, dict], cfg: ExperimentConfig) -> dict:
    """The metrics of the method's last stage (the model it serves)."""
    last = get_method(cfg.method, cfg.method_args).stages[-1].name
    return results[last]
