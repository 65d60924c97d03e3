"""A real `ray job submit` against a real Ray head started with `ray start --head` (token auth on)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port, dash = free_port(), free_port()
    # every fixed default port gets a free one: the test session's own local Ray holds the defaults
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        ok = subprocess.run([BIN / "ray", "job", "list", "--address", address], env=env, capture_output=True)
        if ok.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("the Ray head did not come up")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(10)  # a throwaway head: a graceful stop took 30 s and keeps nothing worth keeping
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(60)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_each_cadenced_job(ray_head, tiny_data, tmp_path):
    """E-CDCTR's three jobs, each its own `ray job submit` (monthly TPM, weekly CPM, daily A-CTR), each
    reading the upstream artifacts the job before it left in the storage."""
    address, env = ray_head
    storage = tmp_path / "runs"

    def submit(job: str) -> str:
        cmd = [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
               sys.executable, "jobs/run.py", "--config", "jobs/configs/e_cdctr.yaml", "--stage", job,
               "--as-of", "2024-04-01", "--set", f"data={tiny_data}", "--set", f"storage={storage}",
               "--set", "train.epochs=1", "--set", "model.deep=[32]",
               "--set", "method_args={tpm_months: 1, snapshots: 1, history: 1}"]
        for _ in range(30):  # the job agent may come up a little after the dashboard answers
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
            if "No available agent to submit job" not in out.stdout + out.stderr:
                break
            time.sleep(2)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    assert "e_cdctr/tpm.m1: best epoch 0; source test AUC" in submit("tpm")
    assert "e_cdctr/cpm: best epoch 0; source test AUC" in submit("cpm")
    assert "e_cdctr/actr: best epoch 0; target test AUC" in submit("actr")
    stages = sorted(p.name.split("-")[0] for p in (storage / "stages").iterdir())
    assert stages == ["actr", "cpm", "tpm.m1"]
    assert all((p / "model.pt").exists() and (p / "metrics.json").exists() for p in (storage / "stages").iterdir())
    # without the token the job server refuses the client
    bad = subprocess.run([BIN / "ray", "job", "list", "--address", address],
                         env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True)
    assert bad.returncode != 0
    shutil.rmtree(storage)
