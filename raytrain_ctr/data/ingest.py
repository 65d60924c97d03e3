"""Ray Data ingest: stream a domain's Parquet split into Ray Train workers as :class:`Batch` es.

Driver side: :func:`read_split` builds a lazy ``ray.data.Dataset`` (schema checked
against the spec first, never materialised), or, for a split small enough to cache, a
:class:`CachedSplit` (one Arrow table in the object store that each worker slices: no
Ray Data pipeline, whose split coordinators cost seconds to start per split and stage).
Worker side: :func:`iter_domain` turns the worker's shard (a Ray Data iterator or its
slice of a cached table) into encoded batches, and :func:`joint` steps two domains together.

Splitting uses :class:`ExactlyOnceDataConfig`: Ray Train's default ``streaming_split(...,
equal=True)`` may drop rows to even out the shards; here every row is seen exactly once
per epoch across workers, and the training loop copes with workers whose shards run
out at different steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import zip_longest

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.train import DataConfig

from raytrain_ctr.data.dataset import CTRDataset, DataError, filter_rows
from raytrain_ctr.data.encode import Batch, FeatureEncoder, user_key
from raytrain_ctr.data.validate import check_schema, value_issues
from raytrain_ctr.runtime import report

ROW = "__row_in_file"


@dataclass(frozen=True)
class TimeWindow:
    """Rows with ``start <= time < end`` (unix seconds; either bound may be open)."""

    start: int | None = None
    end: int | None = None


def on_disk_bytes(dataset: CTRDataset, files: list[str]) -> int:
    return sum(i.size or 0 for i in dataset.filesystem.get_file_info(files))


def block_bytes(dataset: CTRDataset, files: list[str], min_blocks: int) -> int:
    """A block size that cuts the split into at least ``min_blocks`` blocks (64 KiB .. 128 MiB).

    Blocks are what ``streaming_split`` hands to workers: a small split read as one
    block would all go to one worker.
    """
    in_memory = 4 * on_disk_bytes(dataset, files)  # Parquet decompresses several-fold
    return int(min(max(in_memory // max(min_blocks, 1), 64 << 10), 128 << 20))


def _row_filter(dom, files: list[str], dataset: CTRDataset, window: TimeWindow | None) -> dict:
    """``filter_rows``' arguments for a domain's split, after checking its schema and window."""
    check_schema(dom, files, dataset.filesystem)
    if window and not dom.spec.time:
        raise ValueError(f"domain '{dom.name}' has no time field in its spec: cannot select a time window")
    w = window or TimeWindow()
    return {"where": dom.where, "time_col": dom.spec.time, "start": w.start, "end": w.end}


def small_split(dataset: CTRDataset, domain: str, split: str, window: TimeWindow | None, columns: list[str],
                below_bytes: int) -> pa.Table | None:
    """The split's rows (in ``window``) as one Arrow table when it is smaller than ``below_bytes`` on disk,
    else None (stream it)."""
    dom, files = dataset.domain(domain), dataset.files(domain, split)
    if not below_bytes or on_disk_bytes(dataset, files) >= below_bytes:
        return None
    keep = _row_filter(dom, files, dataset, window)
    tables = []
    for file in files:  # each file's rows checked here, before any worker starts: errors name the file and row
        t = pq.read_table(file, columns=columns, filesystem=dataset.filesystem)
        t = filter_rows(t.append_column(ROW, pa.array(np.arange(t.num_rows))), **keep)
        issues = value_issues(t, dom.spec)
        if issues:
            raise DataError(replace(issues[0], row=t.column(ROW)[issues[0].row].as_py()).message(file))
        tables.append(t.drop_columns([ROW]))
    return pa.concat_tables(tables)


@dataclass(frozen=True)
class CachedSplit:
    """A split small enough to cache, read once on the driver and held in the object store as one Arrow
    table; worker ``rank`` of ``world`` reads the rows ``[rank·n/world, (rank+1)·n/world)``: every row
    exactly once per epoch, in the same order every run."""

    ref: object  # ray.ObjectRef of the pa.Table
    rows: int

    def shard(self, rank: int, world: int) -> pa.Table:
        import ray

        start, end = rank * self.rows // world, (rank + 1) * self.rows // world
        return ray.get(self.ref).slice(start, end - start)


def read_split(dataset: CTRDataset, domain: str, split: str, window: TimeWindow | None = None,
               extra_columns: tuple[str, ...] = (), shuffle_files: bool = False, seed: int | None = None,
               min_blocks: int = 32, cache_below_bytes: int = 0):
    """A Ray Dataset of one domain's split (optionally a time window of it), or a :class:`CachedSplit`.

    Lazy and streamed through ``read_parquet``, except that a split smaller than
    ``cache_below_bytes`` on disk is read once here with pyarrow and put in the object
    store: re-reading it every epoch, or even materialising it through a Ray Data
    pipeline, costs more in start-up (seconds) than the read itself.
    """
    import ray

    dom = dataset.domain(domain)
    files = dataset.files(domain, split)
    columns = dom.columns + [c for c in extra_columns if c not in dom.columns]
    table = small_split(dataset, domain, split, window, columns, cache_below_bytes)
    if table is not None:
        return CachedSplit(ray.put(table.combine_chunks()), table.num_rows)
    keep = _row_filter(dom, files, dataset, window)
    shuffle = None
    if shuffle_files:
        shuffle = ray.data.FileShuffleConfig(seed=seed) if seed is not None else "files"
    ds = ray.data.read_parquet(files, filesystem=dataset.filesystem, shuffle=shuffle).select_columns(columns)
    ds.context.target_max_block_size = block_bytes(dataset, files, min_blocks)
    if dom.where or window:
        ds = ds.map_batches(filter_rows, batch_format="pyarrow", batch_size=None, fn_kwargs=keep)
    return ds


class ExactlyOnceDataConfig(DataConfig):
    """``DataConfig`` whose splits together hold every row exactly once (``equal=False``)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            resolve = getattr(self, "_resolve_execution_options", None)
            ds.context.execution_options = resolve(name) if resolve else self.default_ingest_options()
            if name in to_split:
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            else:
                for i in range(world_size):
                    output[i][name] = ds.iterator()
        return output


