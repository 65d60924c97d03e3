"""Flat memory: a worker's peak RSS when the data grows tenfold (issue 19, item 5).

    python benchmarks/memory.py                           # 1M and 10M train rows, 2 workers, local tables
    python benchmarks/memory.py --rows 100000 1000000 --backend torchrec

The Criteo-like workload of ``throughput.py`` (26 Zipf fields, 13 dense, DCN), with ``--max-ids`` ids a field
so the tables stay small beside what could grow with the rows; one epoch of ``raytrain-ctr run`` (Target-only)
per size, Parquet → Ray Data → ``--workers`` TorchTrainer workers, at the default ``train.cache_mb`` (splits
under 256 MB on disk are cached in the object store, larger ones streamed). Each worker reports its peak
resident memory (``ru_maxrss``) every epoch; the table prints the largest over the workers per size, and the
ratio of each to the smallest size's (target: ≤ 1.2× at ten times the rows).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from throughput import config, write_data

from raytrain_ctr.config import from_dict
from raytrain_ctr.pipeline import run
from raytrain_ctr.runtime import init_ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000], help="train rows of each run")
    ap.add_argument("--max-ids", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096, help="rows per step over all workers")
    ap.add_argument("--backend", default="local", choices=["local", "torchrec"])
    ap.add_argument("--out", default=None, help="where the data and runs go (default: a temporary directory)")
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="bench-memory-")
    init_ray()
    rows = []
    for n in sorted(a.rows):
        t0 = time.perf_counter()
        ds = write_data(os.path.join(out, f"data-{n}"), n, a.max_ids)
        written = time.perf_counter() - t0
        raw = config(ds.root, os.path.join(out, "runs"), a.backend, a.workers, a.batch, 1e-3, 0.01)
        raw["train"].pop("cache_mb")  # the default: what a user gets
        result = next(iter(run(from_dict(raw), force=True).values()))
        h = result["history"][0]
        rows.append((n, h["peak_rss_mb"], h["train_rows"] / h["train_seconds"], h["valid_auc"], written))
        print(f"{n:,} rows: written in {written:.0f}s, trained at {rows[-1][2]:,.0f} rows/s, "
              f"peak RSS {h['peak_rss_mb']:,.0f} MiB a worker", flush=True)
    base = rows[0][1]
    print(f"{a.workers} workers, {a.backend} tables (≤ {a.max_ids:,} ids a field), global batch {a.batch}, "
          f"{os.cpu_count()} cores")
    print(f"{'train rows':>12} {'peak RSS MiB':>13} {'ratio':>6} {'rows/s':>9} {'valid AUC':>9}")
    for n, rss, rate, auc, _ in rows:
        print(f"{n:>12,} {rss:>13,.0f} {rss / base:>5.2f}x {rate:>9,.0f} {auc:>9.4f}")


if __name__ == "__main__":
    main()
