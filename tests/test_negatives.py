"""Negatives for click-only logs: contract, determinism across parallelism, popularity skew, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raytrain_ctr.data.dataset import DataError
from raytrain_ctr.data.negatives import sample_negatives
from raytrain_ctr.spec import SpecError

N_USERS, N_ITEMS, N_POS = 50, 40, 300
# split -> files (relative paths) and the share of a domain's rows each gets
FILES = {"train": ["part-0.parquet", "part-1.parquet"], "valid": ["part-0.parquet"], "test": ["sub/part-0.parquet"]}
SHARES = [0.4, 0.3, 0.15, 0.15]


def item_id(domain: str, code: int) -> object:
    return f"m{code}" if domain == "movies" else code


def write_logs(root: Path, seed: int = 0) -> dict[str, dict]:
    """Two click-only domains ('books': int item ids, 'movies': string item ids, no valid split for 'movies');
    returns each domain's item -> item_cat and its set of (user, item) pairs written."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 70, N_USERS)
    truth = {}
    for domain in ("books", "movies"):
        item_cat = rng.integers(0, 6, N_ITEMS)
        users = rng.integers(0, N_USERS, N_POS)
        items = rng.integers(0, N_ITEMS, N_POS)
        table = pa.table({
            "user_id": pa.array(users, pa.int64()),
            "age": pa.array(age[users], pa.int32()),
            "item_id": pa.array([item_id(domain, int(i)) for i in items]),
            "item_cat": pa.array(item_cat[items], pa.int64()),
            "slot": pa.array([f"s{s}" for s in rng.integers(0, 3, N_POS)]),
            "ts": pa.array(np.arange(N_POS, dtype=np.int64) + 1_600_000_000),
            "hist": pa.array([list(rng.integers(0, N_ITEMS, rng.integers(0, 5))) for _ in range(N_POS)],
                             pa.list_(pa.int64())),
        })
        bounds = np.cumsum([0] + [int(s * N_POS) for s in SHARES])
        bounds[-1] = N_POS
        parts = [(split, rel) for split, rels in FILES.items() for rel in rels]
        seen = set()
        for (split, rel), lo, hi in zip(parts, bounds[:-1], bounds[1:]):
            if domain == "movies" and split == "valid":
                continue  # a split may be absent
            seen |= {(int(u), item_id(domain, int(i))) for u, i in zip(users[lo:hi], items[lo:hi])}
            path = root / domain / split / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.slice(lo, hi - lo), path)
        truth[domain] = {"item_cat": {item_id(domain, int(i)): int(item_cat[i]) for i in range(N_ITEMS)},
                         "seen": seen}
    return truth


def output_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_negatives_contract(tmp_path):
    truth = write_logs(tmp_path / "in")
    k = 3
    counts = sample_negatives(str(tmp_path / "in"), str(tmp_path / "out"), k=k, item_columns=("item_cat",),
                              parallelism=1)
    assert sorted(counts) == ["books", "movies"]
    assert sorted(counts["movies"]) == ["test", "train"]
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # no temporary directory left behind
    inputs = sorted(p.relative_to(tmp_path / "in") for p in (tmp_path / "in").rglob("*.parquet"))
    assert sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.parquet")) == inputs
    total = {}
    for rel in inputs:
        domain, split = rel.parts[0], rel.parts[1]
        src, out = pq.read_table(tmp_path / "in" / rel), pq.read_table(tmp_path / "out" / rel)
        n = src.num_rows
        assert out.num_rows == n * (1 + k)  # exactly k negatives per positive
        assert out.column_names == src.column_names + ["label"]
        labels = out["label"].to_numpy()
        assert out.schema.field("label").type == pa.int8()
        assert (labels[:n] == 1).all() and (labels[n:] == 0).all()
        assert out.slice(0, n).drop_columns(["label"]).equals(src)  # positives keep their rows and order
        neg = out.slice(n)
        expect = src.take(pa.array(np.repeat(np.arange(n), k))).drop_columns(["item_id", "item_cat"])
        assert neg.drop_columns(["item_id", "item_cat", "label"]).equals(expect)  # the positive's row, copied
        seen, item_cat = truth[domain]["seen"], truth[domain]["item_cat"]
        catalogue = {i for _, i in seen}
        for u, i, c in zip(neg["user_id"].to_pylist(), neg["item_id"].to_pylist(), neg["item_cat"].to_pylist()):
            assert i in catalogue
            assert (u, i) not in seen  # never a pair seen in any split of the domain
            assert c == item_cat[i]  # item-side features follow the sampled item
        p, q = total.get((domain, split), (0, 0))
        total[domain, split] = (p + n, q + n * k)
    assert {(d, s): v for d, splits in counts.items() for s, v in splits.items()} == total