def iter_domain(shard, encoder: FeatureEncoder, batch_size: int, shuffle_buffer: int = 0,
                seed: int | None = None, prefetch_batches: int = 2) -> Iterator[Batch]:
    """Encoded batches from a worker's ``DataIterator`` (``ray.train.get_dataset_shard``) or its slice of a
    :class:`CachedSplit` (with ``shuffle_buffer``, the slice is permuted whole, seeded by ``seed``)."""
    if isinstance(shard, pa.Table):
        if shuffle_buffer:
            shard = shard.take(np.random.default_rng(seed).permutation(shard.num_rows))
        for start in range(0, shard.num_rows, batch_size):  # small_split checked its values on the driver
            yield encoder.encode(shard.slice(start, batch_size), check=False)
        return
    kwargs = {}
    if shuffle_buffer:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed}
    for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                    prefetch_batches=prefetch_batches, **kwargs):
        if table.num_rows:
            yield encoder.encode(table)


def joint(primary: Iterable[Batch], secondary: Iterable[Batch]) -> Iterator[tuple[Batch | None, Batch | None]]:
    """Step two domains together until both are exhausted (each row once).

    With per-step batch sizes in the ratio of the two domains' sizes both run out
    together; otherwise the shorter one yields ``None`` for its remaining steps.
    """
    yield from zip_longest(primary, secondary)


