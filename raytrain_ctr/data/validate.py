"""Check Parquet data against its spec before training, and summarise it.

Two levels: :func:`check_schema` reads only Parquet footers (cheap, run before every
training stage); :func:`scan` streams every row of every file (one Ray task per file
when Ray is running) and checks values: null or non-0/1 labels, nulls in id columns,
negative ids, and it gathers the summary (rows, positive rate, cardinalities, list lengths).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytrain_ctr.data.dataset import SPLITS, CTRDataset, DataError, Domain, filter_rows
from raytrain_ctr.runtime import map_tasks
from raytrain_ctr.spec import DomainSpec, FieldSpec

MAX_ISSUES = 20
MAX_OOV = 0.1  # validate's default bound on the share of a field's ids that read the OOV row


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _type_rule(f: FieldSpec, t: pa.DataType) -> str | None:
    """None if column type ``t`` fits field ``f``, else the rule it breaks."""
    if f.type == "dense":
        return None if (pa.types.is_floating(t) or _is_int(t)) else "a dense field must be a float or int column"
    if f.type == "sequence":
        if not _is_list(t):
            return "a sequence field must be a list column"
        t = t.value_type
    ok = _is_int(t) or (f.ids in ("hash", "vocab") and _is_str(t))
    if ok:
        return None
    what = "ints" if f.ids == "identity" else "ints or strings"
    return f"ids '{f.ids}' need {what}, got {t}"


def check_schema(domain: Domain, files: list[str], filesystem=None) -> None:
    """Raise :class:`DataError` naming file, column and rule for the first schema mismatch."""
    spec = domain.spec

    def one(path: str) -> None:
        try:
            schema = pq.read_schema(path, filesystem=filesystem)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: unreadable Parquet file: {e}") from e
        names = set(schema.names)
        for col in domain.columns:
            if col not in names:
                raise DataError(f"{path}: missing column '{col}' required by the spec of domain '{spec.domain}'")
        for f in spec.fields:
            rule = _type_rule(f, schema.field(f.name).type)
            if rule:
                raise DataError(f"{path}: column '{f.name}' has type {schema.field(f.name).type}: {rule}")
        lt = schema.field(spec.label).type
        if not (_is_int(lt) or pa.types.is_boolean(lt) or pa.types.is_floating(lt)):
            raise DataError(f"{path}: label column '{spec.label}' has type {lt}: a label must be int, bool or float")
        if spec.time and not (_is_int(schema.field(spec.time).type) or
                              pa.types.is_timestamp(schema.field(spec.time).type)):
            raise DataError(f"{path}: time column '{spec.time}' must be int (unix seconds) or timestamp")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, files))


@dataclass(frozen=True)
class Issue:
    """A value rule broken by ``count`` rows of ``column``, the first at ``row`` (of the table checked)."""

    column: str
    rule: str
    row: int
    count: int

    def message(self, where: str) -> str:
        return f"{where}: column '{self.column}': {self.rule} ({self.count} rows, the first at row {self.row})"


def _first(mask: np.ndarray) -> tuple[int, int]:
    return int(np.argmax(mask)), int(mask.sum())


def _minmax(values: pa.Array) -> tuple:
    mm = pc.min_max(values)
    return mm["min"].as_py(), mm["max"].as_py()


def _label_issues(label: pa.Array, name: str) -> list[Issue]:
    out = []
    if label.null_count:
        out.append(Issue(name, "null label (labels are required)",
                         *_first(label.is_null().to_numpy(zero_copy_only=False))))
    lab = pc.cast(label, pa.float64()) if pa.types.is_boolean(label.type) else label
    if pa.types.is_floating(lab.type):
        broken = pc.all(pc.or_(pc.equal(lab, 0.0), pc.equal(lab, 1.0))).as_py() is False
    else:
        lo, hi = _minmax(lab)
        broken = lo is not None and (lo < 0 or hi > 1)
    if broken:
        values = pc.cast(lab, pa.float64()).fill_null(0).to_numpy(zero_copy_only=False)
        bad = ~np.isin(values, (0.0, 1.0))
        if bad.any():
            out.append(Issue(name, f"label {values[bad][0]:g} outside {{0, 1}}", *_first(bad)))
    return out


def _dense_issues(col: pa.Array, f: FieldSpec) -> list[Issue]:
    if f.fill is not None:
        return []
    out = []
    if col.null_count:
        out.append(Issue(f.name, "missing dense value (name a 'fill' for it in the spec)",
                         *_first(col.is_null().to_numpy(zero_copy_only=False))))
    if pa.types.is_floating(col.type) and pc.all(pc.is_finite(col.drop_null())).as_py() is False:
        values = col.fill_null(0).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(values)
        out.append(Issue(f.name, f"dense value {values[bad][0]} is not finite (name a 'fill' for it in the spec)",
                         *_first(bad)))
    return out


def _id_issues(col: pa.Array, f: FieldSpec, num_embeddings: int) -> list[Issue]:
    """Identity ids: present, non-negative, within the table unless ``oov: map``; vocab values: in the vocab
    unless ``oov: map``. A sequence's issues are counted in rows and located at the first row."""
    out: list[Issue] = []
    if col.null_count and f.type == "categorical" and f.ids == "identity":  # a null list is an empty history
        out.append(Issue(f.name, "null id (use 0 for 'unknown', or ids: hash)",
                         *_first(col.is_null().to_numpy(zero_copy_only=False))))
    flat = pc.list_flatten(col) if f.type == "sequence" else col
    if not len(flat):
        return out

    def rows(bad: np.ndarray) -> tuple[int, int]:  # (first row, rows) of the flat positions in ``bad``
        parents = pc.list_parent_indices(col).to_numpy()[bad] if f.type == "sequence" else np.flatnonzero(bad)
        return int(parents[0]), len(np.unique(parents))

    if f.ids == "vocab":
        unknown = pc.and_(pc.invert(pc.is_in(flat, value_set=pa.array(list(f.vocab), type=flat.type))),
                          pc.is_valid(flat))  # a null reads the OOV row
        if f.oov == "error" and pc.any(unknown).as_py():
            bad = unknown.to_numpy(zero_copy_only=False)
            out.append(Issue(f.name, f"value {flat[int(np.argmax(bad))].as_py()!r} is not in the vocab "
                                     "(add it, or set oov: map to read it as OOV)", *rows(bad)))
        return out
    if f.ids != "identity":
        return out
    low, high = _minmax(flat)
    top = num_embeddings - 2 + f.first_id  # the largest id with a row of its own
    beyond = f.oov == "error" and high is not None and high > top
    if not flat.null_count and (low is None or low >= 0) and not beyond:
        return out
    if flat.null_count and f.type == "sequence":
        out.append(Issue(f.name, "null list element (use 0 for 'unknown')",
                         *rows(flat.is_null().to_numpy(zero_copy_only=False))[:1], int(flat.null_count)))
    ids = flat.fill_null(0).to_numpy(zero_copy_only=False)
    if (ids < 0).any():
        out.append(Issue(f.name, f"negative id {int(ids[ids < 0][0])} (ids must be non-negative)", *rows(ids < 0)))
    if beyond:
        bad = ids > top
        out.append(Issue(f.name, f"id {int(ids[bad][0])} beyond table '{f.table}' ({num_embeddings} rows: "
                                 f"{'0-based ' if f.first_id == 0 else ''}ids up to {top}; size the table, or set "
                                 "oov: map to read such ids as OOV)", *rows(bad)))
    return out


