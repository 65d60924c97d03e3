"""Run a method's stages: one ``TorchTrainer.fit`` per stage, artifacts between stages.

Stage artifacts are content-addressed: ``STORAGE/stages/STAGE-KEY/{model.pt,metrics.json}``
(``plain-KEY`` for plain supervised stages)
where KEY hashes everything that determines the result (data, domains, model and train
configs, the method where the stage is not plain supervised training, load/freeze
rules, and the upstream stage's key). So a stage whose artifacts exist is skipped (a
re-submitted job resumes where it stopped), and Source-only's training is the very
artifact Fine-Tune, L2-SP and KEEP pre-train from. Inside a stage, Ray Train resumes from
the last epoch checkpoint (``STORAGE/_ray/STAGE-KEY``). ``STORAGE/RUN/results.json`` maps
the run's stages to their artifacts. ``stage=NAME`` runs one stage alone against the
latest upstream artifact (``force`` re-runs a finished stage from scratch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from raytrain_ctr.config import ExperimentConfig
from raytrain_ctr.data.dataset import CTRDataset, DataError, join, resolve
from raytrain_ctr.data.ingest import ExactlyOnceDataConfig, read_split
from raytrain_ctr.methods import Method, Stage, StageContext, get_method
from raytrain_ctr.train.loop import METRICS_FILE, MODEL_FILE, dataset_key, stage_train_config, train_stage

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A stage cannot run (e.g. its upstream artifact is missing)."""


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


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


def check_stage_inputs(cfg: ExperimentConfig, dataset: CTRDataset, stage: Stage) -> None:
    """Fail before starting workers: unknown domains, and the model must build from the specs."""
    method = get_method(cfg.method, cfg.method_args)
    for d in (*stage.train_domains, stage.eval_domain):
        dataset.domain(d)
    specs = {d: dataset.domain(d).spec for d in dataset.domains}
    with torch.device("meta"):  # shapes only: no memory for (possibly huge) tables on the driver
        method.build(StageContext(stage, specs, cfg.model, method.args, None))


def stage_keys(cfg: ExperimentConfig, method: Method) -> dict[str, str]:
    """A key per stage that changes whenever anything that shapes its result changes."""
    keys: dict[str, str] = {}
    for st in method.stages:
        tc = asdict(stage_train_config(cfg, st.overrides))
        for k in ("max_failures", "fail_once_at_epoch", "cache_mb"):  # do not change the result
            tc.pop(k)
        ident = {
            "data": cfg.data if "://" in cfg.data else str(Path(cfg.data).absolute()),
            "method": None if st.plain else [cfg.method, sorted(method.args.items())],
            "stage": [st.name if not st.plain else None, st.train_domains, st.eval_domain, st.load_include,
                      st.load_exclude, st.freeze],
            "model": asdict(cfg.model), "train": tc,
            "upstream": keys[st.init_from] if st.init_from else None,
        }
        keys[st.name] = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return keys


def artifact_name(stage: Stage, keys: dict[str, str]) -> str:
    """``STAGE-KEY``; plain stages are named ``plain-KEY`` whichever method declares them."""
    return f"{'plain' if stage.plain else stage.name}-{keys[stage.name]}"


def _storage(cfg: ExperimentConfig, *parts: str) -> str:
    return join(cfg.storage, *parts) if "://" in cfg.storage else str(Path(cfg.storage).absolute().joinpath(*parts))


def stage_dir(cfg: ExperimentConfig, stage: Stage, keys: dict[str, str]) -> str:
    """Where a stage's artifact lives: ``STORAGE/stages/STAGE-KEY`` (a local path or a URI)."""
    return _storage(cfg, "stages", artifact_name(stage, keys))


