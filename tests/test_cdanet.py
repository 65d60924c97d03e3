"""CDAnet and the joint baselines (Share-Bottom, MMoE, PLE, STAR) on heterogeneous schemas:
every model runs, L_orth, what the augmentation network loads, the ablation switches, the
semantics probe, and both stages end to end on a real local Ray with 2 workers."""

import pytest
import torch
from helpers import load

from raytrain_ctr import pipeline
from raytrain_ctr.config import TrainConfig, from_dict
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.layers.experts import PLE, MMoE, PartitionedNorm, StarLinear
from raytrain_ctr.methods import StageContext, get_method
from raytrain_ctr.methods.cdanet import SWITCHES, carried_over, translated_neighbours
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.probe import probe
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.local import fit_local
from raytrain_ctr.train.loop import build_stage_model, make_optimizers, train_step
from raytrain_ctr.train.state import load_filtered
from raytrain_ctr.train.sync import GradientSync

MCFG = ModelConfig(backbone="dnn", deep=(32, 16))
SMALL = {"d": 16, "experts": 2, "expert_depth": 1, "tower_depth": 2}
JOINT = ("share_bottom", "mmoe", "ple", "star")


@pytest.fixture(scope="module")
def data(tiny_data):
    ds = CTRDataset.load(tiny_data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    batches = {d: load(ds, d, "valid").select(slice(0, 256)) for d in ds.domains}
    return specs, batches


def build(specs, name, args, stage=None, upstream=None):
    m = get_method(name, {**SMALL, **args})
    st = m.stage(stage) if stage else m.stages[0]
    model, ctx = build_stage_model(m, st, specs, MCFG, upstream)
    return m, model, ctx


def test_specs_are_heterogeneous(data):
    specs, _ = data
    src, tgt = ({f.name for f in specs[d].sparse_fields} for d in ("source", "target"))
    assert "src_channel" in src - tgt and "tgt_position" in tgt - src


@pytest.mark.parametrize("name,args", [(n, {}) for n in JOINT] + [("mmoe", {"shared_embedding": True}),
                                                                  ("cdanet", {}), ("cdanet", {"mmoe": False})])
def test_every_model_runs_on_heterogeneous_specs(data, name, args):
    specs, batches = data
    m, model, ctx = build(specs, name, args)
    if not args.get("shared_embedding"):  # decoupled embedding layers H_s, H_t (CDAnet eq. 1)
        assert "src_channel" in model.inputs.fields["source"].pooled_names
        assert "src_channel" not in model.inputs.fields["target"].pooled_names
        assert "tgt_position" in model.inputs.fields["target"].pooled_names
    opts = make_optimizers(model, TrainConfig(sparse_lr=0.01))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, ctx, batches, opts, GradientSync(model))
    for b in batches.values():
        logit = ctx.stage.hooks.logits(model, b, ctx)
        assert logit.shape == (len(b),) and torch.isfinite(logit).all()
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # one step on mixed batches moves both domains' field-specific tables
    tables = {k for k in moved if "src_channel" in k or "tgt_position" in k}
    assert len(tables) == 2, tables


def test_domain_layers_route_by_domain():
    torch.manual_seed(0)
    h = torch.randn(64, 8)
    mmoe = MMoE(8, 8, experts=3, depth=1, domains=["source", "target"])
    g = mmoe.gate(h, "source")
    assert g.shape == (64, 3) and torch.allclose(g.sum(-1), torch.ones(64))
    f = torch.stack([e(h) for e in mmoe.experts], 1)
    assert torch.allclose(mmoe(h, "source"), (g.unsqueeze(-1) * f).sum(1), atol=1e-6)  # eq. 4
    assert not torch.allclose(mmoe(h, "source"), mmoe(h, "target"))
    ple = PLE(8, 8, ["source", "target"], shared=2, specific=1, depth=1, levels=2)
    out = ple(h)
    assert set(out) == {"source", "target"} and not torch.allclose(out["source"], out["target"])
    star = StarLinear(8, 4, ["source", "target"])
    assert torch.allclose(star(h, "source"), star.shared(h))  # domain factors start at 1 and 0
    with torch.no_grad():
        star.weight["target"].mul_(2.0)
    assert torch.allclose(star(h, "target") - star.shared.bias, 2 * (star.shared(h) - star.shared.bias), atol=1e-5)
    pn = PartitionedNorm(8, ["source", "target"])
    x = torch.randn(64, 8) * 3 + 5
    pn(x, "source")
    assert not torch.allclose(pn.running_mean_source, torch.zeros(8)) and torch.equal(pn.running_mean_target,
                                                                                      torch.zeros(8))
    y = pn(x, "target")
    assert torch.allclose(y.mean(0), torch.zeros(8), atol=1e-5)  # normalised with the batch's own statistics


