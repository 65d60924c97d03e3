"""Stages on a real local Ray: TorchTrainer per stage, artifacts, resume, freezing, failures."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import local_test_metrics

from raytrain_ctr import pipeline
from raytrain_ctr.config import from_dict, load_config
from raytrain_ctr.data.dataset import CTRDataset, DataError
from raytrain_ctr.methods import get_method
from raytrain_ctr.models.backbones import ModelConfig, build_model
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.state import StateMismatchError, load_filtered


def config(data: str, storage: str, method: str, **kw):
    raw = {"data": data, "method": method, "storage": storage,
           "model": {"backbone": "dcn", "deep": [32, 16], "cross_layers": 2},
           "train": {"epochs": 2, "batch_size": 1024, "workers": 2, "sparse_lr": 0.01}}
    for k, v in kw.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return from_dict(raw)


@pytest.fixture(scope="module")
def finetune_run(tiny_data, ray_local, tmp_path_factory):
    storage = str(tmp_path_factory.mktemp("runs"))
    cfg = config(tiny_data, storage, "finetune")
    return cfg, pipeline.run(cfg)


def test_two_stage_method_on_two_workers(finetune_run):
    cfg, res = finetune_run
    assert set(res) == {"pretrain", "finetune"}
    for stage in res.values():
        assert Path(stage["artifact"], "model.pt").exists() and Path(stage["artifact"], "metrics.json").exists()
        assert stage["test_auc"] > 0.55 and [h["epoch"] for h in stage["history"]] == [0, 1]
        assert all(200 < h["peak_rss_mb"] < 16_384 for h in stage["history"])  # MiB: a torch process, not KiB
    results = json.loads(Path(cfg.storage, cfg.run_name, "results.json").read_text())
    assert results["finetune"]["test_auc"] == res["finetune"]["test_auc"]


def test_metrics_are_exact_over_all_workers(finetune_run, tiny_data):
    """The 2-worker test AUC equals the AUC of the saved model on the whole test split in one process."""
    cfg, res = finetune_run
    local, rows = local_test_metrics(tiny_data, cfg.model, res["finetune"]["artifact"])
    assert res["finetune"]["test_rows"] == rows
    for k in ("auc", "logloss", "gauc"):
        assert res["finetune"][f"test_{k}"] == pytest.approx(local[k], abs=1e-5)


def test_rerun_skips_finished_stages_and_shares_plain_ones(finetune_run, tiny_data):
    cfg, first = finetune_run
    again = pipeline.run(cfg)
    assert again["pretrain"]["skipped"] and again["finetune"]["skipped"]
    assert again["finetune"]["test_auc"] == first["finetune"]["test_auc"]
    # Source-only's training is the same plain stage as Fine-Tune's pre-training: one artifact
    src = pipeline.run(config(tiny_data, cfg.storage, "source_only"))
    assert src["train"]["skipped"] and src["train"]["artifact"] == first["pretrain"]["artifact"]


def test_frozen_tensors_stay_bit_identical(finetune_run, tiny_data):
    cfg, first = finetune_run
    res = pipeline.run(config(tiny_data, cfg.storage, "finetune",
                              method_args={"freeze": ["embedding.*", "backbone.cross.*"]}))
    assert res["pretrain"]["skipped"]  # the same pre-trained model
    before = torch.load(Path(res["pretrain"]["artifact"], "model.pt"))
    after = torch.load(Path(res["finetune"]["artifact"], "model.pt"))
    frozen = [k for k in before if k.startswith(("embedding.", "backbone.cross."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["backbone.head.weight"], after["backbone.head.weight"])


def test_run_one_stage_against_upstream(finetune_run, tiny_data):
    cfg, first = finetune_run
    res = pipeline.run(cfg, stage="finetune")
    assert list(res) == ["finetune"] and res["finetune"]["skipped"]
    res = pipeline.run(cfg, stage="finetune", force=True)
    assert list(res) == ["finetune"] and not res["finetune"].get("skipped")
    assert res["finetune"]["resumed_from_epoch"] is None  # a fresh run, not a restore


def test_missing_upstream_artifact(tiny_data, ray_local, tmp_path):
    cfg = config(tiny_data, str(tmp_path), "l2sp")
    with pytest.raises(pipeline.PipelineError, match="needs the artifact of stage 'pretrain' .* run that stage first"):
        pipeline.run(cfg, stage="finetune")


def test_killed_worker_resumes_from_checkpoint(tiny_data, ray_local, tmp_path):
    cfg = config(tiny_data, str(tmp_path), "target_only", train={"epochs": 3, "fail_once_at_epoch": 1})
    res = pipeline.run(cfg)["train"]
    assert (tmp_path / "_ray").exists() and any((tmp_path / "_ray").rglob("failed-once"))
    assert res["resumed_from_epoch"] == 1  # not from epoch 0
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2]
    assert res["history"][0]["resumed_from_epoch"] is None and res["history"][1]["resumed_from_epoch"] == 1


def test_pretraining_can_keep_its_epoch_on_its_own_domains_validation(tiny_data, ray_local, tmp_path):
    """select_on: train — Source-only keeps the epoch of best *source*-validation AUC (recomputed here from the
    saved model), reports the target's alongside, and is a different stage from the default's."""
    cfg = config(tiny_data, str(tmp_path), "source_only", train={"epochs": 3, "patience": 3, "workers": 1,
                                                                 "select_on": "train"})
    res = pipeline.run(cfg)["train"]
    hist = res["history"]
    assert res["select_on"] == ["source"] and all("select_auc" in h for h in hist)
    best = max(range(len(hist)), key=lambda i: hist[i]["select_auc"])
    assert res["best_epoch"] == hist[best]["epoch"] and res["select_auc"] == hist[best]["select_auc"]
    assert res["valid_auc"] == hist[best]["valid_auc"]  # the target's validation AUC at the kept epoch
    source, _ = local_test_metrics(tiny_data, cfg.model, res["artifact"], "source", "valid")
    assert source["auc"] == pytest.approx(res["select_auc"], abs=1e-6)
    default = cfg.with_overrides({"train.select_on": "eval"})
    method = get_method("source_only")
    assert pipeline.stage_keys(default, method) != pipeline.stage_keys(cfg, method)
    with pytest.raises(SpecError, match="train.select_on: 'source' is not one of"):
        cfg.with_overrides({"train.select_on": "source"})


def test_bad_config_and_method_names(tiny_data, tmp_path):
    with pytest.raises(SpecError, match="unknown method 'finetun'; did you mean 'finetune'"):
        get_method("finetun")
    with pytest.raises(SpecError, match="has no stage 'pretrian'"):
        get_method("finetune").stage("pretrian")
    with pytest.raises(SpecError, match="train: unknown key 'epoch'; did you mean 'epochs'"):
        config(tiny_data, str(tmp_path), "all", train={"epoch": 3})
    with pytest.raises(SpecError, match="unknown key 'pretrian'; did you mean 'pretrain'"):
        get_method("finetune", {"pretrian": "all"})
    with pytest.raises(SpecError, match="'everything' is not one of"):
        pipeline.run(config(tiny_data, str(tmp_path), "finetune", method_args={"pretrain": "everything"}))
    p = tmp_path / "c.yaml"
    p.write_text("base: {data: x, method: all}\nvariants: {a: {modle: {}}}\n")
    with pytest.raises(SpecError, match="unknown key 'modle'; did you mean 'model'"):
        load_config(p, "a")


def test_checkpoint_that_does_not_fit_the_spec(tiny_data):
    ds = CTRDataset.load(tiny_data)
    specs = [ds.domain(d).spec for d in ds.domains]
    small = build_model(specs, ModelConfig(embedding_dim=4)).state_dict()
    with pytest.raises(StateMismatchError, match=r"'embedding.tables.user.weight' has shape \(\d+, 4\) but the model"):
        load_filtered(build_model(specs, ModelConfig(embedding_dim=8)), small, source="old.pt")


def test_keep_plugs_frozen_pretrained_embeddings(finetune_run, tiny_data):
    cfg, first = finetune_run
    res = pipeline.run(config(tiny_data, cfg.storage, "keep"))
    assert res["pretrain"]["skipped"] and res["pretrain"]["artifact"] == first["pretrain"]["artifact"]
    pre = torch.load(Path(res["pretrain"]["artifact"], "model.pt"))
    plug = torch.load(Path(res["plugin"]["artifact"], "model.pt"))
    assert sorted(k for k in plug if k.startswith("plug.")) == ["plug.tables.item.weight", "plug.tables.user.weight"]
    for t in ("user", "item"):
        assert torch.equal(plug[f"plug.tables.{t}.weight"], pre[f"embedding.tables.{t}.weight"])
    assert res["plugin"]["test_auc"] > 0.55


def test_export_and_predict_on_ray_data_reproduce_the_stage(finetune_run, tiny_data, tmp_path, capsys):
    """`raytrain-ctr export` of the finished run, then `predict` over the target test split cut into three
    files of several row groups, on 2 actors: every row written once, with its file and row, and the AUC of
    the written predictions is the stage's reported test AUC."""
    import yaml

    from raytrain_ctr.cli import main
    from raytrain_ctr.train.metrics import auc

    cfg, _ = finetune_run
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"base": cfg.to_dict()}))
    assert main(["export", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "pkg")]) == 0
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    artifact = next(Path(cfg.storage, "stages").glob(manifest["artifact"]))
    reported = json.loads((artifact / "metrics.json").read_text())
    assert manifest["stage"] == "finetune" and manifest["metrics"]["test_auc"] == reported["test_auc"]
    test = pq.read_table(CTRDataset.load(tiny_data).files("target", "test"))
    (tmp_path / "in").mkdir()
    n = test.num_rows
    cuts = [0, n // 4, 2 * n // 3, n]
    for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        pq.write_table(test.slice(lo, hi - lo), tmp_path / "in" / f"part-{i}.parquet", row_group_size=n // 7)
    assert main(["predict", "--package", str(tmp_path / "pkg"), "--input", str(tmp_path / "in"),
                 "--out", str(tmp_path / "out"), "--workers", "2", "--carry", "label", "user_id"]) == 0
    assert "row groups" in capsys.readouterr().out
    out = pq.read_table(tmp_path / "out")
    assert out.num_rows == test.num_rows
    seen = sorted(zip(out.column("file").to_pylist(), out.column("row").to_pylist()))
    expected = sorted((str(tmp_path / "in" / f"part-{i}.parquet"), r)
                      for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])) for r in range(hi - lo))
    assert seen == expected  # every row exactly once
    assert auc(out.column("label").to_numpy(), out.column("pctr").to_numpy()) == pytest.approx(
        reported["test_auc"], abs=1e-6)
    assert main(["predict", "--package", str(tmp_path / "pkg"), "--input", str(tmp_path / "in"),
                 "--out", str(tmp_path / "out")]) == 2  # never appended to an earlier output