def test_deterministic_across_parallelism(tmp_path, ray_local):
    write_logs(tmp_path / "in")
    src = str(tmp_path / "in")

    def run(name: str, seed: int, parallelism: int | None) -> dict[str, bytes]:
        sample_negatives(src, str(tmp_path / name), k=4, item_columns=("item_cat",), seed=seed,
                         sampling="popularity", parallelism=parallelism)
        return output_files(tmp_path / name)

    serial = run("serial", 7, 1)
    assert ray_local.is_initialized()
    assert run("ray", 7, None) == serial  # one Ray task per file, byte-identical
    assert run("ray2", 7, 2) == serial
    assert run("again", 7, 1) == serial
    other = run("other", 8, 1)
    assert other.keys() == serial.keys()
    assert all(other[f] != serial[f] for f in serial)


def test_popularity_favours_popular_items(tmp_path):
    """Item 0 holds 400 train clicks, all by users 0-4; items 1..39 one click each by users 5..44. Negatives
    of users 5..44 (who never clicked item 0) should pick item 0 far more often under popularity sampling."""
    users = np.concatenate([np.arange(400) % 5, np.arange(5, 5 + 39)])
    items = np.concatenate([np.zeros(400, np.int64), np.arange(1, 40)])
    (tmp_path / "in" / "shop" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"user_id": users, "item_id": items}), tmp_path / "in" / "shop" / "train" / "a.parquet")

    def share_of_item0(sampling: str) -> tuple[float, float]:
        out = tmp_path / sampling
        sample_negatives(str(tmp_path / "in"), str(out), k=20, sampling=sampling, seed=3, parallelism=1)
        t = pq.read_table(out / "shop" / "train" / "a.parquet")
        neg = t.filter(pc.and_(pc.equal(t["label"], 0), pc.greater_equal(t["user_id"], 5)))
        counts = np.bincount(neg["item_id"].to_numpy(), minlength=40)
        return counts[0] / len(neg), counts[1:].max() / len(neg)

    hot, rare = share_of_item0("popularity")
    assert hot > 0.8 and rare < 0.02  # expected ≈ 400/438 ≈ 0.91 for item 0, ≈ 0.002 for each rare item
    hot, _ = share_of_item0("uniform")
    assert hot < 0.1  # expected ≈ 1/39


def test_user_who_saw_everything_is_refused(tmp_path):
    (tmp_path / "in" / "shop" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"user_id": [1, 1, 2], "item_id": [10, 11, 10]}),
                   tmp_path / "in" / "shop" / "train" / "a.parquet")
    with pytest.raises(DataError, match=r"shop: user 1 has interacted with every one of the domain's 2 items"):
        sample_negatives(str(tmp_path / "in"), str(tmp_path / "out"), parallelism=1)
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_user_who_saw_all_but_one_item(tmp_path):
    """User 0 clicked 199 of 200 items: rejection sampling rarely hits item 0, the exact draw must."""
    (tmp_path / "in" / "shop" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"user_id": [0] * 199 + [1], "item_id": list(range(1, 200)) + [0]}),
                   tmp_path / "in" / "shop" / "train" / "a.parquet")
    sample_negatives(str(tmp_path / "in"), str(tmp_path / "out"), k=3, parallelism=1)
    t = pq.read_table(tmp_path / "out" / "shop" / "train" / "a.parquet")
    neg = t.slice(200)
    assert neg["item_id"].to_pylist()[:199 * 3] == [0] * (199 * 3)
    assert 0 not in neg["item_id"].to_pylist()[-3:]