def value_issues(table: pa.Table, spec: DomainSpec) -> list[Issue]:
    """The value rules of the contract, one :class:`Issue` per column and rule broken: labels present and in
    {0, 1}; the time present; identity ids (and their list elements) present, non-negative and within their
    table (a null list is an empty history) and vocab values in the vocab, unless the field says ``oov: map``;
    dense values present and finite unless the field names a ``fill``. ``validate``, the driver's read of a
    small split and every worker's encoder (each batch) check through this one function. Cheap aggregates
    decide; rows are located only when a rule is broken. Only the spec's columns that ``table`` has are
    checked (a read of a few columns)."""
    out: list[Issue] = []
    names = set(table.column_names)
    if spec.label in names:
        out += _label_issues(table.column(spec.label).combine_chunks(), spec.label)
    if spec.time in names and table.column(spec.time).null_count:
        out.append(Issue(spec.time, "null time (every row needs its time)",
                         *_first(table.column(spec.time).is_null().to_numpy(zero_copy_only=False))))
    for f in spec.fields:
        if f.name in names:
            col = table.column(f.name).combine_chunks()
            out += (_dense_issues(col, f) if f.type == "dense"
                    else _id_issues(col, f, spec.tables[f.table].num_embeddings))
    return out


def check_values(table: pa.Table, spec: DomainSpec, where: str) -> None:
    """Raise a :class:`DataError` for the first broken value rule, naming ``where`` (a file, or the split
    and batch), the column, the rule and the row."""
    issues = value_issues(table, spec)
    if issues:
        raise DataError(issues[0].message(where))


