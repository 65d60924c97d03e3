"""The method toolkit: stage-bound hooks, parameter groups with their own optimizer and sync rule,
after-step hooks (a tower copied into another every k steps, sharded tables included), several
named inputs loaded into prefixes, exclusion by module type, frozen = eval mode, time windows
relative to ``as_of`` and the artifact catalog, the embedding contract (torchrec ``sequence()``
equals local), attention and gate layers, driver-side checks."""

import datetime as dt
import os
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch
import torch.distributed as dist
from helpers import load, spawn
from torch import nn

from raytrain_ctr import pipeline
from raytrain_ctr.catalog import Catalog
from raytrain_ctr.config import TrainConfig, from_dict
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.encode import FeatureEncoder
from raytrain_ctr.embedding import make_embedding, shard_model, unsharded_state
from raytrain_ctr.layers.attention import SelfAttentionPooling, TargetAttention
from raytrain_ctr.layers.gates import GLU
from raytrain_ctr.layers.inputs import FieldInputs
from raytrain_ctr.layers.mlp import MLP
from raytrain_ctr.methods import METHODS, Input, Method, Stage, StageContext, StageHooks, Window, bce, get_method
from raytrain_ctr.methods.cdanet import CDAnetHooks
from raytrain_ctr.models.backbones import ModelConfig, build_model
from raytrain_ctr.spec import SpecError, merge_tables
from raytrain_ctr.train.local import fit_local
from raytrain_ctr.train.loop import build_stage_model, make_optimizers, train_step
from raytrain_ctr.train.state import StateMismatchError, load_filtered
from raytrain_ctr.train.step import DiscountedReturn, EmbeddingL2, ParamGroup, copy_parameters
from raytrain_ctr.train.sync import GradientSync

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the toy methods travel to Ray workers by value
MCFG = ModelConfig(backbone="dnn", deep=(16,))
LR_GROUP, K = 0.1, 2


# ---- toy stages used below (module level: the spawned workers import them) ----

class Weighted(nn.Module):
    """A CTR model whose logit is scaled by ``1 + w``: the main loss reaches ``w`` unless it is left out."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base, self.w = base, nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        return self.base(batch) * (1 + self.w)


class GroupHooks(StageHooks):
    """``w`` is a parameter group stepped by its own rule: SGD on ½·Σ(w − y)² over the step's rows."""

    def build(self, ctx):
        return Weighted(super().build(ctx))

    def param_groups(self, model, ctx):
        return [ParamGroup("selector", [model.w], lambda ps: torch.optim.SGD(ps, lr=LR_GROUP))]

    def __init__(self):
        self.untouched: list[bool] = []  # per step: w.grad as the last group step left it (the main loss added none)

    def after_step(self, model, batches, ctx):
        if ctx.step > 1:
            self.untouched.append(torch.equal(model.w.grad, self.last))
        y = torch.cat([b.label for b in batches.values()]) if batches else torch.zeros(0)
        ctx.update("selector", 0.5 * ((model.w - y) ** 2).sum())
        self.last = model.w.grad.clone()


class Towers(nn.Module):
    def __init__(self, mixed: nn.Module, pure: nn.Module):
        super().__init__()
        self.mixed, self.pure = mixed, pure


class CompanionHooks(StageHooks):
    """A mixed tower (source + target loss) and a pure one (target loss); mixed → pure every K steps."""

    def build(self, ctx):
        specs = list(ctx.specs.values())
        return Towers(build_model(specs, ctx.model_cfg), build_model(specs, ctx.model_cfg))

    def loss(self, model, batches, ctx):
        total = sum(bce(model.mixed(b), b.label) for b in batches.values())
        return total + sum(bce(model.pure(b), b.label) for d, b in batches.items() if d == "target")

    def after_step(self, model, batches, ctx):
        if ctx.step % K == 0:
            copy_parameters(model.mixed, model.pure)


def toy_method(hooks: StageHooks, domains=("target",), **stage) -> Method:
    class Toy(Method):
        name = "toy"

        @property
        def stages(self):
            return [Stage("toy", domains, hooks=hooks, **stage)]

    return Toy()


def tiny_specs(data: str):
    ds = CTRDataset.load(data)
    return ds, {d: ds.domain(d).spec for d in ds.domains}


