"""The full training path against its in-memory ceiling, on a Criteo-like workload (issue 19, item 2).

    python benchmarks/throughput.py                       # 2M train rows, 2 workers, local and torchrec
    python benchmarks/throughput.py --rows 200000 --backends local

The workload: DCN (3 cross layers, deep [256, 128]) over 26 categorical fields (Zipf ids, table sizes from
``--max-ids`` down to 4, dim 16) and 13 dense fields; one epoch; a global batch of ``--batch`` rows (each of
N workers takes batch/N, so every variant takes the same optimisation steps). Labels follow a planted
logistic rule over per-id weights and the dense values, so AUC means something.

Prints the training rows/s of one epoch (the training pass alone, ``train_seconds``; the evaluation and
start-up are reported apart) for:

* ``in memory``: the project's own in-process path (``train/local.py``) over tensors already in memory, the
  ceiling (this process, torch's default threads);
* ``ray <backend>``: Parquet → Ray Data (streamed, ``cache_mb: 0``) → N TorchTrainer workers, the whole
  ``raytrain-ctr run`` path of Target-only (``pipeline.run``),

each as a ratio to the ceiling, with validation AUC, and the whole command's seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytrain_ctr.batch import Batch  # noqa: E402
from raytrain_ctr.config import from_dict  # noqa: E402
from raytrain_ctr.data.dataset import CTRDataset, write_dataset_yaml  # noqa: E402
from raytrain_ctr.data.encode import FeatureEncoder  # noqa: E402
from raytrain_ctr.methods import get_method  # noqa: E402
from raytrain_ctr.runtime import init_ray  # noqa: E402
from raytrain_ctr.spec import DomainSpec  # noqa: E402

SPARSE, DENSE, DIM = 26, 13, 16
SPLITS = {"train": 1.0, "valid": 0.1, "test": 0.1}  # rows of each split, as a share of --rows
FILE_ROWS, GROUP_ROWS = 250_000, 32_768


def spec(max_ids: int) -> DomainSpec:
    sizes = np.geomspace(max_ids, 4, SPARSE).astype(int)
    return DomainSpec.from_dict({
        "domain": "target", "label": "label",
        "tables": {f"C{i}": {"num_embeddings": int(n) + 1, "dim": DIM} for i, n in enumerate(sizes, 1)},
        "fields": [{"name": f"C{i}", "type": "categorical", "table": f"C{i}"} for i in range(1, SPARSE + 1)]
        + [{"name": f"I{i}", "type": "dense"} for i in range(1, DENSE + 1)]})


def write_data(out: str, rows: int, max_ids: int, seed: int = 0) -> CTRDataset:
    """Criteo-like rows: Zipf ids per field, log-normal dense counts (log1p'd), planted labels."""
    s = spec(max_ids)
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, 0.6, s.tables[f.name].num_embeddings) for f in s.sparse_fields]
    beta = rng.normal(0, 0.3, DENSE)
    Path(out).mkdir(parents=True)
    (Path(out) / "target.spec.yaml").write_text(s.to_yaml())
    write_dataset_yaml(out, {"target": {"spec": "target.spec.yaml", "path": "target"}}, "Criteo-like benchmark")
    for split, share in SPLITS.items():
        n, d = int(rows * share), Path(out, "target", split)
        d.mkdir(parents=True)
        for k, start in enumerate(range(0, n, FILE_ROWS)):
            m = min(FILE_ROWS, n - start)
            cols, logit = {}, np.full(m, -1.0)
            for f, w in zip(s.sparse_fields, weights):
                ids = (rng.zipf(1.1, m) - 1) % (len(w) - 1) + 1
                cols[f.name], logit = ids, logit + w[ids]
            dense = np.log1p(rng.lognormal(1.0, 1.2, (m, DENSE))).astype(np.float32)
            logit += (dense - dense.mean(0)) @ beta
            cols.update({f"I{i}": dense[:, i - 1] for i in range(1, DENSE + 1)})
            cols["label"] = (rng.random(m) < 1 / (1 + np.exp(-logit / 2))).astype(np.int64)
            pq.write_table(pa.table(cols), d / f"part-{k:04d}.parquet", row_group_size=GROUP_ROWS)
    return CTRDataset.load(out)


