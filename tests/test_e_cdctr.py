"""E-CDCTR: TPM's months never overlap CPM's, the historical embeddings (eqs. 2–3), A-CTR re-initialising
exactly BatchNorm, the merged serving tables, the argument checks, and the three cadenced jobs on a real
local Ray with the tables sharded over 2 workers (a re-run is a no-op, a later date reads the newer
artifact, keep_last prunes, the export of the sharded run equals its model)."""

import datetime as dt
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from helpers import load, spawn

from raytrain_ctr import cadence, pipeline
from raytrain_ctr.config import TrainConfig, from_dict
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.embedding import shard_model, sharded_collections, unsharded_state
from raytrain_ctr.methods import get_method
from raytrain_ctr.methods.e_cdctr import CompleteModel, History, MergedHistory
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.serving import load as load_package
from raytrain_ctr.serving.export import export_package
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.loop import build_stage_model, make_optimizers, train_step
from raytrain_ctr.train.sync import GradientSync
from raytrain_ctr.windows import Window

MCFG = ModelConfig(backbone="dcn", deep=(32, 16), cross_layers=1)
SMALL = {"tpm_months": 2, "snapshots": 2, "history": 2, "tpm_deep": (16,)}
AS_OF = "2025-04-01"  # the fixture's months are January to April 2025: TPM on January and February, CPM in March


@pytest.fixture(scope="module")
def drift(tmp_path_factory) -> str:
    """The 'drift' preset scaled down: four calendar months from January 2025."""
    from raytrain_ctr.data.synth import generate, make_config

    out = str(tmp_path_factory.mktemp("drift") / "data")
    generate(out, make_config("drift", rows=24_000, n_users=1_500, n_target_users=400, n_items=400, months=4,
                              rows_per_shard=6_000), parallelism=1)
    return out


def specs_of(data: str) -> dict:
    ds = CTRDataset.load(data)
    return {d: ds.domain(d).spec for d in ds.domains}


def train(data: str, method, stage: str, inputs: dict | None, path: Path, steps: int = 4, args: dict | None = None):
    """A few in-process steps of one stage on the first rows of its domain; saves and returns the model."""
    st = method.stage(stage)
    torch.manual_seed(0)
    model, ctx = build_stage_model(method, st, specs_of(data), MCFG, inputs)
    opts, sync = make_optimizers(model, TrainConfig(lr=0.01, sparse_lr=0.05), ctx), GradientSync(model)
    rows = load(CTRDataset.load(data), st.train_domains[0], "train")
    for s in range(steps):
        train_step(model, ctx, {st.train_domains[0]: rows.select(slice(256 * s, 256 * s + 256))}, opts, sync)
    torch.save(model.state_dict(), path)
    return model


def test_tpm_months_never_overlap_the_month_cpm_trains_on():
    m = get_method("e_cdctr")
    tpm = [s for s in m.stages if s.name.startswith("tpm.")]
    assert [s.name for s in tpm] == [f"tpm.m{j}" for j in range(6, 0, -1)]
    start = dt.date(2025, 8, 1)
    for day in (start + dt.timedelta(days=i) for i in range(92)):  # a quarter of CPM dates
        tpm_date = day.replace(day=1)  # the latest monthly TPM as of that day
        months = [s.window.dates(tpm_date) for s in tpm]
        assert all(a[1] == b[0] for a, b in zip(months, months[1:]))  # six consecutive months, oldest first
        cpm_start, cpm_end = m.stage("cpm").window.dates(day)
        assert months[-1][1] <= cpm_start and cpm_end == day  # the newest snapshot ends before CPM's month
        assert m.stage("actr").window.dates(day) == (cpm_start, day)
    cpm = m.stage("cpm").inputs
    assert sorted(cpm) == ["m1", "m2", "m3"] and all(i.latest for i in cpm.values())  # the last three snapshots
    assert sorted(m.stage("actr").inputs) == ["cpm"]  # and A-CTR the ones its CPM was trained with
    assert {s.keep_last for s in m.stages} == {1}  # only the newest run of each job is kept
    assert [s.name for s in tpm if s.transient] == ["tpm.m6", "tpm.m5", "tpm.m4"]  # warm-up months: not kept


