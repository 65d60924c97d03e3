"""Negatives for click-only logs: k sampled unclicked items per click.

Many public logs hold only positives (clicks, purchases, ratings turned into implicit feedback). A CTR model
needs negatives, and the standard practice is to sample them from the items a user did not interact with:
negative sampling as in NCF (He et al., "Neural Collaborative Filtering", WWW 2017), which draws k unobserved
items per observed interaction uniformly from the catalogue (k = 4 there, the default here).
:func:`sample_negatives` does this per domain of a plain Parquet directory (no spec or ``dataset.yaml`` yet)::

    IN/<domain>/{train,valid,test}/**/*.parquet  ->  OUT/<domain>/{train,valid,test}/**/*.parquet

Per domain:

* the catalogue is the set of distinct ``item`` values across all the domain's splits;
* a negative for positive (u, i) is an item j with (u, j) in none of the domain's splits. Candidates are drawn
  vectorised and tested against the sorted keys ``user_code * n_items + item_code`` of the seen pairs; only the
  rejected ones are redrawn. After a number of rounds the remaining rows (users who have seen almost every item)
  are drawn exactly from their users' unseen items. A user who has seen every item is an error. A positive's k
  negatives are drawn independently (with replacement), so they may repeat an item;
* ``uniform`` draws uniformly from the catalogue; ``popularity`` draws an item with weight equal to its number of
  positives in the train split, or, for an item that never occurs in train, its number of positives across all
  splits (so every catalogue item has weight ≥ 1). Both are then restricted to the user's unseen items;
* a negative copies its positive's whole row (user columns, context, time, sequences) but takes ``item`` and
  every column in ``item_columns`` from the sampled item: the values of that item's first occurrence in the
  domain (splits in train, valid, test order, files sorted, rows in file order).

Output: one file per input file, at the same relative path under ``OUT/<domain>/<split>/``. Its rows are the
input's rows (the positives, label 1) in their order, then the negatives (label 0) grouped by positive: the k
negatives of positive 0, then those of positive 1, and so on. The label column keeps its place and type where
the input has one (every value must then be 1); otherwise it is appended as ``int8``.

Each input file is processed by exactly one task (a Ray task when Ray is initialized, in this process otherwise)
with a numpy Generator seeded from ``(seed, domain, split, relative path)``, so the output is byte-identical for a
given seed whatever the parallelism. The catalogue and seen pairs are built on the driver from the user, item and
item-side columns only, and shared with a domain's tasks once (``ray.put``). The output is written into a sibling
``OUT.tmp-<random>`` directory and renamed to ``OUT`` when complete; an existing ``OUT`` is refused.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytrain_ctr.data.dataset import SPLITS, DataError, join, parquet_under, resolve
from raytrain_ctr.runtime import map_tasks
from raytrain_ctr.spec import SpecError

SAMPLINGS = ("uniform", "popularity")
REJECTION_ROUNDS = 32  # then the rows still rejected are drawn from their users' unseen items exactly


@dataclass(frozen=True)
class _Columns:
    user: str
    item: str
    item_columns: tuple[str, ...]
    label: str


@dataclass(frozen=True)
class _Catalogue:
    """One domain's items and seen pairs, built on the driver and shared by the domain's file tasks."""

    users: pa.Array  # distinct user ids; a user's code is its position
    items: pa.Table  # item column + item_columns, one row per distinct item (its first occurrence); code = row
    seen: np.ndarray  # sorted unique int64 keys user_code * n_items + item_code
    cdf: np.ndarray | None  # cumulative popularity weights (int64); None for uniform


@dataclass(frozen=True)
class _Job:
    """One input file and where its output goes."""

    domain: str
    split: str
    rel: str  # path under the split directory
    src: str
    dst: str
    in_fs: pafs.FileSystem
    out_fs: pafs.FileSystem


def sample_negatives(src: str, out: str, *, user: str = "user_id", item: str = "item_id", k: int = 4,
                     sampling: str = "uniform", item_columns: tuple[str, ...] = (), label: str = "label",
                     seed: int = 0, domains: tuple[str, ...] | None = None,
                     parallelism: int | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """Write ``out``: the domains of ``src`` with ``k`` sampled negatives per positive (see the module docstring).

    ``domains``: the domain directories to take (default: every sub-directory of ``src`` holding a ``train``
    directory). ``parallelism``: at most this many Ray tasks at a time; ``1``, or Ray not initialized, processes
    the files in this process (same output). Returns, per domain and split, (positives, negatives) written.
    """
    cols = _Columns(user, item, tuple(item_columns), label)
    _check_args(cols, k, sampling, seed, parallelism)
    k, seed = int(k), int(seed)
    in_fs, in_base = resolve(src)
    out_fs, out_base = resolve(out)
    out_base = out_base.rstrip("/")
    _refuse_existing(out_fs, out_base)
    names = _domain_names(in_fs, in_base, domains)
    tmp = f"{out_base}.tmp-{secrets.token_hex(4)}"
    try:
        jobs: list[_Job] = []
        catalogues: dict[str, _Catalogue] = {}
        for name in names:
            files = _files(in_fs, in_base, name)
            catalogues[name] = _catalogue(in_fs, name, files, cols, sampling)
            for split, paths in files.items():
                split_dir = join(in_base, name, split)
                for path in paths:
                    rel = path[len(split_dir) + 1:]
                    jobs.append(_Job(name, split, rel, path, join(tmp, name, split, rel), in_fs, out_fs))
        out_fs.create_dir(tmp, recursive=True)
        counts = map_tasks(write_file, [(job, catalogues[job.domain], cols, k, seed) for job in jobs], parallelism)
        _refuse_existing(out_fs, out_base)
        out_fs.move(tmp, out_base)
    except BaseException:
        try:
            if out_fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                out_fs.delete_dir(tmp)
        except OSError:
            pass
        raise
    result: dict[str, dict[str, tuple[int, int]]] = {name: {} for name in names}
    for job, (pos, neg) in zip(jobs, counts):
        p, n = result[job.domain].get(job.split, (0, 0))
        result[job.domain][job.split] = (p + pos, n + neg)
    return result


# ---- driver ------------------------------------------------------------------------------------


def _check_args(cols: _Columns, k: int, sampling: str, seed: int, parallelism: int | None) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SpecError(f"negatives: k must be ≥ 1, got {k!r}")
    if sampling not in SAMPLINGS:
        raise SpecError(f"negatives: sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpecError(f"negatives: seed must be an integer ≥ 0, got {seed!r}")
    if parallelism is not None and (isinstance(parallelism, bool) or not isinstance(parallelism, int)
                                    or parallelism < 1):
        raise SpecError(f"negatives: parallelism must be ≥ 1, got {parallelism!r}")
    if cols.user == cols.item:
        raise SpecError(f"negatives: user and item must be different columns, both are '{cols.user}'")
    for c in cols.item_columns:
        if c in (cols.user, cols.item, cols.label):
            raise SpecError(f"negatives: item_columns may not hold the user, item or label column, got '{c}'")
    if cols.label in (cols.user, cols.item):
        raise SpecError(f"negatives: label must not be the user or item column, got '{cols.label}'")


def _refuse_existing(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        raise DataError(f"{path}: output already exists; negatives are written to a new directory "
                        f"(remove it or choose another path)")


def _domain_names(fs: pafs.FileSystem, base: str, domains: tuple[str, ...] | None) -> list[str]:
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise DataError(f"{base}: input directory does not exist")
    if domains is None:
        subdirs = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(base))
                         if i.type == pafs.FileType.Directory)
        names = [d for d in subdirs if fs.get_file_info(join(base, d, "train")).type == pafs.FileType.Directory]
        if not names:
            raise DataError(f"{base}: no domain directories (sub-directories holding a 'train' directory)")
        return names
    if isinstance(domains, str):
        domains = (domains,)
    names = list(dict.fromkeys(domains))
    if not names:
        raise SpecError("negatives: domains must name at least one domain")
    for d in names:
        if fs.get_file_info(join(base, d, "train")).type != pafs.FileType.Directory:
            raise DataError(f"{join(base, d, 'train')}: domain '{d}' has no train split directory")
    return names


def _files(fs: pafs.FileSystem, base: str, domain: str) -> dict[str, list[str]]:
    """The domain's Parquet files per existing split (train, valid, test order); train must hold some."""
    out = {}
    for split in SPLITS:
        path = join(base, domain, split)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            out[split] = parquet_under(fs, path)
    if not out["train"]:
        raise DataError(f"{join(base, domain, 'train')}: empty domain: no Parquet files for domain "
                        f"'{domain}', split 'train'")
    return out


