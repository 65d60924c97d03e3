"""MKT: the feature groups, HFA's scores, the polarized distribution loss, the frozen MEM through TEM
training, the ablation switches, the serving model without the source entity's parts (both backends,
2 workers with sharded tables), DIN, and the two stages end to end on a real local Ray."""

import os
import sys
from dataclasses import replace

import pytest
import ray.cloudpickle
import torch
import torch.distributed as dist
from helpers import load, spawn

from raytrain_ctr import pipeline
from raytrain_ctr.config import TrainConfig, from_dict
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.embedding import shard_model, sharded_collections, unsharded_state
from raytrain_ctr.layers.alignment import HFA
from raytrain_ctr.methods import get_method
from raytrain_ctr.methods.mkt import FeatureGroups, MKTModel, polarized_distribution
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.loop import build_stage_model, make_optimizers, train_step
from raytrain_ctr.train.sync import GradientSync

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
MCFG = ModelConfig(backbone="dnn", deep=(32, 16))
TC = TrainConfig(lr=0.003, sparse_lr=0.05, sparse_optimizer="adagrad")
SMALL = {"d_hfa": 8, "d_cke": 16, "tower": (8,), "tem_deep": (32, 16, 8), "attention_hidden": (8,)}


def specs_of(data: str) -> dict:
    ds = CTRDataset.load(data)
    return {d: ds.domain(d).spec for d in ds.domains}


def stage_model(data: str, stage: int, args: dict | None = None, cfg: ModelConfig = MCFG, mem: str | None = None):
    m = get_method("mkt", {**SMALL, **(args or {})})
    torch.manual_seed(0)
    return build_stage_model(m, m.stages[stage], specs_of(data), cfg, mem)


def batches(data: str, domains=("source", "target"), n: int = 256, start: int = 0) -> dict:
    ds = CTRDataset.load(data)
    return {d: load(ds, d, "train").select(slice(start, start + n)) for d in domains}


def train_mem(data: str, path: str, steps: int = 20, args: dict | None = None) -> None:
    model, ctx = stage_model(data, 0, args)
    opts, sync = make_optimizers(model, TC, ctx), GradientSync(model)
    for s in range(steps):
        train_step(model, ctx, batches(data, n=128, start=128 * s), opts, sync)
    torch.save(model.state_dict(), path)


def test_feature_groups_follow_the_spec(entities):
    s, t = (FeatureGroups.of(specs_of(entities)[d]) for d in ("source", "target"))
    assert [f.name for f in t.user] == ["user_id", "user_age", "user_gender"]
    assert [f.name for f in t.sequences] == ["hist_source", "hist_target"] and {f.pooling for f in t.sequences} == {
        "none"}
    assert [f.name for f in t.shared] == [f.name for f in s.shared] == ["item_id", "item_cat", "ctx_slot", "item_topic"]
    assert [f.name for f in s.specific] == ["item_price", "src_channel"]
    assert [f.name for f in t.specific] == ["tgt_style", "tgt_position"]
    bad = dict(specs_of(entities))
    bad["target"] = replace(bad["target"], fields=tuple(f for f in bad["target"].fields if f.name != "item_cat"))
    m = get_method("mkt", SMALL)
    with pytest.raises(SpecError, match="'item_cat' is entity-shared.*mark it scope: specific"):
        build_stage_model(m, m.stages[0], bad, MCFG)


def test_hfa_scores_lie_in_0_2_and_reweight_the_fields():
    torch.manual_seed(0)
    hfa = HFA(n=3, d_e=4, out_dim=5)
    V = torch.randn(64, 3, 4) * torch.tensor([0.0, 1.0, 3.0]).view(1, 3, 1)  # zero, unit and larger fields
    p = hfa.importance(V.flatten(1))
    assert p.shape == (64, 3) and bool(((p > 0) & (p < 2)).all())
    with torch.no_grad():
        hfa.score.bias.fill_(50.0)  # every score saturates at 2: the fields are doubled before alignment
        hfa.score.weight.zero_()
        assert torch.allclose(hfa(V), hfa.align((2 * V).flatten(1)))
    unscored = HFA(n=3, d_e=4, out_dim=5, score=False)
    assert not hasattr(unscored, "score") and unscored(V).shape == (64, 5)
    assert torch.equal(HFA(n=0, d_e=4, out_dim=5)(V[:, :0]), torch.zeros(64, 5))


