"""The torchrec backend on a real 2-worker TorchTrainer (gloo): sharded = single process, shards,
DCP checkpoints restored onto another worker count and plan, frozen tables, a whole pipeline."""

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch
from helpers import local_test_metrics

from raytrain_ctr import pipeline
from raytrain_ctr.config import TrainConfig, from_dict
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.encode import FeatureEncoder
from raytrain_ctr.embedding import shard_model, unsharded_state
from raytrain_ctr.embedding.sharded import sharding_plan
from raytrain_ctr.methods import get_method
from raytrain_ctr.models.backbones import ModelConfig, build_model
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.checkpoint import load_sharded, save_sharded, sharded_state
from raytrain_ctr.train.loop import build_stage_model, make_optimizers, train_step
from raytrain_ctr.train.state import freeze
from raytrain_ctr.train.sync import GradientSync

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker loops below travel by value

KINDS = ("table_wise", "row_wise", "column_wise")
ROWS = ((0, 48), (48, 78))  # unequal batches: rank 1's is padded in the collectives
# Adagrad's first step, lr·g / (|g| + eps), moves by up to lr/eps per unit of float error in g: with
# eps 1e-8 summation order alone shifts it by ~1e-5, so the step is compared at eps 1e-3.
TC = TrainConfig(lr=0.01, sparse_lr=0.1, sparse_optimizer="adagrad", sparse_eps=1e-3)
ADAGRAD = TrainConfig(lr=0.01, sparse_lr=0.1, sparse_optimizer="adagrad")
MODEL = ModelConfig(backbone="dcn", deep=(16,), cross_layers=1)


