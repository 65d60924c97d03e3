"""Leaderboards: several methods on the same data over several seeds.

Each entry is ``METHOD`` or ``METHOD:key=value,key=value`` (method args), e.g.
``finetune:pretrain=all``. Every (entry, seed) runs through :func:`pipeline.run`, so
plain stages shared by several methods (Source-only training = Fine-Tune's pre-training)
train once. Writes ``leaderboard.md`` (target AUC, LogLoss, GAUC as mean ± std, paired t-tests
of AUC and GAUC against a reference entry, and the per-user-activity breakdown where the runs
have one),
``leaderboard.json`` (every run) and ``leaderboard.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from raytrain_ctr import pipeline
from raytrain_ctr.config import ExperimentConfig
from raytrain_ctr.train.group import SharedWorkerGroup


@dataclass(frozen=True)
class Entry:
    """A method, its fixed arguments, config ``overrides`` (dotted keys: a tuned configuration), and a
    ``tag`` its label ends with (``autoft[tau=0.5]``)."""

    method: str
    args: dict
    overrides: dict = field(default_factory=dict)
    tag: str = ""

    @classmethod
    def parse(cls, text: str) -> Entry:
        name, _, rest = text.partition(":")
        args = {}
        for pair in filter(None, rest.split(",")):
            k, _, v = pair.partition("=")
            args[k.strip()] = yaml.safe_load(v)
        return cls(name.strip(), args)

    @property
    def label(self) -> str:
        """``finetune(all)``: the pre-training by its value alone; every other argument by its name,
        ``cdanet(mmoe=False)``, ``cctl(ren_weight=0)`` (a bare number says nothing of what it sets)."""
        shown = [str(v) if k == "pretrain" else f"{k}={v}" for k, v in self.args.items()]
        return self.method + (f"({','.join(shown)})" if shown else "") + (f"[{self.tag}]" if self.tag else "")

    def config(self, base: ExperimentConfig, seed: int | None = None) -> ExperimentConfig:
        cfg = base.with_overrides({"method": self.method, "method_args": self.args, **self.overrides})
        return cfg if seed is None else cfg.with_overrides({"train.seed": seed, "name": f"{self.label}-s{seed}"})


METRICS = (("test_auc", "AUC", True), ("test_logloss", "LogLoss", False), ("test_gauc", "GAUC", True))
TESTED = ("test_auc", "test_gauc")  # each gets a paired t-test against the reference


def mean_std(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.4f}"


def paired_p(values: list[float], reference: list[float]) -> float | None:
    """Two-sided paired t-test over seeds (the same seeds in the same order): the p-value of the
    mean difference being 0; None with fewer than 2 pairs or identical columns."""
    from scipy.stats import ttest_rel

    if len(values) < 2 or values == reference:
        return None
    p = float(ttest_rel(values, reference).pvalue)
    return None if np.isnan(p) else p


def compare(base: ExperimentConfig, entries: list[Entry], seeds: list[int], out: str,
            reference: str | None = None) -> list[dict]:
    """Run every entry for every seed; write and return the per-entry summary rows, each with a
    paired t-test of its AUC against ``reference``'s (an entry's label; default the first entry)."""
    rows, runs = run_entries(base, entries, seeds)
    tested(rows, reference or entries[0].label)
    write(rows, runs, base, seeds, out)
    return rows


def run_entries(base: ExperimentConfig, entries: list[Entry], seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """Every (entry, seed) run, all on one worker group: the per-entry rows (each metric's values over the seeds)
    and the runs."""
    runs = []
    with SharedWorkerGroup() as group:
        for e, seed in ((e, seed) for e in entries for seed in seeds):
            cfg = e.config(base, seed)
            final = pipeline.final_metrics(pipeline.run(cfg, group=group), cfg)
            runs.append({"entry": e.label, "seed": seed, "artifact": final["artifact"], "valid_auc": final["valid_auc"],
                         **{k: final[k] for k, _, _ in METRICS},
                         **({"by_activity": final["test_by_activity"]} if "test_by_activity" in final else {})})
    rows = []
    for e in entries:
        mine = [r for r in runs if r["entry"] == e.label]
        rows.append({"entry": e.label, "n": len(mine), **{k: [r[k] for r in mine] for k, _, _ in METRICS}})
    return rows, runs


def tested(rows: list[dict], reference: str) -> None:
    """Add to each row its paired t-tests (over seeds) against the row labelled ``reference``."""
    ref = next((r for r in rows if r["entry"] == reference), None)
    if ref is None:
        raise ValueError(f"reference '{reference}' is not one of the entries {[r['entry'] for r in rows]}")
    for r in rows:
        r["reference"] = reference
        for k in TESTED:
            r[f"p_{k[5:]}"] = paired_p(r[k], ref[k])


def markdown(rows: list[dict], title: str) -> str:
    best = {k: (max if up else min)(np.mean(r[k]) for r in rows) for k, _, up in METRICS}
    tested = "reference" in rows[0]
    names = dict((k, n) for k, n, _ in METRICS)
    head = [n for _, n, _ in METRICS] + ([f"p ({names[k]} vs {rows[0]['reference']})" for k in TESTED]
                                         if tested else [])
    lines = [f"**{title}**", "", "| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for k, _, _ in METRICS:
            cell = mean_std(r[k])
            cells.append(f"**{cell}**" if np.isclose(np.mean(r[k]), best[k]) else cell)
        if tested:
            cells += ["—" if r[f"p_{k[5:]}"] is None else f"{r[f'p_{k[5:]}']:.3f}" for k in TESTED]
        lines.append(f"| {r['entry']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def activity_markdown(runs: list[dict], entries: list[str]) -> str:
    """Test AUC and GAUC per user-activity bucket (MKT Table 3), mean ± std over seeds; empty when
    the runs have no breakdown (``train.activity_buckets`` unset)."""
    runs = [r for r in runs if "by_activity" in r]
    buckets = list(dict.fromkeys(b for r in runs for b in r["by_activity"]))
    if not buckets:
        return ""
    head = [f"{b} {m}" for b in buckets for m in ("AUC", "GAUC")]
    lines = ["", "**by user activity (the user's clicks in the target train split)**", "",
             "| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for e in entries:
        mine = [r["by_activity"] for r in runs if r["entry"] == e]
        if not mine:
            continue
        cells = [mean_std([m[b][k] for m in mine if b in m]) if any(b in m for m in mine) else "—"
                 for b in buckets for k in ("auc", "gauc")]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    users = {b: max(r["by_activity"][b]["users"] for r in runs if b in r["by_activity"]) for b in buckets}
    lines += ["", "users per bucket: " + ", ".join(f"{b}: {n}" for b, n in users.items())]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], runs: list[dict], base: ExperimentConfig, seeds: list[int], out: str,
          extra: str = "", **record: object) -> None:
    """``leaderboard.md`` (the table, the activity breakdown, then ``extra``), ``leaderboard.json`` (the
    runs, the rows, the config and ``record``) and ``leaderboard.png`` under ``out``."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    title = (f"target-domain test metrics, {Path(base.data).name}, backbone {base.model.backbone}, "
             f"seeds {seeds} (mean ± std)")
    (path / "leaderboard.md").write_text(markdown(rows, title) + activity_markdown(runs, [r["entry"] for r in rows])
                                         + extra)
    (path / "leaderboard.json").write_text(json.dumps({"runs": runs, "rows": rows, "config": base.to_dict(),
                                                       **record}, indent=2, default=str))
    plot(rows, path / "leaderboard.png", title)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 0.45 * len(rows) + 1.8))
    labels = [r["entry"] for r in rows]
    for ax, (k, name, _) in zip(axes, METRICS):
        means = [np.mean(r[k]) for r in rows]
        stds = [np.std(r[k], ddof=1) if len(r[k]) > 1 else 0.0 for r in rows]
        ax.barh(labels, means, xerr=stds, color="#4c72b0", capsize=3)
        lo, hi = min(means) - 2 * max(stds + [0.005]), max(means) + 2 * max(stds + [0.005])
        ax.set_xlim(lo, hi)
        ax.set_title(name)
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