@pytest.fixture
def small(tmp_path) -> Path:
    (tmp_path / "in" / "shop" / "train").mkdir(parents=True)
    return tmp_path


def write(path: Path, **cols) -> str:
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_existing_output_refused(small):
    write(small / "in" / "shop" / "train" / "a.parquet", user_id=[1, 2], item_id=[10, 11])
    (small / "out").mkdir()
    with pytest.raises(DataError, match=rf"{small / 'out'}: output already exists"):
        sample_negatives(str(small / "in"), str(small / "out"), k=1, parallelism=1)


def test_missing_item_column(small):
    f = write(small / "in" / "shop" / "train" / "a.parquet", user_id=[1, 2], item=[10, 11])
    with pytest.raises(DataError, match=rf"{f}: missing column 'item_id'"):
        sample_negatives(str(small / "in"), str(small / "out"), k=1, parallelism=1)
    assert not (small / "out").exists()


def test_null_user_id(small):
    write(small / "in" / "shop" / "train" / "a.parquet", user_id=[1, 2, 3], item_id=[10, 11, 12])
    (small / "in" / "shop" / "test").mkdir()
    f = write(small / "in" / "shop" / "test" / "b.parquet", user_id=[1, 2, 3, None], item_id=[11, 12, 13, 10])
    with pytest.raises(DataError, match=rf"{f}: column 'user_id' row 3 is null"):
        sample_negatives(str(small / "in"), str(small / "out"), k=1, parallelism=1)


def test_label_with_a_zero(small):
    f = write(small / "in" / "shop" / "train" / "a.parquet", user_id=[1, 2, 3], item_id=[10, 11, 12],
              label=[1, 0, 1])
    with pytest.raises(DataError, match=rf"{f}: column 'label' row 1 is 0; click-only input .* every value is 1"):
        sample_negatives(str(small / "in"), str(small / "out"), k=1, parallelism=1)


def test_existing_all_ones_label_kept(small):
    write(small / "in" / "shop" / "train" / "a.parquet", user_id=[1, 2, 3], item_id=[10, 11, 12],
          label=pa.array([1, 1, 1], pa.int64()))
    sample_negatives(str(small / "in"), str(small / "out"), k=2, parallelism=1)
    t = pq.read_table(small / "out" / "shop" / "train" / "a.parquet")
    assert t.column_names == ["user_id", "item_id", "label"]
    assert t.schema.field("label").type == pa.int64()
    assert t["label"].to_pylist() == [1, 1, 1] + [0] * 6


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k": 0}, "negatives: k must be ≥ 1, got 0"),
    ({"k": 1.5}, "negatives: k must be ≥ 1, got 1.5"),
    ({"sampling": "zipf"}, r"negatives: sampling must be one of \['uniform', 'popularity'\], got 'zipf'"),
])
def test_bad_arguments(small, kwargs, message):
    write(small / "in" / "shop" / "train" / "a.parquet", user_id=[1, 2], item_id=[10, 11])
    with pytest.raises(SpecError, match=message):
        sample_negatives(str(small / "in"), str(small / "out"), parallelism=1, **kwargs)


def test_missing_domain(small):
    write(small / "in" / "shop" / "train" / "a.parquet", user_id=[1, 2], item_id=[10, 11])
    with pytest.raises(DataError, match=r"domain 'news' has no train split directory"):
        sample_negatives(str(small / "in"), str(small / "out"), domains=("shop", "news"), parallelism=1)
