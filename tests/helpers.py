"""Helpers shared by the tests: whole splits as one batch, a saved model's metrics in one process,
worker processes on a gloo group."""

import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.multiprocessing as mp

from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.encode import Batch, FeatureEncoder
from raytrain_ctr.models.backbones import ModelConfig, build_model
from raytrain_ctr.train.metrics import summarize


def load(ds: CTRDataset, domain: str, split: str) -> Batch:
    """A whole split of a domain as one batch."""
    return FeatureEncoder(ds.domain(domain).spec).encode(
        pa.concat_tables([pq.read_table(f) for f in ds.files(domain, split)]))


def local_test_metrics(data: str, model_cfg: ModelConfig, artifact: str) -> tuple[dict, int]:
    """The target-test metrics of a stage's saved ``model.pt``, recomputed in this process."""
    ds = CTRDataset.load(data)
    model = build_model([ds.domain(d).spec for d in ds.domains], model_cfg)
    model.load_state_dict(torch.load(Path(artifact, "model.pt")))
    model.eval()
    batch = load(ds, "target", "test")
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
