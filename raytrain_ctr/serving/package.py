"""The serving package on disk, and the in-process predictor that loads it.

    PACKAGE/
      manifest.json     format, method, stage, artifact, metrics, the data schema, the program's inputs
      spec.yaml         the serving domain's feature spec: the id encoding (identity/hash/vocab, row 0 = OOV)
      program.pt2       the torch.export program (dense parameters inside; see program.py)
      tables/NAME.npy   one float32 [rows, dim] array per embedding table, memory-mapped at load

A package is written to a temporary directory beside its destination and renamed into place once
complete, so a package that exists is whole. Loading it needs torch, numpy and pyarrow (and this
module and the encoder): neither Ray nor TorchRec is imported.

    from raytrain_ctr.serving import load
    pctr = load("runs/export/target_only").predict(rows)   # rows: Arrow table/batch, DataFrame, dict of columns

Limits: every table file must be readable by the serving host (local disk or a shared file system);
it is mapped, not read, so a host's resident memory holds the rows it has looked up (the page cache
decides what stays), but its address space spans every table. Tables beyond one host's disk need a
sharded lookup service, which this package does not provide.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raytrain_ctr.data.encode import FeatureEncoder
from raytrain_ctr.spec import DomainSpec

FORMAT = "raytrain-ctr-serving/1"
MANIFEST, SPEC, PROGRAM, TABLES = "manifest.json", "spec.yaml", "program.pt2", "tables"


class PackageError(ValueError):
    """A serving package is missing, incomplete, or does not fit the rows given to it."""


def write_package(path: str | Path, program, spec: DomainSpec, manifest: dict[str, Any]) -> Path:
    """Write ``program`` (a :class:`~raytrain_ctr.serving.program.Program`), the domain's spec and
    ``manifest`` as a package at ``path``, atomically (an existing package there is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        (tmp / TABLES).mkdir()
        tables = {}
        for name, weight in program.tables.items():
            np.save(tmp / TABLES / f"{name}.npy", weight.detach().cpu().numpy().astype(np.float32, copy=False))
            tables[name] = {"file": f"{TABLES}/{name}.npy", "rows": int(weight.shape[0]), "dim": int(weight.shape[1])}
        torch.export.save(program.program, tmp / PROGRAM)
        (tmp / SPEC).write_text(spec.to_yaml())
        full = {"format": FORMAT, **manifest, "domain": spec.domain, "output": "pctr",
                "inputs": {"tables": tables, "sparse": list(program.sparse), "dense": list(program.dense)},
                "torch": torch.__version__}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, default=str))
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _table(file: Path) -> torch.Tensor:
    """A table file as a tensor over its memory map (copy-on-write: pages are read when touched)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.load(file, mmap_mode="c"))


def _as_table(rows: Any) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    if isinstance(rows, dict):
        return pa.table(rows)
    if isinstance(rows, list):
        return pa.Table.from_pylist(rows)
    if hasattr(rows, "columns") and hasattr(rows, "dtypes"):  # a pandas DataFrame
        return pa.Table.from_pandas(rows, preserve_index=False)
    raise PackageError(f"predict: rows must be an Arrow table or batch, a DataFrame, a dict of columns or a list of "
                       f"dicts, got {type(rows).__name__}")


@dataclass
class Package:
    """A loaded serving package: ``predict(rows)`` → pCTR per row, through the training encoder."""

    path: Path
    manifest: dict[str, Any]
    spec: DomainSpec
    program: torch.nn.Module
    tables: dict[str, torch.Tensor]
    forward: Callable[..., torch.Tensor]  # the program's forward, maybe compiled
    chunk_rows: int = 65_536

    @property
    def columns(self) -> list[str]:
        """The columns ``predict`` reads: the spec's feature fields."""
        return [f.name for f in self.spec.fields]

    def predict(self, rows: Any) -> np.ndarray:
        """pCTR (float32) of every row, in order, computed ``chunk_rows`` at a time."""
        table = _as_table(rows)
        names = set(table.column_names)
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise PackageError(f"predict: the rows lack column(s) {missing} of the package's spec ({self.path / SPEC})")
        encoder = FeatureEncoder(self.spec)
        out = [np.zeros(0, np.float32)]
        with torch.inference_mode():
            for lo in range(0, table.num_rows, self.chunk_rows):
                sparse, dense = encoder.features(table.slice(lo, self.chunk_rows))
                out.append(self.forward(self.tables, sparse, dense).numpy())
        return np.concatenate(out)


def load(path: str | Path, compile: bool = False) -> Package:
    """Load a package written by ``raytrain-ctr export`` (tables memory-mapped). ``compile``: the program
    compiled by ``torch.compile`` (inductor; tens of seconds on first use and once more for the first
    batch of another size, then about twice the eager program's speed on CPU: ``benchmarks/serving.py``)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise PackageError(f"{path}: not a serving package (no {MANIFEST}); make one with `raytrain-ctr export`")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{path / MANIFEST}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    tables = {name: _table(path / t["file"]) for name, t in manifest["inputs"]["tables"].items()}
    program = torch.export.load(path / PROGRAM).module()
    # forward, not __call__: the call's pre-hooks re-check every input against the program's constraints
    # (≈1 ms a call); predict's inputs come from the package's own encoder, shaped by its spec
    forward = torch.compile(program.forward, dynamic=True) if compile else program.forward
    return Package(path, manifest, DomainSpec.load(path / SPEC), program, tables, forward)