def test_a_later_date_reads_the_newer_cpm_and_the_same_date_the_same(drift, tmp_path):
    cfg = from_dict({"data": drift, "method": "e_cdctr", "method_args": SMALL, "storage": str(tmp_path)})
    method = get_method("e_cdctr", SMALL)
    cat = pipeline.catalog(cfg)
    made = {}
    for day in ("2025-03-31", "2025-04-07"):  # two Mondays: two weekly CPMs, each with its own TPM
        r = pipeline.resolve_stages(cfg.with_overrides({"as_of": day}), method)
        for name in ("tpm.m2", "tpm.m1", "cpm"):
            cat.record(r[name].family, pipeline.artifact_name(method.stage(name), r[name].key),
                       pipeline.stage_dir(cfg, method.stage(name), r[name].key), day)
        made[day] = r
    tuesday, later = (pipeline.resolve_stages(cfg.with_overrides({"as_of": d}), method)["actr"]
                      for d in ("2025-04-01", "2025-04-08"))
    assert tuesday.inputs["cpm"].endswith(made["2025-03-31"]["cpm"].key)
    assert later.inputs["cpm"].endswith(made["2025-04-07"]["cpm"].key)  # the newer CPM
    assert sorted(later.inputs) == ["cpm"]  # A-CTR reads TPM's snapshots through CPM: the ones CPM was trained with
    cpm = pipeline.resolve_stages(cfg.with_overrides({"as_of": "2025-04-08"}), method)["cpm"]
    assert cpm.inputs["m1"].endswith(made["2025-04-07"]["tpm.m1"].key)  # and CPM the newest TPM
    assert pipeline.resolve_stages(cfg.with_overrides({"as_of": "2025-04-01"}), method)["actr"] == tuesday


def test_history_stacks_the_snapshots_newest_first_and_pools_them(drift):
    specs = list(specs_of(drift).values())
    torch.manual_seed(0)
    h = History.of(specs, MCFG, {**get_method("e_cdctr").args, "history": 3})
    assert [f.name for f in h.fields] == ["user_id", "item_id"] and list(h.snapshots) == ["m1", "m2", "m3"]
    for s in h.snapshots.values():
        torch.nn.init.normal_(s.tables["user"].weight)
    b = load(CTRDataset.load(drift), "target", "test").select(slice(0, 32))
    e = h.stacked(b, h.fields[0])
    ids = b.sparse["user_id"]
    assert e.shape == (32, 3, 16)
    assert all(torch.equal(e[:, j], h.snapshots[f"m{j + 1}"].tables["user"].weight[ids]) for j in range(3))
    out = h(b)
    assert out.shape == (32, h.out_dim) and torch.allclose(out[:, :16], h.pool["user_id"](e))


