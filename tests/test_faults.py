"""Faults that lose nothing, injected end to end: a crash during the artifact commit, two runs at once on one
storage, a damaged artifact or checkpoint, a stage resumed on another worker count, and a driver killed
mid-stage on S3 storage (a real S3 server on loopback) and resubmitted."""

import json
import os
import re
import signal
import struct
import time
from pathlib import Path

import boto3
import pytest
import yaml
from helpers import MODEL, cli, finish, write_config

from raytrain_ctr import pipeline
from raytrain_ctr.artifacts import ArtifactError, verify
from raytrain_ctr.cli import main
from raytrain_ctr.config import from_dict
from raytrain_ctr.data.dataset import resolve


def results(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def tensorboard_scalars(logdir: Path) -> dict[str, list[float]]:
    """Every scalar in the TensorBoard event files under ``logdir``, by tag, in step order (TFRecord framing:
    length, its CRC, the ``Event`` proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                found.setdefault(v.tag, []).append((event.step, v.simple_value))
    return {tag: [v for _, v in sorted(points)] for tag, points in found.items()}


@pytest.mark.parametrize("backend", ["local", "torchrec"])
def test_a_stage_resumes_on_another_worker_count(tiny_data, ray_local, tmp_path, backend, capsys):
    """Two workers stop after epoch 0 (a worker dies, no retries left); the stage resumes on one worker from the
    epoch-0 checkpoint (sharded tables re-sharded by DCP on load) and finishes. Then its files are damaged."""
    model = {**MODEL, "embedding_backend": backend, **({"sharding": {"item": "row_wise"}} if backend == "torchrec"
                                                       else {})}
    train = {"epochs": 2, "batch_size": 2048, "workers": 2, "sparse_lr": 0.05, "max_failures": 0,
             "fail_once_at_epoch": 1, **({"sparse_optimizer": "adagrad"} if backend == "torchrec" else {})}
    cfg = from_dict({"data": tiny_data, "method": "target_only", "storage": str(tmp_path), "model": model,
                     "train": train})
    with pytest.raises(Exception):  # noqa: B017 - Ray's own error for a worker group out of retries
        pipeline.run(cfg)
    assert not list((tmp_path / "stages").glob("*/manifest.json"))
    one = cfg.with_overrides({"train.workers": 1, "train.max_failures": 3})
    res = pipeline.run(one)["train"]
    assert res["resumed_from_epoch"] == 1 and [h["epoch"] for h in res["history"]] == [0, 1]
    assert res["history"][0]["resumed_from_epoch"] is None and res["test_auc"] > 0.6
    if backend == "local":
        damaged_files_are_named(one, tmp_path, Path(res["artifact"]))


def damaged_files_are_named(cfg, storage: Path, art: Path) -> None:
    """A committed artifact truncated afterwards, and damaged epoch checkpoints: each a clear error naming the
    file and the command that rebuilds it, never a pickle traceback."""
    started = "raytrain-ctr run --config c.yaml"
    rebuild = re.escape(f"{started} --stage train --force")
    (art / "model.pt").write_bytes((art / "model.pt").read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=rf"{art}/model.pt has 1000 bytes where its manifest says \d+ "
                                            rf"\(truncated or rewritten\); rebuild it: {rebuild}"):
        pipeline.run(cfg, command=started)
    assert main(["runs", str(storage)]) == 2  # and the listing says which
    (art / "manifest.json").unlink()  # unfinished: the next run restores the stage's last checkpoint, damaged
    for f in [*(storage / "_ray").rglob("state.pt"), *(storage / "_ray").rglob("model.pt")]:
        f.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=rf"{storage}/_ray/workers-[^/]+/{art.name}\.1\.\d+/.*\.pt: cannot be "
                                            rf"loaded .*{rebuild}"):
        pipeline.run(cfg.with_overrides({"train.max_failures": 0}), command=started)


def s3_location(uri: str) -> tuple[str, str]:
    """The bucket and the key prefix of an ``s3://`` URI."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix


def s3_json(uri: str) -> dict:
    bucket, key = s3_location(uri)
    return json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def s3_objects(uri: str) -> list[str]:
    bucket, prefix = s3_location(uri)
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def registered_checkpoint(uri: str, artifact: str) -> bool:
    """Whether a checkpoint of the stage is named in its pointer (``_ray/ARTIFACT/latest.json``): a checkpoint's
    files in the bucket are not yet one a resubmitted run resumes from (the controller names it after the upload)."""
    return any(k.endswith("/latest.json") and k.split("/")[-2].startswith(artifact) for k in s3_objects(uri))


def download(uri: str, to: Path) -> Path:
    bucket, prefix = s3_location(uri)
    for key in s3_objects(uri):
        if key.endswith("/"):  # a directory marker (pyarrow writes them), not a file
            continue
        (to / key).parent.mkdir(parents=True, exist_ok=True)
        boto3.client("s3").download_file(bucket, key, str(to / key))
    return to / prefix


def test_on_s3_nothing_finished_is_lost(bucket, tmp_path, capsys):
    """Data and storage in a bucket of the loopback S3 server, credentials from the environment only: synth
    writes there, validate and training read from there; artifacts, manifests, leases, TensorBoard events and
    Ray Train checkpoints go there. (1) After the pre-training (tracked), the driver is killed (its whole
    process group) mid-way through Fine-Tune's second stage; (2) the resubmitted run skips the pre-training,
    resumes Fine-Tune from its last checkpoint in the bucket and dies while committing it (after its first
    file); (3) two runs start at once: one commits the stage from the finished Ray Train checkpoint, the other
    waits for the S3 lease and skips it. Then a damaged upstream artifact is named before any worker starts."""
    data, storage = f"{bucket}/data", f"{bucket}/runs"
    assert main(["synth", "--preset", "tiny", "--out", data, "--rows", "20000", "--parallelism", "1"]) == 0
    assert any(k.endswith(".parquet") for k in s3_objects(data)) and not Path("s3:").exists()
    capsys.readouterr()
    assert main(["validate", data]) == 0 and "target" in capsys.readouterr().out
    cfg_path = write_config(tmp_path / "c.yaml", data, storage, "finetune", epochs=3)
    mlruns = tmp_path / "mlruns"

    code, _, err = finish(cli("run", "--config", str(cfg_path), "--stage", "pretrain",
                              f"--set=train.mlflow=file://{mlruns}", env={"MLFLOW_ALLOW_FILE_STORE": "true"}))
    assert code == 0, err
    pretrain = next(k.split("/")[2] for k in s3_objects(f"{storage}/stages") if "/plain-" in k)
    history = s3_json(f"{storage}/stages/{pretrain}/metrics.json")["history"]
    for h in history:  # tracking: the driver's progress line, TensorBoard events in the bucket, MLflow
        assert re.search(rf"stage pretrain epoch {h['epoch'] + 1}/3: [\d,]+ rows/s, train loss [\d.]+, valid AUC "
                         rf"{h['valid_auc']:.4f} \(best [\d.]+\), peak RSS {h['peak_rss_mb']:,.0f} MiB a worker, ETA",
                         err), err
    events = download(f"{storage}/tensorboard/{pretrain}", tmp_path / "tb")
    assert tensorboard_scalars(events)["valid_auc"] == [pytest.approx(h["valid_auc"]) for h in history]
    (run,) = [t.parent.parent for t in mlruns.rglob("tags/mlflow.runName") if t.read_text() == pretrain]
    lines = (run / "metrics" / "valid_auc").read_text().splitlines()  # MLflow's file store: "time value step"
    assert [float(line.split()[1]) for line in lines] == [pytest.approx(h["valid_auc"]) for h in history]

    # Fine-Tune's worker stalls 5 s at its second epoch's first step (then dies once): the kill lands mid-stage,
    # once the first epoch's checkpoint is registered and named in the stage's pointer
    driver = cli("run", "--config", str(cfg_path), "--set=train.fail_once_at_epoch=1")
    deadline = time.monotonic() + 900
    while not registered_checkpoint(f"{storage}/_ray", "finetune-"):
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started: nothing cleans up
    driver.communicate()
    committed = {k.split("/")[2] for k in s3_objects(f"{storage}/stages") if k.endswith("manifest.json")}
    assert committed == {pretrain}  # the pre-training, not Fine-Tune

    code, out, err = finish(cli("run", "--config", str(cfg_path), env={"RAYTRAIN_CTR_FAULT": "commit"}))
    assert code == 3, err
    (finetune,) = {k.split("/")[2] for k in s3_objects(f"{storage}/stages") if "/finetune-" in k}
    assert main(["runs", storage]) == 0
    assert f"| {finetune} | unfinished (no manifest) |" in capsys.readouterr().out

    first, second = (cli("run", "--config", str(cfg_path)) for _ in range(2))
    (c1, o1, e1), (c2, o2, e2) = finish(first), finish(second)
    assert c1 == 0 and c2 == 0, e1 + e2
    r1, r2 = results(o1), results(o2)
    assert r1["pretrain"]["skipped"] and r2["pretrain"]["skipped"]
    assert sorted([bool(r1["finetune"].get("skipped")), bool(r2["finetune"].get("skipped"))]) == [False, True]
    assert "waiting for it" in e1 + e2  # the second waited for the first's lease
    res = r1["finetune"]
    assert res["test_auc"] == r2["finetune"]["test_auc"] > 0.6
    assert res["resumed_from_epoch"] >= 1  # resumed from the killed driver's checkpoint, never from scratch
    keys = s3_objects(f"{storage}/stages")
    assert sum(k.endswith("manifest.json") for k in keys) == 2
    assert set(verify(*resolve(f"{storage}/stages/{finetune}"), "rebuild").files) >= {"model.pt", "metrics.json"}
    assert not s3_objects(f"{storage}/locks")  # every lease released
    assert main(["runs", storage]) == 0
    assert re.search(rf"\| {finetune} \| committed \| .* \| {res['test_auc']:.4f} \|", capsys.readouterr().out)

    cfg = from_dict(yaml.safe_load(cfg_path.read_text())["base"])
    upstream = next(k for k in keys if "/plain-" in k and k.endswith("model.pt"))
    boto3.client("s3").put_object(Bucket=s3_location(bucket)[0], Key=upstream, Body=b"truncated")
    with pytest.raises(ArtifactError, match=rf"{bucket}/runs/stages/{pretrain}/model.pt has 9 bytes"):
        pipeline.run(cfg, stage="finetune", force=True)  # named before any worker starts


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tiny_data, tmp_path):
    """Ctrl-C (SIGINT) to ``raytrain-ctr tune`` once its first trial finished, then the same command again: the
    finished trial is kept as it was (not re-run), the others run (or are stopped by ASHA), and the table has
    every trial."""
    config = write_config(tmp_path / "exp.yaml", tiny_data, str(tmp_path / "runs"), "target_only", epochs=2)
    space = tmp_path / "space.yaml"
    # five trials, one at a time: on a loaded machine the driver notices the first one's end late (its
    # result.json is flushed in batches), and the interrupt must still land before the last one ends
    space.write_text(yaml.safe_dump({"train.lr": {"grid": [0.001, 0.002, 0.003, 0.004, 0.005]}}))
    args = ("tune", "--config", str(config), "--space", str(space), "--samples", "1", "--max-concurrent", "1",
            "--out", str(tmp_path / "tune"))
    experiment = tmp_path / "tune" / "tune-target_only"

    def finished() -> dict[str, str]:  # trial directory → its result.json, for trials that made their final report
        return {p.parent.name: p.read_text() for p in experiment.glob("*/result.json") if '"test_auc"' in p.read_text()}

    proc = cli(*args)
    deadline = time.monotonic() + 900
    while not finished() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    assert proc.poll() is None, ("the sweep ended before it could be interrupted", finish(proc)[2][-3000:])
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    before = finished()
    assert 1 <= len(before) < 5, (code, err[-2000:])
    # not a finished sweep of fewer trials: a benchmark would go on to its next entry on an unequal budget
    assert code != 0 and re.search(r"was interrupted with \d of its 5 trials finished; the same command resumes it",
                                   err), (code, err[-2000:])
    code, out, err = finish(cli(*args))
    assert code == 0, err[-3000:]
    after = {p.parent.name: p.read_text() for p in experiment.glob("*/result.json")}
    assert len(after) == 5 and {k: after[k] for k in before} == before  # the finished trials untouched
    table = (tmp_path / "tune" / "tune_results.md").read_text()
    assert sum(line.startswith("| 0.") for line in table.splitlines()) == 5
