"""A stage's training state in a Ray Train checkpoint, whatever the embedding backend.

Rank 0 writes ``state.pt``: dense optimizer states, RNG, epoch, best-so-far and history,
and (local backend) the model. With sharded tables every worker also writes its shards
of the model, of the best model and of the fused optimizer state under ``sharded/``
with ``torch.distributed.checkpoint`` (DCP), and Ray Train merges the workers'
checkpoint files into one directory. DCP reshards on load, so a checkpoint restores onto
another worker count or sharding plan (e.g. 2 workers row-wise → 1 worker table-wise),
which TorchRec leaves to its users (pytorch/torchrec#2534).

Each epoch checkpoint also names its origin (``origin.json``: the stage's artifact and the epoch), so a
run that continues from another run's checkpoint (``train.warm_start``, PBT's exploit) has a content
address: its stage key holds the origin, not a path.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raytrain_ctr.artifacts import ArtifactError, load_tensors
from raytrain_ctr.embedding import is_sharded, sharded_collections
from raytrain_ctr.spec import SpecError

STATE_FILE = "state.pt"
ORIGIN_FILE = "origin.json"
SHARDED_DIR = "sharded"


def sharded_state(model: nn.Module, best_state: dict | None = None) -> dict[str, Any]:
    """Every worker's part (ShardedTensors): model, best model, fused optimizer state."""
    return {"model": model.state_dict(), "best": best_state if best_state is not None else model.state_dict(),
            "fused": {name: c.fused_optimizer.state_dict() for name, c in sharded_collections(model)}}


def training_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], epoch: int, best: dict,
                   history: list[dict], step: int = 0) -> tuple[dict, dict | None]:
    """``(rank 0's state.pt, every worker's DCP state or None)`` of one epoch's end (``step``: the
    stage's optimisation steps so far)."""
    meta = {"optimizers": [o.state_dict() for o in optimizers], "rng": torch.get_rng_state(), "epoch": epoch,
            "step": step,
            "best": {k: v for k, v in best.items() if k != "state"}, "history": history}
    if not is_sharded(model):
        meta["model"] = model.state_dict()
        meta["best"]["state"] = best["state"]
        return meta, None
    return meta, sharded_state(model, best["state"])


def save_sharded(state: dict, directory: str | Path) -> None:
    """Every worker writes its shards (a collective); rank 0 also writes the metadata."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))


def load_sharded(model: nn.Module, directory: str | Path) -> dict:
    """Load a DCP checkpoint into ``model``'s own sharding (resharding as needed); returns the
    loaded best-model state. Restores the fused optimizer state too."""
    import torch.distributed.checkpoint as dcp

    template = sharded_state(model, copy.deepcopy(model.state_dict()))
    dcp.load(template, checkpoint_id=str(Path(directory) / SHARDED_DIR))
    model.load_state_dict(template["model"])
    for name, coll in sharded_collections(model):
        coll.fused_optimizer.load_state_dict(template["fused"][name])
    return template["best"]


def restore(model: nn.Module, optimizers: list[torch.optim.Optimizer], directory: str | Path,
            rebuild: str = "the stage's run with --force") -> dict:
    """Load an epoch checkpoint into the model and optimizers; returns ``state.pt``'s dict
    (``best['state']`` filled in). A damaged checkpoint is an :class:`~raytrain_ctr.artifacts.ArtifactError`
    naming its file and ``rebuild`` (the command that trains the stage afresh)."""
    meta = load_tensors(Path(directory) / STATE_FILE, rebuild)
    if is_sharded(model):
        try:
            meta["best"]["state"] = load_sharded(model, directory)
        except Exception as e:  # noqa: BLE001 - DCP's errors name neither the checkpoint nor a way out
            raise ArtifactError(f"{Path(directory) / SHARDED_DIR}: cannot be loaded ({str(e).strip()[:200]}); "
                                f"rebuild it: {rebuild}") from None
    else:
        model.load_state_dict(meta["model"])
    for opt, st in zip(optimizers, meta["optimizers"]):
        opt.load_state_dict(st)
    torch.set_rng_state(meta["rng"])
    return meta


def origin(directory: str | Path) -> dict:
    """Which run and epoch an epoch checkpoint is (``origin.json``: ``{"artifact": ..., "epoch": ...}``)."""
    path = Path(directory) / ORIGIN_FILE
    if not path.is_file() or not (Path(directory) / STATE_FILE).is_file():
        raise SpecError(f"train.warm_start: {directory} is not an epoch checkpoint of a stage (it needs "
                        f"{STATE_FILE} and {ORIGIN_FILE})")
    return json.loads(path.read_text())


def warm_start(model: nn.Module, optimizers: list[torch.optim.Optimizer], directory: str | Path,
               rebuild: str = "the stage's run with --force") -> dict:
    """:func:`restore` another run's epoch checkpoint, keeping the hyperparameters the optimizers were built with
    (learning rates, weight decay, ...: PBT's explored values) over its moments and steps; the fused optimizers
    of sharded tables too. Returns what :func:`restore` returns, and the checkpoint's ``origin``."""
    found = origin(directory)
    fused = [c.fused_optimizer for _, c in sharded_collections(model)] if is_sharded(model) else []
    chosen = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in [*optimizers, *fused]]
    saved = restore(model, optimizers, directory, rebuild)
    for opt, groups in zip([*optimizers, *fused], chosen):
        for group, values in zip(opt.param_groups, groups):
            group.update(values)
    for opt in fused:  # a fused optimizer's step() only hands its param group's lr to the kernel
        opt.step()
    return {**saved, "origin": found}