def test_actr_reinitialises_exactly_batchnorm_and_loads_the_rest(drift, tmp_path):
    m = get_method("e_cdctr", SMALL)
    train(drift, m, "tpm.m2", None, tmp_path / "m2.pt")
    tpm = train(drift, m, "tpm.m1", {"warm": str(tmp_path / "m2.pt")}, tmp_path / "m1.pt")
    snaps = {"m1": str(tmp_path / "m1.pt"), "m2": str(tmp_path / "m2.pt")}
    cpm = train(drift, m, "cpm", snaps, tmp_path / "cpm.pt", steps=6).state_dict()
    bn = {k for k in cpm if ".norm." in k}
    assert bn and any(k.endswith("running_mean") and cpm[k].abs().sum() > 0 for k in bn)  # CPM's statistics moved

    def actr(load_rule: str) -> dict:
        method = get_method("e_cdctr", {**SMALL, "load": load_rule})
        model, _ = build_stage_model(method, method.stage("actr"), specs_of(drift), MCFG,
                                     {"cpm": str(tmp_path / "cpm.pt")})
        return model.state_dict()

    state = actr("all_but_bn")
    fresh = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}
    for k in bn:
        assert torch.all(state[k] == fresh[k.rsplit(".", 1)[1]]), k  # re-initialised
    snapshot_keys = {k for k in state if k.startswith("history.snapshots.")}
    for k in snapshot_keys:  # TPM's, through CPM: history.snapshots.mJ.tables.T.weight = TPM mJ's embedding.tables.T
        j, table = k.split(".")[2], k.split(".")[4]
        tpm_state = torch.load(snaps[j])
        assert torch.equal(state[k], tpm_state[f"embedding.tables.{table}.weight"])
    assert torch.equal(state["history.snapshots.m1.tables.user.weight"],
                       tpm.state_dict()["embedding.tables.user.weight"])
    for k in set(state) - bn - snapshot_keys:
        assert torch.equal(state[k], cpm[k]), k  # everything else is CPM's
    every = actr("all")  # Table 6's "ALL": BatchNorm from CPM too
    assert all(torch.equal(every[k], cpm[k]) for k in bn)
    emb = actr("embeddings")
    assert all(torch.equal(emb[k], cpm[k]) for k in emb if k.startswith("embedding."))
    assert not torch.equal(emb["backbone.head.weight"], cpm["backbone.head.weight"])
    mlp = actr("mlp")
    assert torch.equal(mlp["backbone.head.weight"], cpm["backbone.head.weight"])
    assert not any(torch.equal(mlp[k], cpm[k]) for k in mlp if k.startswith("embedding.tables."))


