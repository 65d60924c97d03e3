"""Backbones: the equations hold, and each learns the planted signal (in-process, same step code)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytrain_ctr.config import TrainConfig
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.encode import FeatureEncoder
from raytrain_ctr.embedding.collection import EmbeddingCollection
from raytrain_ctr.layers.interaction import CrossLayer, fm_interaction
from raytrain_ctr.methods import get_method
from raytrain_ctr.models.backbones import ModelConfig, build_model
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.local import fit_local
from raytrain_ctr.train.loop import build_stage_model, make_optimizers, train_step
from raytrain_ctr.train.sync import GradientSync


def test_cross_layer_is_autoft_eq5():
    torch.manual_seed(0)
    layer = CrossLayer(6)
    x0, xl = torch.randn(4, 6), torch.randn(4, 6)
    explicit = torch.stack([torch.outer(x0[i], xl[i]) @ layer.w for i in range(4)]) + layer.b + xl
    assert torch.allclose(layer(x0, xl), explicit, atol=1e-6)


def test_fm_is_sum_of_pairwise_dot_products():
    v = torch.randn(3, 5, 4)
    pairs = sum((v[:, i] * v[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
    assert torch.allclose(fm_interaction(v), pairs, atol=1e-5)


def load(ds: CTRDataset, domain: str, split: str):
    t = pa.concat_tables([pq.read_table(f) for f in ds.files(domain, split)])
    return FeatureEncoder(ds.domain(domain).spec).encode(t)


@pytest.mark.parametrize("backbone", ["dnn", "deepfm", "dcn", "dcnv2"])
def test_backbone_learns_planted_signal(tiny_data, backbone):
    ds = CTRDataset.load(tiny_data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    method = get_method("target_only")
    result = fit_local(method, method.stages[0], specs, ModelConfig(backbone=backbone, deep=(64, 32)),
                       TrainConfig(epochs=4, batch_size=512, sparse_lr=0.01),
                       {"target": load(ds, "target", "train")}, load(ds, "target", "valid"))
    assert result.best_valid_auc > 0.62, result.history


def test_model_reads_fields_of_every_domain_and_zero_fills_absent_ones(tiny_data):
    ds = CTRDataset.load(tiny_data)
    specs = [ds.domain(d).spec for d in ds.domains]
    model = build_model(specs, ModelConfig(backbone="dcn", deep=(8,)))
    names = [f.name for f in model.embedding.fields]
    assert "src_channel" in names and "tgt_position" in names
    batch = load(ds, "target", "valid")
    pooled = model.embedding(batch)
    assert torch.count_nonzero(pooled["src_channel"]) == 0 and torch.count_nonzero(pooled["tgt_position"]) > 0
    assert model(batch).shape == (len(batch),)


def test_shared_table_is_one_parameter(tiny_data):
    ds = CTRDataset.load(tiny_data)
    emb = EmbeddingCollection.from_specs([ds.domain(d).spec for d in ds.domains])
    assert {f.table for f in emb.fields if f.name in ("item_id", "hist_items")} == {"item"}
    assert len([n for n, _ in emb.named_parameters() if "item" in n]) == 1


def test_deepfm_needs_one_dim_and_unknown_backbone_is_named():
    with pytest.raises(SpecError, match="unknown backbone 'dcn3'"):
        ModelConfig(backbone="dcn3")


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_padding_row_stays_zero_and_training_equals_padding_idx(tiny_data, optimizer):
    """Row 0 (OOV/padding) is read as zeros without ``padding_idx`` (its backward is 3× slower): the optimizer
    sets it back after each step, and every parameter moves exactly as with ``padding_idx=0``."""
    ds = CTRDataset.load(tiny_data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    batch = load(ds, "target", "train").select(slice(0, 768))
    batch.sparse["item_id"][::3] = 0  # OOV rows beside the sequences' padding
    method, states = get_method("target_only"), []
    for padding in (False, True):
        torch.manual_seed(0)
        model, ctx = build_stage_model(method, method.stages[0], specs, ModelConfig(backbone="dcn", deep=(16,)))
        for table in model.embedding.tables.values():
            table.padding_idx = 0 if padding else None
        opts = make_optimizers(model, TrainConfig(lr=0.01, sparse_lr=0.05, sparse_optimizer=optimizer), ctx)
        for step in range(3):
            train_step(model, ctx, {"target": batch.select(slice(step * 256, (step + 1) * 256))}, opts,
                       GradientSync(model))
        states.append(model.state_dict())
    tables = [k for k in states[0] if k.startswith("embedding.tables.")]
    assert tables and all(torch.count_nonzero(states[0][k][0]) == 0 for k in tables)
    assert any(torch.count_nonzero(states[0][k][1:]) for k in tables)
    for k, v in states[1].items():
        assert torch.allclose(states[0][k], v, atol=1e-6), k