def test_a_bad_value_in_a_streamed_split_stops_the_stage_by_name(tiny_data, ray_local, tmp_path):
    """Streamed through Ray Data (no driver-side cache), a label of 2 in the target's train split stops the
    stage at the worker's first bad batch; the error names the file, row, column and rule, and nothing is cached."""
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(tiny_data, data)
    file = CTRDataset.load(data).files("target", "train")[0]
    table = pq.read_table(file)
    labels = table.column("label").to_pylist()
    labels[5] = 2
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa.array(labels, table.schema.field("label").type)), file)
    cfg = config(data, str(tmp_path / "runs"), "target_only", train={"epochs": 1, "cache_mb": 0, "max_failures": 0})
    with pytest.raises(DataError, match=rf"{file}: column 'label': label 2 outside \{{0, 1\}} \(1 rows, the first at "
                                        r"row 5\) \(a worker stopped at it: domain 'target', train split, a batch"):
        pipeline.run(cfg)
    assert not list((tmp_path / "runs" / "stages").glob("*/model.pt"))


def test_warm_start_keeps_the_new_hyperparameters_over_the_saved_moments(tmp_path):
    """PBT's exploit: the donor's weights, optimizer moments, epoch and history, with the clone's learning rate."""
    from raytrain_ctr.train.checkpoint import ORIGIN_FILE, STATE_FILE, training_state, warm_start

    torch.manual_seed(0)
    donor = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(donor.parameters(), lr=0.1)
    donor(torch.randn(8, 4)).sum().backward()
    opt.step()
    best = {"auc": 0.7, "valid_auc": 0.7, "epoch": 1, "state": donor.state_dict(), "bad": 0}
    meta, _ = training_state(donor, [opt], 1, best, [{"epoch": 0}, {"epoch": 1}], step=5)
    torch.save(meta, tmp_path / STATE_FILE)
    with pytest.raises(SpecError, match=f"not an epoch checkpoint of a stage .*{ORIGIN_FILE}"):
        warm_start(torch.nn.Linear(4, 1), [], tmp_path)
    (tmp_path / ORIGIN_FILE).write_text(json.dumps({"artifact": "plain-abc", "epoch": 1}))
    clone = torch.nn.Linear(4, 1)
    clone_opt = torch.optim.Adam(clone.parameters(), lr=0.5, betas=(0.8, 0.9))
    saved = warm_start(clone, [clone_opt], tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), donor.state_dict().values()))
    assert saved["epoch"] == 1 and saved["step"] == 5 and len(saved["history"]) == 2
    group = clone_opt.param_groups[0]
    assert group["lr"] == 0.5 and group["betas"] == (0.8, 0.9)  # the clone's values, not the donor's 0.1
    for p, q in zip(clone.parameters(), donor.parameters()):
        assert torch.equal(clone_opt.state[p]["exp_avg"], opt.state[q]["exp_avg"])