def sharded_actr_worker(rank: int, world: int, port: int, data: str, inputs: dict, out: str) -> None:
    """A-CTR built from CPM and TPM on 2 workers with every table sharded row-wise, gathered back whole."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = replace(MCFG, embedding_backend="torchrec")
    method = get_method("e_cdctr", SMALL)
    model, _ = build_stage_model(method, method.stage("actr"), specs_of(data), cfg, inputs)
    tables = {t for _, c in sharded_collections(model) for t in c.table_names}
    shard_model(model, world, {t: "row_wise" for t in tables}, 10**9, "adagrad", 0.05)
    state = unsharded_state(model)
    if rank == 0:
        torch.save(state, f"{out}/actr.pt")
    dist.destroy_process_group()


def test_actr_on_two_workers_with_sharded_tables_reinitialises_exactly_batchnorm(drift, tmp_path):
    m = get_method("e_cdctr", SMALL)
    train(drift, m, "tpm.m2", None, tmp_path / "m2.pt")
    train(drift, m, "tpm.m1", {"warm": str(tmp_path / "m2.pt")}, tmp_path / "m1.pt")
    inputs = {"cpm": str(tmp_path / "cpm.pt")}
    snaps = {"m1": str(tmp_path / "m1.pt"), "m2": str(tmp_path / "m2.pt")}
    cpm = train(drift, m, "cpm", snaps, tmp_path / "cpm.pt", steps=6).state_dict()
    spawn(sharded_actr_worker, drift, inputs, str(tmp_path))
    state = torch.load(tmp_path / "actr.pt")
    bn = {k for k in cpm if ".norm." in k}
    fresh = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}
    assert bn and all(torch.all(state[k] == fresh[k.rsplit(".", 1)[1]]) for k in bn)
    tables = {k for k in state if k.startswith("embedding.tables.")}
    assert tables and all(torch.equal(state[k], cpm[k]) for k in tables)  # gathered from the shards: CPM's rows
    tpm = torch.load(snaps["m1"])
    assert torch.equal(state["history.snapshots.m1.tables.item.weight"], tpm["embedding.tables.item.weight"])
    assert all(torch.equal(state[k], cpm[k]) for k in set(state) - bn - tables if not k.startswith("history.snap"))


def test_the_merged_serving_tables_predict_like_the_snapshots(drift, tmp_path):
    m = get_method("e_cdctr", {**SMALL, "history": 1, "snapshots": 1, "tpm_months": 1, "cpm": False})
    train(drift, m, "tpm.m1", None, tmp_path / "m1.pt")
    model = train(drift, m, "actr", {"m1": str(tmp_path / "m1.pt")}, tmp_path / "actr.pt")
    model.eval()
    served = model.served()
    assert isinstance(served.history, MergedHistory) and isinstance(model.history, History)  # the model is untouched
    assert not any("snapshots" in k for k in served.state_dict()) and len(served.history.tables) == 2
    b = load(CTRDataset.load(drift), "target", "test")
    with torch.no_grad():
        assert (model(b) - served(b)).abs().max() <= 1e-5


def test_argument_and_config_errors(drift):
    with pytest.raises(SpecError, match=r"history 4, snapshots 3, tpm_months 6: .*1 ≤ history ≤ snapshots"):
        get_method("e_cdctr", {"history": 4})
    with pytest.raises(SpecError, match="method_args.load: 'bn' is not one of"):
        get_method("e_cdctr", {"load": "bn"})
    with pytest.raises(SpecError, match="unknown key 'tpm_month'; did you mean 'tpm_months'"):
        get_method("e_cdctr", {"tpm_month": 3})
    with pytest.raises(SpecError, match="tpm_fields: \\['user_name'\\] are not sparse fields"):
        CompleteModel(list(specs_of(drift).values()), MCFG,
                      History.of(list(specs_of(drift).values()), MCFG,
                                 {**get_method("e_cdctr").args, "tpm_fields": ("user_name",)}), True)
    cfg = from_dict({"data": drift, "method": "target_only", "as_of": AS_OF, "windows": {"trian": [-1, 0]}})
    method = get_method("target_only")
    with pytest.raises(SpecError, match="windows: unknown key 'trian'; did you mean 'train'"):
        pipeline.check_stage_inputs(cfg, CTRDataset.load(drift), method, method.stages[0])
    with pytest.raises(SpecError, match=r"windows.train: a window is \[start, stop\]"):
        from_dict({"data": drift, "method": "target_only", "windows": {"train": "last month"}})


def window_rows(data: str, domain: str, window: Window, as_of: str, split: str = "train") -> int:
    start, end = window.bounds(dt.date.fromisoformat(as_of))
    ts = pq.read_table(CTRDataset.load(data).files(domain, split), columns=["ts"]).column("ts").to_numpy()
    return int(((ts >= start) & (ts < end)).sum())


def test_the_three_jobs_on_ray_with_sharded_tables(drift, ray_local, tmp_path):
    """The cadence of §3.6.1 over two days from a Monday on 2 workers (torchrec): the first day runs every job,
    the second A-CTR alone against the same CPM and TPM; the warm-up month's snapshot is deleted and a
    re-run is a no-op; keep_last prunes the first A-CTR; each stage read exactly its window's rows;
    the serving package of the sharded run equals its model."""
    args = {**SMALL, "snapshots": 1, "history": 1}  # tpm.m2 only warms tpm.m1 up
    cfg = from_dict({"data": drift, "method": "e_cdctr", "method_args": args, "storage": str(tmp_path / "runs"),
                     "model": {"backbone": "dcn", "deep": [32, 16], "cross_layers": 1, "embedding_backend": "torchrec"},
                     "train": {"epochs": 2, "batch_size": 512, "lr": 0.003, "sparse_lr": 0.05,
                               "sparse_optimizer": "rowwise_adagrad", "workers": 2}})
    events = cadence.simulate(cfg, dt.date(2025, 3, 24), 2)
    assert [(e.day, e.job) for e in events] == [("2025-03-24", "tpm"), ("2025-03-24", "cpm"), ("2025-03-24", "actr"),
                                                 ("2025-03-25", "actr")]
    assert events[0].trained == ["tpm.m2", "tpm.m1"] and events[3].trained == ["actr"]
    assert events[3].reads == events[2].reads  # the same CPM (weekly) and TPM snapshots (monthly)
    assert events[3].reads["cpm"] == events[1].artifacts["cpm"]
    assert events[1].reads["m1"] == events[0].artifacts["tpm.m1"]
    stages = Path(tmp_path / "runs" / "stages")
    assert not (stages / events[2].artifacts["actr"]).exists()  # keep_last 1: the first day's A-CTR is pruned
    assert not (stages / events[0].artifacts["tpm.m2"]).exists() and (stages / events[0].artifacts["tpm.m1"]).exists()
    method, again = get_method("e_cdctr", args), {}
    for day, job in (("2025-03-24", "tpm"), ("2025-03-24", "cpm"), ("2025-03-25", "actr")):
        for name, r in pipeline.run(cfg.with_overrides({"as_of": day}), stage=job).items():
            assert r.get("skipped"), name  # a re-run of a job for its date trains nothing
            if r.get("transient"):
                continue
            st = method.stage(name)
            assert 0 < r["history"][0]["train_rows"] == window_rows(drift, st.train_domains[0], st.window, day), name
            again[name] = r
    actr = again["actr"]
    assert actr["test_auc"] > 0.55 and actr["test_gauc"] > 0.5
    model = CompleteModel(list(specs_of(drift).values()), MCFG,
                          History.of(list(specs_of(drift).values()), MCFG, method.args), True)
    assert list(model.history.snapshots) == ["m1"]
    model.load_state_dict(torch.load(Path(actr["artifact"]) / "model.pt"))
    model.eval()
    package = load_package(export_package(cfg.with_overrides({"as_of": "2025-03-25"}), tmp_path / "package"))
    assert package.manifest["artifact"] == Path(actr["artifact"]).name
    merged = package.manifest["inputs"]["tables"]  # one merged table per side, no snapshot (§3.6.2)
    assert {"history.tables.user_id", "history.tables.item_id"} <= set(merged)
    assert not [t for t in merged if "snapshots" in t]
    ds = CTRDataset.load(drift)
    b = load(ds, "target", "test")
    table = pa.concat_tables(pq.read_table(f) for f in ds.files("target", "test"))
    with torch.no_grad():
        assert np.abs(torch.sigmoid(model(b)).numpy() - package.predict(table)).max() <= 1e-5


def test_data_arriving_after_a_window_leaves_the_stage_keys_as_they_were(drift, tmp_path):
    """The data version in a windowed stage's key covers the files whose time range (Parquet footer
    statistics) meets its windows: tomorrow's files do not turn today's re-run into a new training."""
    import shutil

    import pyarrow as pa

    data = str(tmp_path / "data")
    shutil.copytree(drift, data)
    cfg = from_dict({"data": data, "method": "e_cdctr", "method_args": SMALL, "storage": str(tmp_path / "runs"),
                     "as_of": AS_OF})
    plain = cfg.with_overrides({"method": "target_only", "method_args": {}})

    def keys() -> tuple[dict, dict]:
        return (pipeline.stage_keys(cfg, get_method("e_cdctr", SMALL)),
                pipeline.stage_keys(plain, get_method("target_only")))

    before = keys()
    table = pq.read_table(CTRDataset.load(data).files("target", "train")[0])
    later = table.set_column(table.schema.get_field_index("ts"), "ts",
                             pa.array(table.column("ts").to_numpy() + 86400 * 200))  # months after as_of
    pq.write_table(later, Path(data, "target", "train", "part-later.parquet"))
    after = keys()
    assert after[0] == before[0]  # every E-CDCTR stage reads a window the new file is outside of
    assert after[1] != before[1]  # Target-only without a window reads every row: new data, new key
    pq.write_table(table, Path(data, "target", "train", "part-inside.parquet"))  # rows inside the windows
    assert keys()[0]["actr"] != before[0]["actr"]
