"""``spec infer``: write the feature specs of a dataset from its Parquet, so nobody sizes tables by hand.

Input: ``ROOT/<domain>/{train,valid,test}/*.parquet`` (every sub-directory of ROOT with a ``train``
directory is a domain; valid/test are optional). Output (:func:`write_specs`): ``ROOT/<domain>.spec.yaml``
and ``ROOT/dataset.yaml``, the layout :meth:`CTRDataset.load` reads. Every number comes from the data of
every domain and split; the rules are fixed, so the output is predictable and meant to be reviewed.

Columns
  * ``label`` is the label; a file without it is an error. ``exclude`` columns are skipped entirely
    (e.g. a rating the label was derived from, a title, a row id, ground truth).
  * time: the ``time`` column when given (every domain needs it), else the first int/timestamp column named
    ``ts``, ``time`` or ``timestamp`` that a domain has. It is the spec's ``time``, not a field.
  * ``user_id``: the spec's ``user_id`` key in the domains that have the column; it is a field as well.
Field types (a column's type must agree across files and domains)
  * float columns, and int or float columns named in ``dense``: ``dense`` (``fill: 0`` when the column has a
    null or non-finite value anywhere, so the spec accepts it).
  * int: ``categorical``, ``ids: identity``. list<int>: ``sequence``, identity, ``pooling: mean``,
    ``max_len`` = min(``max_len``, the longest list seen).
  * string and list<string>: ``vocab`` (the sorted distinct values; table rows = values + 1) when there are at
    most ``vocab_max`` distinct values, else ``ids: hash`` with the next power of two >= 2 x distinct rows.
  * anything else (bool, timestamp, nested, ...) is an error naming the file, column and type: cast it or
    exclude it. (A bool column cannot be a field: the contract reads ints, strings and floats.)
  * Null identity ids (or null list elements) and negative ids are errors naming the file and column.
Identity tables
  * A column name is one field in every domain that has it, and one table (one size over all domains).
  * A sequence S shares the table of a categorical identity column F (of any domain) when at least half of
    S's distinct values are values of F (histories may hold items never shown as a row) AND either their
    stems match (lower-cased, ``hist_`` prefix, ``_id``/``_ids`` suffix and a plural ``s`` stripped:
    ``hist_movies`` ~ ``movie_id``) or S has more than ``vocab_max`` distinct values, F is an item column
    (group ``item`` by name, below) and S covers at least 5% of F's distinct values. So a behaviour sequence
    of items shares the item table, and a small multi-hot field (genres 1..19) never shares a table just
    because its values fall inside another column's range. Among several such F: a stem match first, then
    the highest coverage, then the name. Otherwise S has a table of its own. String fields never share.
  * 0-based ids: a table's ids are 0-based (``first_id: 0`` on its fields) iff its smallest id is 0 and id 0
    occurs at least a tenth as often as the average id (count(0) x 10 x distinct ids >= ids), counted over
    every field, domain and split of the table; else 0 is the "unknown" id (a rare 0, e.g. a missing
    release year, reads the OOV row). Rows: largest id + 1 (1-based) or + 2 (0-based), at least 2.
  * Sparse ids (a table over ``SPARSE_ROWS`` rows that its distinct ids fill under a quarter of: 64-bit
    hashed ids, say) are ``ids: hash`` instead, with the next power of two >= 2 x distinct rows.
  * Table names: a categorical field's name without a trailing ``_id`` (``movie_id`` -> ``movie``), else the
    column name; on a clash the column name, then ``<name>_2``, ``<name>_3``...; ``dim`` for every table.
Groups and scope
  * ``user`` for names starting ``user``, ``u_`` or ``hist`` and the user-id column; ``item`` for names
    starting ``item``, ``movie``, ``product`` or ``i_`` and fields sharing such a field's table; else
    ``context``. Scope ``specific`` when only some of the domains have the column, else ``shared``.

Integer bounds and null counts come from the Parquet footers (row-group statistics) where present; value
sets come from reads of the needed columns only, one file at a time (a Ray task per file when Ray runs).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from raytrain_ctr.data.dataset import SPLITS, DataError, join, parquet_under, resolve
from raytrain_ctr.runtime import map_tasks
from raytrain_ctr.spec import DomainSpec, merge_tables

TIME_NAMES = ("ts", "time", "timestamp")
MIN_OVERLAP = 0.5   # share of a sequence's distinct values that must be values of the field it shares a table with
MIN_COVERAGE = 0.05  # share of the field's distinct values a sequence must cover to share without a stem match
USER_PREFIXES = ("user", "u_", "hist")
ITEM_PREFIXES = ("item", "movie", "product", "i_")
SPARSE_ROWS = 1 << 22  # an int id table this large whose ids fill under a quarter of it is hashed instead


# ---- column kinds ---------------------------------------------------------------------------------


def _kind(t: pa.DataType) -> str:
    """``int``, ``float``, ``str``, ``list_int``, ``list_str``, ``bool``, ``timestamp`` or ``other``."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _kind(t.value_type)
        if inner in ("int", "str"):
            return f"list_{inner}"
    return "other"


