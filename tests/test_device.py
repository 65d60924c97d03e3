"""Device handling (``train/device.py``): on the CPU, what every path does without a GPU and how ``use_gpu`` fails
where there is none; the tests marked ``gpu`` run where CUDA is available (``pytest -m gpu`` on a GPU machine)."""

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from raytrain_ctr.config import TrainConfig
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.encode import FeatureEncoder
from raytrain_ctr.methods import get_method
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.device import CPU, collective_device, place, stage_device, to_device
from raytrain_ctr.train.local import fit_local

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


def batches(data: str, rows: int = 4000) -> tuple[dict, object, dict]:
    ds = CTRDataset.load(data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    enc = FeatureEncoder(specs["target"])
    read = lambda split: enc.encode(pq.read_table(ds.files("target", split)[0]).slice(0, rows))  # noqa: E731
    return {"target": read("train")}, read("valid"), specs


def test_cpu_unless_use_gpu_and_collectives_on_the_cpu_under_gloo():
    assert stage_device(False, in_ray_worker=False) == CPU and stage_device(False, in_ray_worker=True) == CPU
    assert collective_device() == CPU  # no process group; gloo's is tested by every 2-worker test


@pytest.mark.skipif(CUDA, reason="a machine without CUDA")
def test_use_gpu_without_a_gpu_is_named_before_training(tiny_data):
    with pytest.raises(SpecError, match="train.use_gpu: true, but this process sees no CUDA device"):
        stage_device(True, in_ray_worker=False)
    train, valid, specs = batches(tiny_data, 100)
    method = get_method("target_only")
    with pytest.raises(SpecError, match="train.use_gpu"):
        fit_local(method, method.stages[0], specs, ModelConfig(deep=(8,)), TrainConfig(epochs=1, use_gpu=True),
                  train, valid)


def test_place_moves_what_is_materialised_and_leaves_tables_to_be_sharded_on_meta():
    model = nn.ModuleDict({"dense": nn.Linear(3, 2), "table": nn.Embedding(10, 4, device="meta")})
    model.dense.register_buffer("running", torch.zeros(2))
    assert place(model, CPU) is model
    assert model.table.weight.is_meta and not model.dense.weight.is_meta and model.dense.running.device == CPU


def test_batches_stay_where_they_are_on_the_cpu(tiny_data):
    train, _, _ = batches(tiny_data, 10)
    assert to_device(train["target"], CPU) is train["target"]


@gpu
@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_on_the_gpu_batches_are_pinned_copies_and_training_matches_the_cpu(tiny_data):
    train, valid, specs = batches(tiny_data)
    moved = to_device(train["target"], torch.device("cuda"))
    assert moved.label.is_cuda and all(t.is_cuda for t in moved.sparse.values()) and moved.dense.is_cuda
    method, cfg = get_method("target_only"), ModelConfig(backbone="dcn", deep=(32,))
    runs = [fit_local(method, method.stages[0], specs, cfg, TrainConfig(epochs=2, batch_size=256, sparse_lr=0.01,
                                                                         use_gpu=g), train, valid)
            for g in (False, True)]
    assert next(runs[1].model.parameters()).is_cuda
    assert abs(runs[0].best_valid_auc - runs[1].best_valid_auc) < 0.01, [r.history for r in runs]
