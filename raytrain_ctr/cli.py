"""``raytrain-ctr``: the command line.

    raytrain-ctr synth --out DIR [--rows N] [--seed S] [--preset NAME]
    raytrain-ctr movielens --out DIR [--from PATH] [--split random|time]
    raytrain-ctr validate DIR
    raytrain-ctr ingest DIR [--workers N]        stream a dataset through Train workers
    raytrain-ctr demo [--out DIR]                the README's main job
"""

from __future__ import annotations

import argparse
import sys
import time

from raytrain_ctr.data.dataset import CTRDataset, DataError
from raytrain_ctr.spec import SpecError


def cmd_synth(a: argparse.Namespace) -> None:
    from raytrain_ctr.data.synth import generate, make_config
    from raytrain_ctr.runtime import init_ray

    cfg = make_config(a.preset, rows=a.rows, seed=a.seed)
    if a.parallelism != 1:
        init_ray()
    t0 = time.perf_counter()
    counts = generate(a.out, cfg, parallelism=a.parallelism)
    dt = time.perf_counter() - t0
    total = sum(counts.values())
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v:,} rows" for k, v in counts.items())
          + f" in {dt:.1f}s ({total / dt:,.0f} rows/s)")


def cmd_movielens(a: argparse.Namespace) -> None:
    from raytrain_ctr.data.movielens import prepare

    counts = prepare(a.out, a.source, split=a.split, seed=a.seed)
    for dom, c in counts.items():
        print(f"{dom}: {sum(c.values()):,} rows (" + ", ".join(f"{k} {v:,}" for k, v in c.items()) + ")")


def cmd_validate(a: argparse.Namespace) -> None:
    from raytrain_ctr.data.validate import validate
    from raytrain_ctr.runtime import init_ray

    ds = CTRDataset.load(a.dir)
    init_ray()
    for s in validate(ds):
        print(s.line())
    print("ok: every domain and split satisfies its spec")


def cmd_ingest(a: argparse.Namespace) -> None:
    from raytrain_ctr.data.ingest import stream
    from raytrain_ctr.runtime import init_ray

    ds = CTRDataset.load(a.dir)
    init_ray()
    m = stream(ds, split=a.split, num_workers=a.workers, batch_size=a.batch_size)
    for d in ds.domains:
        print(f"{d}/{a.split}: {m[f'{d}_rows']:,} rows through {a.workers} workers "
              f"({m[f'{d}_rows_per_s']:,.0f} rows/s)")


def cmd_demo(a: argparse.Namespace) -> None:
    """Generate planted data, validate it, and stream it through the ingest path."""
    for step in (
        argparse.Namespace(out=a.out, preset="tiny", rows=None, seed=0, parallelism=0, func=cmd_synth),
        argparse.Namespace(dir=a.out, func=cmd_validate),
        argparse.Namespace(dir=a.out, split="train", workers=2, batch_size=4096, func=cmd_ingest),
    ):
        print(f"== {step.func.__name__[4:]}")
        step.func(step)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain-ctr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write planted-mechanism source/target Parquet + specs")
    s.add_argument("--out", required=True)
    s.add_argument("--rows", type=int, default=None, help="source rows (target = rows * target_ratio)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", default="default")
    s.add_argument("--parallelism", type=int, default=0, help="max concurrent Ray tasks (0 = all, 1 = no Ray)")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("movielens", help="MovieLens (male=source, female=target) → Parquet + specs")
    s.add_argument("--out", required=True)
    s.add_argument("--from", dest="source", default=None, help="folder with ml-100k or ml-1m files")
    s.add_argument("--split", choices=("random", "time"), default="random")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_movielens)

    s = sub.add_parser("validate", help="check a dataset against its specs and summarise it")
    s.add_argument("dir")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("ingest", help="stream a dataset through Ray Train workers")
    s.add_argument("dir")
    s.add_argument("--split", default="train")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--batch-size", type=int, default=4096)
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("demo", help="the README's main job on embedded defaults")
    s.add_argument("--out", default="data/demo-synth")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (SpecError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