def first_rows(ds, domain: str, n: int):
    return FeatureEncoder(ds.domain(domain).spec).encode(pq.read_table(ds.files(domain, "train")[0]).slice(0, n))


def unpooled(specs):
    """The specs with ``hist_items`` read unpooled (``pooling: none``)."""
    return {d: replace(s, fields=tuple(replace(f, pooling="none") if f.name == "hist_items" else f for f in s.fields))
            for d, s in specs.items()}


# ---- two gloo workers: parameter groups, the companion copy (both backends), torchrec sequence() ----

def steps_with_group(data: str, rank: int, world: int, n_steps: int = 3) -> dict:
    ds, specs = tiny_specs(data)
    batch = first_rows(ds, "target", 96)
    m = toy_method(GroupHooks())
    torch.manual_seed(0)
    model, ctx = build_stage_model(m, m.stages[0], specs, MCFG)
    opts = make_optimizers(model, TrainConfig(lr=0.01, sparse_lr=0.05), ctx)
    sync = GradientSync(model, exclude=ctx.group_parameter_ids())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ws = []
    for s in range(n_steps):
        rows = slice(s * 32 + rank * 32 // world, s * 32 + (rank + 1) * 32 // world)
        train_step(model, ctx, {"target": batch.select(rows)}, opts, sync)
        ws.append(float(model.w))
    moved = [k for k, v in model.state_dict().items() if k != "w" and not torch.equal(v, before[k])]
    return {"w": ws, "labels": batch.label[: n_steps * 32], "moved": moved, "step": ctx.step,
            "untouched": ctx.stage.hooks.untouched,
            "in_main_optimizers": any(p is model.w for o in opts for g in o.param_groups for p in g["params"])}


def companion(data: str, backend: str, world: int) -> list[dict]:
    """Three steps of the companion towers; both towers' whole state after each step."""
    ds, specs = tiny_specs(data)
    rank = dist.get_rank()
    batches = {d: first_rows(ds, d, 64).select(slice(32 * rank, 32 * (rank + 1))) for d in ("source", "target")}
    m = toy_method(CompanionHooks(), domains=("source", "target"))
    torch.manual_seed(0)
    cfg = replace(MCFG, embedding_backend=backend)
    model, ctx = build_stage_model(m, m.stages[0], specs, cfg)
    tc = TrainConfig(lr=0.01, sparse_lr=0.05, sparse_optimizer="adagrad")
    if backend == "torchrec":
        shard_model(model, world, {t: "row_wise" for t in model.mixed.embedding.table_names}, 10**9,
                    "adagrad", 0.05)
    opts, sync = make_optimizers(model, tc, ctx), GradientSync(model)
    out = []
    for _ in range(3):
        train_step(model, ctx, batches, opts, sync)
        state = unsharded_state(model)
        out.append({k: v.clone() for k, v in state.items()} if rank == 0 else {})
    return out


def sequences(data: str, world: int) -> dict:
    """``hist_items`` unpooled, read from sharded tables (row-wise over the workers) and locally."""
    ds, specs = tiny_specs(data)
    specs = unpooled(specs)
    tables, fields = merge_tables([specs["target"]]), list(specs["target"].sparse_fields)
    torch.manual_seed(0)
    local = make_embedding(tables, fields, "local")
    sharded = make_embedding(tables, fields, "torchrec")
    sharded.load_state_dict(local.state_dict())
    sharded.shard(world, {t: "row_wise" for t in sharded.table_names}, optimizer="adagrad")
    rank = dist.get_rank()
    batch = FeatureEncoder(specs["target"]).encode(pq.read_table(ds.files("target", "train")[0]).slice(0, 50))
    mine = batch.select(slice(0, 20) if rank == 0 else slice(20, 50))
    with torch.no_grad():
        got, want = sharded(mine), local(mine)
        seq, mask = sharded.sequence(mine, "hist_items")
    return {"got": got, "want": want, "seq": seq, "mask": mask, "ids": mine.sparse["hist_items"]}


def worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(steps_with_group(data, rank, world), f"{out}/group-rank{rank}.pt")
    for backend in ("local", "torchrec"):
        torch.save(companion(data, backend, world), f"{out}/companion-{backend}-rank{rank}.pt")
    torch.save(sequences(data, world), f"{out}/sequence-rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toolkit")
    spawn(worker, tiny_data, str(out))
    return out


def test_a_parameter_group_moves_only_by_its_own_rule_on_two_workers(two_workers):
    r0, r1 = (torch.load(two_workers / f"group-rank{r}.pt") for r in (0, 1))
    assert r0["w"] == r1["w"]  # summed over workers: one value everywhere
    w, expected = 0.0, []
    for s in range(3):  # SGD on ½·Σ(w − y)² over the union of both workers' rows of the step
        y = r0["labels"][s * 32: (s + 1) * 32].double()
        w -= LR_GROUP * float((w - y).sum())
        expected.append(w)
    assert r0["w"] == pytest.approx(expected, rel=1e-5)  # no gradient of the main loss reached w
    assert r0["untouched"] == [True, True]  # the main loss's backward never reached w.grad
    assert not r0["in_main_optimizers"] and r0["moved"] and r0["step"] == 3  # the rest trains on the main loss


@pytest.mark.parametrize("backend", ["local", "torchrec"])
def test_the_companion_copy_every_k_steps_leaves_the_towers_equal(two_workers, backend):
    states = torch.load(two_workers / f"companion-{backend}-rank0.pt")
    for step, state in enumerate(states, start=1):
        mixed = {k[len("mixed."):]: v for k, v in state.items() if k.startswith("mixed.")}
        pure = {k[len("pure."):]: v for k, v in state.items() if k.startswith("pure.")}
        assert mixed.keys() == pure.keys() and any("tables" in k for k in mixed)
        equal = all(torch.equal(mixed[k], pure[k]) for k in mixed)
        assert equal == (step % K == 0), f"step {step}"  # synced at step K, apart after (different losses)


def test_torchrec_sequence_equals_the_local_backend(two_workers):
    for rank in (0, 1):
        r = torch.load(two_workers / f"sequence-rank{rank}.pt")
        assert r["got"].keys() == r["want"].keys() and r["got"]["hist_items"].dim() == 3
        for name in r["want"]:
            assert torch.allclose(r["got"][name], r["want"][name], atol=1e-7), name
        assert torch.allclose(r["seq"], r["want"]["hist_items"], atol=1e-7)
        assert torch.equal(r["mask"], r["ids"] > 0) and (r["seq"][~r["mask"]] == 0).all()


# ---- stage-bound hooks ----

def test_each_stage_has_its_own_hooks(tiny_data):
    _, specs = tiny_specs(tiny_data)
    small = {"d": 8, "experts": 2, "expert_depth": 1, "tower_depth": 2}
    (alone,) = get_method("cdanet", {**small, "translation": False}).stages
    assert alone.name == "augmentation" and not alone.inputs and isinstance(alone.hooks, CDAnetHooks)
    model, ctx = build_stage_model(get_method("cdanet", small), alone, specs, MCFG)
    assert model.augmented is not None and model.towers is None and list(model.translators) == ["target"]
    assert set(ctx.stage.hooks.terms(model, {"target": load(CTRDataset.load(tiny_data), "target", "valid")
                                             .select(slice(0, 16))})) == {"vani", "cross", "orth"}
    pretrain, finetune = get_method("l2sp").stages
    assert type(pretrain.hooks) is StageHooks and type(finetune.hooks).__name__ == "L2SPHooks"
    assert finetune.inputs == {"pretrain": Input("pretrain")}
    with pytest.raises(SpecError, match="no input"):
        build_stage_model(get_method("finetune"), finetune, specs, MCFG, {"pretrian": "x.pt"})


# ---- inputs: several, each into its prefix; exclusion by module type ----

class Pair(nn.Module):
    def __init__(self, specs, cfg):
        super().__init__()
        self.a, self.b = build_model(specs, cfg), build_model(specs, cfg)


class PairHooks(StageHooks):
    def build(self, ctx):
        return Pair(list(ctx.specs.values()), ctx.model_cfg)


def test_a_stage_with_two_named_inputs_loads_each_into_its_prefix(tiny_data, tmp_path):
    _, specs = tiny_specs(tiny_data)
    paths = {}
    for name, seed in (("first", 1), ("second", 2)):
        torch.manual_seed(seed)
        paths[name] = str(tmp_path / f"{name}.pt")
        torch.save(build_model(list(specs.values()), MCFG).state_dict(), paths[name])
    inputs = {"first": Input("s1", into="a."),
              "second": Input("s2", include=("embedding.*",), strip="embedding.", into="b.embedding.")}
    m = toy_method(PairHooks(), inputs=inputs)
    torch.manual_seed(3)
    model, ctx = build_stage_model(m, m.stages[0], specs, MCFG, paths)
    fresh = Pair(list(specs.values()), MCFG).state_dict()
    first, second = (torch.load(paths[n]) for n in ("first", "second"))
    assert set(ctx.inputs) == {"first", "second"}
    for key, value in model.state_dict().items():
        inner = key.split(".", 1)[1]
        if key.startswith("a."):
            assert torch.equal(value, first[inner]), key
        elif inner.startswith("embedding."):
            assert torch.equal(value, second[inner]), key
        else:  # b's backbone: not selected, stays as built
            assert not torch.equal(value, second[inner]), key
    assert fresh.keys() == model.state_dict().keys()


class Normed(nn.Module):
    """Inputs → an MLP with BatchNorm and dropout (``body``) → a head."""

    def __init__(self, specs, cfg):
        super().__init__()
        self.inputs = FieldInputs.of(specs, cfg)
        self.body = MLP(self.inputs.in_dim, [16, 8], batch_norm=True, dropout=0.5)
        self.head = nn.Linear(8, 1)

    def forward(self, batch):
        return self.head(self.body(self.inputs(batch))).squeeze(-1)


class NormedHooks(StageHooks):
    def build(self, ctx):
        return Normed(list(ctx.specs.values()), ctx.model_cfg)


def test_exclusion_by_module_type(tiny_data, tmp_path):
    _, specs = tiny_specs(tiny_data)
    upstream = Normed(list(specs.values()), MCFG)
    with torch.no_grad():
        for v in upstream.state_dict().values():
            v.add_(1)  # every tensor, BatchNorm statistics included, differs from a fresh build
    torch.save(upstream.state_dict(), tmp_path / "up.pt")
    m = toy_method(NormedHooks(), inputs={"up": Input("up", exclude_modules=("BatchNorm*",))})
    torch.manual_seed(0)
    model, _ = build_stage_model(m, m.stages[0], specs, MCFG, str(tmp_path / "up.pt"))
    torch.manual_seed(0)
    fresh = Normed(list(specs.values()), MCFG).state_dict()
    bn = {f"body.{i}.{k}" for i, layer in enumerate(model.body) if isinstance(layer, nn.BatchNorm1d)
          for k in layer.state_dict()}
    assert len(bn) == 10  # two BatchNorms: weight, bias, running mean/var, batches tracked
    for key, value in model.state_dict().items():
        assert torch.equal(value, (fresh if key in bn else upstream.state_dict())[key]), key
    with pytest.raises(StateMismatchError, match="none of its"):
        load_filtered(model, {"nothing.here": torch.zeros(1)})


def test_frozen_modules_stay_in_eval_mode_through_training(tiny_data):
    ds, specs = tiny_specs(tiny_data)
    m = toy_method(NormedHooks(), freeze=("body.*",))
    valid = load(ds, "target", "valid")
    torch.manual_seed(0)
    model, _ = build_stage_model(m, m.stages[0], specs, MCFG)
    body = {k: v.clone() for k, v in model.body.state_dict().items()}
    with torch.no_grad():
        out = model.body(model.inputs(valid.select(slice(0, 64))))
    res = fit_local(m, m.stages[0], specs, MCFG, TrainConfig(epochs=1, batch_size=256, sparse_lr=0.01, seed=0),
                    {"target": load(ds, "target", "train").select(slice(0, 2048))}, valid.select(slice(0, 512)))
    trained = res.model
    assert trained.training and not trained.body.training  # the loop's train mode leaves the frozen body in eval
    for k, v in trained.body.state_dict().items():  # weights and BatchNorm statistics bit-identical
        assert torch.equal(v, body[k]), k
    assert not torch.equal(trained.head.weight, model.head.weight)
    trained.inputs.load_state_dict(model.inputs.state_dict())
    with torch.no_grad():
        assert torch.equal(trained.body(trained.inputs(valid.select(slice(0, 64)))), out)  # no dropout, same stats


# ---- time windows, as_of, the catalog ----

def test_windows_resolve_against_as_of():
    as_of = dt.date(2026, 3, 31)
    assert Window(-1).dates(as_of) == (dt.date(2026, 2, 28), as_of)  # calendar months, day clamped
    assert Window(-6, -1).dates(as_of) == (dt.date(2025, 9, 30), dt.date(2026, 2, 28))
    assert Window(-7, 0, "day").dates(as_of) == (dt.date(2026, 3, 24), as_of)
    assert Window(0, 1, "week").bounds(dt.date(1970, 1, 1)) == (0, 7 * 86400)
    with pytest.raises(SpecError, match="empty"):
        Window(0, 0)
    with pytest.raises(SpecError, match="unit"):
        Window(-1, 0, "year")


def test_the_catalog_answers_the_latest_as_of_a_date_and_prunes(tmp_path):
    cat = Catalog(str(tmp_path / "catalog"))
    for date in ("2026-01-01", "2026-02-01", "2026-03-01", "2026-04-01"):
        art = tmp_path / "stages" / f"tpm-{date}"
        art.mkdir(parents=True)
        cat.record("fam", f"tpm-{date}", str(art), date)
    again = cat.record("fam", "tpm-2026-02-01", str(tmp_path / "stages" / "tpm-2026-02-01"), "2026-02-01")
    assert again.created == cat.entries("fam")[1].created  # a re-run keeps its entry
    assert cat.latest("fam", "2026-03-15").artifact == "tpm-2026-03-01"
    assert cat.latest("fam", "2026-03-01").artifact == "tpm-2026-03-01"  # valid on its own date
    assert cat.latest("fam", "2025-12-31") is None and cat.latest("other", "2026-05-01") is None
    assert cat.latest("fam").artifact == "tpm-2026-04-01"
    gone = cat.prune("fam", keep=2)
    assert [e.artifact for e in gone] == ["tpm-2026-01-01", "tpm-2026-02-01"]
    assert [e.artifact for e in cat.entries("fam")] == ["tpm-2026-03-01", "tpm-2026-04-01"]
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["tpm-2026-03-01", "tpm-2026-04-01"]


class Cadenced(Method):
    """A monthly stage and a daily stage reading the monthly stage's latest artifact."""

    name = "cadenced_toy"

    @property
    def stages(self):
        return [Stage("monthly", ("source",), window=Window(-1), keep_last=1),
                Stage("daily", ("target",), window=Window(-7, 0, "day"),
                      inputs={"monthly": Input("monthly", latest=True)})]


@pytest.fixture
def cadenced(monkeypatch, tiny_data, tmp_path):
    monkeypatch.setitem(METHODS, Cadenced.name, Cadenced)
    return from_dict({"data": tiny_data, "method": Cadenced.name, "storage": str(tmp_path / "runs")})


def test_keys_follow_as_of_and_latest_inputs_read_the_catalog(cadenced):
    method = get_method(cadenced.method)
    nov, dec = (pipeline.resolve_stages(cadenced.with_overrides({"as_of": d}), method)
                for d in ("2026-11-01", "2026-12-01"))
    assert nov["monthly"].key != dec["monthly"].key and nov["monthly"].family == dec["monthly"].family
    assert nov["daily"].inputs == {"monthly": None}  # nothing in the catalog yet
    cfg = cadenced.with_overrides({"as_of": "2026-11-08"})
    with pytest.raises(pipeline.PipelineError, match="input 'monthly' needs the latest artifact of stage 'monthly' "
                                                     "valid as of 2026-11-08"):
        pipeline.local_inputs(cfg, method.stage("daily"), pipeline.resolve_stages(cfg, method)["daily"])
    cat = pipeline.catalog(cfg)
    for as_of, r in (("2026-11-01", nov), ("2026-12-01", dec)):
        cat.record(r["monthly"].family, pipeline.artifact_name(method.stage("monthly"), r["monthly"].key),
                   pipeline.stage_dir(cfg, method.stage("monthly"), r["monthly"].key), as_of)
    week1, week2 = (pipeline.resolve_stages(cfg.with_overrides({"as_of": d}), method)["daily"]
                    for d in ("2026-11-08", "2026-11-09"))
    assert week1.inputs["monthly"] == pipeline.stage_dir(cfg, method.stage("monthly"), nov["monthly"].key)
    assert week1.key != week2.key and week1.family == week2.family  # another day, same monthly artifact
    later = pipeline.resolve_stages(cfg.with_overrides({"as_of": "2026-12-02"}), method)["daily"]
    assert later.inputs["monthly"].endswith(dec["monthly"].key)  # a later date picks the newer artifact
    again = pipeline.resolve_stages(cfg.with_overrides({"as_of": "2026-11-08"}), method)["daily"]
    assert again == week1  # the same date resolves to the same artifact: a re-run is skipped


def test_a_window_needs_as_of_and_a_time_field(cadenced, tiny_data):
    method = get_method(cadenced.method)
    ds = CTRDataset.load(tiny_data)
    with pytest.raises(SpecError, match="stage 'monthly' of 'cadenced_toy' reads a time window relative to as_of"):
        pipeline.check_stage_inputs(cadenced, ds, method, method.stage("monthly"))
    pipeline.check_stage_inputs(cadenced.with_overrides({"as_of": "2026-11-01"}), ds, method, method.stage("daily"))
    with pytest.raises(SpecError, match="as_of: '2026-13-01' is not a date"):
        cadenced.with_overrides({"as_of": "2026-13-01"})


# ---- driver-side checks, layers ----

def test_backend_and_optimizer_mismatches_fail_on_the_driver(tiny_data):
    base = {"data": tiny_data, "method": "target_only"}
    with pytest.raises(SpecError, match="'rowwise_adagrad' is not offered by the local .* needs "
                                        "model.embedding_backend: torchrec"):
        from_dict({**base, "train": {"sparse_optimizer": "rowwise_adagrad"}})
    with pytest.raises(SpecError, match="'adam' runs on GPUs only under the torchrec"):
        from_dict({**base, "model": {"embedding_backend": "torchrec"}})
    with pytest.raises(SpecError, match="'sgd' is not offered by the torchrec"):
        from_dict({**base, "model": {"embedding_backend": "torchrec"}, "train": {"sparse_optimizer": "sgd"}})
    from_dict({**base, "model": {"embedding_backend": "torchrec"}, "train": {"sparse_optimizer": "rowwise_adagrad"}})


def test_self_attention_pooling_is_a_masked_mean_over_a_set():
    torch.manual_seed(0)
    pool = SelfAttentionPooling(8, heads=2).eval()
    e = torch.randn(4, 3, 8)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    out = pool(e, mask)
    assert out.shape == (4, 8) and torch.equal(out[3], torch.zeros(8))  # nothing real: zeros
    other = e.clone()
    other[~mask] = 100.0  # masked positions change nothing
    assert torch.allclose(pool(other, mask), out, atol=1e-6)
    perm = e[:, [2, 0, 1]]  # a set: the order of its members does not matter
    assert torch.allclose(pool(perm)[0], pool(e)[0], atol=1e-6)
    att, _ = pool.attention(e[1:2, :2], e[1:2, :2], e[1:2, :2])  # eq. 3 on row 1's two real vectors
    assert torch.allclose(out[1], att[0].mean(0), atol=1e-6)


def test_target_attention_and_glu_match_their_formulas():
    torch.manual_seed(0)
    e, q = torch.randn(2, 4, 6), torch.randn(2, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    att = TargetAttention(6, hidden=(8,))
    a = att.score(torch.cat([e, q[:, None].expand_as(e), e - q[:, None], e * q[:, None]], -1)).squeeze(-1)
    assert torch.allclose(att(e, q, mask), (a * mask).unsqueeze(-1).mul(e).sum(1), atol=1e-6)  # DIN: raw scores
    soft = TargetAttention(6, hidden=(8,), softmax=True)
    soft.load_state_dict(att.state_dict())
    w = torch.softmax(a.masked_fill(~mask, float("-inf")), 1)
    assert torch.allclose(soft(e, q, mask), (w.unsqueeze(-1) * e).sum(1), atol=1e-6)
    glu = GLU(6, 3)
    x = torch.randn(5, 6)
    assert torch.allclose(glu(x), (x @ glu.value.weight.T + glu.value.bias) * torch.sigmoid(glu.gate(x)))


def test_discounted_return_accumulates_and_resumes():
    g = DiscountedReturn(0.8)
    for r in (1.0, 2.0, -1.0):
        g.add(r)
    assert g.value.item() == pytest.approx((1.0 * 0.8 + 2.0) * 0.8 - 1.0)
    copy = DiscountedReturn(0.8)
    copy.load_state_dict(g.state_dict())  # a buffer: it is checkpointed with the model
    assert copy.pop() == pytest.approx(1.24) and copy.value.item() == 0.0


def test_stage_context_holds_each_input_state_by_name(tiny_data, tmp_path):
    _, specs = tiny_specs(tiny_data)
    state = build_model(list(specs.values()), MCFG).state_dict()
    torch.save(state, tmp_path / "p.pt")
    m = get_method("finetune")
    _, ctx = build_stage_model(m, m.stage("finetune"), specs, MCFG, str(tmp_path / "p.pt"))
    assert isinstance(ctx, StageContext) and set(ctx.inputs) == {"pretrain"}
    assert all(torch.equal(ctx.inputs["pretrain"][k], v) for k, v in state.items())


class HalfWeighted(StageHooks):
    """Per-row weights on the source's loss: its rows count half, the target's fully."""

    def weights(self, model, batch, ctx):
        return torch.full_like(batch.label, 0.5) if batch.domain == "source" else None


def test_per_row_weights_scale_a_domains_loss(tiny_data):
    ds, specs = tiny_specs(tiny_data)
    batches = {d: first_rows(ds, d, 32) for d in ("source", "target")}
    m = toy_method(HalfWeighted(), domains=("source", "target"))
    torch.manual_seed(0)
    model, ctx = build_stage_model(m, m.stages[0], specs, MCFG)
    got = ctx.stage.hooks.loss(model, batches, ctx)
    plain = {d: bce(model(b), b.label) for d, b in batches.items()}
    assert torch.allclose(got, 0.5 * plain["source"] + plain["target"])


def test_embedding_l2_penalises_the_rows_a_step_looks_up(tiny_data):
    """The penalty is ½·λ·Σ‖e‖² of the vectors the main loss looked up (not of the evaluation's, nor of frozen
    tables); a step with it shrinks the looked-up rows more than a step without, and moves no other row."""
    ds, specs = tiny_specs(tiny_data)
    batch = first_rows(ds, "target", 64)
    m = toy_method(StageHooks())
    tc = TrainConfig(lr=1e-3, sparse_lr=0.05, sparse_optimizer="sgd")
    stepped = {}
    for weight in (0.0, 50.0):
        torch.manual_seed(0)
        model, ctx = build_stage_model(m, m.stages[0], specs, MCFG)
        reg = EmbeddingL2(model, weight)
        with torch.no_grad():
            looked_up = model.embedding(batch)
        expected = 0.5 * weight * sum((v ** 2).sum() for v in looked_up.values())
        with reg.recording():
            ctx.stage.hooks.loss(model, {"target": batch}, ctx)
        with torch.no_grad():
            model(batch)  # outside the recording (an evaluation): not penalised
        assert torch.allclose(reg.penalty(), expected) and reg.penalty() == 0  # the record is cleared once read
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_step(model, ctx, {"target": batch}, make_optimizers(model, tc, ctx),
                   GradientSync(model, exclude=set()), reg if weight else None)
        stepped[weight] = (before, model.state_dict())
    (before, plain), (_, penalised) = stepped[0.0], stepped[50.0]
    table = next(k for k in before if k.startswith("embedding.tables.") and "item" in k)
    readers = [f.name for f in model.embedding.fields  # every field reading the table (the item and the history)
               if f"embedding.tables.{f.table}.weight" == table and f.name in batch.sparse]
    rows = torch.unique(torch.cat([batch.sparse[f].reshape(-1) for f in readers]))
    rows = rows[rows > 0]
    others = torch.ones(len(before[table]), dtype=torch.bool)
    others[rows] = False
    # the rows read as the item itself shrink (one read in a pooled history only is pulled toward a smaller
    # mean, not necessarily toward zero)
    item = next(f.name for f in model.embedding.fields if f.name in readers and f.type != "sequence")
    direct = torch.unique(batch.sparse[item].reshape(-1))
    direct = direct[direct > 0]
    assert (penalised[table][direct].norm(dim=1) < plain[table][direct].norm(dim=1)).all()
    assert torch.equal(penalised[table][others], before[table][others])