def setup(data: str):
    ds = CTRDataset.load(data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    batch = FeatureEncoder(specs["target"]).encode(pq.read_table(ds.files("target", "train")[0]).slice(0, 78))
    method = get_method("target_only")
    return specs, batch, method


def sharded(specs, method, init: dict, kind: str, world: int, frozen: tuple[str, ...] = (), tc=ADAGRAD):
    model, ctx = build_stage_model(method, method.stages[0], specs, ModelConfig(
        backbone="dcn", deep=(16,), cross_layers=1, embedding_backend="torchrec"), None)
    model.load_state_dict(init)
    freeze(model, frozen)
    tables = model.embedding.table_specs
    shard_model(model, world, {t: kind for t in tables}, 10**9, tc.sparse_optimizer, tc.sparse_lr, tc.sparse_eps)
    return model, ctx


def worker(config: dict) -> None:
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    out = Path(config["out"])
    specs, batch, method = setup(config["data"])
    init = torch.load(out / "init.pt")
    if config["mode"] == "restore":  # onto one worker, table-wise
        model, _ = sharded(specs, method, init, "table_wise", world)
        load_sharded(model, out / "ckpt")
        torch.save({"tables": unsharded_state(model), "opt": model.embedding.unsharded_optimizer_state()},
                   out / "restored-1worker.pt")
        return
    mine = batch.select(slice(*ROWS[rank]))
    for kind in KINDS:
        model, ctx = sharded(specs, method, init, kind, world, tc=TC)
        with torch.no_grad():
            logits = model(mine)
        shards = model.embedding.local_shards()
        opts = make_optimizers(model, TC)
        train_step(model, ctx, {"target": mine}, opts, GradientSync(model))
        state = unsharded_state(model)
        torch.save({"logits": logits, "shards": shards}, out / f"{kind}-rank{rank}.pt")
        if rank == 0:
            torch.save({"tables": state}, out / f"{kind}.pt")
    model, ctx = sharded(specs, method, init, "row_wise", world)  # Adagrad: its state is checkpointed
    train_step(model, ctx, {"target": mine}, make_optimizers(model, ADAGRAD), GradientSync(model))
    state, opt = unsharded_state(model), model.embedding.unsharded_optimizer_state()
    if rank == 0:
        torch.save({"tables": state, "opt": opt}, out / "adagrad.pt")
    save_sharded(sharded_state(model), out / "ckpt")
    model, _ = sharded(specs, method, init, "column_wise", world)  # restore onto another plan
    load_sharded(model, out / "ckpt")
    state, opt = unsharded_state(model), model.embedding.unsharded_optimizer_state()
    if rank == 0:
        torch.save({"tables": state, "opt": opt}, out / "restored-column_wise.pt")
    model, ctx = sharded(specs, method, init, "row_wise", world, frozen=("embedding.tables.user.*",))
    train_step(model, ctx, {"target": mine}, make_optimizers(model, ADAGRAD), GradientSync(model))
    state, opt = unsharded_state(model), model.embedding.unsharded_optimizer_state()
    if rank == 0:
        torch.save({"tables": state, "opt": opt}, out / "frozen.pt")


def fit(out: Path, data: str, mode: str, workers: int) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(worker, train_loop_config={"out": str(out), "data": data, "mode": mode},
                 scaling_config=ScalingConfig(num_workers=workers),
                 run_config=RunConfig(name=f"sharded-{mode}", storage_path=str(out / "ray"))).fit()


@pytest.fixture(scope="module")
def runs(tiny_data, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    specs, batch, method = setup(tiny_data)
    torch.manual_seed(0)
    reference, ctx = build_stage_model(method, method.stages[0], specs, MODEL, None)
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    torch.save(init, out / "init.pt")
    fit(out, tiny_data, "step", 2)
    fit(out, tiny_data, "restore", 1)
    parts = [batch.select(slice(*r)) for r in ROWS]
    with torch.no_grad():
        logits = [reference(p) for p in parts]
    union = {"target": batch.select(slice(0, ROWS[-1][1]))}
    train_step(reference, ctx, union, make_optimizers(reference, TC), GradientSync(reference))
    after = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.load_state_dict(init)
    adagrad = make_optimizers(reference, ADAGRAD)
    train_step(reference, ctx, union, adagrad, GradientSync(reference))
    sums = {name: adagrad[0].state[p]["sum"] for name, p in reference.named_parameters() if p in adagrad[0].state}
    return out, init, logits, after, specs, sums


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_equals_single_process(runs, kind):
    """Forward outputs, and every tensor after one step (fused vs torch Adagrad on the tables, Adam on
    the rest), agree."""
    out, _, logits, after, _, _ = runs
    for rank in (0, 1):
        got = torch.load(out / f"{kind}-rank{rank}.pt")["logits"]
        assert got.shape == logits[rank].shape
        torch.testing.assert_close(got, logits[rank], atol=1e-5, rtol=0)
    tables = torch.load(out / f"{kind}.pt")["tables"]
    assert set(tables) == set(after)
    for key in after:
        torch.testing.assert_close(tables[key], after[key], atol=1e-5, rtol=0, msg=key)


def test_fused_adagrad_state_equals_torch_adagrad(runs):
    out, _, _, _, _, sums = runs
    opt = torch.load(out / "adagrad.pt")["opt"]
    assert sums
    for name, value in sums.items():  # embedding.tables.user.weight -> embedding_bags.user.weight/user.momentum1
        table = name.split(".")[2]
        torch.testing.assert_close(opt[f"embedding_bags.{table}.weight/{table}.momentum1"], value, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_each_worker_holds_only_its_shards(runs, kind):
    _, init, _, _, _, _ = runs
    shards = [torch.load(runs[0] / f"{kind}-rank{r}.pt")["shards"] for r in (0, 1)]
    for key in shards[0]:
        rows, dim = init[f"embedding.{key}"].shape
        mine = [[sizes for _, sizes in s[key]] for s in shards]
        held = [sum(r * c for r, c in m) for m in mine]
        assert sum(held) == rows * dim  # together the workers hold the table once
        if kind == "table_wise":
            assert sorted(held) == [0, rows * dim]
        elif kind == "row_wise":
            assert all(0 < h < rows * dim for h in held) and all(c == dim for m in mine for _, c in m)
        else:
            assert all(m == [[rows, dim // 2]] for m in mine)


@pytest.mark.parametrize("restored", ["restored-1worker", "restored-column_wise"])
def test_checkpoint_restores_onto_other_worker_count_and_plan(runs, restored):
    """2 workers row-wise → 1 worker table-wise, and → 2 workers column-wise: same tables and
    the same fused Adagrad state, exactly."""
    out = runs[0]
    saved, loaded = torch.load(out / "adagrad.pt"), torch.load(out / f"{restored}.pt")
    assert saved["opt"] and set(loaded["opt"]) == set(saved["opt"])
    for key in saved["opt"]:
        assert torch.equal(loaded["opt"][key], saved["opt"][key]), key
    tables = [k for k in saved["tables"] if k.startswith("embedding.")]
    assert tables and all(torch.equal(loaded["tables"][k], saved["tables"][k]) for k in tables)


def test_frozen_tables_stay_bit_identical_without_optimizer_state(runs):
    out, init, _, _, _, _ = runs
    frozen, trained = torch.load(out / "frozen.pt"), torch.load(out / "adagrad.pt")
    assert torch.equal(frozen["tables"]["embedding.tables.user.weight"], init["embedding.tables.user.weight"])
    assert not torch.equal(frozen["tables"]["embedding.tables.item.weight"], init["embedding.tables.item.weight"])
    assert not any(k.startswith("embedding_bags.user.") for k in frozen["opt"])
    assert any(k.startswith("embedding_bags.user.") for k in trained["opt"])


def test_sharding_plan_by_size_and_config_errors(runs):
    specs = runs[4]
    model = build_model(list(specs.values()), MODEL)
    tables = model.embedding.table_specs
    names = sorted(tables)
    big = max(names, key=lambda t: tables[t].num_embeddings)
    plan = sharding_plan(tables, names, 2, {}, tables[big].num_embeddings)
    assert plan[big] == ("row_wise", None)
    assert {kind for t, (kind, _) in plan.items() if t != big} == {"table_wise"}
    assert {rank for _, (kind, rank) in plan.items() if kind == "table_wise"} == {0, 1}  # balanced
    with pytest.raises(SpecError, match="model.sharding: unknown table 'nope'"):
        sharding_plan(tables, names, 2, {"nope": "row_wise"}, 10)
    with pytest.raises(SpecError, match="model.sharding.user: unknown sharding 'diagonal'"):
        sharding_plan(tables, names, 2, {"user": "diagonal"}, 10)
    sharded_model = build_model(list(specs.values()), ModelConfig(embedding_backend="torchrec"))
    with pytest.raises(SpecError, match=r"model.sharding: unknown table\(s\) \['nope'\]"):
        shard_model(sharded_model, 2, {"nope": "row_wise"}, 10, "adagrad", 0.1)  # refused before any collective
    with pytest.raises(SpecError, match="model.embedding_backend: unknown backend 'faiss'"):
        ModelConfig(embedding_backend="faiss")
    with pytest.raises(SpecError, match="train.sparse_optimizer: unknown optimizer 'lbfgs'"):
        TrainConfig(sparse_optimizer="lbfgs")


def test_pipeline_on_torchrec_resumes_and_exports_unsharded(tiny_data, ray_local, tmp_path):
    """Fine-Tune on sharded tables: a worker killed mid-epoch resumes from the DCP checkpoint; the
    artifact holds whole tables under the local backend's names and reproduces the test AUC there."""
    cfg = from_dict({"data": tiny_data, "method": "finetune", "storage": str(tmp_path),
                     "model": {"backbone": "dcn", "deep": [32, 16], "cross_layers": 2,
                               "embedding_backend": "torchrec", "sharding": {"item": "row_wise"}},
                     "train": {"epochs": 2, "batch_size": 2048, "workers": 2, "sparse_lr": 0.05,
                               "sparse_optimizer": "adagrad", "fail_once_at_epoch": 1}})
    res = pipeline.run(cfg)
    for stage in res.values():
        assert stage["test_auc"] > 0.6 and stage["resumed_from_epoch"] == 1
    local, _ = local_test_metrics(tiny_data, ModelConfig(backbone="dcn", deep=(32, 16), cross_layers=2),
                                  res["finetune"]["artifact"])
    assert res["finetune"]["test_auc"] == pytest.approx(local["auc"], abs=1e-5)


def test_l2sp_refuses_the_torchrec_backend(tiny_data, tmp_path):
    cfg = from_dict({"data": tiny_data, "method": "l2sp", "storage": str(tmp_path),
                     "model": {"embedding_backend": "torchrec"}, "train": {"sparse_optimizer": "adagrad"}})
    method = get_method("l2sp")
    specs = {d: CTRDataset.load(tiny_data).domain(d).spec for d in ("source", "target")}
    with pytest.raises(SpecError, match="l2sp.*model.embedding_backend: local"):
        build_stage_model(method, method.stages[1], specs, cfg.model, None)
