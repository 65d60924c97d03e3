"""Artifacts that can be trusted (manifests, safe loads) and stage leases, on a local disk and on a real S3
server on loopback."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from raytrain_ctr.artifacts import MANIFEST, ArtifactError, commit, load_tensors, read_manifest, verify
from raytrain_ctr.data.dataset import resolve
from raytrain_ctr.lease import FileLease, LeaseError, S3Lease, stage_lease

REBUILD = "raytrain-ctr run --config c.yaml --stage train --force"


def staged(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"w": torch.arange(1000.0)}, src / "model.pt")
    (src / "metrics.json").write_text(json.dumps({"test_auc": 0.75}))
    return {"model.pt": src / "model.pt", "metrics.json": src / "metrics.json"}


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> str:
    """An artifact directory on a local disk or in a bucket of the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "stages" / "train-abc")
    return f"{request.getfixturevalue('bucket')}/stages/train-abc"


def test_commit_then_verify_and_every_kind_of_damage_is_named(place, tmp_path):
    fs, art = resolve(place)
    assert verify(fs, art, REBUILD) is None  # nothing committed yet
    files = staged(tmp_path)
    manifest = commit(files, fs, art, {"stage": "train"})
    assert set(manifest.files) == {"model.pt", "metrics.json"}
    assert manifest.files["model.pt"][0] == files["model.pt"].stat().st_size
    assert verify(fs, art, REBUILD, ("model.pt",)) == read_manifest(fs, art)
    with pytest.raises(ArtifactError, match=r"committed without \['tables.npy'\]"):
        verify(fs, art, REBUILD, ("tables.npy",))

    def damage(name: str, data: bytes) -> str:
        with fs.open_output_stream(f"{art}/{name}") as f:
            f.write(data)
        with pytest.raises(ArtifactError) as e:
            verify(fs, art, REBUILD)
        commit(files, fs, art)  # a re-commit repairs it
        return str(e.value)

    truncated = damage("model.pt", files["model.pt"].read_bytes()[:100])
    assert "model.pt has 100 bytes where its manifest says" in truncated and truncated.endswith(REBUILD)
    same_size = json.dumps({"test_auc": 0.99}).encode()
    assert len(same_size) == files["metrics.json"].stat().st_size
    assert "metrics.json does not match its manifest's SHA-256" in damage("metrics.json", same_size)
    fs.delete_file(f"{art}/model.pt")
    with pytest.raises(ArtifactError, match="model.pt is missing"):
        verify(fs, art, REBUILD)
    commit(files, fs, art)
    with fs.open_output_stream(f"{art}/{MANIFEST}") as f:
        f.write(b"{not json")
    with pytest.raises(ArtifactError, match=f"{MANIFEST}: not a manifest"):
        verify(fs, art, REBUILD)