def test_a_stage_warm_started_from_another_runs_epoch_continues_it(tiny_data, ray_local, tmp_path):
    """``train.warm_start``: a 3-epoch run started from a 2-epoch run's last epoch checkpoint trains epoch 2 alone
    and ends where an uninterrupted 3-epoch run ends; its key is the checkpoint's origin (a copy elsewhere is
    the same stage), and a checkpoint of another stage is refused before training."""
    import shutil

    cfg = config(tiny_data, str(tmp_path), "target_only", train={"workers": 1, "deterministic": True})
    first = pipeline.run(cfg)["train"]
    epoch1 = [p.parent for p in (tmp_path / "_ray").rglob("origin.json")
              if json.loads(p.read_text())["epoch"] == 1]
    assert len(epoch1) == 1
    longer = cfg.with_overrides({"train.epochs": 3})
    warm = pipeline.run(longer.with_overrides({"train.warm_start": str(epoch1[0])}))["train"]
    whole = pipeline.run(longer)["train"]
    assert (warm["warm_start"]["artifact"], warm["warm_start"]["epoch"]) == (Path(first["artifact"]).name, 1)
    assert warm["resumed_from_epoch"] == 2 and [h["epoch"] for h in warm["history"]] == [0, 1, 2]
    assert [h["valid_auc"] for h in warm["history"][:2]] == [h["valid_auc"] for h in first["history"]]
    assert warm["history"][2]["valid_auc"] == pytest.approx(whole["history"][2]["valid_auc"], abs=1e-9)
    assert warm["test_auc"] == pytest.approx(whole["test_auc"], abs=1e-9)
    assert len({warm["artifact"], whole["artifact"], first["artifact"]}) == 3
    copy = shutil.copytree(epoch1[0], tmp_path / "elsewhere")
    method = get_method("target_only")
    assert (pipeline.stage_keys(longer.with_overrides({"train.warm_start": str(copy)}), method)
            == pipeline.stage_keys(longer.with_overrides({"train.warm_start": str(epoch1[0])}), method))
    with pytest.raises(SpecError, match=r"stage 'finetune': train.warm_start .* is a checkpoint of plain-\w+ \(stage "
                                        r"\['train', 'target', 'target'\]\), not of this stage \(its artifacts are "
                                        r"finetune-KEY"):
        pipeline.run(config(tiny_data, str(tmp_path), "finetune",
                            stage_train={"finetune": {"warm_start": str(epoch1[0])}}), stage="finetune")
