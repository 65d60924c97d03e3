"""CCTL: the k-step sync of the mixed tower into the pure one (both backends), the reward's sign, the
selector moving only by its REINFORCE step, the export of the pure tower alone, the CoNet baseline,
and the stage end to end on a real local Ray with sharded tables."""

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch
import torch.distributed as dist
from helpers import load, spawn

from raytrain_ctr import pipeline
from raytrain_ctr.config import TrainConfig, from_dict
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.encode import FeatureEncoder
from raytrain_ctr.embedding import shard_model, unsharded_state
from raytrain_ctr.methods import get_method
from raytrain_ctr.methods.cctl import BINS, Tower, bce_rows
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.serving import load as load_package
from raytrain_ctr.serving.export import export_package
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.loop import build_stage_model, make_optimizers, train_step
from raytrain_ctr.train.metrics import summarize
from raytrain_ctr.train.sync import GradientSync

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
MCFG = ModelConfig(backbone="dcn", deep=(16,), cross_layers=1)
TC = TrainConfig(lr=0.01, sparse_lr=0.05, sparse_optimizer="adagrad")


def setup(data: str, args: dict, cfg: ModelConfig = MCFG):
    ds = CTRDataset.load(data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    m = get_method("cctl", args)
    torch.manual_seed(0)
    model, ctx = build_stage_model(m, m.stages[0], specs, cfg)
    return ds, model, ctx


def rows(ds, domain: str, start: int, n: int):
    table = pq.read_table(ds.files(domain, "train")[0]).slice(start, n)
    return FeatureEncoder(ds.domain(domain).spec, ("is_noise",) if domain == "source" else ()).encode(table)


def towers_equal(state: dict) -> bool:
    mixed = {k[6:]: v for k, v in state.items() if k.startswith("mixed.")}
    pure = {k[5:]: v for k, v in state.items() if k.startswith("pure.")}
    assert mixed.keys() == pure.keys() and any(".tables." in k for k in mixed)
    return all(torch.equal(mixed[k], pure[k]) for k in mixed)


def sync_steps(data: str, backend: str, rank: int = 0, world: int = 1) -> list[bool]:
    """After each of 5 steps (k = 2): are the towers equal?"""
    ds, model, ctx = setup(data, {"k": 2, "n": 2}, ModelConfig(backbone="dnn", deep=(16,), embedding_backend=backend))
    if backend == "torchrec":
        tables = {t for _, c in model.named_modules() if hasattr(c, "table_names") for t in c.table_names}
        shard_model(model, world, {t: "row_wise" for t in tables}, 10**9, "adagrad", 0.05)
    opts, sync = make_optimizers(model, TC, ctx), GradientSync(model, exclude=ctx.group_parameter_ids())
    out = []
    for s in range(5):
        batches = {"source": rows(ds, "source", 256 * s + 128 * rank, 128),
                   "target": rows(ds, "target", 64 * s + 32 * rank, 32)}
        train_step(model, ctx, batches, opts, sync)
        state = unsharded_state(model)
        out.append(towers_equal(state) if rank == 0 else None)
    return out


def worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for backend in ("local", "torchrec"):
        torch.save(sync_steps(data, backend, rank, world), f"{out}/{backend}-rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cctl")
    spawn(worker, tiny_data, str(out))
    return out


@pytest.mark.parametrize("backend", ["local", "torchrec"])
def test_the_sync_makes_the_pure_tower_equal_to_the_mixed_one(two_workers, backend):
    # both start equal (§2.3.4), are synced at steps 2 and 4 (k = 2), apart in between
    assert torch.load(two_workers / f"{backend}-rank0.pt") == [False, True, False, True, False]


def test_the_reward_has_the_sign_of_the_source_rows_help(tiny_data):
    ds, model, ctx = setup(tiny_data, {"k": 100, "n": 100})
    hooks, target = ctx.stage.hooks, rows(ds, "target", 0, 64)
    for better, sign in (("mixed", 1), ("pure", -1)):  # the tower that predicts the target better
        with torch.no_grad():
            getattr(model, better).backbone.head.bias.fill_(0.0)
            getattr(model, "pure" if better == "mixed" else "mixed").backbone.head.bias.fill_(5.0)  # far off
        with ctx.main_loss():
            hooks.loss(model, {"target": target, "source": rows(ds, "source", 0, 64)}, ctx)
        ctx.step = 1  # neither a sync (k) nor a selector (n) step
        hooks.after_step(model, {}, ctx)
        r = hooks.rewards[-1]
        with torch.no_grad():
            want = (bce_rows(model.pure(target), target.label) - bce_rows(model.mixed(target), target.label)).mean()
        assert r == pytest.approx(float(want), rel=1e-5) and r * sign > 0.1  # eq. 5: Loss_pure − Loss_tgt


def test_the_row_reward_scores_each_source_row_by_the_pure_tower(tiny_data):
    """``reward: row``: a source row's reward is minus its loss under the pure tower; eq. 9 then credits
    each row with its own reward less the window's mean, so the rows the pure tower finds worst lose
    weight and the others gain."""
    ds, model, ctx = setup(tiny_data, {"reward": "row"})
    source = rows(ds, "source", 0, 256)
    with ctx.main_loss():
        ctx.stage.hooks.loss(model, {"target": rows(ds, "target", 0, 64), "source": source}, ctx)
    with torch.no_grad():
        want = -bce_rows(model.pure.head(model.aligned(source)[0]), source.label)
    assert torch.allclose(ctx.stage.hooks.step_source[2], want, atol=1e-6) and want.std() > 0
    # the update: the step's rows (the window's first) move by their reward against the window's mean
    _, model2, ctx2 = setup(tiny_data, {"reward": "row", "k": 100, "n": 2})
    hooks2, opts2 = ctx2.stage.hooks, make_optimizers(model2, TC, ctx2)
    sync2 = GradientSync(model2, exclude=ctx2.group_parameter_ids())
    train_step(model2, ctx2, {"source": source, "target": rows(ds, "target", 0, 64)}, opts2, sync2)
    rewards, v = hooks2.window[-1][2].clone(), hooks2.window[-1][0]
    with torch.no_grad():
        before = model2.weight(v)
    train_step(model2, ctx2, {"source": source, "target": rows(ds, "target", 64, 64)}, opts2, sync2)
    with torch.no_grad():
        moved = model2.weight(v) - before  # the selector's step alone (the same inputs)
    best, worst = rewards.argsort(descending=True)[:32], rewards.argsort()[:32]
    assert moved[best].mean() > moved[worst].mean()


def test_alpha_sizes_the_selector_step(tiny_data):
    """Eq. 9's α scales the selector's step (Adam's first step is lr·sign(g): a factor on the loss would not)."""
    moved = {}
    for alpha in (1.0, 0.5):
        ds, model, ctx = setup(tiny_data, {"k": 2, "n": 3, "alpha": alpha})
        opts, sync = make_optimizers(model, TC, ctx), GradientSync(model, exclude=ctx.group_parameter_ids())
        before = [p.clone() for p in model.selector.parameters()]
        for s in range(3):  # the first REINFORCE step is at step 3
            train_step(model, ctx, {"source": rows(ds, "source", 256 * s, 256),
                                    "target": rows(ds, "target", 64 * s, 64)}, opts, sync)
        moved[alpha] = torch.cat([(p - b).flatten() for p, b in zip(model.selector.parameters(), before)])
    assert moved[1.0].abs().max() > 1e-4
    torch.testing.assert_close(moved[0.5], 0.5 * moved[1.0], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("alpha,policy", [(1.0, "weight"), (0.0, "weight"), (1.0, "sample")])
def test_the_selector_moves_only_by_its_reinforce_step(tiny_data, alpha, policy):
    ds, model, ctx = setup(tiny_data, {"k": 2, "n": 3, "alpha": alpha, "policy": policy})
    opts, sync = make_optimizers(model, TC, ctx), GradientSync(model, exclude=ctx.group_parameter_ids())
    selector = {id(p) for p in model.selector.parameters()}
    assert not any(id(p) in selector for o in opts for g in o.param_groups for p in g["params"])
    moved = []
    for s in range(6):
        before = [p.clone() for p in model.selector.parameters()]
        train_step(model, ctx, {"source": rows(ds, "source", 256 * s, 256), "target": rows(ds, "target", 64 * s, 64)},
                   opts, sync)
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, model.selector.parameters())))
    # only at steps 3 and 6 (n = 3), and not at all when α = 0 (eq. 9 scales the step by α)
    assert moved == ([False, False, True, False, False, True] if alpha else [False] * 6)
    _, act, _ = ctx.stage.hooks.window[-1]  # the last step's source rows: sampled 0/1 selections, or none
    assert act is None if policy == "weight" else set(act.unique().tolist()) == {0.0, 1.0}
    report = ctx.stage.hooks.artifacts(model, ctx)["selector.json"]
    assert report["steps"] == [3, 6] and report["final"]["rows_clean"] + report["final"]["rows_noise"] == 3 * 256
    assert len(report["final"]["histogram_clean"]) == BINS and 0 < report["final"]["mean_clean"] < 1


