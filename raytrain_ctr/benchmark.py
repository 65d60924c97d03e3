"""The benchmark protocol: every method at its tuned best under the same budget, then tested over seeds.

For each entry (a method with the arguments it fixes, e.g. ``finetune:pretrain=all``):

1. a Ray Tune sweep of ``trials`` trials (ASHA on target-validation AUC) over the keys every method
   shares (:data:`~raytrain_ctr.tune.COMMON_SPACE`, alike for baselines and methods) and the method's
   own ``search_space``, less the arguments the entry fixes. Epochs and early stopping are the base
   config's, for every entry. Stages upstream of the tuned one are trained once and shared by the
   trials (``tuned_overrides``);
2. the best trial's configuration re-run for every seed and evaluated on the target's *test* split.

Each entry is then tested (paired t-test over seeds) against the best baseline: the entry, among
those whose method is a baseline (``Method.baseline``), with the highest mean test AUC. Writes under
``out``: ``leaderboard.md`` (the table, each entry's chosen configuration and sweep, the command),
``leaderboard.json`` and ``leaderboard.png``, and each sweep's ``tune/<entry>/tune_results.md``.
An interrupted benchmark resumes: finished sweeps and runs are found again, a sweep cut short
resumes its unfinished trials.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from raytrain_ctr.compare import Entry, run_entries, tested, write
from raytrain_ctr.config import ExperimentConfig
from raytrain_ctr.methods import METHODS, get_method
from raytrain_ctr.spec import SpecError
from raytrain_ctr.tune import TuneError, method_space, tune_method, tuned_overrides


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")


def sweep(base: ExperimentConfig, entry: Entry, trials: int, max_concurrent: int, out: str,
          grace_epochs: int = 1) -> dict:
    """Tune ``entry``: the best trial's sampled keys (``params``), its validation AUC, and the sweep's size."""
    cfg = entry.config(base)
    space = method_space(entry.method, entry.args)
    found = tune_method(cfg, space, trials, max_concurrent, str(Path(out) / "tune" / slug(entry.label)), grace_epochs)
    if not found:  # interrupted (Ctrl-C) before any trial reported
        raise TuneError(f"the sweep of {entry.label} ended without a trial's result (interrupted?); the same command "
                        f"resumes it")
    best = found[0]
    return {"params": {k: best[k] for k in space}, "valid_auc": best["valid_auc"], "trials": len(found),
            "stopped_early": sum(t["test_auc"] is None for t in found)}


def best_baseline(rows: list[dict], entries: list[Entry]) -> str:
    baselines = {e.label for e in entries if METHODS[e.method].baseline}
    if not baselines:
        raise SpecError(f"a benchmark needs a baseline to test against; none of {[e.label for e in entries]} is one "
                        f"(baselines: {sorted(n for n, m in METHODS.items() if m.baseline)})")
    return max((r for r in rows if r["entry"] in baselines), key=lambda r: np.mean(r["test_auc"]))["entry"]


def benchmark(base: ExperimentConfig, entries: list[Entry], trials: int, seeds: list[int], out: str,
              max_concurrent: int = 2, grace_epochs: int = 1, command: str | None = None) -> list[dict]:
    """Sweep, re-run and test every entry (see the module's docstring); returns the leaderboard's rows."""
    if len(seeds) < 2:
        raise SpecError(f"--seeds: a paired test needs at least 2 seeds (5 or more for the protocol), got {seeds}")
    for e in entries:
        get_method(e.method, e.args)  # an unknown method or argument fails before any sweep
    chosen = {e.label: sweep(base, e, trials, max_concurrent, out, grace_epochs) for e in entries}
    tuned = [Entry(e.method, e.args, tuned_overrides(e.config(base), chosen[e.label]["params"])) for e in entries]
    rows, runs = run_entries(base, tuned, seeds)
    reference = best_baseline(rows, entries)
    tested(rows, reference)
    for r in rows:
        r["chosen"] = chosen[r["entry"]]
    write(rows, runs, base, seeds, out, extra=report(chosen, trials, reference, command), chosen=chosen,
          trials=trials, reference=reference, command=command)
    return rows


def report(chosen: dict[str, dict], trials: int, reference: str, command: str | None) -> str:
    lines = ["", f"p: paired t-test over seeds against the best baseline, {reference}.", "",
             f"**chosen configurations** ({trials} trials per entry, ASHA on target-validation AUC)", "",
             "| entry | valid AUC (sweep) | trials stopped early | configuration |", "|---|---|---|---|"]
    for label, c in chosen.items():
        conf = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c["params"].items())
        lines.append(f"| {label} | {c['valid_auc']:.4f} | {c['stopped_early']} of {c['trials']} | {conf} |")
    if command:
        lines += ["", "reproduce with:", "", "```", command, "```"]
    return "\n".join(lines) + "\n"