@dataclass
class FileStats:
    """What one file contributes to the summary, and the rules it breaks."""

    rows: int = 0
    positives: int = 0
    nulls: dict[str, int] = field(default_factory=dict)
    uniques: dict[str, np.ndarray] = field(default_factory=dict)
    list_len: dict[str, list[int]] = field(default_factory=dict)  # [min, max, sum]
    oov: dict[str, list[int]] = field(default_factory=dict)  # [values reading the OOV row, values]
    issues: list[str] = field(default_factory=list)

    def merge(self, o: FileStats) -> FileStats:
        self.rows += o.rows
        self.positives += o.positives
        for k, v in o.nulls.items():
            self.nulls[k] = self.nulls.get(k, 0) + v
        for k, v in o.uniques.items():
            self.uniques[k] = np.union1d(self.uniques[k], v) if k in self.uniques else v
        for k, (n, total) in o.oov.items():
            a = self.oov.setdefault(k, [0, 0])
            a[0], a[1] = a[0] + n, a[1] + total
        for k, (lo, hi, s) in o.list_len.items():
            a = self.list_len.setdefault(k, [lo, hi, 0])
            a[0], a[1], a[2] = min(a[0], lo), max(a[1], hi), a[2] + s
        self.issues += o.issues
        return self


def scan_file(path: str, spec: DomainSpec, where: dict, filesystem=None) -> FileStats:
    """Stream one file's row groups and check every value."""
    from raytrain_ctr.data.encode import to_rows  # the encoder's own mapping (encode imports this module)

    st = FileStats()
    cols = spec.columns + [c for c in where if c not in spec.columns]
    pf = pq.ParquetFile(path, filesystem=filesystem)
    for rb in pf.iter_batches(batch_size=65_536, columns=cols):
        t = filter_rows(pa.Table.from_batches([rb]), where)
        base = st.rows
        st.rows += t.num_rows
        st.issues += [replace(i, row=base + i.row).message(path) for i in value_issues(t, spec)]
        st.positives += int(pc.sum(pc.equal(pc.cast(t.column(spec.label), pa.float64()), 1.0)).as_py() or 0)
        for f in spec.fields:
            col = t.column(f.name)
            if col.null_count:
                st.nulls[f.name] = st.nulls.get(f.name, 0) + col.null_count
            if not f.is_sparse:
                continue
            values = col
            if f.type == "sequence":
                arr = col.combine_chunks()
                lengths = pc.list_value_length(arr).fill_null(0).to_numpy()
                if len(lengths):
                    prev = st.list_len.get(f.name, [int(lengths.min()), int(lengths.max()), 0])
                    st.list_len[f.name] = [min(prev[0], int(lengths.min())), max(prev[1], int(lengths.max())),
                                           prev[2] + int(lengths.sum())]
                values = pc.list_flatten(arr)
            rows = to_rows(values, f, spec.tables[f.table].num_embeddings)
            a = st.oov.setdefault(f.name, [0, 0])
            a[0], a[1] = a[0] + int((rows == 0).sum()), a[1] + len(rows)
            values = values.drop_null()
            u = pc.unique(values).to_numpy(zero_copy_only=False)
            st.uniques[f.name] = np.union1d(st.uniques[f.name], u) if f.name in st.uniques else u
    return st


