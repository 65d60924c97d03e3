"""``raytrain-ctr predict``: a serving package over Parquet at scale, on Ray Data.

The input is cut into its Parquet row groups (read from the footers on the driver); a Ray Data
``map_batches`` over them runs on a pool of actors, each loading the package once, reading its
row groups, encoding them with the training encoder and scoring them. Every output row carries its
row id, ``file`` and ``row`` (the row's index in its file), so each input row is written exactly
once and can be joined back; the ``--carry`` columns (a request id, the label) are copied along.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrain_ctr.data.dataset import DataError, filter_rows, parquet_under, resolve
from raytrain_ctr.data.ingest import ROW
from raytrain_ctr.serving.package import Package, PackageError, load


def footer(file: str) -> pq.FileMetaData:
    fs, path = resolve(file)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{file}: cannot read its Parquet footer: {e}") from None


def row_groups(files: list[str]) -> list[dict]:
    """The units of work: every row group of ``files``, with its first row's index in its file."""
    units = []
    for file in files:
        meta = footer(file)
        first = 0
        for i in range(meta.num_row_groups):
            units.append({"file": file, "index": i, "first_row": first})
            first += meta.row_group(i).num_rows
    return units


def parquet_files(paths: list[str]) -> list[str]:
    """The Parquet files named by ``paths`` (files, or directories searched recursively), sorted."""
    files: list[str] = []
    for p in paths:
        fs, path = resolve(p)
        info = fs.get_file_info(path)
        if info.type.name == "Directory":
            prefix = p[: len(p) - len(path)] if "://" in p else ""
            files += [prefix + f for f in parquet_under(fs, path)]
        elif info.type.name == "File":
            files.append(p)
        else:
            raise DataError(f"predict: input '{p}' does not exist")
    if not files:
        raise DataError(f"predict: no Parquet files under {paths}")
    return files


class Scorer:
    """A Ray Data actor: the package loaded once; each call scores a batch of row groups."""

    def __init__(self, package: str, carry: tuple[str, ...], where: dict):
        self.package: Package = load(package)
        self.carry, self.where = carry, where
        self.columns = list(dict.fromkeys([*self.package.columns, *carry, *where]))

    def __call__(self, units: dict[str, np.ndarray]) -> pa.Table:
        out = []
        for file, index, first in zip(units["file"], units["index"], units["first_row"]):
            fs, path = resolve(str(file))
            with fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(int(index), columns=self.columns)
            rows = pa.array(np.arange(int(first), int(first) + table.num_rows, dtype=np.int64))
            table = filter_rows(table.append_column(ROW, rows), self.where)
            cols = {"file": pa.array([str(file)] * table.num_rows, pa.string()), "row": table.column(ROW),
                    **{c: table.column(c) for c in self.carry},
                    "pctr": pa.array(self.package.predict(table), pa.float32())}
            out.append(pa.table(cols))
        return pa.concat_tables(out)


def predict(package: str, inputs: list[str], out: str, workers: int = 2, carry: tuple[str, ...] = (),
            where: dict | None = None) -> dict:
    """Score every row of the Parquet ``inputs`` (files or directories) with ``package`` on ``workers``
    actors; write ``out`` as Parquet (``file``, ``row``, the ``carry`` columns, ``pctr``). ``where``:
    only the rows whose columns equal these values (a domain column). Returns the counts."""
    import ray

    pkg = load(package)  # fails here, not in every actor, if the package is bad
    where = dict(where or {})
    files = parquet_files(inputs)
    names = footer(files[0]).schema.to_arrow_schema().names
    missing = [c for c in [*pkg.columns, *carry, *where] if c not in names]
    if missing:
        raise PackageError(f"predict: {files[0]} lacks column(s) {missing} (the package's spec, --carry or --where)")
    fs, target = resolve(out)
    if fs.get_file_info(target).type.name != "NotFound":
        raise DataError(f"predict: the output {out} exists; give a new directory")
    units = row_groups(files)
    local = "://" not in out
    staging = str(Path(target).with_name(f".{Path(target).name}.partial")) if local else out
    if local:
        shutil.rmtree(staging, ignore_errors=True)  # a run that died while writing left it
    scored = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        Scorer, fn_constructor_args=(str(Path(package).absolute()), tuple(carry), where), batch_size=1,
        concurrency=workers, batch_format="numpy")
    scored.write_parquet(staging)
    if local:  # complete, then in place: an output directory that exists is whole
        Path(staging).rename(target)
    written = parquet_files([out])
    return {"files": len(files), "row_groups": len(units), "rows": sum(footer(f).num_rows for f in written),
            "output_files": len(written)}
