"""Ingest throughput: Parquet → Ray Data → tensors in Train workers, against pyarrow in one process.

    python benchmarks/ingest.py [--rows 1000000] [--workers 2] [--batch-size 8192]

Prints, in one run: the generator's rows/s (one process, and Ray tasks), the rows/s of
the full ingest path (read, split over workers, encode to tensors; counted from each
worker's iterator start, slowest worker), the rows/s of pyarrow reading the same files and
encoding them with the same encoder in this process (the ceiling here), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raytrain_ctr.data.dataset import CTRDataset  # noqa: E402
from raytrain_ctr.data.encode import FeatureEncoder  # noqa: E402
from raytrain_ctr.data.ingest import stream  # noqa: E402
from raytrain_ctr.data.synth import generate, generate_shard, make_config  # noqa: E402
from raytrain_ctr.data.validate import value_issues  # noqa: E402
from raytrain_ctr.runtime import init_ray  # noqa: E402


def pyarrow_in_process(ds: CTRDataset, domain: str, batch_size: int) -> float:
    """Rows/s of Parquet read with pyarrow → the encoder (value checks included), in this process."""
    enc = FeatureEncoder(ds.domain(domain).spec)
    cols = ds.domain(domain).columns
    rows, t0 = 0, time.perf_counter()
    for f in ds.files(domain, "train"):
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=cols):
            rows += len(enc.encode(rb))
    return rows / (time.perf_counter() - t0)


def value_checks(ds: CTRDataset, domain: str, batch_size: int) -> float:
    """Rows/s of the value checks alone (``value_issues``, run by the encoder on every batch), batches in memory."""
    spec, cols = ds.domain(domain).spec, ds.domain(domain).columns
    batches = [pa.Table.from_batches([rb]) for f in ds.files(domain, "train")
               for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=cols)]
    t0 = time.perf_counter()
    for t in batches:
        value_issues(t, spec)
    return sum(t.num_rows for t in batches) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = make_config("large", rows=a.rows)
    out = a.out or tempfile.mkdtemp(prefix="bench-ingest-")

    t0 = time.perf_counter()
    generate_shard(cfg, "source", 0)
    serial = cfg.rows_per_shard / (time.perf_counter() - t0)
    init_ray()
    t0 = time.perf_counter()
    counts = generate(out, cfg)
    parallel = sum(counts.values()) / (time.perf_counter() - t0)
    print(f"generator: {serial:,.0f} rows/s in one process; {parallel:,.0f} rows/s with Ray tasks "
          f"({os.cpu_count()} cores, {sum(counts.values()):,} rows written incl. Parquet)")

    ds = CTRDataset.load(out)
    t0 = time.perf_counter()
    m = stream(ds, "train", num_workers=a.workers, batch_size=a.batch_size, domains=("source",))
    wall = time.perf_counter() - t0
    ray_rate = m["source_rows_per_s"]
    ceiling = pyarrow_in_process(ds, "source", a.batch_size)
    print(f"ingest, source/train ({m['source_rows']:,} rows), batch {a.batch_size}:")
    print(f"  Ray Data → {a.workers} Train workers → tensors: {ray_rate:,.0f} rows/s "
          f"(job wall time incl. worker start-up {wall:.1f}s)")
    print(f"  pyarrow → tensors, one process:           {ceiling:,.0f} rows/s")
    print(f"  ratio Ray path / in-process pyarrow:      {ray_rate / ceiling:.2f}")
    checks = value_checks(ds, "source", a.batch_size)
    print(f"  the encoder's value checks alone:         {checks:,.0f} rows/s ({ceiling / checks:.0%} of the "
          f"encoder's time, {ray_rate / checks:.1%} of the Ray path's)")


if __name__ == "__main__":
    main()