def test_orth_loss_is_zero_for_orthogonal_translators_and_positive_otherwise(data):
    specs, batches = data
    _, model, _ = build(specs, "cdanet", {})
    z = model.latent(batches["target"])
    assert z.shape == (256, 16) and z.abs().sum() > 0
    assert model.orth(z, "target").max() < 1e-8  # orthogonal initialisation
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(16, 16))
        model.translators["target"].weight.copy_(q)
    assert model.orth(z, "target").max() < 1e-8
    with torch.no_grad():
        model.translators["target"].weight.copy_(torch.randn(16, 16))
    w = model.translators["target"].weight
    explicit = ((z @ w.T @ w - z) ** 2).sum(-1)  # ‖W^T (W z) − z‖² (eq. 7)
    assert torch.allclose(model.orth(z, "target"), explicit) and explicit.min() > 0


def test_augmentation_loads_exactly_the_named_parts_and_reinitialises_the_tower(data, tmp_path):
    specs, batches = data
    m, trans, ctx = build(specs, "cdanet", {})
    opts = make_optimizers(trans, TrainConfig(sparse_lr=0.05, lr=0.01))
    for _ in range(3):
        train_step(trans, ctx, batches, opts, GradientSync(trans))
    upstream = trans.state_dict()
    torch.save(upstream, tmp_path / "model.pt")

    torch.manual_seed(7)
    _, fresh, _ = build(specs, "cdanet", {}, stage="augmentation")  # nothing loaded
    torch.manual_seed(7)
    m, aug, _ = build(specs, "cdanet", {}, stage="augmentation", upstream=str(tmp_path / "model.pt"))
    state = aug.state_dict()
    tower = {k for k in state if k.startswith("augmented.")}
    assert tower and not any(k.startswith("towers.") for k in state)
    assert not any(".source" in k for k in state)  # only the served domain's parts
    for k, v in state.items():
        if k in tower:  # newly initialised, on z_t ⊕ W_t z_t (eq. 10): input 2d
            assert torch.equal(v, fresh.state_dict()[k])
        else:
            assert torch.equal(v, upstream[k]), k
            assert not torch.equal(v, fresh.state_dict()[k]), k
    assert aug.augmented[0].in_features == 2 * SMALL["d"]
    loaded = load_filtered(aug, upstream, carried_over("target"))
    assert set(loaded) == set(state) - tower
    assert m.stage("augmentation").load_include == carried_over("target")


def test_each_ablation_switch_changes_exactly_its_part(data):
    specs, batches = data
    m0 = get_method("cdanet", SMALL)

    def model(args, stage="translation"):
        torch.manual_seed(0)
        return build(specs, "cdanet", args, stage=stage)

    _, base, _ = model({})
    keys = {k: v.shape for k, v in base.state_dict().items()}
    _, wo_mmoe, _ = model({"mmoe": False})
    other = {k: v.shape for k, v in wo_mmoe.state_dict().items()}
    changed = {k for k in keys.keys() | other.keys() if keys.get(k) != other.get(k)}
    assert changed and all(k.startswith("extractor.") for k in changed)
    assert type(wo_mmoe.extractor).__name__ == "Bottom" and type(base.extractor).__name__ == "MMoE"

    hooks = m0.stage("translation").hooks
    terms = hooks.terms(base, batches)
    assert all(float(t.detach()) > 0 for t in terms.values())
    total = hooks.loss(base, batches, None)
    for switch, term, weight in (("orth", "orth", SMALL.get("beta", 0.1)), ("cross", "cross", 0.01)):
        m = get_method("cdanet", {**SMALL, switch: False})
        switched = m.stage("translation").hooks
        assert torch.equal(switched.terms(base, batches)[term], terms[term])  # the term itself is unchanged ...
        dropped = total - switched.loss(base, batches, None)  # ... only its weight is 0
        assert torch.allclose(dropped, weight * terms[term], rtol=1e-5)
        assert [s.name for s in m.stages] == [s.name for s in m0.stages]

    t, a = m0.stages
    assert (t.name, t.train_domains, a.name, a.train_domains, a.init_from) == (
        "translation", ("source", "target"), "augmentation", ("target",), "translation")
    wo_translation = get_method("cdanet", {**SMALL, "translation": False}).stages
    assert [(s.name, s.init_from, s.load_include) for s in wo_translation] == [("augmentation", None, ())]
    wo_augmentation = get_method("cdanet", {**SMALL, "augmentation": False}).stages
    assert wo_augmentation == [t]
    with pytest.raises(SpecError, match="both switched off"):
        get_method("cdanet", {"translation": False, "augmentation": False})
    assert set(SWITCHES) <= set(m0.args)
    source_side = get_method("cdanet", {**SMALL, "augment": "source"}).stages  # §4.3.2
    assert (source_side[0].eval_domain, source_side[1].train_domains) == ("source", ("source",))