@dataclass
class SplitSummary:
    domain: str
    split: str
    files: int
    rows: int
    positive_rate: float
    cardinality: dict[str, int]
    nulls: dict[str, int]
    list_len: dict[str, dict[str, float]]
    oov: dict[str, float]  # per sparse field: the share of its values that read the OOV row

    def line(self) -> str:
        card = ", ".join(f"{k}={v}" for k, v in self.cardinality.items())
        lists = ", ".join(f"{k}: {v['min']}-{v['max']} (mean {v['mean']:.1f})" for k, v in self.list_len.items())
        nulls = ", ".join(f"{k}={v}" for k, v in self.nulls.items() if v) or "none"
        oov = ", ".join(f"{k}={v:.2%}" for k, v in self.oov.items() if v) or "none"
        return (f"{self.domain}/{self.split}: {self.rows:,} rows in {self.files} files, positive rate "
                f"{self.positive_rate:.4f}\n    cardinality: {card}\n    list lengths: {lists or '-'}\n"
                f"    nulls: {nulls}\n    OOV rows read: {oov}")


def validate(dataset: CTRDataset, splits: tuple[str, ...] = SPLITS, max_oov: float = MAX_OOV) -> list[SplitSummary]:
    """Check every domain and split; return summaries or raise one DataError listing the problems. A sparse field
    whose values read the OOV row more often than ``max_oov`` (a share) is a problem: ids of the wrong base or
    a table or vocab too small."""
    out, issues = [], []
    for name, dom in dataset.domains.items():
        present = [s for s in splits if dataset.has_split(name, s)]
        if "train" in splits and "train" not in present:
            raise DataError(f"{dom.path}: domain '{name}' has no 'train' split")
        for split in present:
            files = dataset.files(name, split)
            check_schema(dom, files, dataset.filesystem)
            st = FileStats()
            for s in map_tasks(scan_file, [(f, dom.spec, dom.where, dataset.filesystem) for f in files]):
                st.merge(s)
            if st.rows == 0:
                issues.append(f"{dom.path}/{split}: empty domain: domain '{name}' has no rows in split '{split}'")
            issues += st.issues
            oov = {k: n / total for k, (n, total) in st.oov.items() if total}
            issues += [f"{dom.path}/{split}: column '{k}': {v:.1%} of its ids read the OOV row (more than "
                       f"max_oov {max_oov:.1%}): 0-based ids need first_id: 0; a table or vocab may be too small"
                       for k, v in oov.items() if v > max_oov]
            out.append(SplitSummary(
                name, split, len(files), st.rows, st.positives / max(st.rows, 1),
                {k: len(v) for k, v in st.uniques.items()},
                {f.name: st.nulls.get(f.name, 0) for f in dom.spec.fields},
                {k: {"min": v[0], "max": v[1], "mean": v[2] / max(st.rows, 1)} for k, v in st.list_len.items()},
                oov,
            ))
    if issues:
        more = f"\n  ... and {len(issues) - MAX_ISSUES} more" if len(issues) > MAX_ISSUES else ""
        raise DataError("data does not satisfy its spec:\n  " + "\n  ".join(issues[:MAX_ISSUES]) + more)
    return out
