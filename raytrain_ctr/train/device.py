"""Where a worker computes and where its collectives' tensors live: the one module that knows about devices.

* ``train.use_gpu``: every Ray Train worker holds one GPU (Ray sets ``CUDA_VISIBLE_DEVICES`` and the current
  device) and the process group is NCCL (Ray Train's choice when GPUs are requested); otherwise CPU and gloo.
* The model's dense parts are moved to the device, the tables sharded onto it (TorchRec's fused kernels on a
  GPU); tables still on the ``meta`` device (not yet sharded) stay there (:func:`place`).
* Batches are encoded on the CPU (Arrow → tensors), pinned, and copied to the GPU without blocking
  (:func:`to_device`): the CPU goes on to read and encode the next batch while the GPU runs the step.
* NCCL reduces CUDA tensors only: every collective of the project (the step's row count, the gradient sync, the
  metrics' exchanges) builds its tensors on :func:`collective_device` and reads results back with ``.cpu()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.spec import SpecError

CPU = torch.device("cpu")


def stage_device(use_gpu: bool, in_ray_worker: bool) -> torch.device:
    """The device a stage trains on: the Ray Train worker's GPU (``ray.train.torch.get_device``), this
    process's current GPU outside Ray (the in-memory path), or the CPU."""
    if not use_gpu:
        return CPU
    if not torch.cuda.is_available():
        raise SpecError("train.use_gpu: true, but this process sees no CUDA device (a GPU node, its driver and the "
                        "CUDA build of torch are needed: the images and set-up commands in cluster/ install it)")
    if in_ray_worker:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda", torch.cuda.current_device())


def collective_device() -> torch.device:
    """Where the tensors of a collective must be: the current GPU under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return CPU


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model``'s parameters and buffers to ``device`` (in place), leaving those on ``meta`` (tables that
    TorchRec shards onto the device later)."""
    return model._apply(lambda t: t if t.is_meta else t.to(device))


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` on ``device``: pinned and copied without blocking to a GPU; unchanged on the CPU."""
    if device.type != "cuda":
        return batch
    pinned = Batch(batch.domain, {k: v.pin_memory() for k, v in batch.sparse.items()}, batch.dense.pin_memory(),
                   batch.label.pin_memory(), *(None if t is None else t.pin_memory() for t in (batch.user, batch.time)),
                   {k: v.pin_memory() for k, v in batch.extra.items()}, batch.dense_fields)
    return pinned.to(device)
