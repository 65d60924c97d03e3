"""Sensitivity studies, the papers' parameter figures: one key of one method swept over values, each over seeds.

``sensitivity(base, entry, key, values, seeds, out)`` runs the entry once per value and seed
(:func:`compare.run_entries`: stages the values do not shape, e.g. a pre-training, train once),
tests each value against the best one (paired t-test over seeds), and writes ``sensitivity.md``,
``sensitivity.json`` and ``sensitivity.png`` (test AUC and GAUC against the value, mean ± std: AutoFT's
τ, CDAnet Figure 6's α, β and K, CCTL Figure 5(b)'s α, E-CDCTR Figure 4's dimension, MKT's γ).
A key without a dot is the method's argument (``tau`` = ``method_args.tau``); without values, the
ones its paper studies (``Method.studied``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from raytrain_ctr.compare import Entry, markdown, run_entries, tested
from raytrain_ctr.config import ExperimentConfig
from raytrain_ctr.methods import get_method
from raytrain_ctr.spec import SpecError


def studied_values(method: str, key: str) -> list[Any]:
    studied = get_method(method).studied
    if key not in studied:
        raise SpecError(f"method '{method}' declares no studied values for '{key}' (it does for {sorted(studied)}); "
                        f"give --values")
    return list(studied[key])


def sensitivity(base: ExperimentConfig, entry: Entry, key: str, values: list[Any] | None, seeds: list[int],
                out: str) -> list[dict]:
    """Run ``entry`` with ``key`` at each of ``values`` over ``seeds``; write and return the rows, one per value."""
    values = studied_values(entry.method, key) if values is None else list(values)
    if len(values) < 2:
        raise SpecError(f"a sensitivity study of '{key}' needs two values or more, got {values}")
    dotted = key if "." in key else f"method_args.{key}"
    entries = [Entry(entry.method, entry.args, {**entry.overrides, dotted: v}, tag=f"{key}={v}") for v in values]
    for e in entries:  # a bad key or value fails before any run
        cfg = e.config(base)
        get_method(cfg.method, cfg.method_args)
    rows, runs = run_entries(base, entries, seeds)
    for r, v in zip(rows, values):
        r["value"] = v
    best = max(rows, key=lambda r: np.mean(r["test_auc"]))
    tested(rows, best["entry"])
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    title = f"{entry.label}: target test metrics against {key}, {Path(base.data).name}, seeds {seeds} (mean ± std)"
    (path / "sensitivity.md").write_text(markdown(rows, title))
    (path / "sensitivity.json").write_text(json.dumps({"key": key, "values": values, "rows": rows, "runs": runs,
                                                       "config": base.to_dict()}, indent=2, default=str))
    plot(rows, key, path / "sensitivity.png", title)
    return rows


def plot(rows: list[dict], key: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [r["value"] for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = values if numeric else list(range(len(values)))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (metric, name) in zip(axes, (("test_auc", "AUC"), ("test_gauc", "GAUC"))):
        means = [np.mean(r[metric]) for r in rows]
        stds = [np.std(r[metric], ddof=1) if len(r[metric]) > 1 else 0.0 for r in rows]
        ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, color="#4c72b0")
        if numeric and min(values) > 0 and max(values) / min(values) >= 100:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(x, [str(v) for v in values])
        ax.set_xlabel(key)
        ax.set_title(f"test {name}")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