def test_pdl_is_the_cosine_sum_and_enters_the_loss_times_gamma(entities):
    g_com = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    g_ind = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-1.0, 0.0]])
    assert torch.allclose(polarized_distribution(g_com, g_ind), torch.tensor([0.0, 1.0, -1.0]))
    model, ctx = stage_model(entities, 0, {"gamma": 0.5})
    b = batches(entities, n=64)
    no_pdl = get_method("mkt", {**SMALL, "pdl": False}).stages[0].hooks
    with torch.no_grad():
        diff = ctx.stage.hooks.loss(model, b, ctx) - no_pdl.loss(model, b, ctx)
        want = sum(polarized_distribution(*model.predict(x)[1:]).sum() for x in b.values())
    assert abs(float(want)) > 1e-3 and torch.allclose(diff, 0.5 * want, atol=1e-4)


def test_mem_is_frozen_and_in_eval_mode_through_tem_training(entities, tmp_path):
    train_mem(entities, str(tmp_path / "mem.pt"))
    model, ctx = stage_model(entities, 1, mem=str(tmp_path / "mem.pt"))
    mem_state = torch.load(tmp_path / "mem.pt")
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("mem.")}
    assert all(torch.equal(v, mem_state[k[4:]]) for k, v in before.items())  # every mem. tensor loaded
    modes = []
    model.mem.inputs.register_forward_pre_hook(lambda *_: modes.append([x.training for x in model.mem.modules()]))
    tem_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("tem.")}
    opts, sync = make_optimizers(model, TC, ctx), GradientSync(model)
    for s in range(5):
        train_step(model, ctx, batches(entities, ("target",), 128, 128 * s), opts, sync)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # bit-identical
    assert modes and not any(any(m) for m in modes) and model.tem.training  # MEM in eval mode, TEM training
    assert sum(not torch.equal(v, after[k]) for k, v in tem_before.items()) > 10  # TEM learns


def test_ablation_switches_change_exactly_their_part(entities, tmp_path):
    full, _ = stage_model(entities, 0)
    keys = set(full.state_dict())
    wo_hfa, _ = stage_model(entities, 0, {"hfa": False})
    scoring = {k for k in keys if k.startswith("hfa.") and k.split(".")[2] != "align"}
    assert scoring and set(wo_hfa.state_dict()) == keys - scoring
    wo_pdl, _ = stage_model(entities, 0, {"pdl": False})
    assert set(wo_pdl.state_dict()) == keys
    assert [s.name for s in get_method("mkt", {"tem": False}).stages] == ["mem"]
    cfg = from_dict({"data": entities, "method": "mkt", "storage": str(tmp_path)})
    mem_key = lambda args: pipeline.stage_keys(cfg, get_method("mkt", args))["mem"]  # noqa: E731
    assert mem_key({"tem": False}) == mem_key({}) == mem_key({"gate": "linear", "tem_deep": (8, 4)})  # one MEM
    assert mem_key({"pdl": False}) != mem_key({}) != mem_key({"hfa": False})
    glu, _ = stage_model(entities, 1)
    linear, _ = stage_model(entities, 1, {"gate": "linear"})
    differ = {k for k in set(glu.state_dict()) ^ set(linear.state_dict())}
    assert differ and all(k.startswith("tem.gates.") for k in differ)
    with pytest.raises(SpecError, match="method_args.gate: 'relu'"):
        get_method("mkt", {"gate": "relu"})


def test_the_serving_model_holds_no_source_part_and_predicts_the_same(entities, tmp_path):
    train_mem(entities, str(tmp_path / "mem.pt"), steps=5)
    model, _ = stage_model(entities, 1, mem=str(tmp_path / "mem.pt"))
    keys = set(model.state_dict())
    mem_keys = set(torch.load(tmp_path / "mem.pt"))
    assert {k for k in mem_keys if ".source." in k or k.startswith(("ike.", "towers."))}  # the MEM had them
    # the CKE's shared stream mixes every entity's experts below its last level (PLE's progressive extraction)
    read = {k for k in keys if k.startswith("mem.cke.levels.0.specific.source.")}
    assert read and not {k for k in keys - read
                         if ".source." in k or ".ike." in k or ".towers." in k or "src_channel" in k}
    full, _ = stage_model(entities, 0)
    full.load_state_dict(torch.load(tmp_path / "mem.pt"))
    full.eval()
    served = MKTModel({"target": specs_of(entities)["target"]}, MCFG, get_method("mkt", SMALL).args)
    served.load_state_dict(model.state_dict())  # strict: built from the target's spec alone, same tensors
    model.eval(), served.eval()
    b = load(CTRDataset.load(entities), "target", "test")
    with torch.no_grad():
        assert torch.equal(model(b), served(b))
        assert torch.allclose(model.mem.knowledge(b)[1], full.knowledge(b)[1], atol=1e-6)  # MEM's g_com^t


