"""Starting or joining Ray, the same way for the CLI, jobs, tests and benchmarks."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytrain_ctr.spec import SpecError


def init_ray(num_cpus: int | None = None, address: str | None = None, extra_cpus: int = 0) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS``, or start a new local one (never attach to a
    cluster found on the machine without being told to).

    A local Ray gets more logical CPUs than cores (at least 4): training workers hold
    CPUs for their whole run, and Ray Data's read tasks must still be scheduled beside
    them, or the ingest stalls on a small machine. Worker logs reach this terminal only
    with ``RAYTRAIN_CTR_VERBOSE=1`` (failures are raised here either way, with the
    worker's traceback). ``extra_cpus`` adds logical CPUs to a local Ray (see ``cmd_tune``).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray Train's controller polls its workers every 2 s: a stage's fit returned 4-6 s after its train function
    # (two polls, measured); at 0.2 s it returns within a second. The variable reaches the controller from the
    # process that calls fit (Ray Train propagates it), and a local cluster's processes inherit it from here.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    verbose = os.environ.get("RAYTRAIN_CTR_VERBOSE", "0") == "1"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose)
        return
    cpus = (num_cpus or max(4, 2 * (os.cpu_count() or 2))) + extra_cpus
    # address="local": a new cluster, never one that `ray start` recorded in the temp dir (someone else's, on a
    # shared machine, which would then refuse num_cpus)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING)
    _LOCAL.add(ray.get_runtime_context().gcs_address)


_LOCAL: set[str] = set()  # the clusters init_ray started here (they cannot grow)


def map_tasks(fn: Callable, calls: list[tuple], parallelism: int | None = None) -> list:
    """``[fn(*args) for args in calls]``, as Ray tasks (one CPU each, at most ``parallelism`` running, the rest
    cancelled on the first failure) when Ray runs and there are several calls, else in this process (also with
    ``parallelism=1``). Each distinct argument object is put in the object store once (a domain's catalogue or
    spec shared by its files' calls travels once)."""
    import ray

    if parallelism == 1 or len(calls) < 2 or not ray.is_initialized():
        return [fn(*args) for args in calls]
    task, refs = ray.remote(num_cpus=1)(fn), {}
    for a in (a for call in calls for a in call):
        if id(a) not in refs:
            refs[id(a)] = ray.put(a)
    args = [tuple(refs[id(a)] for a in call) for call in calls]
    results: list = [None] * len(calls)
    pending, running, limit = list(range(len(calls))), {}, parallelism or len(calls)
    try:
        while pending or running:
            while pending and len(running) < limit:
                i = pending.pop(0)
                running[task.remote(*args[i])] = i
            done, _ = ray.wait(list(running), num_returns=1)
            results[running.pop(done[0])] = ray.get(done[0])
    except BaseException:
        for ref in running:
            ray.cancel(ref)
        raise
    return results


def check_workers(workers: int, per_worker: dict[str, float] | None = None) -> None:
    """Before a stage starts: ``workers`` Train workers, each holding ``per_worker`` resources (one CPU by
    default), must fit the cluster, or the stage would wait for them forever. A local Ray cannot grow: there
    it is an error; a cluster's autoscaler may add nodes: there it is a warning."""
    import ray

    if not ray.is_initialized():
        return
    have = ray.cluster_resources()
    for kind, each in (per_worker or {"CPU": 1}).items():
        need = workers * each
        if need <= have.get(kind, 0):
            continue
        msg = f"train.workers: {workers} workers need {need:g} {kind}s and the Ray cluster has {have.get(kind, 0):g}"
        if ray.get_runtime_context().gcs_address not in _LOCAL:
            logging.getLogger(__name__).warning("%s: the stage waits until the autoscaler adds them", msg)
        elif kind == "CPU":
            raise SpecError(f"{msg}; lower train.workers or train.cpus_per_worker (a local Ray started here has "
                            f"max(4, 2 × cores) logical CPUs, or set RAY_ADDRESS to a larger cluster)")
        else:
            raise SpecError(f"{msg}; lower train.workers, or set train.use_gpu: false (this machine's Ray sees "
                            f"{have.get(kind, 0):g})")


def report(metrics: dict, files: dict[str, Any] | None = None,
           every_worker: Callable[[Path], None] | None = None, directory: str | None = None) -> None:
    """``ray.train.report`` from every worker; rank 0 attaches a checkpoint holding ``files``.

    Ray Train V2 keeps only metrics that come with a checkpoint (``Result.metrics``), so
    rank 0 always attaches one, empty if there are no files. ``*.json`` files are written
    as JSON, ``bytes`` as they are (figures), the others with ``torch.save``.
    ``every_worker(dir)`` writes each worker's own files (its table shards); Ray Train
    merges the workers' files into one checkpoint, in the run's ``directory`` (default: a name of Ray Train's).
    """
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        rank0 = ray.train.get_context().get_world_rank() == 0
        if every_worker is not None:
            every_worker(Path(tmp))
        if rank0:
            for name, obj in (files or {}).items():
                if name.endswith(".json"):
                    Path(tmp, name).write_text(json.dumps(obj, indent=2))
                elif isinstance(obj, bytes):
                    Path(tmp, name).write_bytes(obj)
                else:
                    torch.save(obj, Path(tmp, name))
        attach = rank0 or every_worker is not None
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if attach else None,
                         checkpoint_dir_name=directory)