def stem(name: str) -> str:
    """``hist_movies`` -> ``movie``, ``movie_id`` -> ``movie``, ``hist_ad_ids`` -> ``ad``."""
    s = name.lower().removeprefix("hist_")
    for suffix in ("_ids", "_id"):
        if s.endswith(suffix) and len(s) > len(suffix):
            s = s[: -len(suffix)]
            break
    return s[:-1] if s.endswith("s") and len(s) > 1 else s


def _name_group(name: str, user_id: str | None) -> str | None:
    n = name.lower()
    if name == user_id or n.startswith(USER_PREFIXES):
        return "user"
    if n.startswith(ITEM_PREFIXES):
        return "item"
    return None


def _pow2(n: int) -> int:
    return 1 << max(1, int(n - 1).bit_length())


# ---- per-file statistics --------------------------------------------------------------------------


@dataclass
class _Stat:
    """What some files hold in one column (list columns: their elements)."""

    values: int = 0          # non-null values
    nulls: int = 0           # null values (a sequence: null elements; a null list is an empty history)
    min: Any = None
    max: Any = None
    zeros: int = 0           # values equal to 0 (read columns only)
    longest: int = 0         # the longest list
    nonfinite: int = 0       # dense: NaN or infinite values
    uniques: np.ndarray | None = None  # sorted distinct values (read columns only)

    def merge(self, o: _Stat) -> _Stat:
        self.values += o.values
        self.nulls += o.nulls
        self.zeros += o.zeros
        self.nonfinite += o.nonfinite
        self.longest = max(self.longest, o.longest)
        if o.min is not None:
            self.min = o.min if self.min is None else min(self.min, o.min)
            self.max = o.max if self.max is None else max(self.max, o.max)
        if o.uniques is not None:
            self.uniques = o.uniques if self.uniques is None else np.union1d(self.uniques, o.uniques)
        return self


@dataclass
class _Footer:
    path: str
    types: dict[str, pa.DataType]
    rows: int
    bounds: dict[str, _Stat]  # non-list int columns whose every row group has min, max and a null count


def _read_footer(path: str, fs: pafs.FileSystem) -> _Footer:
    try:
        pf = pq.ParquetFile(path, filesystem=fs)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: unreadable Parquet file: {e}") from e
    schema, meta = pf.schema_arrow, pf.metadata
    types = {f.name: f.type for f in schema}
    leaves = {meta.schema.column(j).path: j for j in range(meta.num_columns)}
    bounds = {}
    for name, t in types.items():
        if _kind(t) != "int" or pa.types.is_dictionary(t) or name not in leaves:
            continue
        st, ok = _Stat(), True
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            if rg.num_rows == 0:
                continue
            s = rg.column(leaves[name]).statistics
            if s is None or not s.has_min_max or not s.has_null_count or not isinstance(s.min, int):
                ok = False
                break
            st.merge(_Stat(values=rg.num_rows - s.null_count, nulls=s.null_count, min=s.min, max=s.max))
        if ok:
            bounds[name] = st
    return _Footer(path, types, meta.num_rows, bounds)