def torchrec_worker(rank: int, world: int, port: int, data: str, mem_path: str, out: str) -> None:
    """TEM on 2 workers with every table sharded row-wise: MEM's tables stay bit-identical, and the
    sharded model's predictions equal the same state's read by the local backend."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = ModelConfig(backbone="dnn", deep=(32, 16), embedding_backend="torchrec")
    model, ctx = stage_model(data, 1, cfg=cfg, mem=mem_path)
    tables = {t for _, c in sharded_collections(model) for t in c.table_names}
    shard_model(model, world, {t: "row_wise" for t in tables}, 10**9, "adagrad", 0.05)
    opts, sync = make_optimizers(model, TC, ctx), GradientSync(model)
    for s in range(4):
        train_step(model, ctx, batches(data, ("target",), 64, 128 * s + 64 * rank), opts, sync)
    state = unsharded_state(model)
    test = load(CTRDataset.load(data), "target", "test").select(slice(64 * rank, 64 * rank + 64))
    model.eval()
    with torch.no_grad():
        logits = model(test)
    torch.save({"state": state if rank == 0 else None, "logits": logits, "rows": (64 * rank, 64)}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_tem_on_two_workers_with_sharded_tables(entities, tmp_path):
    train_mem(entities, str(tmp_path / "mem.pt"), steps=5)
    spawn(torchrec_worker, entities, str(tmp_path / "mem.pt"), str(tmp_path))
    state = torch.load(tmp_path / "0.pt")["state"]
    mem = torch.load(tmp_path / "mem.pt")
    mem_tables = [k for k in state if k.startswith("mem.") and ".tables." in k]
    assert len(mem_tables) >= 6 and all(torch.equal(state[k], mem[k[4:]]) for k in mem_tables)
    tem_tables = [k for k in state if k.startswith("tem.") and ".tables." in k]
    local, _ = stage_model(entities, 1)
    assert not all(torch.equal(state[k], local.state_dict()[k]) for k in tem_tables)  # TEM's tables trained
    local.load_state_dict(state)
    local.eval()
    test = load(CTRDataset.load(entities), "target", "test")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        start, n = got["rows"]
        with torch.no_grad():
            want = local(test.select(slice(start, start + n)))
        assert torch.allclose(got["logits"], want, atol=1e-5)


def test_din_attends_to_the_behaviour_sequence(entities):
    m = get_method("din")
    torch.manual_seed(0)
    model, ctx = build_stage_model(m, m.stages[0], specs_of(entities), MCFG)
    b = batches(entities, ("target",), 64)["target"]
    model.eval()
    with torch.no_grad():
        base = model(b)
        seq = b.sparse["hist_source"]
        lengths = (seq > 0).sum(1).tolist()
        b.sparse["hist_source"] = torch.stack([torch.cat([r[:n].flip(0), r[n:]]) for r, n in zip(seq, lengths)])
        assert torch.allclose(model(b), base, atol=1e-5)  # a set: the order of the real items does not matter
        b.sparse["hist_source"] = torch.zeros_like(seq)
        assert not torch.allclose(model(b), base)
    with pytest.raises(SpecError, match="no behaviour sequence"):
        spec = specs_of(entities)["target"]
        bare = replace(spec, fields=tuple(f for f in spec.fields if f.type != "sequence"))
        build_stage_model(m, m.stages[0], {"source": bare, "target": bare}, MCFG)


def test_mkt_end_to_end_on_ray(entities, ray_local, tmp_path):
    """MEM then TEM on 2 workers with tables sharded on TorchRec: the TEM artifact holds the MEM's
    target path unchanged, and MKT beats chance on the planted target well."""
    cfg = from_dict({"data": entities, "method": "mkt", "method_args": SMALL, "storage": str(tmp_path / "runs"),
                     "model": {"backbone": "dnn", "deep": [32, 16], "embedding_backend": "torchrec"},
                     "train": {"epochs": 1, "batch_size": 1024, "sparse_lr": 0.05, "lr": 0.003, "workers": 2,
                               "sparse_optimizer": "adagrad", "activity_buckets": [2, 5]}})
    out = pipeline.run(cfg)
    assert set(out) == {"mem", "tem"} and out["tem"]["test_auc"] > 0.62
    by = out["tem"]["test_by_activity"]  # Table 3: the test rows by their user's clicks in the target train split
    assert list(by) == ["0-1", "2-4", "5+"] and sum(b["rows"] for b in by.values()) == out["tem"]["test_rows"]
    mem = torch.load(f"{out['mem']['artifact']}/model.pt")
    tem = torch.load(f"{out['tem']['artifact']}/model.pt")
    assert all(torch.equal(v, mem[k[4:]]) for k, v in tem.items() if k.startswith("mem."))
