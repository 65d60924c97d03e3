"""Ingest: encoding to tensors, and Ray Data → 2 Train workers seeing every row exactly once."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytrain_ctr.data.dataset import CTRDataset, DataError
from raytrain_ctr.data.encode import FeatureEncoder, stable_hash
from raytrain_ctr.data.ingest import TimeWindow, joint, read_split, stream, user_clicks
from raytrain_ctr.spec import DomainSpec

SPEC = DomainSpec.from_dict({
    "domain": "d", "label": "y", "user_id": "u",
    "tables": {"item": {"num_embeddings": 10, "dim": 4}, "city": {"num_embeddings": 5, "dim": 4},
               "tag": {"num_embeddings": 4, "dim": 4}},
    "fields": [
        {"name": "item", "type": "categorical", "table": "item"},
        {"name": "hist", "type": "sequence", "table": "item", "max_len": 3},
        {"name": "city", "type": "categorical", "table": "city", "ids": "hash"},
        {"name": "tag", "type": "categorical", "table": "tag", "ids": "vocab", "vocab": ["a", "b", "c"]},
        {"name": "price", "type": "dense"},
    ],
})


def test_encoder_maps_ids_pads_sequences_and_keeps_the_latest():
    t = pa.table({
        "item": [3, 0, 12, 9], "hist": [[1, 2, 3, 4, 5], [], None, [7]],
        "city": ["paris", "rome", "paris", None], "tag": ["b", "z", "a", None],
        "price": [1.5, None, 2.0, 0.0], "y": [1, 0, 1, 0], "u": ["x", "y", "x", "z"],
    })
    sparse, dense = FeatureEncoder(SPEC).features(t)  # serving's reading: lenient
    assert sparse["item"].tolist() == [3, 0, 0, 9]  # 0 and out-of-range ids → OOV row 0
    assert sparse["hist"].tolist() == [[3, 4, 5], [0, 0, 0], [0, 0, 0], [7, 0, 0]]
    city = sparse["city"].tolist()
    assert city[0] == city[2] != 0 and 1 <= city[1] <= 4 and city[3] == 0
    assert sparse["tag"].tolist() == [2, 0, 1, 0]  # vocab order, unknown → 0
    assert dense[:, 0].tolist() == [1.5, 0.0, 2.0, 0.0]
    with pytest.raises(DataError, match="column 'item': id 12 beyond table 'item'"):  # training's: the value rules
        FeatureEncoder(SPEC).encode(t)
    clean = t.filter(pa.array([True, False, False, True])).set_column(4, "price", pa.array([1.5, 0.0]))
    b = FeatureEncoder(SPEC).encode(clean)
    assert b.sparse["item"].tolist() == [3, 9] and b.label.dtype == torch.float32
    assert b.user[0] != b.user[1]


def test_stable_hash_is_stable():
    # the same value hashes the same in every process and run (pandas' fixed-key siphash)
    assert stable_hash(np.array(["paris"], dtype=object))[0] == stable_hash(np.array(["paris"], dtype=object))[0]
    assert stable_hash(np.array([42, 42]))[0] == stable_hash(np.array([7, 42]))[1]


def test_joint_steps_until_both_domains_end():
    steps = list(joint(iter([1, 2, 3]), iter(["a"])))
    assert steps == [(1, "a"), (2, None), (3, None)]


def test_two_workers_see_every_row_exactly_once(tiny_data, ray_local, tmp_path):
    ds = CTRDataset.load(tiny_data)
    m = stream(ds, split="train", num_workers=2, batch_size=1000, extra_columns=("row_id",),
               ids_dir=str(tmp_path), storage_path=str(tmp_path / "runs"))
    for domain in ("source", "target"):
        expected = np.concatenate([pq.read_table(f, columns=["row_id"])["row_id"].to_numpy()
                                   for f in ds.files(domain, "train")])
        seen = [np.load(tmp_path / f"{domain}-rank{r}.npy") for r in (0, 1)]
        assert all(len(s) > 0 for s in seen), "both workers get rows"
        allseen = np.concatenate(seen)
        assert len(allseen) == len(expected) == m[f"{domain}_rows"]
        assert np.array_equal(np.sort(allseen), np.sort(expected))  # each row once, none lost


def test_time_window_selects_rows(tiny_data, ray_local):
    ds = CTRDataset.load(tiny_data)
    full = pa.concat_tables([pq.read_table(f, columns=["ts"]) for f in ds.files("target", "train")])
    ts = full["ts"].to_numpy()
    mid = int(np.median(ts))
    window = read_split(ds, "target", "train", window=TimeWindow(start=mid))
    got = window.to_arrow_refs()
    import ray

    got_ts = np.concatenate([ray.get(r)["ts"].to_numpy() for r in got])
    assert len(got_ts) == int((ts >= mid).sum()) and got_ts.min() >= mid


def test_user_clicks_counted_here_or_by_ray_data_agree(tiny_data, ray_local):
    """Each user's positive rows in a window of the train split: counted in process (a small split)
    and block by block in Ray Data tasks (a large one) give pandas' group-by."""
    ds = CTRDataset.load(tiny_data)
    rows = pa.concat_tables([pq.read_table(f, columns=["user_id", "label", "ts"])
                             for f in ds.files("target", "train")]).to_pandas()
    mid = int(rows.ts.median())
    want = rows[rows.ts >= mid].groupby("user_id").label.sum()
    for below in (256 << 20, 0):
        users, clicks = user_clicks(ds, "target", TimeWindow(start=mid), cache_below_bytes=below)
        assert np.array_equal(users, want.index.to_numpy()) and np.array_equal(clicks, want.to_numpy())
