"""Ray Tune over config keys with ASHA, and the multi-seed leaderboard."""

import json
import os

import numpy as np
import pytest
import yaml
from helpers import cli, finish, write_config

from raytrain_ctr.compare import Entry
from raytrain_ctr.config import from_dict
from raytrain_ctr.spec import SpecError
from raytrain_ctr.tune import TuneError, load_space, to_tune, tune_method, tuned_overrides


def base(data: str, storage: str, method: str = "target_only"):
    return from_dict({"data": data, "method": method, "storage": storage,
                      "model": {"backbone": "dcn", "deep": [32], "cross_layers": 1},
                      "train": {"epochs": 2, "batch_size": 1024, "sparse_lr": 0.01}})


def test_entry_parsing():
    e = Entry.parse("finetune:pretrain=all,alpha=0.01")
    assert e.method == "finetune" and e.args == {"pretrain": "all", "alpha": 0.01}
    assert e.label == "finetune(all,alpha=0.01)" and Entry.parse("all").args == {}
    assert Entry.parse("cctl:ren_weight=0").label == "cctl(ren_weight=0)"
    assert Entry.parse("cdanet:mmoe=false").label == "cdanet(mmoe=False)"
    tuned = Entry("l2sp", {"pretrain": "all"}, {"method_args.alpha": 0.05}, tag="alpha=0.05")
    cfg = tuned.config(base("data", "runs"), seed=1)
    assert cfg.method_args == {"pretrain": "all", "alpha": 0.05} and cfg.train.seed == 1
    assert tuned.args == {"pretrain": "all"} and tuned.label == "l2sp(all)[alpha=0.05]"  # the entry untouched


def test_space_checks():
    assert "method_args.alpha" in load_space(None, "l2sp") and "train.lr" in load_space(None, "l2sp")
    with pytest.raises(SpecError, match="expected one of"):
        to_tune({"train.lr": {"logunif": [1, 2]}})


def test_tune_two_trials_with_asha_sharing_the_pretraining(tiny_data, ray_local, tmp_path, monkeypatch):
    """A sweep of Fine-Tune's learning rate tunes the fine-tuning stage alone: both trials read the one
    pre-trained artifact, trained once; ASHA on target-validation AUC; the table lists every trial."""
    from raytrain_ctr import pipeline
    from raytrain_ctr.methods import get_method

    monkeypatch.chdir(tmp_path)  # relative data and storage paths, as a user gives them (trials run elsewhere)
    cfg = base(os.path.relpath(tiny_data), "runs", "finetune").with_overrides({"train.epochs": 3})
    space = {"train.lr": {"grid": [0.001, 0.003]}}  # a grid: exactly these two trials
    trials = tune_method(cfg, space, num_samples=1, max_concurrent=1, out=str(tmp_path / "tune"))
    # both trials report; ASHA may stop the worse one after its first epoch
    assert len(trials) == 2 and trials[0]["valid_auc"] > 0.58 and all(t["valid_auc"] > 0.5 for t in trials)
    assert {t["train.lr"] for t in trials} == {0.001, 0.003} and all(1 <= t["reports"] <= 4 for t in trials)
    assert trials[0]["test_auc"] > 0.55  # the best trial ran to its final report (test metrics, artifact)
    assert trials[0]["valid_auc"] >= trials[1]["valid_auc"]
    table = (tmp_path / "tune" / "tune_results.md").read_text()
    stopped = sum(t["test_auc"] is None for t in trials)
    assert sum(line.startswith("| 0.") for line in table.splitlines()) == 2 and "train.lr" in table
    assert f"2 trials, {stopped} stopped early by ASHA" in table
    method = get_method("finetune")
    keys = [pipeline.stage_keys(cfg.with_overrides(tuned_overrides(cfg, {"train.lr": t["train.lr"]})), method)
            for t in trials]
    assert keys[0]["pretrain"] == keys[1]["pretrain"] == pipeline.stage_keys(cfg, method)["pretrain"]
    assert keys[0]["finetune"] != keys[1]["finetune"]
    stages = sorted(p.name for p in (tmp_path / "runs" / "stages").iterdir())
    assert stages.count(pipeline.artifact_name(method.stage("pretrain"), keys[0])) == 1
    assert sum(name.startswith("plain-") for name in stages) == 1, stages  # no other pre-training
    # a second sweep of the same values on the same storage replays each finished trial's committed stage (a stage
    # ASHA stopped resumes from its last epoch's checkpoint: nothing is lost, and nothing finished is trained again)
    committed = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "stages").rglob("*") if p.is_file()}
    again = tune_method(cfg, space, num_samples=1, max_concurrent=1, out=str(tmp_path / "again"))
    finished = [t for t in trials if t["test_auc"] is not None]
    assert finished and [t for t in again if t["train.lr"] in {f["train.lr"] for f in finished}] == finished
    after = sorted(p.name for p in (tmp_path / "runs" / "stages").iterdir())
    # a resumed trial commits its stage unless ASHA stops it again
    assert set(stages) <= set(after) and len(after) <= len(stages) + len(trials) - len(finished)
    assert {p: p.stat().st_mtime_ns for p in committed} == committed  # no committed stage written again
    with pytest.raises(SpecError, match="unknown key 'lrr'; did you mean 'lr'"):
        tune_method(cfg, {"train.lrr": 0.1}, 1, 1, str(tmp_path / "t2"))
    with pytest.raises(SpecError, match="holds another sweep"):  # not resumed as if it were this one
        tune_method(cfg, {"train.lr": {"grid": [0.002]}}, 1, 1, str(tmp_path / "tune"))


