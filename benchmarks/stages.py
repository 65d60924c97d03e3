"""Fixed cost per stage on a running cluster (issue 19, item 3): one worker group for many stages against a
Ray Train run per stage.

    python benchmarks/stages.py                   # MovieLens-100K (data/ml100k), Target-only, 4 seeds each way
    python benchmarks/stages.py --data data/synth --stages 3 --workers 2

Each way trains the same ``--stages`` Target-only stages (seeds 0…) on one warm local Ray: first each in its own
``TorchTrainer.fit`` (the path a Tune trial's stage takes), then all on one ``SharedWorkerGroup`` (what
``raytrain-ctr run`` and a leaderboard do). A stage's fixed cost is its wall time less the time its epochs
report (training and validation); the first stage on the shared group pays for starting it and is shown apart.
Target: ≤ 5 s a stage on the shared group.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from ray.train import UserCallback

from raytrain_ctr.config import load_config
from raytrain_ctr.pipeline import run
from raytrain_ctr.runtime import init_ray
from raytrain_ctr.train.group import SharedWorkerGroup


def timed(cfg, **kw) -> tuple[float, float]:
    """(wall seconds, seconds of epochs) of one run of ``cfg``'s single stage."""
    t0 = time.perf_counter()
    (result,) = run(cfg, **kw).values()
    return time.perf_counter() - t0, sum(h["epoch_seconds"] for h in result["history"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/target_only.yaml")
    ap.add_argument("--data", default=None, help="dataset directory (default: the config's)")
    ap.add_argument("--stages", type=int, default=4, help="stages each way (seeds 0…)")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    base = load_config(a.config).with_overrides({"storage": tempfile.mkdtemp(prefix="bench-stages-"),
                                                 "train.workers": a.workers, "train.progress": False,
                                                 **({"data": a.data} if a.data else {})})
    init_ray()
    seeds = range(a.stages)
    own = [timed(base.with_overrides({"train.seed": s, "name": f"own-{s}"}), force=True,
                 callbacks=[UserCallback()])  # a callback (Ray Train's no-op base): a fit of its own, Tune's path
           for s in seeds]
    with SharedWorkerGroup() as group:
        shared = [timed(base.with_overrides({"train.seed": s, "name": f"shared-{s}"}), force=True, group=group)
                  for s in seeds]
    fixed_own = statistics.median(w - e for w, e in own)
    fixed_shared = statistics.median(w - e for w, e in shared[1:]) if len(shared) > 1 else float("nan")
    print("| way | stages | median wall s a stage | median epochs s | median fixed s a stage |")
    print("|---|---|---|---|---|")
    print(f"| own fit per stage | {len(own)} | {statistics.median(w for w, _ in own):.2f} | "
          f"{statistics.median(e for _, e in own):.2f} | {fixed_own:.2f} |")
    print(f"| shared group, first stage (starts it) | 1 | {shared[0][0]:.2f} | {shared[0][1]:.2f} | "
          f"{shared[0][0] - shared[0][1]:.2f} |")
    print(f"| shared group, later stages | {len(shared) - 1} | {statistics.median(w for w, _ in shared[1:]):.2f} | "
          f"{statistics.median(e for _, e in shared[1:]):.2f} | {fixed_shared:.2f} |")
    print(f"fixed cost a stage, shared / own: {fixed_shared / fixed_own:.2f}× (target ≤ 5 s: "
          f"{'met' if fixed_shared <= 5 else 'not met'})")


if __name__ == "__main__":
    main()