def _scan_file(path: str, modes: dict[str, str], fs: pafs.FileSystem) -> tuple[dict[str, _Stat], list[str]]:
    """Read ``modes``'s columns of one file: ``bounds`` (int: min, max, nulls), ``values`` (int: bounds, zeros
    and distinct values), ``seq`` (list<int>: values and lengths), ``str``, ``seqstr`` (distinct values),
    ``dense`` (nulls and non-finite values). Returns the statistics and the broken rules (file, column)."""
    out = {c: _Stat() for c in modes}
    issues: list[str] = []
    pf = pq.ParquetFile(path, filesystem=fs)
    for rb in pf.iter_batches(batch_size=65_536, columns=list(modes)):
        for name, mode in modes.items():
            col = rb.column(name)
            if pa.types.is_dictionary(col.type):
                col = col.dictionary_decode()
            st = _Stat()
            if mode in ("seq", "seqstr"):
                lengths = pc.list_value_length(col).fill_null(0)
                st.longest = int(pc.max(lengths).as_py() or 0)
                col = pc.list_flatten(col)
            st.nulls, st.values = col.null_count, len(col) - col.null_count
            if mode == "dense":
                if pa.types.is_floating(col.type):
                    st.nonfinite = int(pc.sum(pc.invert(pc.is_finite(col.drop_null()))).as_py() or 0)
            elif st.values:
                valid = col.drop_null()
                if mode in ("bounds", "values", "seq"):
                    mm = pc.min_max(valid)
                    st.min, st.max = mm["min"].as_py(), mm["max"].as_py()
                    st.zeros = int(pc.sum(pc.equal(valid, 0)).as_py() or 0)
                if mode != "bounds":
                    st.uniques = np.sort(pc.unique(valid).to_numpy(zero_copy_only=False))
            out[name].merge(st)
    for name, mode in modes.items():
        st = out[name]
        if mode in ("bounds", "values", "seq"):
            if st.min is not None and st.min < 0:
                issues.append(f"{path}: column '{name}': negative id {st.min} (identity ids must be non-negative)")
            if st.nulls:
                what = "null list elements" if mode == "seq" else "null ids"
                issues.append(f"{path}: column '{name}': {st.nulls} {what} (identity ids must be present: use 0 "
                              "for 'unknown', or exclude the column)")
    return out, issues


def _scan_all(tasks: list[tuple[str, dict[str, str]]], fs: pafs.FileSystem) -> dict[str, _Stat]:
    """Scan every file (a Ray task each when Ray runs) and merge per column; raise on the first broken rule."""
    merged: dict[str, _Stat] = {}
    for stats, issues in map_tasks(_scan_file, [(p, m, fs) for p, m in tasks if m]):
        if issues:
            raise DataError(issues[0] + (f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""))
        for name, st in stats.items():
            merged.setdefault(name, _Stat()).merge(st)
    return merged


# ---- inference -------------------------------------------------------------------------------------


def _domains(fs: pafs.FileSystem, base: str, only: tuple[str, ...] | None) -> dict[str, list[str]]:
    """Domain name -> its Parquet files (train first, then valid, test)."""
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise DataError(f"{base}: not a directory")
    found = {}
    for d in sorted(fs.get_file_info(pafs.FileSelector(base)), key=lambda i: i.path):
        if d.type == pafs.FileType.Directory and fs.get_file_info(join(d.path, "train")).type == \
                pafs.FileType.Directory:
            found[posixpath.basename(d.path.rstrip("/"))] = d.path
    if only is not None:
        missing = [d for d in only if d not in found]
        if missing:
            raise DataError(f"{base}: no domain directory with a 'train' split for {missing} (found {sorted(found)})")
        found = {d: found[d] for d in sorted(only)}
    if not found:
        raise DataError(f"{base}: no domains: expected <domain>/train/*.parquet under it")
    out = {}
    for name, path in found.items():
        files = [f for split in SPLITS if fs.get_file_info(join(path, split)).type == pafs.FileType.Directory
                 for f in parquet_under(fs, join(path, split))]
        if not files:
            raise DataError(f"{path}: empty domain: no Parquet files for domain '{name}'")
        out[name] = files
    return out


def _type_error(path: str, name: str, t: pa.DataType) -> DataError:
    hint = "a bool column is not a feature type: cast it to int8" if pa.types.is_boolean(t) else "cast it"
    return DataError(f"{path}: column '{name}' has type {t}: spec infer makes fields of int, float and string "
                     f"columns and lists of ints or strings ({hint}, or exclude it)")