def _plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-encoded columns as plain values."""
    return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False)))[0])


def _check_label(path: str, table: pa.Table, label: str) -> None:
    col = table[label]
    t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise DataError(f"{path}: column '{label}' has type {t}; click-only input may have no label column or one "
                        f"whose every value is 1")
    ok = pc.fill_null(pc.equal(col.cast(pa.float64()), 1.0), False)
    if not pc.all(ok).as_py():
        row = _first_true(pc.invert(ok))
        raise DataError(f"{path}: column '{label}' row {row} is {col[row].as_py()!r}; click-only input may have no "
                        f"label column or one whose every value is 1")


def _read_keys(fs: pafs.FileSystem, path: str, cols: _Columns) -> pa.Table:
    """The user, item and item-side columns of one file, checked (present, no null ids, labels all 1)."""
    names = pq.read_schema(path, filesystem=fs).names
    for c in (cols.user, cols.item, *cols.item_columns):
        if c not in names:
            raise DataError(f"{path}: missing column '{c}' (needed to sample negatives; has {names})")
    read = [cols.user, cols.item, *cols.item_columns]
    table = pq.read_table(path, columns=read + ([cols.label] if cols.label in names else []), filesystem=fs)
    for c in (cols.user, cols.item):
        if table[c].null_count:
            raise DataError(f"{path}: column '{c}' row {_first_true(table[c].is_null())} is null; "
                            f"user and item ids may not be null")
    if cols.label in names:
        _check_label(path, table, cols.label)
    return pa.table({c: _plain(table[c]) for c in read})


def _catalogue(fs: pafs.FileSystem, domain: str, files: dict[str, list[str]], cols: _Columns,
               sampling: str) -> _Catalogue:
    parts, n_train = [], 0
    for split, paths in files.items():
        for path in paths:
            t = _read_keys(fs, path, cols)
            if parts and t.schema != parts[0].schema:
                t = _cast_like(path, t, parts[0].schema)
            parts.append(t)
            n_train += t.num_rows if split == "train" else 0
    table = pa.concat_tables(parts).combine_chunks()
    ucodes, users = _encode(table[cols.user])
    icodes, catalogue = _encode(table[cols.item])
    n_users, n_items = len(users), len(catalogue)
    if n_items == 0:
        raise DataError(f"{domain}: empty domain: no positives in any split")
    if n_users * n_items >= 2**62:
        raise DataError(f"{domain}: {n_users} users × {n_items} items is too many for 64-bit pair keys")
    first = np.unique(icodes, return_index=True)[1]
    items = table.select([cols.item, *cols.item_columns]).take(pa.array(first)).combine_chunks()
    seen = np.unique(ucodes * n_items + icodes)
    full = np.flatnonzero(np.bincount(seen // n_items, minlength=n_users) == n_items)
    if len(full):
        raise DataError(f"{domain}: user {users[int(full[0])].as_py()!r} has interacted with every one of the "
                        f"domain's {n_items} items; no negative can be sampled for them (drop the user)")
    cdf = None
    if sampling == "popularity":
        weights = np.bincount(icodes[:n_train], minlength=n_items)
        weights = np.where(weights > 0, weights, np.bincount(icodes, minlength=n_items))
        cdf = np.cumsum(weights, dtype=np.int64)
    return _Catalogue(users, items, seen, cdf)


def _cast_like(path: str, table: pa.Table, schema: pa.Schema) -> pa.Table:
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        bad = next(f for f in schema if table.schema.field(f.name).type != f.type)
        raise DataError(f"{path}: column '{bad.name}' has type {table.schema.field(bad.name).type} but the "
                        f"domain's first file has {bad.type}: {e}") from e


def _encode(col: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Codes (int64, first-occurrence order) and the distinct values."""
    enc = pc.dictionary_encode(col.combine_chunks())
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary


