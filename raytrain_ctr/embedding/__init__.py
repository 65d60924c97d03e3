"""The embedding interface (DESIGN §5, :class:`~raytrain_ctr.embedding.base.Embedding`) and its two
backends, chosen by ``model.embedding_backend``.

* ``local``: :class:`~raytrain_ctr.embedding.collection.EmbeddingCollection`, one
  ``nn.Embedding`` per table with sparse gradients, replicated on every worker.
* ``torchrec``: :class:`~raytrain_ctr.embedding.sharded.ShardedEmbeddingCollection`,
  TorchRec tables sharded across the workers with a fused optimizer.

Models and methods build their collections through :func:`make_embedding` and never
import TorchRec.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from raytrain_ctr.embedding.base import Embedding
from raytrain_ctr.embedding.collection import EmbeddingCollection, fields_of
from raytrain_ctr.embedding.sharded import ShardedEmbeddingCollection
from raytrain_ctr.spec import FieldSpec, SpecError, TableSpec

BACKENDS: dict[str, type[Embedding]] = {"local": EmbeddingCollection, "torchrec": ShardedEmbeddingCollection}


def backend(name: str) -> type[Embedding]:
    if name not in BACKENDS:
        raise SpecError(f"model.embedding_backend: unknown backend '{name}' (one of {list(BACKENDS)})")
    return BACKENDS[name]


def make_embedding(tables: dict[str, TableSpec], fields: list[FieldSpec], backend_name: str = "local") -> Embedding:
    return backend(backend_name)(tables, fields)


def check_sparse_optimizer(backend_name: str, optimizer: str, gpu: bool = False) -> None:
    """On the driver: ``train.sparse_optimizer`` must be one the backend offers (on this device kind)."""
    cls = backend(backend_name)
    if optimizer in cls.optimizers or (gpu and optimizer in cls.gpu_optimizers):
        return
    if optimizer in cls.gpu_optimizers:
        raise SpecError(f"train.sparse_optimizer: '{optimizer}' runs on GPUs only under the {backend_name} embedding "
                        f"backend; on CPU use one of {list(cls.optimizers)}")
    others = [b for b, c in BACKENDS.items() if optimizer in c.optimizers]
    hint = f"; it needs model.embedding_backend: {others[0]}" if others else ""
    raise SpecError(f"train.sparse_optimizer: '{optimizer}' is not offered by the {backend_name} embedding backend "
                    f"(it offers {list(cls.optimizers)}){hint}")


def sharded_collections(model: nn.Module) -> Iterator[tuple[str, Embedding]]:
    """``(name, collection)`` for every collection of ``model`` whose optimizer is fused once sharded."""
    for name, m in model.named_modules():
        if isinstance(m, Embedding) and m.fuses_optimizer:
            yield name, m


def sharded_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters updated inside backward by a sharded collection's fused optimizer."""
    return {id(p) for _, m in sharded_collections(model) if m.is_sharded for p in m.parameters()}


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds sharded tables: its forward passes are then collectives."""
    return any(m.is_sharded for _, m in sharded_collections(model))


def shard_model(model: nn.Module, world_size: int, sharding: dict[str, str], row_wise_from_rows: int,
                optimizer: str, lr: float, eps: float = 1e-8, device: torch.device | None = None) -> nn.Module:
    """Shard every collection of ``model`` across the workers (in place); ``sharding`` names tables
    of any of them (KEEP's plug-in holds only the id tables)."""
    collections = [c for _, c in sharded_collections(model)]
    tables = {t for c in collections for t in c.table_names}
    unknown = sorted(set(sharding) - tables)
    if unknown:
        raise SpecError(f"model.sharding: unknown table(s) {unknown} (tables: {sorted(tables)})")
    for coll in collections:
        own = {t: kind for t, kind in sharding.items() if t in coll.table_names}
        coll.shard(world_size, own, row_wise_from_rows, optimizer=optimizer, lr=lr, eps=eps, device=device)
    return model


def unsharded_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with sharded tables gathered whole (a collective: every worker
    calls it; the full tables land on rank 0, the other ranks keep their shards)."""
    state = model.state_dict()
    for name, coll in sharded_collections(model):
        if coll.is_sharded:
            full = coll.unsharded_state()
            if full is not None:
                state.update({f"{name}.{k}": v for k, v in full.items()})
    return state


__all__ = ["BACKENDS", "Embedding", "EmbeddingCollection", "ShardedEmbeddingCollection", "check_sparse_optimizer",
           "fields_of", "is_sharded", "make_embedding", "shard_model", "sharded_collections",
           "sharded_parameter_ids", "unsharded_state"]
