"""Starting or joining Ray, the same way for the CLI, jobs, tests and benchmarks."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def init_ray(num_cpus: int | None = None, address: str | None = None, extra_cpus: int = 0) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS``, or start a local one.

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
    verbose = os.environ.get("RAYTRAIN_CTR_VERBOSE", "0") == "1"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose)
        return
    cpus = (num_cpus or max(4, 2 * (os.cpu_count() or 2))) + extra_cpus
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING)


def report(metrics: dict, files: dict[str, Any] | None = None,
           every_worker: Callable[[Path], None] | None = None) -> None:
    """``ray.train.report`` from every worker; rank 0 attaches a checkpoint holding ``files``.

    Ray Train V2 keeps only metrics that come with a checkpoint (``Result.metrics``), so
    rank 0 always attaches one, empty if there are no files. ``*.json`` files are written
    as JSON, ``bytes`` as they are (figures), the others with ``torch.save``.
    ``every_worker(dir)`` writes each worker's own files (its table shards); Ray Train
    merges the workers' files into one checkpoint.
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
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if attach else None)