# ---- one file (a task) -------------------------------------------------------------------------


def file_rng(seed: int, domain: str, split: str, rel: str) -> np.random.Generator:
    """The Generator of one input file: from the seed and a SHA-256 of its domain, split and relative path."""
    digest = hashlib.sha256("\0".join((domain, split, rel)).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:16], "little")])


def write_file(job: _Job, cat: _Catalogue, cols: _Columns, k: int, seed: int) -> tuple[int, int]:
    """Read one input file, write its positives then their negatives; returns (positives, negatives)."""
    table = pq.read_table(job.src, filesystem=job.in_fs)
    n = table.num_rows
    users = _plain(table[cols.user]).cast(cat.users.type)
    found = pc.index_in(users, value_set=cat.users)
    if found.null_count:
        raise DataError(f"{job.src}: column '{cols.user}' row {_first_true(found.is_null())} holds a user the "
                        f"catalogue does not know: the file changed while negatives were sampled")
    ucodes = found.to_numpy(zero_copy_only=False).astype(np.int64)
    picks = _sample(file_rng(seed, job.domain, job.split, job.rel), np.repeat(ucodes, k), cat)
    neg = table.take(pa.array(np.repeat(np.arange(n, dtype=np.int64), k)))
    take = pa.array(picks)
    for c in (cols.item, *cols.item_columns):
        field = table.schema.field(c)
        neg = neg.set_column(table.schema.get_field_index(c), field, cat.items[c].take(take).cast(field.type))
    pos = table
    if cols.label in table.schema.names:
        i, field = table.schema.get_field_index(cols.label), table.schema.field(cols.label)
        neg = neg.set_column(i, field, pa.array(np.zeros(len(neg), np.int8)).cast(field.type))
    else:
        pos = pos.append_column(pa.field(cols.label, pa.int8()), pa.array(np.ones(n, np.int8)))
        neg = neg.append_column(pa.field(cols.label, pa.int8()), pa.array(np.zeros(len(neg), np.int8)))
    job.out_fs.create_dir(job.dst.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.concat_tables([pos, neg]), job.dst, filesystem=job.out_fs)
    return n, len(neg)


