"""Embedding backends on N workers: training rows/s and peak memory per worker, in one run.

    python benchmarks/embedding.py                      # 2 gloo workers on CPU, 1e5 and 1e6 rows
    python benchmarks/embedding.py --rows 100000 --steps 10 --workers 2
    python benchmarks/embedding.py --device cuda --workers 1   # a GPU (NCCL)

Every variant trains the same model (``--tables`` tables of ``--rows`` rows × ``--dim``,
one id field each, Zipf-distributed ids, an MLP on top) with Adagrad on the tables and
Adam on the MLP, ``--batch`` rows per worker and step:

* ``torchrec row_wise`` / ``torchrec table_wise``: tables sharded, fused Adagrad;
* ``local sparse``: replicated ``nn.Embedding(sparse=True)``, the local backend's own
  gradient sync (touched rows all-gathered, dense parts all-reduced);
* ``local sparse + DDP``: the same tables under ``DistributedDataParallel``;
* ``dense DDP``: ``nn.Embedding(sparse=False)`` under DDP (whole-table all-reduce).

Peak memory is the growth of the worker's peak RSS (CPU) or peak CUDA allocation (GPU)
from just before the model is built. Ratios are against ``local sparse`` measured in the
same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytrain_ctr.batch import Batch  # noqa: E402
from raytrain_ctr.spec import FieldSpec, TableSpec  # noqa: E402

VARIANTS = ("torchrec row_wise", "torchrec table_wise", "local sparse", "local sparse + DDP", "dense DDP")


def memory_bytes(device: torch.device, peak: bool) -> int:
    """Peak (or current) CUDA allocation, or the process's peak (or current) resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    field = "VmHWM:" if peak else "VmRSS:"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


class Model(nn.Module):
    def __init__(self, embedding: nn.Module, n_fields: int, dim: int):
        super().__init__()
        self.embedding = embedding
        self.names = [f"f{i}" for i in range(n_fields)]
        self.mlp = nn.Sequential(nn.Linear(n_fields * dim, 256), nn.ReLU(), nn.Linear(256, 1))

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embedding(batch)
        return self.mlp(torch.cat([emb[n] for n in self.names], 1)).squeeze(-1)


def batches(args, rank: int, device: torch.device) -> list[Batch]:
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(args.steps + args.warmup):
        u = torch.rand(args.tables, args.batch, generator=g)
        ids = (args.rows - 1) ** u  # Zipf-like: log-uniform over 1..rows-1
        sparse = {f"f{i}": ids[i].long().clamp(1, args.rows - 1).to(device) for i in range(args.tables)}
        label = (torch.rand(args.batch, generator=g) < 0.2).float().to(device)
        out.append(Batch("bench", sparse, torch.zeros(args.batch, 0, device=device), label))
    return out


def build(variant: str, args, world: int, device: torch.device):
    from raytrain_ctr.embedding.collection import EmbeddingCollection

    tables = {f"t{i}": TableSpec(f"t{i}", args.rows, args.dim) for i in range(args.tables)}
    fields = [FieldSpec(f"f{i}", "categorical", f"t{i}") for i in range(args.tables)]
    if variant.startswith("torchrec"):
        from raytrain_ctr.embedding.sharded import ShardedEmbeddingCollection

        emb = ShardedEmbeddingCollection(tables, fields)
        kind = variant.split()[1]
        emb.shard(world, {t: kind for t in tables}, optimizer="adagrad", lr=0.05, device=device)
        model = Model(emb, args.tables, args.dim).to(device)
        return model, [torch.optim.Adam(model.mlp.parameters(), lr=1e-3)], None
    sparse = variant != "dense DDP"
    model = Model(EmbeddingCollection(tables, fields, sparse=sparse), args.tables, args.dim).to(device)
    opts = [torch.optim.Adagrad(model.embedding.parameters(), lr=0.05), torch.optim.Adam(model.mlp.parameters())]
    if variant == "local sparse":
        from raytrain_ctr.train.sync import GradientSync

        return model, opts, GradientSync(model)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return ddp, opts, None


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    data = batches(args, rank, device)
    if args.variant.startswith("torchrec"):  # its libraries load before the baseline: count tables, not code
        import torchrec.distributed.shard  # noqa: F401
        import torchrec.optim  # noqa: F401
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = memory_bytes(device, peak=False)
    torch.manual_seed(0)
    model, opts, sync = build(args.variant, args, world, device)
    loss_fn = nn.BCEWithLogitsLoss()
    for step, b in enumerate(data):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = loss_fn(model(b), b.label)
        loss.backward()
        if sync is not None:
            sync()
        for o in opts:
            o.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - t0
    peak = memory_bytes(device, peak=True) - base
    Path(out, f"{rank}.txt").write_text(f"{seconds} {peak} {loss.item()}")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(variant: str, rows: int, args) -> dict:
    args = argparse.Namespace(**{**vars(args), "variant": variant, "rows": rows})
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(args.workers, free_port(), args, out), nprocs=args.workers)
        res = [Path(out, f"{r}.txt").read_text().split() for r in range(args.workers)]
    seconds = max(float(r[0]) for r in res)
    return {"rows_per_s": args.workers * args.batch * args.steps / seconds,
            "peak_mb": max(int(r[1]) for r in res) / 2**20, "loss": float(res[0][2])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args()
    print(f"{args.workers} workers on {args.device}, {args.tables} tables × dim {args.dim}, batch {args.batch}/worker,"
          f" {args.steps} timed steps")
    print("| rows/table | variant | rows/s | × local sparse | peak MB/worker | table MB (all tables) | "
          "peak ÷ local sparse |")
    print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        results = {}
        for v in args.variants:
            try:
                results[v] = measure(v, rows, args)
            except Exception as e:  # e.g. NCCL has no sparse all-reduce: say so and go on
                print(f"| {rows:,} | {v} | failed: {str(e).strip().splitlines()[-1][:100]} | | | | |", flush=True)
        ref = results.get("local sparse")
        table_mb = args.tables * rows * args.dim * 4 / 2**20
        for v, r in results.items():
            speed = f"{r['rows_per_s'] / ref['rows_per_s']:.2f}" if ref else "-"
            mem = f"{r['peak_mb'] / ref['peak_mb']:.2f}" if ref and ref["peak_mb"] > 0 else "-"
            print(f"| {rows:,} | {v} | {r['rows_per_s']:,.0f} | {speed} | {r['peak_mb']:,.0f} | {table_mb:,.0f} | "
                  f"{mem} |", flush=True)


if __name__ == "__main__":
    main()
