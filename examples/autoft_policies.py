"""What AutoFT's policies learn over training (issue 15's diagnosis; docs/AUTOFT.md).

    python examples/autoft_policies.py runs/diag-autoft-ml100k data/ml100k docs/autoft-policies.png

Reads ``leaderboard.json`` (written by ``raytrain-ctr compare``) and each AutoFT/SpotTune run's
``metrics.json`` (its stage artifact: every epoch's validation share routed to the pre-trained
copy and share of tied decisions, per field and layer, and τ) and ``policy.json`` (the test
split's). Prints, per entry, the test shares over seeds and the per-epoch validation shares of
one seed; draws them (AutoFT Figure 3 over training); and, from the data, the share of target
test lookups whose pre-trained row was never trained (its id absent from every pre-training
domain's train split).
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from raytrain_ctr.data.dataset import CTRDataset

PRETRAIN_DOMAINS = {"source": ("source",), "all": ("source", "target")}


def column(dataset: CTRDataset, domain: str, split: str, names: list[str]) -> np.ndarray:
    """Every id the named columns of one domain's split hold (lists flattened)."""
    import pyarrow.dataset as pads

    t = pads.dataset(dataset.files(domain, split), format="parquet", filesystem=dataset.filesystem).to_table(
        columns=names)
    return np.concatenate([np.asarray((pc.list_flatten(t[c]) if t[c].type.num_fields else t[c]).to_numpy(
        zero_copy_only=False)) for c in names])


def untrained_share(dataset: CTRDataset, pretrain: str) -> dict[str, float]:
    """Per field of the target, the share of its test lookups whose pre-trained row no pre-training
    domain's train split looked up (through any field on the same table)."""
    fields = dataset.domain("target").spec.sparse_fields
    seen = {table: np.unique(np.concatenate([  # each table's trained rows, read once
        column(dataset, d, "train", [g.name for g in dataset.domain(d).spec.sparse_fields if g.table == table])
        for d in PRETRAIN_DOMAINS[pretrain]])) for table in {f.table for f in fields}}
    return {f.name: float(np.mean(~np.isin(column(dataset, "target", "test", [f.name]), seen[f.table])))
            for f in fields}


def main(out: str, data: str, figure: str | None = None) -> None:
    runs = [r for r in json.loads(Path(out, "leaderboard.json").read_text())["runs"]
            if Path(r["artifact"], "policy.json").exists()]
    by_entry: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        metrics = json.loads(Path(run["artifact"], "metrics.json").read_text())
        policy = json.loads(Path(run["artifact"], "policy.json").read_text())
        by_entry[run["entry"]].append({**run, "history": metrics["history"], "best_epoch": metrics["best_epoch"],
                                       "policy": policy})
    for entry, seeds in by_entry.items():
        print(f"\n## {entry}: test AUC {np.mean([s['test_auc'] for s in seeds]):.4f}, best epochs "
              f"{[s['best_epoch'] for s in seeds]}")
        print("| decision | pre-trained share (test), each seed | tied share (test), each seed |")
        print("|---|---|---|")
        first = seeds[0]["policy"]
        for group, shares in first["pretrained_share"].items():
            for d in shares:
                pre = " ".join(f"{s['policy']['pretrained_share'][group][d]:.2f}" for s in seeds)
                tied = " ".join(f"{s['policy'].get('tied_share', {}).get(group, {}).get(d, float('nan')):.2f}"
                                for s in seeds)
                print(f"| {group}/{d} | {pre} | {tied} |")
        h = seeds[0]["history"]
        keys = sorted(k for k in h[0] if k.startswith("valid_pretrained_share/"))
        print(f"\nseed {seeds[0]['seed']}, validation, by epoch: tau "
              + " ".join(f"{e.get('tau', float('nan')):.2f}" for e in h)
              + "; valid AUC " + " ".join(f"{e['valid_auc']:.4f}" for e in h))
        for k in keys:
            tied = k.replace("pretrained_share", "tied_share")
            print(f"  {k.split('/', 1)[1]}: pre " + " ".join(f"{e[k]:.2f}" for e in h)
                  + " | tied " + " ".join(f"{e[tied]:.2f}" for e in h))
    dataset = CTRDataset.load(data)
    for pretrain in PRETRAIN_DOMAINS:
        shares = untrained_share(dataset, pretrain)
        print(f"\npre-trained on {pretrain}: target test lookups whose pre-trained row was never trained: "
              + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    if figure:
        draw(by_entry, figure)


def draw(by_entry: dict[str, list[dict]], path: str) -> None:
    """Rows: entries; columns: the policies; per decision, the validation share routed to the pre-trained
    copy by epoch (mean over seeds, solid) and the share of tied decisions (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ("embedding", "cross", "deep")
    fig, axes = plt.subplots(len(by_entry), 3, figsize=(15, 3.6 * len(by_entry)), squeeze=False)
    for row, (entry, seeds) in zip(axes, by_entry.items()):
        epochs = min(len(s["history"]) for s in seeds)
        for ax, group in zip(row, groups):
            keys = sorted(k for k in seeds[0]["history"][0] if k.startswith(f"valid_pretrained_share/{group}/"))
            for k in keys:
                pre = np.mean([[e[k] for e in s["history"][:epochs]] for s in seeds], axis=0)
                tied = np.mean([[e[k.replace("pretrained_share", "tied_share")] for e in s["history"][:epochs]]
                                for s in seeds], axis=0)
                line, = ax.plot(range(epochs), pre, marker="o", label=k.rsplit("/", 1)[1])
                ax.plot(range(epochs), tied, ls="--", color=line.get_color(), alpha=0.6)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xticks(range(epochs))
            ax.set_title(f"{entry}: {group} policy" if keys else f"{entry}: no {group} policy")
            ax.set_xlabel("epoch")
            ax.set_ylabel("share of validation instances")
            if keys:
                ax.legend(fontsize=7)
    fig.suptitle(f"AutoFT policies over training: routed to the pre-trained copy (solid), tied (dashed); mean over "
                 f"{len(next(iter(by_entry.values())))} seeds, up to the shortest run's last epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
