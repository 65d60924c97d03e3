"""``raytrain-ctr``: the command line.

    raytrain-ctr synth --out DIR [--rows N] [--seed S] [--preset NAME]
    raytrain-ctr movielens --out DIR [--from PATH] [--split random|time] [--variant gender|entities]
    raytrain-ctr validate [DIR] [--config YAML] [--max-oov 0.1]
    raytrain-ctr spec infer DIR [--label label] [--exclude COL ...]   write the specs from the Parquet
    raytrain-ctr negatives DIR --out DIR [--k 4] [--sampling uniform|popularity]   click-only logs
    raytrain-ctr ingest DIR [--workers N]          stream a dataset through Train workers
    raytrain-ctr run --config YAML [--variant V] [--stage S] [--force] [--as-of DATE] [--set KEY=VALUE ...]
    raytrain-ctr schedule --config YAML --start DATE [--days 90]   cadenced jobs day by day (E-CDCTR), timeline
    raytrain-ctr compare --config YAML --methods M[:k=v,...] ... --seeds 0 1 2 --out DIR
    raytrain-ctr tune --config YAML [--space YAML] --samples N --out DIR
    raytrain-ctr probe --config YAML [--k 5] [--rows 20] [--columns C ...] [--out FILE.csv]
                                                   CDAnet §5.3: nearest other-domain rows of translated latents
    raytrain-ctr export --config YAML [--variant V] [--stage S] --out DIR
                                                   a finished run's served model as a serving package
    raytrain-ctr predict --package DIR --input PATH ... --out DIR [--workers 2] [--carry COL ...]
                                                   score Parquet with a package on Ray Data
    raytrain-ctr demo                              the README's main job: a MovieLens leaderboard
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import yaml

from raytrain_ctr.artifacts import ArtifactError
from raytrain_ctr.data.dataset import CTRDataset, DataError
from raytrain_ctr.data.validate import MAX_OOV
from raytrain_ctr.lease import LeaseError
from raytrain_ctr.pipeline import PipelineError
from raytrain_ctr.serving.package import PackageError
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.metrics import MetricsError
from raytrain_ctr.train.state import StateMismatchError
from raytrain_ctr.tune import TuneError


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

    counts = prepare(a.out, a.source, split=a.split, seed=a.seed, variant=a.variant)
    for dom, c in counts.items():
        print(f"{dom}: {sum(c.values()):,} rows (" + ", ".join(f"{k} {v:,}" for k, v in c.items()) + ")")


RAY_VALIDATE_BYTES = 256 << 20  # validate scans smaller data in this process: starting Ray costs more


def cmd_validate(a: argparse.Namespace) -> None:
    import os

    from raytrain_ctr.data.validate import validate
    from raytrain_ctr.runtime import init_ray

    cfg = experiment(a) if a.config else None
    if cfg is None and a.dir is None:
        raise SpecError("validate: give a dataset directory, or --config (its data, mapped by its roles)")
    ds = CTRDataset.load(a.dir or cfg.data, cfg.roles if cfg else None)
    if cfg:
        from raytrain_ctr.methods import get_method
        from raytrain_ctr.pipeline import check_stage_inputs

        method = get_method(cfg.method, cfg.method_args)
        for stage in method.stages:
            check_stage_inputs(cfg, ds, method, stage)
    if a.ray or os.environ.get("RAY_ADDRESS") or ds.size_bytes > RAY_VALIDATE_BYTES:
        init_ray()
    for s in validate(ds, max_oov=a.max_oov):
        print(s.line())
    print("ok: every domain and split satisfies its spec" + (f"; method '{cfg.method}' finds the domains its "
                                                               f"stages read" if cfg else ""))


def cmd_spec_infer(a: argparse.Namespace) -> None:
    from raytrain_ctr.data.infer import infer_specs, write_specs

    specs = infer_specs(a.dir, label=a.label, user_id=a.user_id or None, time=a.time, exclude=tuple(a.exclude or ()),
                        dense=tuple(a.dense or ()), dim=a.dim, max_len=a.max_len, vocab_max=a.vocab_max)
    for path in write_specs(a.dir, specs, force=a.force):
        print(f"wrote {path}")
    for name, spec in specs.items():
        tables = ", ".join(f"{t.name} {t.num_embeddings:,}" for t in spec.tables.values())
        print(f"{name}: {len(spec.fields)} fields; tables (rows incl. OOV): {tables}")
    print("review the specs, then: raytrain-ctr validate " + a.dir)


def cmd_negatives(a: argparse.Namespace) -> None:
    from raytrain_ctr.data.negatives import sample_negatives
    from raytrain_ctr.runtime import init_ray

    if a.parallelism != 1:
        init_ray()
    counts = sample_negatives(a.dir, a.out, user=a.user, item=a.item, k=a.k, sampling=a.sampling,
                              item_columns=tuple(a.item_columns or ()), label=a.label, seed=a.seed,
                              domains=tuple(a.domains) if a.domains else None, parallelism=a.parallelism or None)
    for dom, splits in counts.items():
        print(f"{dom}: " + ", ".join(f"{s} {pos:,} positives + {neg:,} negatives" for s, (pos, neg) in splits.items()))
    print(f"wrote {a.out}")


def cmd_ingest(a: argparse.Namespace) -> None:
    from raytrain_ctr.data.ingest import stream
    from raytrain_ctr.runtime import init_ray

    ds = CTRDataset.load(a.dir)
    init_ray()
    m = stream(ds, split=a.split, num_workers=a.workers, batch_size=a.batch_size)
    for d in ds.domains:
        print(f"{d}/{a.split}: {m[f'{d}_rows']:,} rows through {a.workers} workers "
              f"({m[f'{d}_rows_per_s']:,.0f} rows/s)")


def experiment(a: argparse.Namespace):
    """The config of ``--config [--variant]`` with ``--set key=value`` overrides applied."""
    import yaml

    from raytrain_ctr.config import load_config

    cfg = load_config(a.config, a.variant)
    overrides = {}
    for item in a.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise SpecError(f"--set expects KEY=VALUE, got '{item}'")
        overrides[key] = yaml.safe_load(value)
    return cfg.with_overrides(overrides) if overrides else cfg


def cmd_run(a: argparse.Namespace) -> None:
    import json

    from raytrain_ctr import pipeline
    from raytrain_ctr.methods import get_method
    from raytrain_ctr.runtime import init_ray

    cfg = experiment(a)
    if a.as_of:
        cfg = cfg.with_overrides({"as_of": a.as_of})
    init_ray()
    results = pipeline.run(cfg, stage=a.stage, force=a.force, command=shlex.join(
        ["raytrain-ctr", "run", "--config", a.config, *(["--variant", a.variant] if a.variant else []),
         *(f"--set={s}" for s in a.set or []), *(["--as-of", a.as_of] if a.as_of else [])]))
    method = get_method(cfg.method, cfg.method_args)
    for name, r in results.items():
        if r.get("transient"):
            print(f"{cfg.method}/{name}: not kept (transient), and every stage reading it has its artifact")
            continue
        state = "skipped (artifact exists)" if r.get("skipped") else f"best epoch {r['best_epoch']}"
        print(f"{cfg.method}/{name}: {state}; {method.stage(name).eval_domain} test AUC {r['test_auc']:.4f}, LogLoss "
              f"{r['test_logloss']:.4f}, GAUC {r.get('test_gauc', float('nan')):.4f} -> {r['artifact']}")
    print(json.dumps({k: {m: v for m, v in r.items() if m != "history"} for k, r in results.items()}, default=str))


def cmd_schedule(a: argparse.Namespace) -> None:
    import datetime as dt

    from raytrain_ctr import cadence
    from raytrain_ctr.runtime import init_ray

    cfg = experiment(a)
    init_ray()
    seen: list = []

    def show(event) -> None:
        seen.append(event)
        print(cadence.line(event, cadence.labels(seen)), flush=True)

    events = cadence.simulate(cfg, dt.date.fromisoformat(a.start), a.days, on_event=show)
    print(f"timeline: {cadence.write(events, a.out)}/timeline.md")


def cmd_runs(a: argparse.Namespace) -> None:
    import datetime as dt

    from raytrain_ctr.artifacts import inventory

    rows = inventory(a.storage)
    print("| artifact | state | created | MB | best epoch | valid AUC | test AUC | test GAUC |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        when = dt.datetime.fromtimestamp(r.created).strftime("%Y-%m-%d %H:%M") if r.created else ""
        m = r.metrics
        figures = [f"{m[k]:.4f}" if isinstance(m.get(k), float) else "" for k in ("valid_auc", "test_auc", "test_gauc")]
        print(f"| {r.artifact} | {r.state} | {when} | {r.bytes / 2**20:.1f} | {m.get('best_epoch', '')} | "
              f"{' | '.join(figures)} |")
    if not rows:
        print(f"(no stages under {a.storage})")
    if any(r.state.startswith("damaged") for r in rows):
        raise ArtifactError(f"{a.storage}: damaged artifacts (above); re-run their stages with --force")


def cmd_compare(a: argparse.Namespace) -> None:
    from raytrain_ctr.compare import Entry, compare, markdown
    from raytrain_ctr.runtime import init_ray

    cfg = experiment(a)
    init_ray()
    rows = compare(cfg, [Entry.parse(m) for m in a.methods], a.seeds, a.out, reference=a.reference)
    print(markdown(rows, f"target test metrics over seeds {a.seeds}"))
    print(f"written: {a.out}/leaderboard.md, leaderboard.json, leaderboard.png")


def cmd_tune(a: argparse.Namespace) -> None:
    from raytrain_ctr.runtime import init_ray
    from raytrain_ctr.tune import load_space, tune_method

    cfg = experiment(a)
    # Measured on Ray 2.60: a trial the scheduler stops leaves its worker group's 1-CPU placement group
    # reserved until the sweep ends (tune.release_placement_groups frees them then), and a local Ray
    # with 4 logical CPUs stalled after 4 such trials. A local cluster gets room for them.
    # PBT stops and restarts trials (each exploit, and every pause): room for a placement group left at each
    restarts = 1 + (cfg.train.epochs // max(a.perturbation_interval, 1) if a.scheduler == "pbt" else 0)
    init_ray(extra_cpus=a.samples * (cfg.train.workers + 1) * restarts)
    trials = tune_method(cfg, load_space(a.space, cfg.method), a.samples, a.max_concurrent, a.out,
                         scheduler=a.scheduler, perturbation_interval=a.perturbation_interval)
    print((Path(a.out) / "tune_results.md").read_text())
    print(f"best: {trials[0] if trials else None}")


def cmd_benchmark(a: argparse.Namespace) -> None:
    from raytrain_ctr.benchmark import benchmark
    from raytrain_ctr.compare import Entry, markdown
    from raytrain_ctr.runtime import init_ray

    cfg = experiment(a)
    init_ray(extra_cpus=a.trials * (cfg.train.workers + 1))  # room for the sweeps' placement groups (cmd_tune)
    command = shlex.join(["raytrain-ctr", *a.argv])
    rows = benchmark(cfg, [Entry.parse(m) for m in a.methods], a.trials, a.seeds, a.out,
                     max_concurrent=a.max_concurrent, grace_epochs=a.grace_epochs, command=command)
    print(markdown(rows, f"tuned ({a.trials} trials each), target test metrics over seeds {a.seeds}"))
    print(f"written: {a.out}/leaderboard.md, leaderboard.json, leaderboard.png")


def cmd_sensitivity(a: argparse.Namespace) -> None:
    from raytrain_ctr.compare import Entry, markdown
    from raytrain_ctr.runtime import init_ray
    from raytrain_ctr.sensitivity import sensitivity

    cfg = experiment(a)
    values = None if a.values is None else [yaml.safe_load(v) for v in a.values]
    init_ray()
    rows = sensitivity(cfg, Entry.parse(a.method), a.key, values, a.seeds, a.out)
    print(markdown(rows, f"{a.method}: target test metrics against {a.key}, seeds {a.seeds}"))
    print(f"written: {a.out}/sensitivity.md, sensitivity.json, sensitivity.png")


def cmd_probe(a: argparse.Namespace) -> None:
    from raytrain_ctr.probe import probe

    table, summary = probe(experiment(a), k=a.k, rows=a.rows, pool=a.pool, split=a.split,
                           positives=not a.all_labels, columns=a.columns, metric=a.metric, seed=a.seed,
                           translate=not a.untranslated)
    print(table.head(a.show * a.k).to_string(index=False, float_format="{:.4f}".format))
    print()
    print(summary.to_string(index=False, float_format="{:.4f}".format))
    print(f"distinct neighbours: {table.pool_row.nunique():,} pool rows of {len(table):,} neighbour slots")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(a.out, index=False)
        print(f"written: {a.out} ({len(table)} rows)")


DEMO_METHODS = ["target_only", "source_only", "all", "finetune:pretrain=source", "finetune:pretrain=all",
                "l2sp:pretrain=source", "spottune:pretrain=source", "autoft:pretrain=source", "autoft:pretrain=all"]


def cmd_export(a: argparse.Namespace) -> None:
    import json

    from raytrain_ctr.serving.export import export_package

    cfg = experiment(a)
    if a.as_of:
        cfg = cfg.with_overrides({"as_of": a.as_of})
    path = export_package(cfg, a.out, a.stage)
    manifest = json.loads((path / "manifest.json").read_text())
    tables = manifest["inputs"]["tables"]
    print(f"exported {manifest['method']} stage '{manifest['stage']}' ({manifest['artifact']}) to {path}: "
          f"{len(tables)} tables, {sum(t['rows'] for t in tables.values()):,} rows; test AUC "
          f"{manifest['metrics'].get('test_auc', float('nan')):.4f}")


def cmd_predict(a: argparse.Namespace) -> None:
    import yaml

    from raytrain_ctr.runtime import init_ray
    from raytrain_ctr.serving.predict import predict

    where = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in a.where or [])}
    init_ray(extra_cpus=a.workers)
    counts = predict(a.package, a.input, a.out, a.workers, tuple(a.carry or ()), where)
    print(f"scored {counts['rows']:,} rows ({counts['files']} files, {counts['row_groups']} row groups) on "
          f"{a.workers} workers → {a.out}")


def cmd_demo(a: argparse.Namespace) -> None:
    """MovieLens-100K (male → female): AutoFT Table 3's rows over 3 seeds, local Ray."""
    try:
        CTRDataset.load(a.data)
    except DataError:
        cmd_movielens(argparse.Namespace(out=a.data, source=None, split="random", seed=0, variant="gender"))
    a = argparse.Namespace(config=a.config, variant=None, set=[f"data={a.data}"], methods=DEMO_METHODS,
                           seeds=a.seeds, out=a.out, reference=None)
    cmd_compare(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain-ctr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write planted-mechanism source/target Parquet + specs")
    s.add_argument("--out", required=True, help="dataset directory to write")
    s.add_argument("--rows", type=int, default=None, help="source rows (target = rows * target_ratio)")
    s.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default %(default)s)")
    s.add_argument("--preset", default="default",
                   help="default, tiny, homogeneous, noisy, entities (MKT), drift (E-CDCTR) or large")
    s.add_argument("--parallelism", type=int, default=0, help="max concurrent Ray tasks (0 = all, 1 = no Ray)")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("movielens", help="MovieLens (male=source, female=target) → Parquet + specs")
    s.add_argument("--out", required=True, help="dataset directory to write")
    s.add_argument("--from", dest="source", default=None, help="folder with ml-100k or ml-1m files")
    s.add_argument("--split", choices=("random", "time"), default="random",
                   help="random: 80/10/10 by row; time: by timestamp")
    s.add_argument("--seed", type=int, default=0, help="seed of the random split (default %(default)s)")
    s.add_argument("--variant", choices=("gender", "entities"), default="gender",
                   help="gender: male→female users; entities: catalogue→new-release movies (MKT)")
    s.set_defaults(func=cmd_movielens)

    s = sub.add_parser("validate", help="check a dataset against its specs and summarise it (nulls, cardinality, "
                                        "OOV shares); with --config, also that the method finds its domains")
    s.add_argument("dir", nargs="?", default=None, help="dataset directory (default: the config's data)")
    s.add_argument("--config", default=None, help="experiment YAML: its roles map the domains, its method's stages "
                                                  "are checked against them")
    s.add_argument("--variant", default=None, help="the config's variant")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. roles.target=game")
    s.add_argument("--max-oov", type=float, default=MAX_OOV,
                   help="fail when more than this share of a field's ids read the OOV row (default %(default)s)")
    s.add_argument("--ray", action="store_true", help=f"scan on Ray (one task per file) even below "
                                                      f"{RAY_VALIDATE_BYTES >> 20} MB (always on a cluster)")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("spec", help="feature-spec tools")
    spec_sub = s.add_subparsers(dest="spec_command", required=True)
    s = spec_sub.add_parser("infer", help="write DIR/<domain>.spec.yaml and DIR/dataset.yaml from the Parquet under "
                                          "DIR/<domain>/{train,valid,test}/ (table sizes, shared tables, 0-based ids)")
    s.add_argument("dir", help="a directory with one sub-directory per domain")
    s.add_argument("--label", default="label", help="the label column (default %(default)s)")
    s.add_argument("--user-id", default="user_id", help="the user column GAUC groups by ('' for none)")
    s.add_argument("--time", default=None, help="the time column (default: one named ts, time or timestamp)")
    s.add_argument("--exclude", nargs="+", default=None, help="columns that are not features (e.g. a raw rating)")
    s.add_argument("--dense", nargs="+", default=None, help="int columns to read as dense values, not ids")
    s.add_argument("--dim", type=int, default=16, help="embedding dim of every table (default %(default)s)")
    s.add_argument("--max-len", type=int, default=20, help="longest sequence kept (default %(default)s)")
    s.add_argument("--vocab-max", type=int, default=64,
                   help="string columns with at most this many values get a vocab, others are hashed")
    s.add_argument("--force", action="store_true", help="overwrite existing specs and dataset.yaml")
    s.set_defaults(func=cmd_spec_infer)

    s = sub.add_parser("negatives", help="click-only logs: k sampled negatives per positive, in its split")
    s.add_argument("dir", help="Parquet under DIR/<domain>/{train,valid,test}/, positives only")
    s.add_argument("--out", required=True, help="a new directory, same layout, with a label column")
    s.add_argument("--user", default="user_id", help="user column (default %(default)s)")
    s.add_argument("--item", default="item_id", help="item column (default %(default)s)")
    s.add_argument("--item-columns", nargs="+", default=None,
                   help="item-side columns a negative takes from its sampled item (e.g. a category)")
    s.add_argument("--k", type=int, default=4, help="negatives per positive (default %(default)s)")
    s.add_argument("--sampling", choices=("uniform", "popularity"), default="uniform",
                   help="uniform over the domain's items, or weighted by their train clicks")
    s.add_argument("--label", default="label", help="the label column written (default %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same output, whatever the parallelism")
    s.add_argument("--domains", nargs="+", default=None, help="only these domains (default: every one)")
    s.add_argument("--parallelism", type=int, default=0, help="max concurrent Ray tasks (0 = all, 1 = no Ray)")
    s.set_defaults(func=cmd_negatives)

    s = sub.add_parser("ingest", help="stream a dataset through Ray Train workers")
    s.add_argument("dir", help="dataset directory")
    s.add_argument("--split", default="train", help="split to stream (default %(default)s)")
    s.add_argument("--workers", type=int, default=2, help="Train workers (default %(default)s)")
    s.add_argument("--batch-size", type=int, default=4096, help="rows per batch per worker (default %(default)s)")
    s.set_defaults(func=cmd_ingest)

    def with_config(s: argparse.ArgumentParser) -> None:
        s.add_argument("--config", required=True, help="experiment YAML (base: + variants:)")
        s.add_argument("--variant", default=None, help="a variant of the config (its variants: block)")
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=0.01")

    s = sub.add_parser("run", help="run a method's stages (skipping finished ones)")
    with_config(s)
    s.add_argument("--stage", default=None,
                   help="run only this stage, or this job (its stages NAME.*), against the upstream artifacts")
    s.add_argument("--force", action="store_true", help="re-run stages whose artifacts exist")
    s.add_argument("--as-of", default=None, metavar="YYYY-MM-DD",
                   help="the date the stages' time windows and latest-artifact inputs are relative to")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("schedule", help="run a cadenced method's jobs day by day (E-CDCTR: TPM monthly, CPM weekly, "
                                        "A-CTR daily) and print the artifact timeline")
    with_config(s)
    s.add_argument("--start", required=True, metavar="YYYY-MM-DD", help="the first day (every job runs on it)")
    s.add_argument("--days", type=int, default=90, help="days to run (default %(default)s)")
    s.add_argument("--out", default="runs/schedule", help="where the timeline and results go")
    s.set_defaults(func=cmd_schedule)

    s = sub.add_parser("runs", help="a storage's stage artifacts (verified against their manifests), with their "
                                    "metrics, and the stages trained there without one yet")
    s.add_argument("storage", nargs="?", default="runs", help="a config's storage: a path or a URI (default runs)")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("compare", help="several methods over several seeds → leaderboard")
    with_config(s)
    s.add_argument("--methods", nargs="+", required=True, help="METHOD or METHOD:key=value,...")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds each method runs with (default %(default)s)")
    s.add_argument("--out", default="runs/leaderboard", help="leaderboard directory")
    s.add_argument("--reference", default=None,
                   help="the entry every other is paired against (t-test over seeds); default the first")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("tune", help="Ray Tune search (ASHA on target-validation AUC)")
    with_config(s)
    s.add_argument("--space", default=None, help="search-space YAML (default: the method's built-in space)")
    s.add_argument("--samples", type=int, default=8, help="trials (default %(default)s)")
    s.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default %(default)s)")
    s.add_argument("--scheduler", choices=["asha", "pbt"], default="asha",
                   help="asha: stop the worse trials early; pbt: population-based training, the worse trials "
                        "continue from the better ones' checkpoints with perturbed values (run --max-concurrent "
                        "as large as --samples: PBT's population trains together)")
    s.add_argument("--perturbation-interval", type=int, default=1, help="PBT: epochs between exploits")
    s.add_argument("--out", default="runs/tune", help="Tune results directory")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("benchmark", help="each method tuned (ASHA, equal trials), its best re-run over seeds, tested "
                                         "against the best baseline → leaderboard")
    with_config(s)
    s.add_argument("--methods", nargs="+", required=True, help="METHOD or METHOD:key=value,... (fixed arguments)")
    s.add_argument("--trials", type=int, default=8, help="trials per method, the same for all (default %(default)s)")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="seeds the chosen configurations re-run with (default %(default)s)")
    s.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default %(default)s)")
    s.add_argument("--grace-epochs", type=int, default=1, help="epochs before ASHA may stop a trial")
    s.add_argument("--out", default="runs/benchmark", help="leaderboard directory (an interrupted one resumes)")
    s.set_defaults(func=cmd_benchmark)

    s = sub.add_parser("sensitivity", help="one key of a method swept over values, each over seeds → the papers' "
                                           "sensitivity figures")
    with_config(s)
    s.add_argument("--method", required=True, help="METHOD or METHOD:key=value,...")
    s.add_argument("--key", required=True, help="a method argument (tau) or a dotted config key (train.lr)")
    s.add_argument("--values", nargs="+", default=None, help="values (YAML scalars; default: those its paper studies)")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default %(default)s)")
    s.add_argument("--out", default="runs/sensitivity", help="output directory")
    s.set_defaults(func=cmd_sensitivity)

    s = sub.add_parser("probe", help="CDAnet §5.3: the k nearest other-domain rows of translated latent features")
    with_config(s)
    s.add_argument("--k", type=int, default=5, help="neighbours per query row (default %(default)s)")
    s.add_argument("--rows", type=int, default=20, help="query rows of the served domain (a seeded sample)")
    s.add_argument("--pool", type=int, default=20_000, help="rows of the other domain's train split to search")
    s.add_argument("--split", default="test", help="split the query rows come from")
    s.add_argument("--all-labels", action="store_true", help="not only positive rows (§5.3 uses positives)")
    s.add_argument("--columns", nargs="+", default=None, help="Parquet columns to show (default: ids, title)")
    s.add_argument("--metric", choices=("euclidean", "cosine", "centered"), default="euclidean",
                   help="centered: cosine after removing each set's mean")
    s.add_argument("--seed", type=int, default=0, help="seed of the query-row sample")
    s.add_argument("--untranslated", action="store_true", help="search with z itself (the control for W z)")
    s.add_argument("--show", type=int, default=5, help="query rows printed (all go to --out)")
    s.add_argument("--out", default=None, help="CSV of every query row's neighbours")
    s.set_defaults(func=cmd_probe)

    s = sub.add_parser("export", help="a finished run's served model → a serving package (torch.export program, "
                                      "tables, spec, manifest)")
    with_config(s)
    s.add_argument("--stage", default=None, help="the stage to export (default: the method's last, the served one)")
    s.add_argument("--as-of", default=None, metavar="YYYY-MM-DD", help="the run's date (cadenced methods)")
    s.add_argument("--out", required=True, help="the package directory (replaced if it exists)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("predict", help="score Parquet with a serving package on Ray Data")
    s.add_argument("--package", required=True, help="a package written by raytrain-ctr export")
    s.add_argument("--input", nargs="+", required=True, help="Parquet files or directories")
    s.add_argument("--out", required=True, help="a new directory: Parquet with file, row, the carried columns, pctr")
    s.add_argument("--workers", type=int, default=2, help="actors, each holding the package once")
    s.add_argument("--carry", nargs="+", default=None, help="input columns copied to the output (ids, labels)")
    s.add_argument("--where", nargs="+", default=None, metavar="COL=VALUE",
                   help="only rows whose column equals the value (a domain column); compared as strings")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("demo", help="the README's main job: MovieLens-100K leaderboard (baselines, SpotTune, AutoFT)")
    s.add_argument("--data", default="data/ml100k", help="MovieLens-100K dataset directory (written if absent)")
    s.add_argument("--config", default="jobs/configs/movielens.yaml", help="the experiment YAML")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default %(default)s)")
    s.add_argument("--out", default="runs/leaderboard-ml100k", help="leaderboard directory")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.func(args)
    except (SpecError, DataError, PipelineError, StateMismatchError, PackageError, MetricsError, ArtifactError,
            LeaseError, TuneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