def test_a_sweep_interrupted_before_any_result_stops_the_benchmark_by_name(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C during a benchmark's sweep: Tune returns no trial; the benchmark says which sweep and how to resume
    (it used to fail on an empty list's first element)."""
    from raytrain_ctr import benchmark

    monkeypatch.setattr(benchmark, "tune_method", lambda *a, **k: [])  # what Tune.fit gives after SIGINT, measured
    base = from_dict({"data": tiny_data, "method": "target_only", "storage": str(tmp_path)})
    with pytest.raises(TuneError, match=r"the sweep of finetune\(all\) ended without a trial's result .* the same "
                                        r"command resumes it"):
        benchmark.sweep(base, Entry.parse("finetune:pretrain=all"), 8, 2, str(tmp_path))


def test_the_paired_test_over_seeds():
    from raytrain_ctr.compare import paired_p

    a, b = [0.760, 0.771, 0.765, 0.768, 0.762], [0.755, 0.770, 0.760, 0.761, 0.760]
    diff = [x - y for x, y in zip(a, b)]
    mean, sd = sum(diff) / 5, (sum((d - sum(diff) / 5) ** 2 for d in diff) / 4) ** 0.5
    t = mean / (sd / 5 ** 0.5)
    assert t == pytest.approx(3.651, abs=1e-3)  # the paired t statistic; two-sided p with 4 d.o.f.:
    assert paired_p(a, b) == pytest.approx(0.0217, abs=2e-4)  # between the tables' 0.05 (2.776) and 0.02 (3.747)
    assert paired_p(a, a) is None and paired_p(a[:1], b[:1]) is None


def test_benchmark_protocol(tiny_data, ray_local, tmp_path):
    """Each entry tuned with the same trials, its best configuration re-run over seeds, tested against the
    best baseline; the chosen configuration reproduces its sweep's validation AUC when run alone."""
    import json

    from raytrain_ctr import pipeline
    from raytrain_ctr.benchmark import benchmark

    cfg = base(tiny_data, str(tmp_path / "runs"))
    entries = [Entry.parse("lr"), Entry.parse("target_only")]
    rows = benchmark(cfg, entries, trials=2, seeds=[0, 1], out=str(tmp_path / "bench"), max_concurrent=1,
                     command="raytrain-ctr benchmark …")
    assert [r["entry"] for r in rows] == ["lr", "target_only"]
    assert all(r["n"] == 2 for r in rows)
    best = max(rows, key=lambda r: sum(r["test_auc"]))
    assert min(best["test_auc"]) > 0.6
    assert {r["reference"] for r in rows} == {best["entry"]} and best["p_auc"] is None
    record = json.loads((tmp_path / "bench" / "leaderboard.json").read_text())
    assert record["reference"] == best["entry"] and record["trials"] == 2
    for e in entries:
        chosen = record["chosen"][e.label]
        assert chosen["trials"] == 2 and set(chosen["params"]) >= {"train.lr", "train.sparse_lr"}
        sweep = (tmp_path / "bench" / "tune" / e.label / "tune_results.md").read_text()
        assert "| 0.001 | 0.01 |" in sweep  # the config's own learning rates are one of the trials
    md = (tmp_path / "bench" / "leaderboard.md").read_text()
    assert "chosen configurations" in md and "raytrain-ctr benchmark" in md and "| target_only |" in md and "±" in md
    assert (tmp_path / "bench" / "leaderboard.png").stat().st_size > 5000
    # the winner's configuration, run alone in fresh storage, lands where its sweep said
    chosen = record["chosen"]["target_only"]
    alone = Entry("target_only", {}, tuned_overrides(cfg, chosen["params"])).config(
        cfg.with_overrides({"storage": str(tmp_path / "alone")}))
    final = pipeline.final_metrics(pipeline.run(alone), alone)
    assert final["valid_auc"] == pytest.approx(chosen["valid_auc"], abs=2e-3)


def test_a_sensitivity_study_sweeps_one_key_over_seeds(tiny_data, ray_local, tmp_path):
    """One row per value, each over the seeds, tested against the best value; the figure and the table written;
    a method's studied values by default, and a clear error where it declares none."""
    import json

    from raytrain_ctr.sensitivity import sensitivity, studied_values

    assert studied_values("cdanet", "experts") == [1, 2, 4, 8] and studied_values("cctl", "alpha")[0] == 0.0
    with pytest.raises(SpecError, match="declares no studied values for 'lr'"):
        studied_values("target_only", "lr")
    cfg = base(tiny_data, str(tmp_path / "runs")).with_overrides({"train.epochs": 1})
    rows = sensitivity(cfg, Entry.parse("target_only"), "train.sparse_lr", [0.0005, 0.05], [0, 1], str(tmp_path / "s"))
    assert [r["entry"] for r in rows] == ["target_only[train.sparse_lr=0.0005]", "target_only[train.sparse_lr=0.05]"]
    assert [r["value"] for r in rows] == [0.0005, 0.05] and all(r["n"] == 2 for r in rows)
    low, high = (np.mean(r["test_auc"]) for r in rows)
    assert high > low + 0.02  # a table learning rate 100× lower barely moves the ids in one epoch
    assert rows[1]["p_auc"] is None and rows[0]["reference"] == rows[1]["entry"]
    record = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert record["key"] == "train.sparse_lr" and len(record["runs"]) == 4
    assert (tmp_path / "s" / "sensitivity.png").stat().st_size > 5000


def test_pbt_perturbs_only_what_a_clone_can_continue_with(tiny_data):
    """PBT changes the tuned stage's own keys mid-trial; the tables' width, dropout and a method argument that
    shapes the parameters (SpotTune's policy width) are drawn once per trial."""
    from raytrain_ctr.tune import method_space, mutable_keys

    cfg = base(tiny_data, "runs", "spottune")
    mutable = mutable_keys(cfg, method_space("spottune", {"pretrain": "source"}))
    assert {"train.lr", "train.sparse_lr", "train.batch_size", "method_args.tau"} <= set(mutable)
    assert not {"model.embedding_dim", "model.dropout", "method_args.policy_hidden"} & set(mutable)
    l2sp = mutable_keys(base(tiny_data, "runs", "l2sp"), method_space("l2sp", {"pretrain": "source"}))
    assert "method_args.alpha" in l2sp  # the fine-tuning stage's alone: its pre-training is plain
    with pytest.raises(SpecError, match="PBT needs a key it can change mid-trial"):
        tune_method(cfg, {"model.embedding_dim": {"choice": [8, 16]}}, 2, 2, "unused", scheduler="pbt")


def test_a_pbt_sweep_clones_the_better_trials_into_the_worse(tiny_data, tmp_path):
    """``raytrain-ctr tune --scheduler pbt``: three trials at once, one of them with an embedding learning rate too
    small to learn; a trial PBT exploits continues from the better trial's epoch checkpoint (its committed stage
    says which epoch) with the donor's values, the learning rate perturbed."""
    from raytrain_ctr.tune import exploits

    config = write_config(tmp_path / "exp.yaml", tiny_data, str(tmp_path / "runs"), "target_only", epochs=3,
                          patience=3)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"loguniform": [3e-4, 3e-3]},
                                     "train.sparse_lr": {"grid": [1e-6, 0.01, 0.05]}}))
    code, out, err = finish(cli("tune", "--config", str(config), "--space", str(space), "--samples", "1",
                                "--max-concurrent", "3", "--scheduler", "pbt", "--out", str(tmp_path / "tune")))
    assert code == 0, err[-3000:]
    table = (tmp_path / "tune" / "tune_results.md").read_text()
    assert "3 trials, population-based training" in table and "perturbing train.lr);" in table
    experiment = tmp_path / "tune" / "tune-target_only"
    done = exploits(experiment)
    assert done and f"{len(done)} exploits" in table
    for _, _, _, _, donor, new in done:
        assert new["train.sparse_lr"] == donor["train.sparse_lr"] and new["train.lr"] != donor["train.lr"]
    # (not the trials' result.json: Tune rewrites a restarted trial's, losing its reports before the restart)
    stages = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs" / "stages").glob("*/metrics.json")}
    warm = [m for m in stages.values() if m.get("warm_start")]
    assert warm, "no trial went on from another's checkpoint"
    for m in warm:
        upto, donor = m["warm_start"]["epoch"], stages.get(m["warm_start"]["artifact"])
        assert m["resumed_from_epoch"] == upto + 1 and [h["epoch"] for h in m["history"]] == list(range(3))
        if donor is not None:  # the donor committed under the key it was cloned from: the clone took its epochs
            assert m["history"][:upto + 1] == donor["history"][:upto + 1]
    assert max(m["valid_auc"] for m in stages.values()) > 0.58