def run_stage(cfg: ExperimentConfig, dataset: CTRDataset, stage: Stage, keys: dict[str, str],
              fresh: bool = False, callbacks: list | None = None) -> dict:
    """One ``TorchTrainer.fit``; resumes the stage's last Ray Train checkpoint unless ``fresh``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, _ = resolve(_storage(cfg))
    upstream = None
    if stage.init_from:
        method = get_method(cfg.method, cfg.method_args)
        upstream = join(stage_dir(cfg, method.stage(stage.init_from), keys), MODEL_FILE)
        if not _exists(fs, resolve(upstream)[1]):
            raise PipelineError(f"stage '{stage.name}' of '{cfg.method}' needs the artifact of stage "
                                f"'{stage.init_from}' at {upstream}; run that stage first")
        if not isinstance(fs, pafs.LocalFileSystem):  # workers read a local copy
            local = Path(tempfile.mkdtemp()) / MODEL_FILE
            pafs.copy_files(upstream, str(local))
            upstream = str(local)
    tc = stage_train_config(cfg, stage.overrides)
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = tc.deterministic
    cache = tc.cache_mb << 20
    splits = {dataset_key(d, "train"): read_split(dataset, d, "train", shuffle_files=tc.shuffle_buffer > 0,
                                                  seed=tc.seed, cache_below_bytes=cache)
              for d in stage.train_domains}
    for split in ("valid", "test"):
        splits[dataset_key(stage.eval_domain, split)] = read_split(dataset, stage.eval_domain, split,
                                                                   cache_below_bytes=cache)
    name = artifact_name(stage, keys)
    storage = _storage(cfg, "_ray")
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if fresh else name
    trainer = TorchTrainer(
        train_stage,
        train_loop_config={
            "cfg": cfg, "stage": stage.name, "upstream": upstream,
            "specs": {d: dataset.domain(d).spec for d in dataset.domains},
            "batch_sizes": batch_sizes(dataset, stage.train_domains, tc.batch_size),
            "run_dir": str(Path(storage) / run_name) if "://" not in storage else tempfile.mkdtemp(),
        },
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=False),
        datasets=splits,
        dataset_config=ExactlyOnceDataConfig(),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks or []),
    )
    result = trainer.fit()
    if result.checkpoint is None or not (result.metrics or {}).get("final"):
        raise PipelineError(f"stage '{stage.name}' ended without its final report: {result.error}")
    art = resolve(stage_dir(cfg, stage, keys))[1]
    fs.create_dir(art, recursive=True)
    with result.checkpoint.as_directory() as d:  # model.pt, metrics.json and the method's own files
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                pafs.copy_files(str(f), join(art, f.name), destination_filesystem=fs)
    return _read_json(fs, join(art, METRICS_FILE))


def run(cfg: ExperimentConfig, stage: str | None = None, force: bool = False,
        callbacks: list | None = None) -> dict[str, dict]:
    """Run every stage of ``cfg.method``, or only ``stage``; finished stages are skipped unless ``force``.

    ``callbacks`` go to the Ray Train ``RunConfig`` of the stages that run (Tune's report callback).
    """
    dataset = CTRDataset.load(cfg.data)
    method = get_method(cfg.method, cfg.method_args)
    stages = method.stages if stage is None else [method.stage(stage)]
    for st in stages:
        check_stage_inputs(cfg, dataset, st)
    keys = stage_keys(cfg, method)
    fs, run_dir = resolve(_storage(cfg, cfg.run_name))
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(join(run_dir, "config.json")) as f:
        f.write(json.dumps(cfg.to_dict(), indent=2, default=str).encode())
    results = {}
    for st in stages:
        art = resolve(stage_dir(cfg, st, keys))[1]
        if not force and _exists(fs, join(art, METRICS_FILE)) and _exists(fs, join(art, MODEL_FILE)):
            log.info("stage %s: artifacts exist at %s, skipped", st.name, art)
            results[st.name] = {**_read_json(fs, join(art, METRICS_FILE)), "skipped": True}
        else:
            results[st.name] = run_stage(cfg, dataset, st, keys, fresh=force, callbacks=callbacks)
        results[st.name]["artifact"] = art
    if not results:
        raise DataError(f"method '{cfg.method}' has no stages")
    with fs.open_output_stream(join(run_dir, "results.json")) as f:
        f.write(json.dumps(results, indent=2, default=str).encode())
    return results


def final_metrics(results: dict[str, dict], cfg: ExperimentConfig) -> dict:
    """The metrics of the method's last stage (the model it serves)."""
    last = get_method(cfg.method, cfg.method_args).stages[-1].name
    return results[last]
