"""CSV click logs → the Parquet layout raytrain-ctr reads: ``OUT/<domain>/{train,valid,test}/part-00000.parquet``.

One CSV per domain (``video.csv`` → domain ``video``). Rows are split by time: the oldest 80 % train, the next
10 % valid, the newest 10 % test, so evaluation never sees the future. Usage::

    python examples/clicklog/to_parquet.py examples/clicklog data/clicks-raw
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

SPLITS = {"train": 0.8, "valid": 0.1, "test": 0.1}


def convert(src: str | Path, out: str | Path, time: str = "ts") -> dict[str, dict[str, int]]:
    counts = {}
    for csv in sorted(Path(src).glob("*.csv")):
        table = pcsv.read_csv(csv)
        table = table.take(pc.sort_indices(table, [(time, "ascending")]))
        edges = np.cumsum([0, *SPLITS.values()]) * table.num_rows
        counts[csv.stem] = {}
        for (split, _), lo, hi in zip(SPLITS.items(), edges[:-1].round().astype(int), edges[1:].round().astype(int)):
            (Path(out) / csv.stem / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(table.slice(lo, hi - lo), Path(out) / csv.stem / split / "part-00000.parquet")
            counts[csv.stem][split] = int(hi - lo)
    return counts


if __name__ == "__main__":
    print(convert(sys.argv[1], sys.argv[2]))
