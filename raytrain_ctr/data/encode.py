"""Arrow record batches → model-ready tensors, vectorised with numpy (no per-row Python).

Ids become table rows as the spec says (identity / hash / vocab, row 0 = OOV/padding);
sequence fields become ``[B, max_len]`` row matrices, keeping the *last* ``max_len``
items (lists are chronological, most recent last) and padding with 0 on the right.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from raytrain_ctr.batch import Batch
from raytrain_ctr.data.validate import check_values
from raytrain_ctr.spec import DomainSpec, FieldSpec


def stable_hash(values: np.ndarray) -> np.ndarray:
    """A hash of ints or strings that is the same in every process and run (uint64)."""
    return pd.util.hash_array(np.asarray(values, dtype=object) if values.dtype.kind in "OUS" else values)


def dense_values(values: pa.Array, f: FieldSpec) -> np.ndarray:
    """A dense column as float32, its null and non-finite entries read as the field's ``fill`` (0 without one:
    the value checks refuse them in training data, a serving row gets 0)."""
    x = values.to_numpy(zero_copy_only=False).astype(np.float32)  # nulls arrive as NaN
    bad = ~np.isfinite(x)
    if bad.any():
        x[bad] = 0.0 if f.fill is None else f.fill
    return x


def to_rows(values: pa.Array, f: FieldSpec, num_embeddings: int) -> np.ndarray:
    """Map raw id values of one field to table rows in ``[0, num_embeddings)``; 0 is OOV (a null, identity id 0
    when ids start at 1, an id beyond the table, a value not in the vocab)."""
    n = num_embeddings
    if f.ids == "vocab":
        idx = pc.index_in(values, value_set=pa.array(list(f.vocab), type=values.type))
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    if f.ids == "hash":
        raw = values.to_numpy(zero_copy_only=False)
        rows = (stable_hash(raw) % np.uint64(n - 1)).astype(np.int64) + 1
        if values.null_count:
            rows[values.is_null().to_numpy(zero_copy_only=False)] = 0
        return rows
    shift = 1 - f.first_id  # 0-based ids read rows 1.. (row 0 stays the OOV row)
    rows = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64) + shift
    if values.null_count:
        rows[values.is_null().to_numpy(zero_copy_only=False)] = 0
    return np.where((rows > 0) & (rows < n), rows, 0)


def pad_lists(col: pa.ListArray | pa.LargeListArray, max_len: int) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Gather indices for the last ``max_len`` items of each list.

    Returns (flat values, index matrix into them [B, max_len], validity mask [B, max_len]).
    """
    offsets = col.offsets.to_numpy()
    values = col.values
    lengths = np.diff(offsets)
    keep = np.minimum(lengths, max_len)
    start = offsets[:-1] + (lengths - keep)
    pos = np.arange(max_len)
    mask = pos[None, :] < keep[:, None]
    idx = np.where(mask, start[:, None] + pos[None, :], 0)
    if col.null_count:
        mask &= col.is_valid().to_numpy(zero_copy_only=False)[:, None]
    return values, idx, mask


def user_key(raw: np.ndarray) -> np.ndarray:
    """The int64 key a user-id column groups by (GAUC, activity): integer ids as they are, others hashed."""
    return raw.astype(np.int64) if raw.dtype.kind in "iu" else stable_hash(raw).view(np.int64)


class FeatureEncoder:
    """Encodes Arrow data of one domain into :class:`Batch` objects."""

    def __init__(self, spec: DomainSpec, extra_columns: tuple[str, ...] = (), source: str | None = None):
        self.spec = spec
        self.extra_columns = extra_columns
        self.source = source or f"domain '{spec.domain}'"  # where encode's batches come from, for its errors

    def features(self, data: pa.Table | pa.RecordBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The model's inputs alone: sparse fields as table rows (``[B]``, ``[B, max_len]``) and the
        dense fields ``[B, D]``. Training and serving both encode through it (no feature skew)."""
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        spec, cols = self.spec, {}
        for f in spec.sparse_fields:
            col = data.column(f.name).combine_chunks()
            n = spec.tables[f.table].num_embeddings
            if f.type == "categorical":
                cols[f.name] = torch.from_numpy(to_rows(col, f, n))
            else:
                values, idx, mask = pad_lists(col, f.max_len)
                flat = to_rows(values, f, n) if len(values) else np.zeros(1, dtype=np.int64)
                cols[f.name] = torch.from_numpy(np.where(mask, flat[idx], 0))
        dense_fields = spec.dense_fields
        if dense_fields:
            dense = np.stack([dense_values(data.column(f.name).combine_chunks(), f) for f in dense_fields], axis=1)
        else:
            dense = np.zeros((data.num_rows, 0), dtype=np.float32)
        return cols, torch.from_numpy(dense)

    def encode(self, data: pa.Table | pa.RecordBatch, check: bool = True) -> Batch:
        """A labelled batch; the contract's value rules are checked first (a :class:`DataError` names the
        source, column, rule and row: a bad value never trains), unless ``check=False`` says they were (a cached
        split, checked whole on the driver)."""
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        spec = self.spec
        if check:
            check_values(data, spec, f"{self.source}, a batch of {data.num_rows} rows")
        sparse, dense = self.features(data)
        label = data.column(spec.label).to_numpy().astype(np.float32)
        user = time = None
        if spec.user_id:
            user = torch.from_numpy(user_key(data.column(spec.user_id).combine_chunks().to_numpy(zero_copy_only=False)))
        if spec.time:
            time = torch.from_numpy(data.column(spec.time).to_numpy().astype(np.int64))
        extra = {c: torch.from_numpy(data.column(c).to_numpy()) for c in self.extra_columns}
        return Batch(spec.domain, sparse, dense, torch.from_numpy(label), user, time, extra,
                     tuple(f.name for f in spec.dense_fields))

    def empty(self) -> Batch:
        """A batch of zero rows with this domain's shapes (a worker whose shard ran out steps
        with it while sharded tables keep the workers in lockstep)."""
        spec = self.spec
        sparse = {f.name: torch.zeros((0,) if f.type == "categorical" else (0, f.max_len), dtype=torch.long)
                  for f in spec.sparse_fields}
        z = torch.zeros(0, dtype=torch.long)
        return Batch(spec.domain, sparse, torch.zeros(0, len(spec.dense_fields)), torch.zeros(0),
                     z if spec.user_id else None, z if spec.time else None,
                     {c: z for c in self.extra_columns}, tuple(f.name for f in spec.dense_fields))
