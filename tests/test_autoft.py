"""AutoFT and SpotTune: hard routing with policy gradients, frozen copy, deterministic inference,
ablation switches, the policy report; and the stage end to end on a real local Ray."""

import json
from pathlib import Path

import pytest
import torch
from helpers import load

from raytrain_ctr import pipeline
from raytrain_ctr.config import TrainConfig, from_dict
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.methods import get_method
from raytrain_ctr.methods.autoft import POLICIES, PolicyNet, choose, policy_figure, policy_report
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.local import fit_local
from raytrain_ctr.train.loop import build_stage_model, evaluate, make_optimizers, train_step
from raytrain_ctr.train.sync import GradientSync

MCFG = ModelConfig(backbone="dcn", deep=(32, 16), cross_layers=2)


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    """Specs, target batches and a pre-trained (Source-only) model on disk."""
    ds = CTRDataset.load(tiny_data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    valid = load(ds, "target", "valid")
    src = get_method("source_only")
    tc = TrainConfig(epochs=1, batch_size=1024, sparse_lr=0.01)
    pre = fit_local(src, src.stages[0], specs, MCFG, tc, {"source": load(ds, "source", "train")}, valid)
    path = tmp_path_factory.mktemp("autoft") / "pre.pt"
    torch.save(pre.model.state_dict(), path)
    return specs, load(ds, "target", "train"), valid, str(path)


def stage_model(setup, **args):
    specs, _, _, path = setup
    m = get_method("autoft", args)
    model, ctx = build_stage_model(m, m.stage("autoft"), specs, MCFG, path)
    return m, model, ctx


def test_routing_is_hard_and_gradients_reach_every_policy(setup):
    m, model, ctx = stage_model(setup)
    batch = setup[2].select(slice(0, 64))
    # both copies start equal, so a decision between them has no gradient until the fine copy moves
    opts = make_optimizers(model, TrainConfig(sparse_lr=0.01))
    train_step(model, ctx, {"target": setup[1].select(slice(0, 512))}, opts, GradientSync(model))
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    decisions = {}
    for name, policy in model.policy.items():
        policy.register_forward_hook(lambda mod, inp, out, name=name: decisions.__setitem__(name, out[0]))
    model.train()
    logit = model(batch)
    torch.nn.functional.binary_cross_entropy_with_logits(logit, batch.label).backward()
    assert set(decisions) == set(POLICIES)
    for name, p in decisions.items():
        assert p.shape == (64, model.policy[name].decisions)
        assert set(p.detach().unique().tolist()) <= {0.0, 1.0}  # eq. 13: hard in the forward pass
        assert 0 < p.detach().mean() < 1  # both copies are used at initialisation
    for name, policy in model.policy.items():  # eq. 14: the relaxation's gradient reaches the policy
        grads = [q.grad for q in policy.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, name
    assert all(p.grad is None for p in model.pre.parameters())  # the frozen copy gets none


def test_frozen_copy_bit_identical_and_inference_deterministic(setup):
    specs, target, valid, path = setup
    m = get_method("autoft", {"tau": 0.5, "anneal_rate": 1e-3})
    res = fit_local(m, m.stage("autoft"), specs, MCFG, TrainConfig(epochs=2, batch_size=512, sparse_lr=0.01),
                    {"target": target}, valid, upstream=path)
    upstream = torch.load(path)
    state = res.model.state_dict()
    for key, value in upstream.items():
        assert torch.equal(state[f"pre.{key}"], value), key  # V^S, cross^S, deep^S never move
    assert any(not torch.equal(state[f"fine.{k}"], v) for k, v in upstream.items())  # the fine copy does
    assert res.model.temperature < 0.5 and int(res.model.step) > 0  # annealed per step
    res.model.eval()
    with torch.no_grad():
        first, second = res.model(valid), res.model(valid)
    assert torch.equal(first, second)
    assert res.best_valid_auc > 0.6


@pytest.mark.parametrize("policies", [("embedding",), ("cross",), ("deep",), ("cross", "deep")])
def test_each_ablation_switch_removes_exactly_its_policy(setup, policies):
    _, full, _ = stage_model(setup)
    _, model, _ = stage_model(setup, policies=policies)
    assert set(model.policy) == set(policies)
    missing = set(full.state_dict()) - set(model.state_dict())
    assert missing and all(k.split(".")[1] not in policies and k.startswith("policy.") for k in missing)
    batch = setup[2].select(slice(0, 32))
    model.eval()
    with torch.no_grad():
        model(batch)
    assert set(model.routes) == set(policies)  # no decision is taken where the policy is removed


def test_spottune_is_the_layer_wise_policies_only(setup):
    specs, _, _, path = setup
    m = get_method("spottune")
    model, _ = build_stage_model(m, m.stage("spottune"), specs, MCFG, path)
    assert set(model.policy) == {"cross", "deep"}
    bad = get_method("autoft", {"policies": ["embedding", "heads"]})
    with pytest.raises(SpecError, match="method_args.policies"):
        build_stage_model(bad, bad.stage("autoft"), specs, MCFG, path)
    with pytest.raises(SpecError, match="'cross' has nothing to route with backbone 'dnn'"):
        build_stage_model(m, m.stage("spottune"), specs, ModelConfig(backbone="dnn", deep=(8,)), path)


def test_policy_report_and_figure(setup):
    m, model, ctx = stage_model(setup)
    valid = setup[2]
    evaluate(model, ctx, [valid.select(slice(0, 500)), valid.select(slice(500, 900))], with_users=False)
    report = policy_report(model)
    assert report["instances"] == 900
    assert set(report["pretrained_share"]) == set(POLICIES)
    assert list(report["pretrained_share"]["cross"]) == ["cross_0", "cross_1"]
    assert all(0.0 <= s <= 1.0 for shares in report["pretrained_share"].values() for s in shares.values())
    png = policy_figure(report, "autoft")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_autoft_stage_on_ray(tiny_data, ray_local, tmp_path):
    """Both stages on 2 workers with sharded tables: the policy report counts every test row; the
    frozen copy, sharded too, leaves the stage exactly as the pre-trained model entered it. (The
    local backend's 2-worker path is the pipeline tests'; its routing is checked in process above.)"""
    cfg = from_dict({"data": tiny_data, "method": "autoft", "storage": str(tmp_path),
                     "method_args": {"pretrain": "all"},
                     "model": {"backbone": "dcn", "deep": [32, 16], "cross_layers": 2, "embedding_backend": "torchrec"},
                     "train": {"epochs": 1, "batch_size": 1024, "workers": 2, "sparse_optimizer": "adagrad",
                               "sparse_lr": 0.05}})
    res = pipeline.run(cfg)
    art = Path(res["autoft"]["artifact"])
    report = json.loads((art / "policy.json").read_text())
    assert report["instances"] == res["autoft"]["test_rows"]  # every test row, over both workers
    assert set(report["pretrained_share"]) == set(POLICIES)
    assert (art / "policy.png").read_bytes()[:4] == b"\x89PNG"
    assert res["autoft"]["test_auc"] > 0.6
    upstream = torch.load(Path(res["pretrain"]["artifact"], "model.pt"))
    state = torch.load(art / "model.pt")
    assert all(torch.equal(state[f"pre.{k}"], v) for k, v in upstream.items())
    assert not torch.equal(state["fine.embedding.tables.item.weight"], upstream["embedding.tables.item.weight"])


@pytest.mark.parametrize("backbone", ["dnn", "deepfm", "dcnv2"])
def test_autoft_routes_other_backbones(setup, tmp_path, backbone):
    """AutoFT §4.5: the same routing over DNN, DeepFM (FM term over the routed fields) and DCN-V2."""
    specs, _, valid, _ = setup
    mcfg = ModelConfig(backbone=backbone, deep=(16, 8), cross_layers=2, embedding_dim=8)
    policies = ["embedding", "deep"] + (["cross"] if backbone == "dcnv2" else [])
    m = get_method("autoft", {"policies": policies})
    pre, _ = build_stage_model(m, m.stage("pretrain"), specs, mcfg, None)
    torch.save(pre.state_dict(), tmp_path / "pre.pt")
    model, _ = build_stage_model(m, m.stage("autoft"), specs, mcfg, str(tmp_path / "pre.pt"))
    model.eval()
    batch = valid.select(slice(0, 16))
    with torch.no_grad():
        routed, plain = model(batch), pre(batch)
    assert set(model.routes) == set(policies)
    torch.testing.assert_close(routed, plain)  # both copies equal the pre-trained model before training


def test_a_tied_decision_goes_to_the_fine_tuned_copy_at_inference():
    """Eq. 9's outer ReLU clips both logits to 0 for some inputs: such a decision is a 50/50 draw in
    training (no gradient) and must not send every tied instance to the frozen copy at inference."""
    logits = torch.tensor([[[0.0, 0.0], [2.0, 1.0], [0.0, 3.0]]])  # tied, pre-trained wins, fine-tuned wins
    assert choose(logits, 1.0, training=False).tolist() == [[0.0, 1.0, 0.0]]
    assert choose(logits, 1.0, training=False, tie_to_pretrained=True).tolist() == [[1.0, 1.0, 0.0]]  # argmax's tie
    dead = torch.nn.Linear(8, 2)  # a policy whose outer ReLU clips every logit: every decision tied
    torch.nn.init.constant_(dead.weight, 0.0), torch.nn.init.constant_(dead.bias, -1.0)
    for tie, share in (("fine_tuned", 0.0), ("pretrained", 1.0)):
        net = PolicyNet(4, 8, 1, output_relu=True, tie=tie).eval()
        net.net[2] = dead
        p, tied = net(torch.randn(16, 4), 1.0)
        assert tied.all() and float(p.mean()) == share
    with pytest.raises(SpecError, match="method_args.inference_tie: 'frozen' must be one of"):
        PolicyNet(4, 8, 1, tie="frozen")
    torch.manual_seed(0)
    drawn = torch.stack([choose(logits, 1.0, training=True) for _ in range(2000)]).mean(0)
    assert abs(float(drawn[0, 0]) - 0.5) < 0.05  # a tie is a coin in training


def test_epoch_metrics_follow_the_policies_over_training(setup):
    """Every epoch logs τ and, per decision, the validation shares routed to the pre-trained copy
    and tied: the policies over training (issue 15's diagnosis)."""
    specs, target, valid, path = setup
    m = get_method("autoft", {"tau": 2.0, "anneal_rate": 1e-2})
    res = fit_local(m, m.stage("autoft"), specs, MCFG, TrainConfig(epochs=2, batch_size=512, sparse_lr=0.01),
                    {"target": target}, valid, upstream=path)
    first, last = res.history
    assert 0.1 <= last["tau"] < first["tau"] < 2.0  # annealed per step, floored at tau_min
    names = res.model.fine.pooled_names
    for kind in ("pretrained_share", "tied_share"):
        keys = {k for k in last if k.startswith(f"valid_{kind}/")}
        assert keys == ({f"valid_{kind}/embedding/{n}" for n in names}
                        | {f"valid_{kind}/cross/cross_{i}" for i in range(2)}
                        | {f"valid_{kind}/deep/deep_{i}" for i in range(2)})
        assert all(0.0 <= last[k] <= 1.0 for k in keys)
    res.model.eval()  # the logged shares are the argmax decisions on the validation split
    with torch.no_grad():
        res.model(valid)
    report = policy_report(res.model)
    for name, shares in report["pretrained_share"].items():
        for d, share in shares.items():
            assert last[f"valid_pretrained_share/{name}/{d}"] == pytest.approx(share)


def test_policy_without_the_outer_relu(setup):
    _, model, _ = stage_model(setup, policy_output_relu=False)
    assert all(isinstance(p.net[-1], torch.nn.Identity) for p in model.policy.values())
    _, eq9, _ = stage_model(setup)
    assert all(isinstance(p.net[-1], torch.nn.ReLU) for p in eq9.policy.values())  # eq. 9 as written
    model.eval()
    with torch.no_grad():
        model(setup[2].select(slice(0, 32)))
    assert all(set(torch.unique(r).tolist()) <= set(range(33)) for r in model.routes.values())
