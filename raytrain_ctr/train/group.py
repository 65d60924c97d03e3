"""One Ray Train worker group for many stages: ``TorchTrainer.fit`` once, stage jobs handed to it in turn.

An empty ``TorchTrainer.fit`` takes 6–7.7 s on a warm 2-core cluster, 5.2 s of it before its train function
starts (controller, placement group, worker processes and their imports, the process group), and a stage's
own fit about 9.6 s besides its epochs (``benchmarks/stages.py``): more than a small stage's epochs.
:class:`SharedWorkerGroup` starts one run whose workers take the stages of a method, and a leaderboard's
runs, from a :class:`JobBoard` actor one after another. Each stage's reports come back to the driver
through the controller's callback (:class:`Forward`); the driver commits the artifact from the final one,
as from a stage's own run (:func:`raytrain_ctr.pipeline.run_stage`).

Nothing is lost. Every epoch checkpoint is named in the stage's pointer (:class:`LatestCheckpoint`): a
worker group that ``FailureConfig`` restarts takes the stage it was on again and resumes it there, and a
later run, shared or not, resumes it the same way. Each stage survives ``train.max_failures`` failures, as
in a run of its own: the group's run counts all its stages' failures, so a stage with failures to spare
goes on, from its latest checkpoint, on a new group allowed what the stage has left. A stage that needs
other workers (count, GPUs, resources) gets a new group, the old one ending first. A stage's Ray Data
splits are split afresh for each worker group that takes it (:meth:`JobBoard.streams`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.train import UserCallback

from raytrain_ctr.artifacts import GROUP_RUN, latest_pointer, write_atomic
from raytrain_ctr.config import TrainConfig
from raytrain_ctr.data.dataset import resolve
from raytrain_ctr.data.ingest import ExactlyOnceDataConfig
from raytrain_ctr.train.loop import StageJob

log = logging.getLogger(__name__)


class LatestCheckpoint(UserCallback):
    """On the Ray Train controller: each registered epoch checkpoint named in its stage's pointer
    (``CHECKPOINTS/ARTIFACT/latest.json``), so the stage resumes there from any later run (written whole)."""

    def __init__(self, checkpoints: str) -> None:
        self.checkpoints = checkpoints

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        m = metrics[0] if metrics else {}
        if checkpoint is None or not m.get("artifact") or m.get("final"):
            return
        run = run_context.get_run_config().name
        pointer = {"checkpoint": f"{run}/{posixpath.basename(checkpoint.path.rstrip('/'))}", "epoch": m.get("epoch"),
                   "run": run, "stage_run": m.get("stage_run")}
        try:
            fs, path = resolve(latest_pointer(self.checkpoints, m["artifact"]))
            fs.create_dir(posixpath.dirname(path), recursive=True)
            write_atomic(fs, path, json.dumps(pointer).encode())
        except Exception as e:  # noqa: BLE001 - a pointer not written loses a resume point, never the stage
            log.warning("stage %s: its latest checkpoint (epoch %s) could not be named in %s: %s", m["artifact"],
                        m.get("epoch"), latest_pointer(self.checkpoints, m["artifact"]), e)


class Forward(UserCallback):
    """On the controller: every report (rank 0's metrics, the checkpoint) into the driver's queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        self.queue.put((metrics[0] if metrics else {}, checkpoint))


@ray.remote(num_cpus=0)
class JobBoard:
    """The stages a shared worker group trains, in the order posted; its workers take the first one not
    finished after the last they trained (a restarted group: the one it was on)."""

    def __init__(self) -> None:
        self.jobs: dict[int, tuple[StageJob, dict, ExactlyOnceDataConfig]] = {}
        self.splits: dict[tuple[int, str], list[dict]] = {}
        self.closed = False
        self.changed = asyncio.Condition()

    async def post(self, job_id: int, job: StageJob, datasets: dict, data_config: ExactlyOnceDataConfig) -> None:
        async with self.changed:
            self.jobs[job_id] = (job, datasets, data_config)
            self.changed.notify_all()

    async def take(self, after: int) -> tuple[int, StageJob] | None:
        """The first job posted after ``after`` and not finished; None once the board is closed."""
        async with self.changed:
            while True:
                waiting = sorted(i for i in self.jobs if i > after)
                if waiting:
                    return waiting[0], self.jobs[waiting[0]][0]
                if self.closed:
                    return None
                await self.changed.wait()

    def streams(self, job_id: int, attempt: str, rank: int, world: int) -> dict:
        """Rank ``rank``'s Ray Data iterators of the job's splits, split once for each worker group (``attempt``)
        that takes the job: a restarted group's iterators start afresh."""
        if (job_id, attempt) not in self.splits:
            _, datasets, data_config = self.jobs[job_id]
            for key in [k for k in self.splits if k[0] == job_id]:  # an earlier group's iterators: done with
                self.splits[key] = []
            self.splits[job_id, attempt] = data_config.configure(datasets, world, None, None)
        return self.splits[job_id, attempt][rank]

    def attempts(self, job_id: int) -> int:
        """How many worker groups have taken the job."""
        return sum(1 for j, _ in self.splits if j == job_id)

    async def finish(self, job_id: int) -> None:
        async with self.changed:
            self.jobs.pop(job_id, None)
            self.splits = {k: v for k, v in self.splits.items() if k[0] != job_id}

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()


def serve(config: dict) -> None:
    """``train_loop_per_worker`` of a shared group: train the board's jobs in turn until it closes. Rank 0 takes
    each job and hands it to the others (every rank trains the same stage)."""
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    from raytrain_ctr.train.loop import train_job

    board = config["board"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    attempt = broadcast_from_rank_zero(uuid.uuid4().hex)  # this worker group's, the same on every rank
    done = -1
    while (taken := broadcast_from_rank_zero(ray.get(board.take.remote(done)) if rank == 0 else None)) is not None:
        job_id, job = taken
        streams = ray.get(board.streams.remote(job_id, attempt, rank, world))
        train_job(job, job.shards(streams), job.resume_point())
        done = job_id
        gc.collect()


@dataclass(frozen=True)
class Scaling:
    """What a worker group is started with: a stage needing other values gets another group."""

    workers: int
    use_gpu: bool
    resources: tuple[tuple[str, float], ...]
    max_failures: int
    checkpoints: str

    @classmethod
    def of(cls, tc: TrainConfig, checkpoints: str) -> Scaling:
        return cls(tc.workers, tc.use_gpu, tuple(sorted((tc.resources_per_worker or {}).items())), tc.max_failures,
                   checkpoints)


class WorkersStopped(RuntimeError):
    """The shared group's run ended, without an error, before the stage's final report."""


class _Run:
    """One ``TorchTrainer.fit`` of :func:`serve`, in a thread of the driver."""

    def __init__(self, scaling: Scaling) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        self.scaling = scaling
        self.name = f"{GROUP_RUN}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.board = JobBoard.remote()
        self.reports = Queue(actor_options={"num_cpus": 0})
        self.error: BaseException | None = None
        trainer = TorchTrainer(
            serve, train_loop_config={"board": self.board},
            scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=dict(scaling.resources) or None),
            run_config=RunConfig(name=self.name, storage_path=scaling.checkpoints,
                                 failure_config=FailureConfig(max_failures=scaling.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 callbacks=[LatestCheckpoint(scaling.checkpoints), Forward(self.reports)]))
        self.thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True, name=self.name)
        self.thread.start()

    def _fit(self, trainer: Any) -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised in the driver's thread, as the stage's failure
            self.error = e
        finally:
            self.reports.put(None)

    def close(self, wait: bool = True) -> None:
        """Close the board: the workers finish the stage they are on, if any, and the run ends. Without ``wait``
        (the driver unwinding an error) the run is ended at once: the board and the report queue are killed, so
        the stage's next report fails the controller's callback and Ray Train stops the workers."""
        if wait:
            with contextlib.suppress(Exception):  # a board whose run has died has nothing to close
                ray.get(self.board.close.remote())
            self.thread.join()
        for actor in (self.board, self.reports.actor):
            with contextlib.suppress(Exception):
                ray.kill(actor)


class SharedWorkerGroup:
    """The driver's end: ``fit`` hands a stage to the running group (started on first use) and returns its
    final report and checkpoint. ``with SharedWorkerGroup() as group: pipeline.run(cfg, group=group)``."""

    def __init__(self) -> None:
        self._run: _Run | None = None
        self._ids = itertools.count()

    def __enter__(self) -> SharedWorkerGroup:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(wait=kind is None)

    def close(self, wait: bool = True) -> None:
        """End the group's run (see :meth:`_Run.close`)."""
        if self._run is not None:
            self._run.close(wait)
            self._run = None

    def fit(self, job: StageJob, datasets: dict, tc: TrainConfig,
            on_epoch: Callable[[dict], None] | None = None) -> tuple[dict, Any]:
        """Train ``job`` on the group (``datasets``: its Ray Data splits by key); its final metrics and
        checkpoint. A stage survives ``train.max_failures`` worker failures, as in a run of its own: the group's
        run counts the failures of all its stages, so a stage whose run ended with failures to spare goes on,
        from its latest checkpoint, on a new group. Past them the run's error is raised here; the next stage
        gets a new group."""
        from ray.data import DataContext

        scaling = Scaling.of(tc, job.checkpoints)
        options = DataContext.get_current().execution_options  # the driver's (preserve_order), as Ray Train does
        data_config = ExactlyOnceDataConfig(execution_options=options)
        job, failures = replace(job, shared=True), 0
        while True:
            scaling = replace(scaling, max_failures=tc.max_failures - failures)  # what the stage has left
            if self._run is not None and (self._run.scaling != scaling or not self._run.thread.is_alive()):
                self.close()  # other workers, or a run that ended after an earlier stage (its error was that one's)
            if self._run is None:
                self._run = _Run(scaling)
            run, job_id = self._run, next(self._ids)
            ray.get(run.board.post.remote(job_id, job, datasets, data_config))
            while (item := run.reports.get()) is not None:
                metrics, checkpoint = item
                if any(metrics.get(k) != v for k, v in job.tags.items()):
                    continue  # a report of an earlier stage the driver has finished with (a restarted group's)
                if metrics.get("final"):
                    ray.get(run.board.finish.remote(job_id))
                    return metrics, checkpoint
                if on_epoch is not None:
                    on_epoch(metrics)
            attempts = 0
            with contextlib.suppress(Exception):
                attempts = ray.get(run.board.attempts.remote(job_id))
            self.close()
            failures += max(1, attempts)  # each group that took the stage failed in it; one that never took it
            if run.error is None:  # counts once (a group that cannot start is not retried forever)
                raise WorkersStopped(f"the worker group stopped during stage '{job.stage.name}'")
            if failures > tc.max_failures:
                raise run.error  # Ray Train's, naming the workers' failures (pipeline.worker_error reads them)
            log.warning("stage %s: its worker group failed (%d of %d failures survived); resuming it on a new group",
                        job.stage.name, failures, tc.max_failures)
