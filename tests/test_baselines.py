"""L2-SP's penalty (in process, with the loop's own step code)."""

import pytest
import torch
from helpers import load

from raytrain_ctr.config import TrainConfig
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.methods import get_method
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.local import fit_local
from raytrain_ctr.train.loop import build_stage_model


def distance(a: dict, b: dict, prefix: str) -> float:
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a if k.startswith(prefix))


def test_l2sp_stays_closer_to_the_pretrained_weights(tiny_data, tmp_path):
    ds = CTRDataset.load(tiny_data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    mcfg, tc = ModelConfig(backbone="dcn", deep=(32,)), TrainConfig(epochs=2, batch_size=512, sparse_lr=0.01)
    target, valid = load(ds, "target", "train"), load(ds, "target", "valid")
    src = get_method("source_only")
    pre = fit_local(src, src.stages[0], specs, mcfg, tc, {"source": load(ds, "source", "train")}, valid)
    path = tmp_path / "pre.pt"
    torch.save(pre.model.state_dict(), path)
    w0 = pre.model.state_dict()
    moved = {}
    for name, args in (("finetune", {}), ("l2sp", {"alpha": 1.0})):
        m = get_method(name, args)
        res = fit_local(m, m.stage("finetune"), specs, mcfg, tc, {"target": target}, valid, upstream=str(path))
        moved[name] = {p: distance(res.model.state_dict(), w0, p) for p in ("backbone.", "embedding.")}
        assert res.best_valid_auc > 0.6
    assert moved["l2sp"]["backbone."] < 0.5 * moved["finetune"]["backbone."]
    assert moved["l2sp"]["embedding."] < moved["finetune"]["embedding."]


def test_l2sp_penalty_touches_only_the_batch_rows(tiny_data, tmp_path):
    ds = CTRDataset.load(tiny_data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    m = get_method("l2sp", {"alpha": 1.0})
    model, ctx = build_stage_model(m, m.stage("pretrain"), specs, ModelConfig(deep=(8,)), None)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    model, ctx = build_stage_model(m, m.stage("finetune"), specs, ModelConfig(deep=(8,)), str(path))
    with torch.no_grad():
        for e in model.embedding.tables.values():
            e.weight.add_(0.1)  # move away from the reference so the penalty has a gradient
    batch = load(ds, "target", "valid").select(slice(0, 16))
    ctx.stage.hooks.penalty(model, {"target": batch}, ctx).backward()
    grad = model.embedding.tables["item"].weight.grad
    assert grad.is_sparse
    touched = set(grad.coalesce().indices()[0].tolist())
    expected = set(torch.cat([batch.sparse["item_id"], batch.sparse["hist_items"].reshape(-1)]).tolist()) - {0}
    assert touched == expected


def test_progressive_nn_starts_as_the_pretrained_model_and_learns_laterals(tiny_data, tmp_path):
    """ProgressiveNN: with ``U = 0`` the fine-tuned column is the pre-trained model; training moves
    the fine-tuned column and the lateral connections, never the frozen column, and the trained
    model reads the frozen column through them."""
    ds = CTRDataset.load(tiny_data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    mcfg, tc = ModelConfig(backbone="dcn", deep=(32, 16)), TrainConfig(epochs=2, batch_size=512, sparse_lr=0.01)
    target, valid = load(ds, "target", "train"), load(ds, "target", "valid")
    src = get_method("source_only")
    pre = fit_local(src, src.stages[0], specs, mcfg, tc, {"source": load(ds, "source", "train")}, valid)
    path = tmp_path / "pre.pt"
    torch.save(pre.model.state_dict(), path)
    m = get_method("progressive_nn")
    model, _ = build_stage_model(m, m.stage("progressive"), specs, mcfg, str(path))
    model.eval()
    pre.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(valid), pre.model(valid), atol=1e-5)
    res = fit_local(m, m.stage("progressive"), specs, mcfg, tc, {"target": target}, valid, upstream=str(path))
    trained, w0 = res.model.state_dict(), pre.model.state_dict()
    assert all(torch.equal(trained[f"pre.{k}"], v) for k, v in w0.items())  # the frozen column
    assert distance({k[5:]: v for k, v in trained.items() if k.startswith("fine.")}, w0, "backbone.") > 0
    assert all(float(lat.u.weight.detach().abs().sum()) > 0 for lat in [*res.model.lateral, res.model.lateral_head])
    assert res.best_valid_auc > 0.6
    res.model.eval()
    with torch.no_grad():
        out = res.model(valid)
        for lat in [*res.model.lateral, res.model.lateral_head]:
            lat.u.weight.zero_()
        assert not torch.allclose(res.model(valid), out, atol=1e-4)  # the laterals carry the frozen column
    with pytest.raises(SpecError, match="progressive_nn"):
        build_stage_model(m, m.stage("progressive"), specs, ModelConfig(backbone="deepfm", embedding_dim=8), None)


def test_lr_is_logistic_regression_and_learns(tiny_data):
    """``lr``: a weight per id (tables at dim 1, pooled sequences a mean of weights) and per dense
    value into one linear layer, whatever ``model.deep`` / ``cross_layers`` / ``embedding_dim`` say."""
    ds = CTRDataset.load(tiny_data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    m = get_method("lr")
    cfg = ModelConfig(backbone="dcn", deep=(64, 32), cross_layers=2, embedding_dim=16)
    model, _ = build_stage_model(m, m.stages[0], specs, cfg, None)
    tables = model.embedding.tables
    assert all(t.weight.shape[1] == 1 for t in tables.values())
    n_inputs = len(model.pooled_names) + len(model.dense_fields)
    assert model.backbone.head.in_features == n_inputs
    assert not len(model.backbone.deep) and not len(model.backbone.cross)
    assert sum(p.numel() for p in model.parameters()) == sum(t.weight.numel() for t in tables.values()) + n_inputs + 1
    tc = TrainConfig(epochs=2, batch_size=512, lr=0.01, sparse_lr=0.05)
    valid = load(ds, "target", "valid")
    target = {"target": load(ds, "target", "train")}
    res = fit_local(m, m.stages[0], specs, cfg, tc, target, valid)
    dcn = get_method("target_only")
    dcn_auc = fit_local(dcn, dcn.stages[0], specs, cfg, tc, target, valid).best_valid_auc
    # ids' and features' main effects only: well above chance, below the DCN that also learns the planted
    # user-item preference (an interaction)
    assert 0.55 < res.best_valid_auc < dcn_auc, (res.best_valid_auc, dcn_auc)