def test_the_export_is_the_pure_tower_alone(tiny_data, tmp_path):
    ds, model, ctx = setup(tiny_data, {"k": 2, "n": 2})
    opts, sync = make_optimizers(model, TC, ctx), GradientSync(model, exclude=ctx.group_parameter_ids())
    for s in range(3):  # the pure tower has drifted from the mixed one since the sync at step 2
        train_step(model, ctx, {"source": rows(ds, "source", 256 * s, 256), "target": rows(ds, "target", 64 * s, 64)},
                   opts, sync)
    served = ctx.stage.hooks.export(model, ctx)
    torch.save(served.state_dict(), tmp_path / "pure.pt")
    assert not any(k.startswith(("mixed", "source", "selector", "san")) for k in served.state_dict())
    fresh = Tower(ds.domain("target").spec, MCFG)  # Target-only's interface: forward(batch) → logit
    fresh.load_state_dict(torch.load(tmp_path / "pure.pt"))
    model.eval()
    fresh.eval()
    valid = load(ds, "target", "valid")
    with torch.no_grad():
        assert torch.equal(fresh(valid), ctx.stage.hooks.logits(model, valid, ctx))
        assert not torch.equal(model.mixed(valid), fresh(valid))


def test_bad_arguments_and_ablation_switches(tiny_data):
    with pytest.raises(SpecError, match="method_args.k"):
        get_method("cctl", {"k": 0})
    with pytest.raises(SpecError, match="gamma"):
        get_method("cctl", {"gamma": 1.5})
    with pytest.raises(SpecError, match="policy: 'greedy'"):
        get_method("cctl", {"policy": "greedy"})
    with pytest.raises(SpecError, match="reward: 'step'"):
        get_method("cctl", {"reward": "step"})
    _, full, _ = setup(tiny_data, {})
    _, wo_ren_model, _ = setup(tiny_data, {"ren": False})
    ds, model, ctx = setup(tiny_data, {"ifn": False})
    assert not ctx.groups and set(model.state_dict()) == set(full.state_dict())  # same model, no selector step
    # REN's dual embedding: the source keeps its own id tables (ids and sequences over them) and its own
    # fields; its other fields read the mixed tower's tables. Without REN it shares the id tables too.
    assert set(model.source.inputs.embedding.tables) == {"user", "item", "src_channel"}
    assert set(wo_ren_model.source.inputs.embedding.tables) == {"src_channel"}
    batches = {"source": rows(ds, "source", 0, 64), "target": rows(ds, "target", 0, 64)}
    with_ren = ctx.stage.hooks
    wo_ren = get_method("cctl", {"ifn": False, "ren": False}).stages[0].hooks
    wo_ren.prepare(model, ctx)
    with torch.no_grad():  # REN adds exactly ren_weight · eq. 12 to the loss
        diff = with_ren.loss(model, batches, ctx) - wo_ren.loss(model, batches, ctx)
        _, emb_t = model.mixed.tokens(batches["target"])
        _, emb_s = model.aligned(batches["source"])
        ren = with_ren.ren(model, batches["target"], emb_t, batches["source"], emb_s)
    assert torch.allclose(diff, 0.1 * ren, atol=1e-4) and abs(float(ren)) > 0