def read_batch(ds: CTRDataset, split: str) -> Batch:
    enc = FeatureEncoder(ds.domain("target").spec)
    table = pa.concat_tables(pq.read_table(f, columns=ds.domain("target").columns) for f in ds.files("target", split))
    return enc.encode(table)


def config(data: str, storage: str, backend: str, workers: int, batch: int, dense_lr: float, sparse_lr: float) -> dict:
    return {"data": data, "method": "target_only", "storage": storage, "name": backend,
            "model": {"backbone": "dcn", "deep": [256, 128], "cross_layers": 3, "embedding_backend": backend},
            "train": {"epochs": 1, "batch_size": batch // workers, "workers": workers, "lr": dense_lr,
                      "sparse_lr": sparse_lr, "sparse_optimizer": "adagrad", "cache_mb": 0, "progress": False,
                      "tensorboard": False}}


def in_memory(ds: CTRDataset, raw: dict) -> dict:
    from raytrain_ctr.train.local import fit_local

    cfg = from_dict(raw)
    method = get_method("target_only")
    train, valid = read_batch(ds, "train"), read_batch(ds, "valid")
    t0 = time.perf_counter()
    result = fit_local(method, method.stages[0], {"target": ds.domain("target").spec}, cfg.model, cfg.train,
                       {"target": train}, valid)
    h = result.history[0]
    return {"rows_per_s": len(train) / h["train_seconds"], "auc": h["auc"], "seconds": time.perf_counter() - t0}


def through_ray(raw: dict) -> dict:
    from raytrain_ctr.pipeline import run

    t0 = time.perf_counter()
    result = next(iter(run(from_dict(raw), force=True).values()))
    h = result["history"][0]
    return {"rows_per_s": h["train_rows"] / h["train_seconds"], "auc": h["valid_auc"],
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="train rows (valid and test: a tenth each)")
    ap.add_argument("--max-ids", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096, help="rows per step over all workers")
    ap.add_argument("--backends", nargs="+", default=["local", "torchrec"], choices=["local", "torchrec"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sparse-lr", type=float, default=0.01)
    ap.add_argument("--out", default=None, help="where the data and runs go (default: a temporary directory)")
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="bench-throughput-")
    t0 = time.perf_counter()
    ds = write_data(os.path.join(out, "data"), a.rows, a.max_ids)
    print(f"data: {a.rows:,} train rows, {SPARSE} sparse fields (≤ {a.max_ids:,} ids), {DENSE} dense, "
          f"written in {time.perf_counter() - t0:.0f}s; global batch {a.batch}, {os.cpu_count()} cores")

    raw = config(ds.root, os.path.join(out, "runs"), "local", 1, a.batch, a.lr, a.sparse_lr)
    ceiling = in_memory(ds, raw)
    rows = [("in memory (train/local.py)", ceiling)]
    init_ray()
    for backend in a.backends:
        raw = config(ds.root, os.path.join(out, "runs"), backend, a.workers, a.batch, a.lr, a.sparse_lr)
        rows.append((f"ray, {a.workers} workers, {backend}", through_ray(raw)))
    print(f"{'path':<32} {'rows/s':>10} {'ratio':>6} {'valid AUC':>9} {'command s':>9}")
    for name, r in rows:
        print(f"{name:<32} {r['rows_per_s']:>10,.0f} {r['rows_per_s'] / ceiling['rows_per_s']:>5.2f}x "
              f"{r['auc']:>9.4f} {r['seconds']:>9.1f}")


if __name__ == "__main__":
    main()
