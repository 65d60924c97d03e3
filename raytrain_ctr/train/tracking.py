"""Experiment tracking and progress: every epoch's metrics to TensorBoard and MLflow (rank 0 only), and one
progress line per epoch on the driver.

- TensorBoard (``train.tensorboard``, on by default): tensorboardX event files (Ray Tune's own logger
  writes with it) under ``STORAGE/tensorboard/ARTIFACT/``; on an object store they are written locally and
  uploaded after every epoch. ``tensorboard --logdir STORAGE/tensorboard`` shows every stage of every run.
- MLflow (``train.mlflow: TRACKING_URI``): through Ray's integration (``setup_mlflow``, rank 0 only), one
  MLflow run per stage (named by its artifact) in an experiment named by the method, with the config flattened
  into its parameters.
- Progress (``train.progress``, on by default): a Ray Train callback on the controller turns rank 0's report
  into a line (epoch, rows/s, train loss, validation AUC, best, ETA) and hands it to the driver, which prints
  it to stderr while ``fit`` runs.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from raytrain_ctr.data.dataset import join, resolve


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started, in MiB (what a worker's epoch reports)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that are finite numbers (a figure per name: what trackers plot)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class EpochTracker(ABC):
    """Where rank 0 sends each epoch's metrics."""

    @abstractmethod
    def log(self, metrics: dict[str, Any], epoch: int) -> None: ...

    def close(self) -> None:  # noqa: B027 - most trackers have nothing to flush
        """Flush and release (after the stage's last epoch)."""


class TensorBoard(EpochTracker):
    """tensorboardX event files in ``logdir`` (a local path or a URI: written locally, uploaded each epoch)."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self.fs, self.dest = resolve(logdir)
        self.remote = "://" in logdir
        self.local = tempfile.mkdtemp(prefix="raytrain-ctr-tb-") if self.remote else self.dest
        self.writer = SummaryWriter(self.local)

    def log(self, metrics: dict[str, Any], epoch: int) -> None:
        for name, value in scalars(metrics).items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()
        if self.remote:
            import pyarrow.fs as pafs

            self.fs.create_dir(self.dest, recursive=True)
            for f in Path(self.local).iterdir():
                pafs.copy_files(str(f), join(self.dest, f.name), destination_filesystem=self.fs)

    def close(self) -> None:
        self.writer.close()


class MLflow(EpochTracker):
    """An MLflow run through Ray's ``setup_mlflow`` (rank 0 only)."""

    def __init__(self, uri: str, experiment: str, run: str, params: dict[str, Any]):
        from ray.air.integrations.mlflow import setup_mlflow

        self.mlflow = setup_mlflow(config=params, tracking_uri=uri, experiment_name=experiment, run_name=run,
                                   create_experiment_if_not_exists=True, rank_zero_only=True)

    def log(self, metrics: dict[str, Any], epoch: int) -> None:
        self.mlflow.log_metrics(scalars(metrics), step=epoch)

    def close(self) -> None:
        self.mlflow.end_run()


def flat(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def trackers(cfg, artifact: str, rank: int) -> list[EpochTracker]:
    """The stage's trackers on rank 0 (none elsewhere), from ``train.tensorboard`` and ``train.mlflow``."""
    from raytrain_ctr.config import storage_path

    if rank != 0:
        return []
    out: list[EpochTracker] = []
    if cfg.train.tensorboard:
        out.append(TensorBoard(storage_path(cfg, "tensorboard", artifact)))
    if cfg.train.mlflow:
        out.append(MLflow(cfg.train.mlflow, cfg.method, artifact, flat(cfg.to_dict())))
    return out


def progress_line(stage: str, metrics: dict[str, Any], epochs: int) -> str:
    """``stage finetune epoch 2/4: 41,200 rows/s, train loss 0.5120, valid AUC 0.7342 (best 0.7342), peak RSS
    1,210 MiB a worker, ETA ≤ 1m20s``."""
    epoch, seconds = int(metrics["epoch"]), float(metrics.get("epoch_seconds") or 0.0)
    training = float(metrics.get("train_seconds") or seconds)  # the training pass alone, without the evaluation
    rate = metrics.get("train_rows", 0) / training if training else 0.0
    left = max(epochs - epoch - 1, 0) * seconds
    best = metrics.get("best_valid_auc", metrics.get("valid_auc", float("nan")))
    rss = f"peak RSS {metrics['peak_rss_mb']:,.0f} MiB a worker, " if "peak_rss_mb" in metrics else ""
    return (f"stage {stage} epoch {epoch + 1}/{epochs}: {rate:,.0f} rows/s, train loss "
            f"{metrics.get('train_loss', float('nan')):.4f}, valid AUC {metrics.get('valid_auc', float('nan')):.4f} "
            f"(best {best:.4f}), {rss}ETA ≤ {int(left // 60)}m{int(left % 60):02d}s")


class Progress:
    """The driver's end of the progress lines: a queue the controller's callback puts lines in, printed to
    stderr by a thread while ``fit`` runs. ``with Progress(stage, epochs) as p: ... callbacks=[p.callback()]``."""

    def __init__(self, stage: str, epochs: int, out=None):
        from ray.util.queue import Queue

        self.stage, self.epochs, self.out = stage, epochs, out or sys.stderr
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._print, daemon=True, name=f"progress-{stage}")

    def callback(self):
        return ProgressCallback(self.queue, self.stage, self.epochs)

    def _print(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set() or not self.queue.empty():
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                continue
            print(line, file=self.out, flush=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with contextlib.suppress(Exception):
            self.queue.shutdown()


class ProgressCallback(UserCallback):
    """On the Ray Train controller: rank 0's epoch report → a progress line in the driver's queue."""

    def __init__(self, queue, stage: str, epochs: int):
        self.queue, self.stage, self.epochs = queue, stage, epochs

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics and "epoch" in metrics[0] and not metrics[0].get("final"):
            with contextlib.suppress(Exception):  # progress never fails a stage
                self.queue.put_nowait(progress_line(self.stage, metrics[0], self.epochs))