def test_conet_joins_two_domain_networks(tiny_data):
    ds = CTRDataset.load(tiny_data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    m = get_method("conet", {"d": 16, "expert_depth": 2})
    model, ctx = build_stage_model(m, m.stages[0], specs, MCFG)
    cross = model.network.body.cross[0].weight
    batches = {d: load(ds, d, "valid").select(slice(0, 128)) for d in ("source", "target")}
    opts = make_optimizers(model, TC, ctx)
    before = cross.clone()
    train_step(model, ctx, batches, opts, GradientSync(model))
    assert not torch.equal(cross, before)  # the shared cross-connection units learn from both domains
    for b in batches.values():
        assert torch.isfinite(model(b)).all() and model(b).shape == (len(b),)


def test_cctl_end_to_end_on_ray(tiny_data, ray_local, tmp_path):
    """2 workers, tables sharded on TorchRec: the selector report, and the exported package (the pure
    tower alone) reproduces the stage's test AUC in one process."""
    cfg = from_dict({"data": tiny_data, "method": "cctl", "method_args": {"k": 5, "n": 5},
                     "storage": str(tmp_path / "runs"),
                     "model": {"backbone": "dnn", "deep": [16], "embedding_backend": "torchrec"},
                     "train": {"epochs": 1, "batch_size": 1024, "sparse_lr": 0.05, "workers": 2,
                               "sparse_optimizer": "adagrad"}})
    res = pipeline.run(cfg)["cctl"]
    assert res["test_auc"] > 0.6
    report = json.loads(Path(res["artifact"], "selector.json").read_text())
    assert report["final"]["rows_noise"] > 0 and report["final"]["rows_clean"] > 0
    package = load_package(export_package(cfg, tmp_path / "package"))  # the pure tower alone (§3.4)
    assert package.manifest["stage"] == "cctl" and package.manifest["artifact"] == Path(res["artifact"]).name
    assert not [k for k in package.program.state_dict() if "mixed" in k or "selector" in k or "san" in k]
    ds = CTRDataset.load(tiny_data)
    table = pa.concat_tables(pq.read_table(f) for f in ds.files("target", "test"))
    batch = load(ds, "target", "test")
    again = summarize(batch.label.numpy(), package.predict(table), batch.user.numpy())
    assert again["auc"] == pytest.approx(res["test_auc"], abs=1e-5)
