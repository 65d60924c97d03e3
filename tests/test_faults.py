"""Faults that lose nothing, injected end to end: a crash during the artifact commit, two runs at once on one
storage, a damaged artifact or checkpoint, a stage resumed on another worker count, and a driver killed
mid-stage on S3 storage (a real S3 server on loopback) and resubmitted."""

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from raytrain_ctr import pipeline
from raytrain_ctr.artifacts import ArtifactError, read_manifest, verify
from raytrain_ctr.cli import main
from raytrain_ctr.config import from_dict
from raytrain_ctr.data.dataset import resolve

CLI = [sys.executable, "-m", "raytrain_ctr.cli"]
MODEL = {"backbone": "dcn", "deep": [32, 16], "cross_layers": 2}


def write_config(path: Path, data: str, storage: str, method: str, **train) -> Path:
    train = {"epochs": 1, "batch_size": 1024, "workers": 1, "sparse_lr": 0.05, **train}
    path.write_text(yaml.safe_dump({"base": {"data": data, "storage": storage, "method": method, "model": MODEL,
                                             "train": train}}))
    return path


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    """Wait for a CLI process; then kill what is left of its process group (the local Ray it started)."""
    out, err = proc.communicate(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


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


def test_a_commit_crash_two_runs_at_once_and_damaged_files(tiny_data, tmp_path, capsys):
    """The driver dies while committing (after its first file): nothing is taken as finished. Then two runs of
    the same config start at once on the same storage: one commits the stage (from the finished Ray Train
    checkpoint: no retraining), the other waits for its lease and skips it. Then damaged files are named, with
    the command that rebuilds them, and that command works."""
    storage = tmp_path / "runs"
    cfg_path = write_config(tmp_path / "c.yaml", tiny_data, str(storage), "target_only", epochs=2)
    mlruns = tmp_path / "mlruns"
    code, _, err = finish(cli("run", "--config", str(cfg_path), f"--set=train.mlflow=file://{mlruns}",
                              env={"RAYTRAIN_CTR_FAULT": "commit", "MLFLOW_ALLOW_FILE_STORE": "true"}))
    assert code == 3, err
    (art,) = (storage / "stages").iterdir()
    assert (art / "metrics.json").exists() and read_manifest(*resolve(str(art))) is None  # half-written
    history = json.loads((art / "metrics.json").read_text())["history"]
    for epoch in (1, 2):  # the driver's progress line per epoch
        assert re.search(rf"stage train epoch {epoch}/2: [\d,]+ rows/s, train loss [\d.]+, valid AUC "
                         rf"{history[epoch - 1]['valid_auc']:.4f} \(best [\d.]+\), ETA", err), err
    assert tensorboard_scalars(storage / "tensorboard" / art.name)["valid_auc"] == [
        pytest.approx(h["valid_auc"]) for h in history]
    (auc_file,) = mlruns.rglob("metrics/valid_auc")  # MLflow's file store: "time value step" per line
    assert [float(line.split()[1]) for line in auc_file.read_text().splitlines()] == [
        pytest.approx(h["valid_auc"]) for h in history]
    assert main(["runs", str(storage)]) == 0
    assert f"| {art.name} | unfinished (no manifest) |" in capsys.readouterr().out

    first, second = (cli("run", "--config", str(cfg_path)) for _ in range(2))
    (c1, o1, e1), (c2, o2, e2) = finish(first), finish(second)
    assert c1 == 0 and c2 == 0, e1 + e2
    r1, r2 = results(o1)["train"], results(o2)["train"]
    assert sorted([bool(r1.get("skipped")), bool(r2.get("skipped"))]) == [False, True]  # one committed, one waited
    assert "waiting for it" in e1 + e2
    assert r1["test_auc"] == r2["test_auc"] > 0.6 and r1["resumed_from_epoch"] == r2["resumed_from_epoch"] is None
    assert [p.name for p in (storage / "stages").iterdir()] == [art.name]
    assert set(verify(*resolve(str(art)), "rebuild").files) >= {"model.pt", "metrics.json"}

    cfg = from_dict(yaml.safe_load(cfg_path.read_text())["base"])
    rebuild = f"raytrain-ctr run --config {cfg_path} --stage train --force"
    (art / "model.pt").write_bytes((art / "model.pt").read_bytes()[:1000])  # truncated after the commit
    with pytest.raises(ArtifactError, match=rf"{art}/model.pt has 1000 bytes .* rebuild it: {rebuild}"):
        pipeline.run(cfg, command=f"raytrain-ctr run --config {cfg_path}")
    assert main(["runs", str(storage)]) == 2
    assert f"| {art.name} | damaged: {art}/model.pt has 1000 bytes" in capsys.readouterr().out

    damaged = sorted((storage / "_ray").rglob("model.pt")) + sorted((storage / "_ray").rglob("state.pt"))
    assert damaged
    for f in damaged:
        f.write_bytes(b"garbage")
    code, out, err = finish(cli("run", "--config", str(cfg_path), "--stage", "train", "--force"))
    assert code == 0, err  # the command named: a fresh Ray Train run, the damaged checkpoints unread
    assert not results(out)["train"].get("skipped") and verify(*resolve(str(art)), "rebuild")
    assert main(["runs", str(storage)]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"\| {art.name} \| committed \| .* \| {results(out)['train']['test_auc']:.4f} \|", listed)

    (art / "manifest.json").unlink()  # unfinished again: the next run restores the damaged checkpoint
    code, _, err = finish(cli("run", "--config", str(cfg_path), "--set", "train.max_failures=0"))
    assert code == 2 and "Traceback" not in err, err
    assert "_ray/" in err and "cannot be loaded" in err and "--stage train --force" in err


@pytest.mark.parametrize("backend", ["local", "torchrec"])
def test_a_stage_resumes_on_another_worker_count(tiny_data, ray_local, tmp_path, backend):
    """Two workers stop after epoch 0 (a worker dies, no retries left); the stage resumes on one worker from the
    epoch-0 checkpoint (sharded tables re-sharded by DCP on load) and finishes."""
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


def s3_objects(uri: str) -> list[str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_on_s3_a_killed_driver_is_resubmitted_and_resumes(bucket, tmp_path):
    """Data and storage in a bucket of the loopback S3 server, credentials from the environment only: synth
    writes there, validate and training read from there, artifacts and Ray Train checkpoints go there. The
    driver is killed (its whole process group) mid-way through Fine-Tune's second stage; the resubmitted run
    skips the finished pre-training and resumes Fine-Tune from its last checkpoint in the bucket."""
    data, storage = f"{bucket}/data", f"{bucket}/runs"
    code, _, err = finish(cli("synth", "--preset", "tiny", "--out", data, "--rows", "20000"))
    assert code == 0, err
    assert any(k.endswith(".parquet") for k in s3_objects(data)) and not Path("s3:").exists()
    code, out, err = finish(cli("validate", data))
    assert code == 0 and "target" in out, err
    cfg_path = write_config(tmp_path / "c.yaml", data, storage, "finetune", epochs=4)

    driver = cli("run", "--config", str(cfg_path))
    deadline = time.monotonic() + 900
    while not any("finetune-" in k and k.endswith("state.pt") for k in s3_objects(f"{storage}/_ray")):
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started: nothing cleans up
    driver.wait()
    stages = {k.split("/")[2] for k in s3_objects(f"{storage}/stages")}
    committed = {k.split("/")[2] for k in s3_objects(f"{storage}/stages") if k.endswith("manifest.json")}
    assert any(s.startswith("plain-") for s in committed) and not any(s.startswith("finetune-") for s in committed)

    code, out, err = finish(cli("run", "--config", str(cfg_path)))
    assert code == 0, err
    res = results(out)
    assert res["pretrain"]["skipped"] and not res["finetune"].get("skipped")
    assert res["finetune"]["resumed_from_epoch"] >= 1 and res["finetune"]["test_auc"] > 0.6
    keys = s3_objects(f"{storage}/stages")
    assert {k.split("/")[2] for k in keys} >= stages and sum(k.endswith("manifest.json") for k in keys) == 2
    assert not any(k.endswith(".lock") for k in s3_objects(f"{storage}/locks"))  # released

    cfg = from_dict(yaml.safe_load(cfg_path.read_text())["base"])
    upstream = next(k for k in keys if "/plain-" in k and k.endswith("model.pt"))
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket.removeprefix("s3://"), Key=upstream, Body=b"truncated")
    with pytest.raises(ArtifactError, match=rf"s3://.*{upstream.split('/')[-2]}/model.pt has 9 bytes"):
        pipeline.run(cfg, stage="finetune", force=True)  # named before any worker starts