def infer_specs(root: str, *, label: str = "label", user_id: str | None = "user_id", time: str | None = None,
                exclude: tuple[str, ...] = (), dense: tuple[str, ...] = (), dim: int = 16, max_len: int = 20,
                vocab_max: int = 64, domains: tuple[str, ...] | None = None) -> dict[str, DomainSpec]:
    """The spec of every domain under ``root``, by the rules of this module's docstring."""
    fs, base = resolve(root)
    files = _domains(fs, base, domains)
    with ThreadPoolExecutor(8) as pool:
        footers = {d: list(pool.map(lambda p: _read_footer(p, fs), fl)) for d, fl in files.items()}

    # the columns of each domain, their kinds (agreeing across files and domains), the time columns
    skip = set(exclude) | {label}
    cols: dict[str, list[str]] = {}          # domain -> its columns, in the order of its first file
    kinds: dict[str, tuple[str, str, pa.DataType]] = {}  # column -> (kind, a file, its type)
    times: dict[str, str | None] = {}
    for d, fts in footers.items():
        first = fts[0]
        for ft in fts:
            if label not in ft.types:
                raise DataError(f"{ft.path}: missing label column '{label}'")
            if _kind(ft.types[label]) not in ("int", "float", "bool"):
                raise DataError(f"{ft.path}: label column '{label}' has type {ft.types[label]}: a label must be "
                                "int, bool or float")
            for a, b in ((first, ft), (ft, first)):
                extra = [c for c in a.types if c not in b.types and c not in skip]
                if extra:
                    raise DataError(f"{b.path}: missing column '{extra[0]}' (present in {a.path}): every file of "
                                    f"domain '{d}' needs the same columns (or exclude it)")
            for c, t in ft.types.items():
                if c in skip:
                    continue
                k = _kind(t)
                if c in kinds and kinds[c][0] != k:
                    raise DataError(f"{ft.path}: column '{c}' has type {t} but {kinds[c][2]} in {kinds[c][1]}: a "
                                    "column needs one type in every file and domain")
                kinds.setdefault(c, (k, ft.path, t))
        if time is not None:
            if time not in first.types:
                raise DataError(f"{first.path}: missing time column '{time}'")
            times[d] = time
        else:
            times[d] = next((c for c in TIME_NAMES if c in first.types and c not in skip
                             and _kind(first.types[c]) in ("int", "timestamp")), None)
        if times[d] and _kind(first.types[times[d]]) not in ("int", "timestamp"):
            raise DataError(f"{first.path}: time column '{times[d]}' has type {first.types[times[d]]}: it must be "
                            "int (unix seconds) or timestamp")
        cols[d] = [c for c in first.types if c not in skip and c != times[d]]
    time_cols = {t for t in times.values() if t}
    everywhere = {c for fts in footers.values() for ft in fts for c in ft.types}
    for key, given in (("exclude", exclude), ("dense", dense)):
        unknown = [c for c in given if c not in everywhere]
        if unknown:
            raise DataError(f"{base}: {key} names {unknown}, in no file of domains {sorted(files)} (columns: "
                            f"{sorted(everywhere)})")

    roles: dict[str, str] = {}  # column -> dense, cat, seq, cat_str, seq_str
    for c, (k, path, t) in kinds.items():
        if c in time_cols and all(c not in cs for cs in cols.values()):
            continue
        if c in dense:
            if k not in ("int", "float"):
                raise DataError(f"{path}: column '{c}' has type {t}: a dense field must be a float or int column")
            roles[c] = "dense"
        elif c == user_id and k not in ("int", "str"):
            raise DataError(f"{path}: user-id column '{c}' has type {t}: it must be int or string")
        else:
            role = {"float": "dense", "int": "cat", "list_int": "seq", "str": "cat_str", "list_str": "seq_str"}.get(k)
            if role is None:
                raise _type_error(path, c, t)
            roles[c] = role

    # pass 1: footers give the int bounds; pass 2 reads what they cannot give
    bounds: dict[str, _Stat] = {}
    first_pass: list[tuple[str, dict[str, str]]] = []
    mode_of = {"seq": "seq", "cat_str": "str", "seq_str": "seqstr", "dense": "dense"}
    for d, fts in footers.items():
        for ft in fts:
            modes = {}
            for c in cols[d]:
                if roles[c] == "cat" and c in ft.bounds:
                    st = ft.bounds[c]
                    if st.min is not None and st.min < 0:
                        raise DataError(f"{ft.path}: column '{c}': negative id {st.min} (identity ids must be "
                                        "non-negative)")
                    if st.nulls:
                        raise DataError(f"{ft.path}: column '{c}': {st.nulls} null ids (identity ids must be "
                                        "present: use 0 for 'unknown', or exclude the column)")
                    bounds.setdefault(c, _Stat()).merge(st)
                else:
                    modes[c] = mode_of.get(roles[c], "bounds")
            first_pass.append((ft.path, modes))
    stats = _scan_all(first_pass, fs)
    for c, st in bounds.items():
        stats.setdefault(c, _Stat()).merge(st)

    # sharing candidates and 0-based checks need the value sets of some int columns: pass 3
    cats = [c for c, r in roles.items() if r == "cat"]
    seqs = [c for c, r in roles.items() if r == "seq"]
    group = {c: _name_group(c, user_id) for c in roles}

    def candidates(s: str) -> list[str]:
        big = stats[s].uniques is not None and len(stats[s].uniques) > vocab_max
        return [f for f in cats if stem(f) == stem(s) or (big and group[f] == "item")] if stats[s].values else []

    needed = {f for s in seqs for f in candidates(s)} | {c for c in cats if stats[c].min == 0 or
                                                          (stats[c].max or 0) + 2 > SPARSE_ROWS}
    if needed:
        third = [(ft.path, {c: "values" for c in cols[d] if c in needed}) for d, fts in footers.items() for ft in fts]
        for c, st in _scan_all(third, fs).items():
            stats[c].uniques, stats[c].zeros = st.uniques, st.zeros

    table_of: dict[str, str] = {c: c for c in cats}  # column -> the column whose table it uses
    for s in seqs:
        best = None
        for f in sorted(candidates(s)):
            su, fu = stats[s].uniques, stats[f].uniques
            if fu is None or not len(fu):
                continue
            common = len(np.intersect1d(su, fu, assume_unique=True))
            overlap, coverage = common / len(su), common / len(fu)
            if overlap >= MIN_OVERLAP and (stem(f) == stem(s) or coverage >= MIN_COVERAGE):
                key = (stem(f) == stem(s), coverage)
                if best is None or key > best[0]:  # ties: the first name
                    best = (key, f)
        table_of[s] = best[1] if best else s
    item_tables = {c for c in cats if group[c] == "item"}
    for s in seqs:
        if group[s] is None and table_of[s] in item_tables:
            group[s] = "item"

    # table names, in the order columns first appear (domains sorted, then each domain's columns)
    order = list(dict.fromkeys(c for d in cols for c in cols[d] if c in roles))
    names: dict[str, str] = {}
    used: set[str] = set()
    for c in sorted((c for c in order if roles[c] != "dense"), key=lambda c: roles[c] not in ("cat", "cat_str")):
        if table_of.get(c, c) != c:
            continue
        base_name = c[:-3] if roles[c] in ("cat", "cat_str") and c.endswith("_id") and len(c) > 3 else c
        options = [base_name, c] + [f"{c}_{i}" for i in range(2, len(order) + 3)]
        names[c] = next(n for n in options if n not in used)
        used.add(names[c])

    # identity tables: members, size, base
    members: dict[str, list[str]] = {}
    for c in cats + seqs:
        members.setdefault(table_of[c], []).append(c)
    ident: dict[str, tuple[int, int]] = {}  # owner column -> (num_embeddings, first_id)
    hashed: dict[str, int] = {}  # owner column -> rows, for sparse ids (64-bit hashed ids, say) hashed instead
    for owner, mem in members.items():
        lo = min((stats[c].min for c in mem if stats[c].min is not None), default=None)
        hi = max((stats[c].max for c in mem if stats[c].max is not None), default=0)
        sets = [stats[c].uniques for c in mem if stats[c].uniques is not None]
        distinct = len(np.unique(np.concatenate(sets))) if sets else 1
        first_id = 1
        if lo == 0:
            n_values = sum(stats[c].values for c in mem)
            zeros = sum(stats[c].zeros for c in mem)
            first_id = 0 if zeros * 10 * distinct >= n_values else 1
        ident[owner] = (max(2, int(hi) + 2 - first_id), first_id)
        if ident[owner][0] > SPARSE_ROWS and sets and 4 * distinct < ident[owner][0]:
            hashed[owner] = _pow2(2 * distinct)

    def field(c: str, scope: str) -> tuple[dict, str | None, int]:
        role = roles[c]
        g = group[c] or "context"
        f: dict[str, Any] = {"name": c, "type": "dense" if role == "dense" else
                             ("sequence" if role.startswith("seq") else "categorical")}
        size = 0
        if role == "dense":
            if stats[c].nulls or stats[c].nonfinite:
                f["fill"] = 0.0
        elif role in ("cat", "seq") and table_of[c] in hashed:
            f["table"], f["ids"], size = names[table_of[c]], "hash", hashed[table_of[c]]
        elif role in ("cat", "seq"):
            size, first = ident[table_of[c]]
            f["table"] = names[table_of[c]]
            if first == 0:
                f["first_id"] = 0
        else:
            u = stats[c].uniques
            if u is None or not len(u):
                raise DataError(f"{kinds[c][1]}: column '{c}' has no values in any file (exclude it)")
            f["table"] = names[c]
            if len(u) <= vocab_max:
                f["ids"], f["vocab"], size = "vocab", [str(v) for v in u], len(u) + 1
            else:
                f["ids"], size = "hash", _pow2(2 * len(u))
        f["group"], f["scope"] = g, scope
        if f["type"] == "sequence":
            f["max_len"], f["pooling"] = max(1, min(max_len, stats[c].longest)), "mean"
        return f, f.get("table"), size

    out = {}
    for d in cols:
        flds, tables = [], {}
        for c in cols[d]:
            if c not in roles:
                continue
            scope = "shared" if all(c in cols[o] for o in cols) else "specific"
            f, table, size = field(c, scope)
            flds.append(f)
            if table:
                tables[table] = {"num_embeddings": size, "dim": dim}
        if not flds:
            raise DataError(f"{files[d][0]}: domain '{d}' has no feature columns left")
        raw = {"domain": d, "label": label, "tables": tables, "fields": flds}
        if user_id and user_id in cols[d]:
            raw["user_id"] = user_id
        if times[d]:
            raw["time"] = times[d]
        out[d] = DomainSpec.from_dict(raw, where=f"inferred spec of domain '{d}'")
    merge_tables(list(out.values()))
    return out