def _draw(rng: np.random.Generator, size: int, n: int, cdf: np.ndarray | None) -> np.ndarray:
    """``size`` codes in ``[0, n)``: uniform, or by the integer weights whose cumulative sum is ``cdf``."""
    if cdf is None:
        return rng.integers(0, n, size, dtype=np.int64)
    return np.searchsorted(cdf, rng.integers(0, cdf[-1], size, dtype=np.int64), side="right").astype(np.int64)


def _sample(rng: np.random.Generator, ucodes: np.ndarray, cat: _Catalogue) -> np.ndarray:
    """An unseen item code for each user code: rejection sampling, then exact draws for the stragglers."""
    n_items = len(cat.items)
    picks = np.empty(len(ucodes), np.int64)
    todo = np.arange(len(ucodes))
    for _ in range(REJECTION_ROUNDS):
        if not len(todo):
            return picks
        cand = _draw(rng, len(todo), n_items, cat.cdf)
        keys = ucodes[todo] * n_items + cand
        at = np.minimum(np.searchsorted(cat.seen, keys), len(cat.seen) - 1)
        ok = cat.seen[at] != keys
        picks[todo[ok]] = cand[ok]
        todo = todo[~ok]
    weights = None if cat.cdf is None else np.diff(cat.cdf, prepend=0)
    for u in np.unique(ucodes[todo]):
        rows = todo[ucodes[todo] == u]
        lo, hi = np.searchsorted(cat.seen, [u * n_items, (u + 1) * n_items])
        unseen = np.setdiff1d(np.arange(n_items), cat.seen[lo:hi] - u * n_items, assume_unique=True)
        cdf = None if weights is None else np.cumsum(weights[unseen])
        picks[rows] = unseen[_draw(rng, len(rows), len(unseen), cdf)]
    return picks
