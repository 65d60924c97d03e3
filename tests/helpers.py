"""Helpers shared by the tests: whole splits as one batch, a saved model's metrics in one process,
worker processes on a gloo group."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.multiprocessing as mp
import yaml

from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.encode import Batch, FeatureEncoder
from raytrain_ctr.models.backbones import ModelConfig, build_model
from raytrain_ctr.train.metrics import summarize


def load(ds: CTRDataset, domain: str, split: str) -> Batch:
    """A whole split of a domain as one batch."""
    return FeatureEncoder(ds.domain(domain).spec).encode(
        pa.concat_tables([pq.read_table(f) for f in ds.files(domain, split)]))


def rename_domains(root: str, names: dict[str, str]) -> dict[str, str]:
    """Rename a dataset's domains on disk (directories, spec files and their ``domain``, dataset.yaml) as a user's
    data would name them; returns the config ``roles`` that map them back ({role: new name})."""
    base = Path(root)
    meta = yaml.safe_load((base / "dataset.yaml").read_text())
    domains = {}
    for old, entry in meta["domains"].items():
        new = names.get(old, old)
        spec = yaml.safe_load((base / entry["spec"]).read_text())
        (base / entry["spec"]).unlink()
        (base / f"{new}.spec.yaml").write_text(yaml.safe_dump({**spec, "domain": new}, sort_keys=False))
        (base / entry["path"]).rename(base / new)
        domains[new] = {**entry, "spec": f"{new}.spec.yaml", "path": new}
    (base / "dataset.yaml").write_text(yaml.safe_dump({**meta, "domains": domains}, sort_keys=False))
    return {old: new for old, new in names.items()}


def local_test_metrics(data: str, model_cfg: ModelConfig, artifact: str, domain: str = "target",
                       split: str = "test") -> tuple[dict, int]:
    """The target-test metrics (or ``domain``'s ``split``'s) of a stage's saved ``model.pt``, recomputed in this
    process."""
    ds = CTRDataset.load(data)
    model = build_model([ds.domain(d).spec for d in ds.domains], model_cfg)
    model.load_state_dict(torch.load(Path(artifact, "model.pt")))
    model.eval()
    batch = load(ds, domain, split)
    with torch.no_grad():
        probs = torch.sigmoid(model(batch)).numpy()
    return summarize(batch.label.numpy(), probs, batch.user.numpy()), len(batch)


def spawn(worker, *args, nprocs: int = 2) -> None:
    """Run ``worker(rank, nprocs, port, *args)`` in ``nprocs`` processes, ``port`` a free loopback
    port for their gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(nprocs, port, *args), nprocs=nprocs, join=True)


CLI = [sys.executable, "-m", "raytrain_ctr.cli"]
MODEL = {"backbone": "dcn", "deep": [32, 16], "cross_layers": 2}


def write_config(path: Path, data: str, storage: str, method: str, **train) -> Path:
    train = {"epochs": 1, "batch_size": 1024, "workers": 1, "sparse_lr": 0.05, **train}
    path.write_text(yaml.safe_dump({"base": {"data": data, "storage": storage, "method": method, "model": MODEL,
                                             "train": train}}))
    return path


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    """Wait for a CLI process; then kill what is left of its process group (the local Ray it started)."""
    out, err = proc.communicate(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err
