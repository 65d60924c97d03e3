"""The planted generator's rows/s in one process (issue 19 item 6: the target is 1M rows/s a core).

    python benchmarks/generator.py [--presets default large] [--shards 3]

Generates whole source shards in this process (latents, labels, behaviour sequences; no Parquet
written) and prints the best rows/s over ``--shards`` shards per preset, after one warm-up shard,
and its ratio to the target. ``benchmarks/ingest.py`` measures the generator writing Parquet
through Ray tasks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raytrain_ctr.data.synth import generate_shard, make_config  # noqa: E402

TARGET = 1_000_000  # rows/s a core


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["default", "large"])
    p.add_argument("--shards", type=int, default=3)
    a = p.parse_args()
    print("| preset | rows a shard | rows/s, one process | × target (1M rows/s a core) |")
    print("|---|---|---|---|")
    for preset in a.presets:
        cfg = make_config(preset)
        generate_shard(cfg, "source", 0)  # warm-up: the world's item table, numpy's first calls
        best = 0.0
        for shard in range(1, a.shards + 1):
            t0 = time.perf_counter()
            rows = generate_shard(cfg, "source", shard).num_rows
            best = max(best, rows / (time.perf_counter() - t0))
        print(f"| {preset} | {cfg.rows_per_shard:,} | {best:,.0f} | {best / TARGET:.2f} |")


if __name__ == "__main__":
    main()
