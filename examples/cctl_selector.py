"""The CCTL selector's mean weight on noisy and clean source rows, per run of a leaderboard.

    python examples/cctl_selector.py runs/leaderboard-cctl-synth

Reads ``leaderboard.json`` (written by ``raytrain-ctr compare``) and each CCTL run's
``selector.json`` (its stage artifact; the last quarter of training). Needs data with the
generator's ``is_noise`` column for the noisy rows.
"""

import json
import sys
from pathlib import Path

import numpy as np


def main(out: str) -> None:
    runs = json.loads(Path(out, "leaderboard.json").read_text())["runs"]
    table: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        path = Path(run["artifact"], "selector.json")
        if not path.exists():
            continue
        final = json.loads(path.read_text())["final"]
        print(f"{run['entry']} seed {run['seed']}: clean {final['mean_clean']:.4f} ({final['rows_clean']:,} rows), "
              f"noise {final['mean_noise'] if final['mean_noise'] is None else round(final['mean_noise'], 4)} "
              f"({final['rows_noise']:,} rows)")
        if final["mean_noise"] is not None:
            table.setdefault(run["entry"], []).append((final["mean_clean"], final["mean_noise"]))
    for entry, pairs in table.items():
        clean, noise = np.array(pairs).T
        print(f"{entry}: clean {clean.mean():.4f} ± {clean.std(ddof=1) if len(clean) > 1 else 0:.4f}, "
              f"noise {noise.mean():.4f} ± {noise.std(ddof=1) if len(noise) > 1 else 0:.4f}, "
              f"noise below clean in {int((noise < clean).sum())} of {len(pairs)} seeds")


if __name__ == "__main__":
    main(sys.argv[1])