def test_a_crash_during_the_commit_leaves_an_unfinished_artifact(place, tmp_path):
    """The committing process is killed after its first file: the directory holds a file but no manifest, so it
    is not finished; a second commit over it finishes it."""
    files = staged(tmp_path)
    fs, art = resolve(place)
    commit(files, fs, art)  # an earlier commit is there: the crash must not leave its manifest standing
    script = textwrap.dedent(f"""
        from raytrain_ctr.artifacts import commit
        from raytrain_ctr.data.dataset import resolve
        fs, art = resolve({place!r})
        commit({ {k: str(v) for k, v in files.items()}!r}, fs, art)
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "RAYTRAIN_CTR_FAULT": "commit"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(art))}
    assert "metrics.json" in names and MANIFEST not in names
    assert verify(fs, art, REBUILD) is None
    commit(files, fs, art)
    assert verify(fs, art, REBUILD) is not None


def test_damaged_tensor_files_are_named_not_a_pickle_traceback(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"epoch": 1, "history": [{"valid_auc": 0.7}]}, path)
    assert load_tensors(path, REBUILD)["epoch"] == 1
    path.write_bytes(path.read_bytes()[:64])
    with pytest.raises(ArtifactError, match=rf"{path}: cannot be loaded .*; rebuild it: {REBUILD}"):
        load_tensors(path, REBUILD)
    import numpy as np

    torch.save({"auc": np.float64(0.5)}, path)  # what weights_only refuses: the loop must not write it
    with pytest.raises(ArtifactError, match="cannot be loaded"):
        load_tensors(path, REBUILD)


HOLD = """
import sys, time
from raytrain_ctr.lease import stage_lease
lease = stage_lease(sys.argv[1], "train-abc", ttl=float(sys.argv[2]))
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold(storage: str, ttl: float = 60.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, storage, str(ttl)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_local_lease_excludes_and_is_freed_when_its_holder_dies(tmp_path):
    holder = hold(str(tmp_path))
    lease = stage_lease(str(tmp_path), "train-abc", timeout=0.5)
    assert isinstance(lease, FileLease) and not lease.try_acquire()
    assert str(holder.pid) in lease.holder()
    with pytest.raises(LeaseError, match="still held by"):
        lease.acquire()
    os.killpg(holder.pid, signal.SIGKILL)  # no clean-up runs: the kernel frees the lock
    holder.wait()
    with stage_lease(str(tmp_path), "train-abc", timeout=60) as again:
        assert not stage_lease(str(tmp_path), "train-abc").try_acquire()
    assert again._fd is None and stage_lease(str(tmp_path), "train-abc").try_acquire()


def test_an_s3_lease_excludes_renews_and_is_taken_over_when_stale(bucket):
    holder = hold(bucket, ttl=4.0)
    lease = stage_lease(bucket, "train-abc", timeout=1.0, ttl=4.0)
    assert isinstance(lease, S3Lease) and not lease.try_acquire()
    time.sleep(6)  # beyond the ttl: the holder's heartbeat keeps it
    assert not lease.try_acquire() and str(holder.pid) in lease.holder()
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    lease.timeout = 120
    lease.acquire()  # after the ttl without a heartbeat: taken over
    try:
        lease.check()
        stale = S3Lease(lease.bucket, lease.key, "train-abc", ttl=0.0)  # sees any lease as stale
        assert stale.try_acquire()  # takes it over...
        stale._stop.set()
        deadline = time.monotonic() + 60
        while not lease._lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.2)
        with pytest.raises(LeaseError, match="was taken over while held"):  # ...and the first holder knows
            lease.check()
    finally:
        lease.release()


def test_every_load_is_safe_and_every_local_ray_hides_its_dashboard():
    """Static rules over the package's source: tensors are loaded with ``weights_only=True``, YAML with
    ``safe_load``, and a Ray started here runs no dashboard (a cluster's is bound to 127.0.0.1: test_cluster)."""
    import ast

    import raytrain_ctr

    calls = []
    for path in Path(raytrain_ctr.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                calls.append((path.name, owner, node.func.attr, {k.arg: k.value for k in node.keywords}))
    loads = [c for c in calls if c[1:3] == ("torch", "load")]
    assert loads and all(isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                         for *_, kw in loads), loads
    assert not [c for c in calls if c[1] == "yaml" and c[2] in ("load", "unsafe_load", "full_load")]
    inits = [kw for _, owner, attr, kw in calls if (owner, attr) == ("ray", "init")]
    assert inits and all("address" in kw for kw in inits)  # never "whatever cluster the machine has"
    local = [kw for kw in inits if isinstance(kw["address"], ast.Constant)]  # the others join a given address
    assert local and all(kw["address"].value == "local" and kw["include_dashboard"].value is False for kw in local)


def test_a_damaged_catalog_entry_is_named(tmp_path):
    from raytrain_ctr.catalog import Catalog

    cat = Catalog(str(tmp_path / "catalog"))
    entry = cat.record("fam", "train-abc", str(tmp_path / "stages" / "train-abc"), "2026-11-01")
    assert cat.latest("fam", "2026-12-01") == entry
    (file,) = (tmp_path / "catalog" / "fam").iterdir()
    file.write_text('{"family": "fam"')
    with pytest.raises(ArtifactError, match=rf"{file}: not a catalog entry .* delete it and re-run its stage"):
        cat.latest("fam", "2026-12-01")