def _stream_loop(config: dict) -> None:
    """Worker loop of :func:`stream`: iterate each domain's shard, count rows, optionally dump ids."""
    import time

    import numpy as np
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    totals = {}
    for domain, spec in config["specs"].items():
        encoder = FeatureEncoder(spec, extra_columns=tuple(config["extra_columns"]))
        rows, ids, t0 = 0, [], time.perf_counter()
        for batch in iter_domain(ray.train.get_dataset_shard(domain), encoder, config["batch_size"]):
            rows += len(batch)
            for col in config["extra_columns"]:
                ids.append(batch.extra[col].numpy())
        end = time.perf_counter()
        if config["ids_dir"]:
            np.save(f"{config['ids_dir']}/{domain}-rank{ctx.get_world_rank()}.npy",
                    np.concatenate(ids) if ids else np.zeros(0, np.int64))
        # rows summed over workers; time of the slowest worker from its iterator's start
        # (Ray Data's pipeline start-up included: it is part of the cost of ingest)
        stats = torch.tensor([rows, end - t0], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(stats[:1])
            dist.all_reduce(stats[1:], op=dist.ReduceOp.MAX)
        totals[f"{domain}_rows"] = int(stats[0])
        totals[f"{domain}_rows_per_s"] = float(stats[0] / max(float(stats[1]), 1e-9))
    report(totals)


def stream(dataset: CTRDataset, split: str = "train", num_workers: int = 2, batch_size: int = 4096,
           domains: tuple[str, ...] | None = None, extra_columns: tuple[str, ...] = (),
           ids_dir: str | None = None, storage_path: str | None = None) -> dict:
    """Stream domains' Parquet through Ray Data into ``num_workers`` Train workers as tensors.

    Returns the total rows per domain and the rows/s of the slowest worker's stream;
    ``ids_dir`` makes every worker save the ``extra_columns`` values it saw (for checks).
    """
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    domains = domains or tuple(dataset.domains)
    datasets = {d: read_split(dataset, d, split, extra_columns=extra_columns) for d in domains}
    trainer = TorchTrainer(
        _stream_loop,
        train_loop_config={"specs": {d: dataset.domain(d).spec for d in domains}, "batch_size": batch_size,
                           "extra_columns": list(extra_columns), "ids_dir": ids_dir},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False),
        datasets=datasets,
        dataset_config=ExactlyOnceDataConfig(),
        run_config=RunConfig(storage_path=storage_path or tempfile.mkdtemp(prefix="raytrain-ctr-stream-"),
                             name="stream"),
    )
    return dict(trainer.fit().metrics)


def user_clicks(dataset: CTRDataset, domain: str, window: TimeWindow | None = None,
                cache_below_bytes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each user's clicks (positive rows) in the domain's train split (within ``window``): sorted user
    keys and their counts (MKT §4.2.2's user activity). A split below ``cache_below_bytes`` is counted
    here; a larger one block by block in Ray Data tasks, the per-block counts summed on the driver (no
    shuffle: one row per block and user moves)."""
    spec = dataset.domain(domain).spec
    if not spec.user_id:
        raise ValueError(f"domain '{domain}' has no user_id in its spec: no user activity")

    def count(t: pa.Table) -> dict[str, np.ndarray]:
        keys = user_key(t.column(spec.user_id).combine_chunks().to_numpy(zero_copy_only=False))
        users, clicks = sum_by_key(keys, t.column(spec.label).to_numpy())
        return {"user": users, "clicks": clicks}

    columns = [c for c in (spec.user_id, spec.label, spec.time) if c]
    table = small_split(dataset, domain, "train", window, columns + list(dataset.domain(domain).where),
                        cache_below_bytes)
    if table is not None:  # counted here: a Ray Data pipeline costs seconds to start
        out = count(table)
        return out["user"], out["clicks"]
    split = read_split(dataset, domain, "train", window=window)
    parts = split.map_batches(count, batch_format="pyarrow", batch_size=None)
    blocks = list(parts.iter_batches(batch_format="numpy", batch_size=None))
    return sum_by_key(np.concatenate([b["user"] for b in blocks] or [np.zeros(0, np.int64)]),
                      np.concatenate([b["clicks"] for b in blocks] or [np.zeros(0, np.int64)]))


def sum_by_key(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct ``keys`` and the sum of ``values`` per key (integers)."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, weights=values, minlength=len(uniq)).astype(np.int64)