def test_bad_arguments_are_named(data):
    specs, _ = data
    with pytest.raises(SpecError, match="augment: 'movie'"):
        get_method("cdanet", {"augment": "movie"})
    with pytest.raises(SpecError, match="tower_depth"):
        build(specs, "mmoe", {"tower_depth": 0})
    with pytest.raises(SpecError, match="one number"):
        build(specs, "star", {"tower_depth": {"source": 3, "target": 2}})
    _, m, _ = build(specs, "mmoe", {"tower_depth": {"source": 3, "target": 1}})  # R_s, R_t may differ
    assert len(m.network.towers["source"]) == 5 and len(m.network.towers["target"]) == 1
    with pytest.raises(SpecError, match="unknown key 'alpah'"):
        get_method("cdanet", {"alpah": 0.1})


def test_translation_learns_and_the_probe_finds_neighbours(data, tiny_data):
    """A short translation run beats chance on the target; the §5.3 probe ranks pool rows by the
    distance of their z to W_t z_t."""
    specs, _ = data
    ds = CTRDataset.load(tiny_data)
    m = get_method("cdanet", SMALL)
    st = m.stage("translation")
    res = fit_local(m, st, specs, MCFG, TrainConfig(epochs=2, batch_size=1024, sparse_lr=0.01),
                    {d: load(ds, d, "train") for d in ds.domains}, load(ds, "target", "valid"))
    assert res.best_valid_auc > 0.6
    rows, pool = load(ds, "target", "test").select(slice(0, 50)), load(ds, "source", "test").select(slice(0, 500))
    idx, dist = translated_neighbours(res.model, rows, pool, k=4)
    assert idx.shape == (50, 4) and (dist[:, 1:] >= dist[:, :-1]).all()
    z = res.model.translate(res.model.latent(rows), "target")
    keys = res.model.latent(pool)
    assert torch.equal(idx, torch.cdist(z, keys).argsort(1)[:, :4])
    idx, _ = translated_neighbours(res.model, rows, pool, k=4, metric="centered")
    zc, kc = z - z.mean(0), keys - keys.mean(0)
    cos = (zc @ kc.T) / zc.norm(dim=1, keepdim=True) / kc.norm(dim=1)
    assert torch.equal(idx, cos.argsort(1, descending=True)[:, :4])
    idx, _ = translated_neighbours(res.model, rows, pool, k=4, translate=False)
    assert torch.equal(idx, torch.cdist(res.model.latent(rows), keys).argsort(1)[:, :4])
    with pytest.raises(SpecError, match="metric"):
        translated_neighbours(res.model, rows, pool, metric="manhattan")


def test_cdanet_end_to_end_on_ray(tiny_data, ray_local, tmp_path):
    """Both stages through the pipeline with 2 workers, each domain's tables sharded on TorchRec (one
    collection per domain); the artifact reproduces its test AUC in one process on the local
    backend; then the probe reads the translation network's artifact."""
    cfg = from_dict({"data": tiny_data, "method": "cdanet", "method_args": SMALL, "storage": str(tmp_path / "runs"),
                     "model": {"backbone": "dnn", "deep": [32], "embedding_backend": "torchrec"},
                     "train": {"epochs": 1, "batch_size": 1024, "sparse_lr": 0.01, "workers": 2,
                               "sparse_optimizer": "adagrad"}})
    res = pipeline.run(cfg)
    assert res["translation"]["test_auc"] > 0.6 and res["augmentation"]["test_auc"] > 0.6
    # the augmentation model saved by rank 0 reproduces its test AUC in one process
    m = get_method("cdanet", SMALL)
    st = m.stage("augmentation")
    specs = {d: CTRDataset.load(tiny_data).domain(d).spec for d in ("source", "target")}
    model = st.hooks.build(StageContext(st, specs, MCFG, m.args))
    model.load_state_dict(torch.load(f"{res['augmentation']['artifact']}/model.pt"))
    model.eval()
    from raytrain_ctr.train.metrics import summarize

    batch = load(CTRDataset.load(tiny_data), "target", "test")
    with torch.no_grad():
        again = summarize(batch.label.numpy(), torch.sigmoid(model(batch)).numpy(), batch.user.numpy())
    assert again["auc"] == pytest.approx(res["augmentation"]["test_auc"], abs=1e-5)

    table, summary = probe(cfg, k=3, rows=10, pool=2000, columns=["user_id", "item_id"])
    assert len(table) == 30 and list(table["rank"][:3]) == [1, 2, 3]
    assert {"target.item_id", "source.item_id", "distance", "pool_row"} <= set(table.columns)
    assert set(summary["column"]) == {"user_id", "item_id"} and summary["chance"].between(0, 1).all()
    with pytest.raises(SpecError, match="not in the Parquet"):
        probe(cfg, columns=["no_such_column"])
    with pytest.raises(pipeline.PipelineError, match="no translation network"):
        probe(cfg.with_overrides({"method_args.alpha": 0.5}))
