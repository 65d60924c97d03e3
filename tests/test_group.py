"""One worker group for many stages (``raytrain_ctr.train.group``) on a real local Ray: a method's stages and a
leaderboard's runs train in one Ray Train run, equal to a stage's own run; committed stages are skipped; a
worker killed mid-stage is restarted onto the stage it was on and resumes it; a stage needing other workers gets
another group."""

import json
from pathlib import Path

import pytest
from ray.train import TrainingFailedError, UserCallback

from raytrain_ctr import pipeline
from raytrain_ctr.config import from_dict
from raytrain_ctr.train.group import SharedWorkerGroup


def config(data: str, storage: Path, method: str, **train):
    return from_dict({"data": data, "method": method, "storage": str(storage),
                      "model": {"backbone": "dcn", "deep": [32, 16], "cross_layers": 2},
                      "train": {"epochs": 2, "batch_size": 1024, "workers": 1, "sparse_lr": 0.01, **train}})


def group_runs(storage: Path) -> list[Path]:
    """The Ray Train runs of shared worker groups under ``storage``."""
    return sorted((storage / "_ray").glob("workers-*"))


def test_stages_and_runs_share_one_worker_group_and_equal_their_own_runs(tiny_data, ray_local, tmp_path):
    with SharedWorkerGroup() as group:
        ft = pipeline.run(config(tiny_data, tmp_path, "finetune"), group=group)
        seeds = [pipeline.run(config(tiny_data, tmp_path, "target_only", seed=s), group=group)["train"]
                 for s in (1, 2)]
        again = pipeline.run(config(tiny_data, tmp_path, "finetune"), group=group)
    assert len(group_runs(tmp_path)) == 1  # four stages, one Ray Train run
    assert again["pretrain"]["skipped"] and again["finetune"]["skipped"]
    assert ft["finetune"]["test_auc"] > 0.55
    assert seeds[0]["test_auc"] != seeds[1]["test_auc"]  # each run its own seed: a stage is not mistaken for another
    for stage in [*ft.values(), *seeds]:
        pointer = json.loads((tmp_path / "_ray" / Path(stage["artifact"]).name / "latest.json").read_text())
        assert pointer["run"] == group_runs(tmp_path)[0].name and pointer["epoch"] == 1
        assert pointer["checkpoint"].startswith(f"{pointer['run']}/{Path(stage['artifact']).name}.1.")

    own = tmp_path / "own"
    # given a callback (here Ray Train's no-op base class), a stage trains in its own fit: Tune's path
    alone = pipeline.run(config(tiny_data, own, "target_only", seed=1), callbacks=[UserCallback()])["train"]
    assert not group_runs(own)
    for k in ("test_auc", "test_logloss", "test_gauc", "best_epoch"):
        assert alone[k] == pytest.approx(seeds[0][k], abs=1e-6)
    assert [h["train_loss"] for h in alone["history"]] == pytest.approx([h["train_loss"] for h in seeds[0]["history"]])


def test_a_worker_killed_mid_stage_resumes_the_stage_on_the_restarted_group(tiny_data, ray_local, tmp_path):
    """Both Fine-Tune stages lose a worker mid-way through epoch 1 (once each), each surviving one failure
    (``max_failures: 1``) as in a run of its own: Ray Train restarts the group in the pre-training, which takes the
    stage again and resumes it from its epoch-0 checkpoint; the fine-tuning's failure is its run's second, so the
    run ends and the stage goes on, from its checkpoint, on a new group."""
    cfg = config(tiny_data, tmp_path, "finetune", epochs=3, workers=2, fail_once_at_epoch=1, max_failures=1)
    res = pipeline.run(cfg)
    assert len(group_runs(tmp_path)) == 2 and len(list((tmp_path / "_ray").rglob("failed-once"))) == 2
    for stage in res.values():
        assert stage["resumed_from_epoch"] == 1 and [h["epoch"] for h in stage["history"]] == [0, 1, 2]
        assert stage["history"][0]["resumed_from_epoch"] is None and stage["test_auc"] > 0.55
    pointers = [json.loads((tmp_path / "_ray" / Path(r["artifact"]).name / "latest.json").read_text())
                for r in res.values()]
    assert [p["run"] for p in pointers] == [g.name for g in group_runs(tmp_path)]  # pre-training: the first run


def test_a_stage_on_other_workers_gets_another_group_and_a_fresh_one_resumes_nothing(tiny_data, ray_local,
                                                                                        tmp_path):
    """A forced (fresh) stage does not resume the latest checkpoint an earlier run left; a stage that needs two
    workers after one that needed one: the first group ends, a second starts. A failed stage ends its group and
    the next run resumes it from the latest checkpoint that group wrote."""
    one = config(tiny_data, tmp_path, "target_only", epochs=2)
    with SharedWorkerGroup() as group:
        first = pipeline.run(one, group=group)["train"]
        forced = pipeline.run(one, force=True, group=group)["train"]
        assert len(group_runs(tmp_path)) == 1
        two = pipeline.run(config(tiny_data, tmp_path, "target_only", epochs=2, workers=2, seed=3), group=group)
        assert not two["train"].get("skipped")  # (the worker count is not in a stage's key: another seed)
        assert len(group_runs(tmp_path)) == 2
    assert forced["resumed_from_epoch"] is None and [h["epoch"] for h in forced["history"]] == [0, 1]
    assert forced["test_auc"] == pytest.approx(first["test_auc"], abs=1e-6)

    failing = config(tiny_data, tmp_path / "b", "target_only", epochs=3, fail_once_at_epoch=2, max_failures=0)
    with SharedWorkerGroup() as group:
        with pytest.raises(TrainingFailedError):  # no retry left: not on a new group either
            pipeline.run(failing, group=group)
        res = pipeline.run(failing, group=group)["train"]  # the marker is left: it does not fail again
    assert len(group_runs(tmp_path / "b")) == 2
    assert res["resumed_from_epoch"] == 2 and [h["epoch"] for h in res["history"]] == [0, 1, 2]
