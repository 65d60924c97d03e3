"""Serving packages: every method's export predicts what its training model predicts, at any batch size;
a package loads in a fresh process without Ray or TorchRec; bad packages and rows are refused by name."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import load, rename_domains

from raytrain_ctr.config import TrainConfig
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.embedding import unsharded_state
from raytrain_ctr.methods import METHODS, StageContext, get_method
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.serving import PackageError
from raytrain_ctr.serving import load as load_package
from raytrain_ctr.serving.export import example_batch, served_model
from raytrain_ctr.serving.package import write_package
from raytrain_ctr.serving.program import export_program
from raytrain_ctr.train.local import fit_local

ROLES = {"source": "video", "target": "game"}  # the datasets' domains are named video and game
MCFG = ModelConfig(backbone="dcn", deep=(32, 16), cross_layers=2)
TC = TrainConfig(epochs=1, batch_size=256, lr=0.003, sparse_lr=0.05, sparse_optimizer="adagrad")
ARGS = {"mkt": {"d_hfa": 8, "d_cke": 16, "tower": (8,), "tem_deep": (32, 16, 8), "attention_hidden": (8,)}}
# what each paper serves, read off the package's tables (and, for what must not be there, the program's
# parameters too): (names that must appear, names that must not)
SERVES = {
    "cctl": ((), ("mixed.", "source.", "selector.", "san.")),  # §3.4: the pure tower alone
    "e_cdctr": (("history.tables.user_id", "history.tables.item_id"), ("snapshots",)),  # §3.6.2: merged tables
    "mkt": (("mem.", "tem."), ("mem.hfa.source", "mem.ike.", "mem.towers.", "src_")),  # §3.4: TEM + the MEM it reads
    "autoft": (("pre.", "fine."), ()),  # both copies, routed by the policies' argmax
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, entities) -> dict[str, str]:
    import shutil

    from raytrain_ctr.data.synth import generate, make_config

    out = {"default": str(tmp_path_factory.mktemp("default") / "data"),
           "entities": shutil.copytree(entities, tmp_path_factory.mktemp("entities") / "data")}
    generate(out["default"], make_config("default", rows=24_000, n_users=2_000, n_target_users=600, n_items=600,
                                         rows_per_shard=6_000), parallelism=1)
    for root in out.values():
        rename_domains(str(root), ROLES)  # a user's names: every method reads them through the roles
    return {k: str(v) for k, v in out.items()}


def split_table(ds: CTRDataset, domain: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in ds.files(domain, "test"))


def trained_package(data: str, name: str, out: Path) -> tuple[np.ndarray, pa.Table, Path]:
    """The method's served stage trained briefly in-process, its test predictions, the test rows and its package."""
    ds = CTRDataset.load(data, ROLES)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    method = get_method(name, ARGS.get(name, {}))
    stage = method.stages[-1]
    torch.manual_seed(0)
    train = {d: load(ds, d, "train").select(slice(0, 1024)) for d in stage.train_domains}
    test = load(ds, stage.eval_domain, "test")
    model = fit_local(method, stage, specs, MCFG, TC, train, test.select(slice(0, 256))).model
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(stage.hooks.logits(model, test, StageContext(stage, specs, MCFG, method.args)))
    program = export_program(served_model(method, stage, specs, MCFG, unsharded_state(model)),
                             example_batch(ds, stage.eval_domain))
    path = write_package(out, program, specs[stage.eval_domain], {"method": name, "stage": stage.name})
    return expected.numpy(), split_table(ds, stage.eval_domain), path


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_exports_what_it_serves_and_predicts_the_same(name, datasets, tmp_path):
    expected, rows, path = trained_package(datasets["entities" if name == "mkt" else "default"], name, tmp_path / "pkg")
    package = load_package(path)
    assert np.abs(package.predict(rows) - expected).max() <= 1e-5
    for lo, n in ((0, 1), (5, 3), (100, 777)):  # any batch size, the one-row request included
        assert np.abs(package.predict(rows.slice(lo, n)) - expected[lo: lo + n]).max() <= 1e-5
    tables = package.manifest["inputs"]["tables"]
    must, must_not = SERVES.get(name, ((), ()))
    assert all(any(t.startswith(m) or m in t for t in tables) for m in must), sorted(tables)
    names = [*tables, *(k.removeprefix("served.") for k in package.program.state_dict())]
    assert not [t for t in names if any(t.startswith(m) or f".{m}" in t for m in must_not)], sorted(names)
    # the tables live in their own files, outside the program, which holds the dense parameters only
    state = package.program.state_dict()
    assert state and not [t for t in tables if f"served.{t}.weight" in state]
    assert all(tuple(package.tables[t].shape) == (m["rows"], m["dim"]) for t, m in tables.items())


def test_package_loads_in_a_fresh_process_without_ray_or_torchrec(datasets, tmp_path):
    expected, rows, path = trained_package(datasets["default"], "e_cdctr", tmp_path / "pkg")
    pq.write_table(rows, tmp_path / "rows.parquet")
    code = ("import json, sys, pyarrow.parquet as pq\n"
            "from raytrain_ctr.serving import load\n"
            f"p = load({str(path)!r}).predict(pq.read_table({str(tmp_path / 'rows.parquet')!r}))\n"
            "print(json.dumps({'pctr': p.tolist(), 'modules': sorted(m for m in sys.modules\n"
            "                  if m.split('.')[0] in ('ray', 'torchrec', 'fbgemm_gpu'))}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["modules"] == []
    assert np.abs(np.array(got["pctr"]) - expected).max() <= 1e-5


def test_bad_packages_and_rows_are_refused_by_name(datasets, tmp_path):
    with pytest.raises(PackageError, match="not a serving package"):
        load_package(tmp_path)
    _, rows, path = trained_package(datasets["default"], "target_only", tmp_path / "pkg")
    with pytest.raises(PackageError, match="item_id"):
        load_package(path).predict(rows.drop_columns(["item_id"]))
    with pytest.raises(PackageError, match="rows must be"):
        load_package(path).predict(42)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(PackageError, match="format"):
        load_package(path)


def mapped_files(ptr: int) -> set[str]:
    """The files whose memory mapping in this process holds the address ``ptr``."""
    out = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi and len(parts) == 6:
            out.add(parts[5].strip())
    return out


def test_tables_stay_memory_mapped_through_export_and_load(datasets, tmp_path):
    """Large tables: the exporting host maps the artifact's tables (no copy) and a serving host maps the
    package's table files: neither reads a whole table into its own memory."""
    ds = CTRDataset.load(datasets["default"], ROLES)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    method = get_method("target_only")
    stage = method.stages[-1]
    torch.manual_seed(0)
    torch.save(stage.hooks.build(StageContext(stage, specs, MCFG, method.args)).state_dict(), tmp_path / "model.pt")
    mapped = torch.load(tmp_path / "model.pt", weights_only=True, mmap=True)
    served = served_model(method, stage, specs, MCFG, mapped)
    user = served.embedding.tables["user"].weight
    assert str(tmp_path / "model.pt") in mapped_files(user.data_ptr())
    path = write_package(tmp_path / "pkg", export_program(served, example_batch(ds, "target")), specs["target"], {})
    package = load_package(path)
    for name, meta in package.manifest["inputs"]["tables"].items():
        if meta["rows"]:
            assert str(path / meta["file"]) in mapped_files(package.tables[name].data_ptr()), name

