"""The embedding interface (DESIGN §5) and its two backends, chosen by ``model.embedding_backend``.

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

from raytrain_ctr.embedding.collection import EmbeddingCollection, fields_of
from raytrain_ctr.spec import FieldSpec, SpecError, TableSpec

BACKENDS = ("local", "torchrec")


def make_embedding(tables: dict[str, TableSpec], fields: list[FieldSpec], backend: str = "local") -> nn.Module:
    if backend == "local":
        return EmbeddingCollection(tables, fields)
    if backend == "torchrec":
        from raytrain_ctr.embedding.sharded import ShardedEmbeddingCollection

        return ShardedEmbeddingCollection(tables, fields)
    raise SpecError(f"model.embedding_backend: unknown backend '{backend}' (one of {list(BACKENDS)})")


def sharded_collections(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, collection)`` for every torchrec collection of ``model``, sharded or not yet."""
    for name, m in model.named_modules():
        if getattr(m, "fused_optimizer_backend", False):
            yield name, m


def sharded_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters updated inside backward by a sharded collection's fused optimizer."""
    return {id(p) for _, m in sharded_collections(model) if m.is_sharded for p in m.parameters()}


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds sharded tables: its forward passes are then collectives."""
    return any(m.is_sharded for _, m in sharded_collections(model))


def shard_model(model: nn.Module, world_size: int, sharding: dict[str, str], row_wise_from_rows: int,
                optimizer: str, lr: float, eps: float = 1e-8, device: torch.device | None = None) -> nn.Module:
    """Shard every torchrec collection of ``model`` across the workers (in place); ``sharding``
    names tables of any of them (KEEP's plug-in holds only the id tables)."""
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


__all__ = ["BACKENDS", "EmbeddingCollection", "fields_of", "is_sharded", "make_embedding", "shard_model",
           "sharded_collections", "sharded_parameter_ids", "unsharded_state"]
