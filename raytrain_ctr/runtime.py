"""Starting or joining Ray, the same way for the CLI, jobs, tests and benchmarks."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS``, or start a local one.

    A local Ray gets more logical CPUs than cores (at least 4): training workers hold
    CPUs for their whole run, and Ray Data's read tasks must still be scheduled beside
    them, or the ingest stalls on a small machine.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    cpus = num_cpus or max(4, 2 * (os.cpu_count() or 2))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