# ---- writing ------------------------------------------------------------------------------------


def _write_atomic(fs: pafs.FileSystem, path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    if isinstance(fs, pafs.LocalFileSystem):
        fd, tmp = tempfile.mkstemp(dir=posixpath.dirname(path), prefix=f".{posixpath.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the spec from other users of the dataset
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, path)


def write_specs(root: str, specs: dict[str, DomainSpec], force: bool = False) -> list[str]:
    """Write ``<domain>.spec.yaml`` per domain, then ``dataset.yaml``; returns the paths written. Refuses (a
    :class:`DataError` naming the file) when ROOT already has a dataset.yaml or spec file, unless ``force``."""
    fs, base = resolve(root)
    for name, spec in specs.items():
        if spec.domain != name:
            raise DataError(f"spec of domain '{spec.domain}' is given as domain '{name}'")
    merge_tables(list(specs.values()))
    if not force:
        existing = sorted((i.path for i in fs.get_file_info(pafs.FileSelector(base))
                           if i.type == pafs.FileType.File
                           and (i.path.endswith(".spec.yaml") or posixpath.basename(i.path) == "dataset.yaml")),
                          key=lambda p: (posixpath.basename(p) != "dataset.yaml", p))
        if existing:
            raise DataError(f"{existing[0]}: already exists; refusing to overwrite it (pass force=True / --force)")
    written = []
    for name, spec in specs.items():
        path = join(base, f"{name}.spec.yaml")
        _write_atomic(fs, path, spec.to_yaml())
        written.append(path)
    meta = {"description": "feature specs inferred from the Parquet by `raytrain-ctr spec infer`",
            "domains": {name: {"spec": f"{name}.spec.yaml", "path": name} for name in specs}}
    path = join(base, "dataset.yaml")
    _write_atomic(fs, path, yaml.safe_dump(meta, sort_keys=False))
    written.append(path)
    return written
