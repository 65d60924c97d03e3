"""Real MovieLens-100K (from the recbole wheel) in the AutoFT §4.1 setting, and the GroupLens layouts."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.movielens import ML100K_GENRES, history, prepare, read_raw, recbole_dir
from raytrain_ctr.data.validate import validate


def frame(root: str, domain: str) -> pd.DataFrame:
    ds = CTRDataset.load(root)
    return pd.concat([pq.read_table(f).to_pandas().assign(split=s)
                      for s in ("train", "valid", "test") for f in ds.files(domain, s)])


def test_row_counts_match_the_real_data(ml100k):
    rows = {s.domain: 0 for s in validate(CTRDataset.load(ml100k))}
    for s in validate(CTRDataset.load(ml100k)):
        rows[s.domain] += s.rows
    assert rows == {"source": 74_260, "target": 25_740}
    t = frame(ml100k, "target")
    assert (t.gender == 2).all() and (frame(ml100k, "source").gender == 1).all()
    assert t.split.value_counts(normalize=True).round(2).to_dict() == {"train": 0.8, "valid": 0.1, "test": 0.1}
    assert np.array_equal(t.label, (t.rating > 3).astype(np.int8))
    assert t.genres.map(len).min() >= 1 and t.age.between(1, 7).all()


def test_history_strictly_before_the_row(ml100k):
    df = pd.concat([frame(ml100k, "source"), frame(ml100k, "target")])
    by_user = {u: g for u, g in df.groupby("user_id")}
    rng = np.random.default_rng(0)
    for i in rng.choice(len(df), 300, replace=False):
        row = df.iloc[i]
        g = by_user[row.user_id]
        earlier = g[g.ts < row.ts].sort_values(["ts", "movie_id"])
        assert list(row.hist_movies) == list(earlier.movie_id)[-20:]


def test_entities_variant_splits_by_item_with_a_sequence_per_entity(tmp_path):
    out = str(tmp_path / "ent")
    counts = prepare(out, variant="entities")
    assert {d: sum(c.values()) for d, c in counts.items()} == {"source": 83_765, "target": 16_235}
    ds = CTRDataset.load(out)
    fields = {d: {f.name: f.scope for f in ds.domain(d).spec.fields} for d in ("source", "target")}
    assert fields["source"]["release_year"] == "specific" and "genres" not in fields["source"]
    assert fields["target"]["genres"] == "specific" and "release_year" not in fields["target"]
    s, t = frame(out, "source"), frame(out, "target")
    new = set(t.movie_id)
    assert not new & set(s.movie_id)  # disjoint items: two entities
    df = pd.concat([s, t])
    by_user = {u: g for u, g in df.groupby("user_id")}
    for i in np.random.default_rng(0).choice(len(df), 200, replace=False):
        row = df.iloc[i]
        g = by_user[row.user_id]
        earlier = g[g.ts < row.ts].sort_values(["ts", "movie_id"])
        assert list(row.hist_new) == [m for m in earlier.movie_id if m in new][-20:]
        assert list(row.hist_catalogue) == [m for m in earlier.movie_id if m not in new][-20:]


def test_history_ties_and_truncation():
    users = np.array([1, 1, 1, 1, 2])
    items = np.array([10, 11, 12, 13, 10])
    ts = np.array([5, 5, 6, 9, 1])
    assert history(users, items, ts, max_len=2).to_pylist() == [[], [], [10, 11], [11, 12], []]


def test_time_split_is_chronological(tmp_path):
    out = str(tmp_path / "ml")
    prepare(out, split="time")
    t = frame(out, "target")
    assert t[t.split == "train"].ts.max() <= t[t.split == "valid"].ts.min()
    assert t[t.split == "valid"].ts.max() <= t[t.split == "test"].ts.min()


def to_grouplens_100k(d):
    """Write the recbole copy of ML-100K in GroupLens's own u.* layout."""
    ratings, users, items, _ = read_raw(None)
    ratings[["user", "item", "rating", "ts"]].astype({"rating": int}).to_csv(d / "u.data", sep="\t",
                                                                           header=False, index=False)
    users.assign(zip="00000")[["user", "age", "gender", "occupation", "zip"]].to_csv(
        d / "u.user", sep="|", header=False, index=False)
    flags = [[int(g in (gs if isinstance(gs, list) else [])) for g in ML100K_GENRES] for gs in items.genres]
    date = [f"01-Jan-{int(y)}" if y == y else "" for y in items.year]
    item_rows = [[i, "t", dt, "", "u", *f] for i, dt, f in zip(items.item, date, flags)]
    pd.DataFrame(item_rows).to_csv(d / "u.item", sep="|", header=False, index=False)


def test_grouplens_100k_layout_gives_the_same_dataset(tmp_path, ml100k):
    src = tmp_path / "ml-100k"
    src.mkdir()
    to_grouplens_100k(src)
    out = str(tmp_path / "gl")
    prepare(out, src)
    a, b = frame(ml100k, "target"), frame(out, "target")
    cols = ["user_id", "movie_id", "ts", "label", "age", "occupation", "release_year"]
    assert a[cols].reset_index(drop=True).equals(b[cols].reset_index(drop=True))
    assert list(a.genres.map(list)) == list(b.genres.map(list))


def test_grouplens_1m_layout(tmp_path):
    ratings, users, items, _ = read_raw(None)
    d = tmp_path / "ml-1m"
    d.mkdir()
    ages = np.array([1, 18, 25, 35, 45, 50, 56])[np.searchsorted([18, 25, 35, 45, 50, 56], users.age, "right")]
    lines = lambda rows: "\n".join("::".join(map(str, r)) for r in rows) + "\n"  # noqa: E731
    (d / "ratings.dat").write_text(lines(ratings[["user", "item", "rating", "ts"]].astype(int).values.tolist()))
    (d / "users.dat").write_text(lines(zip(users.user, users.gender, ages, range(len(users)), ["0"] * len(users))))
    titles = [f"Movie ({int(y)})" if y == y else "Movie" for y in items.year]
    genres = ["|".join(g) if isinstance(g, list) else "Drama" for g in items.genres]
    (d / "movies.dat").write_text(lines(zip(items.item, titles, genres)), encoding="latin-1")
    out = str(tmp_path / "out")
    counts = prepare(out, d)
    assert {k: sum(v.values()) for k, v in counts.items()} == {"source": 74_260, "target": 25_740}
    t = frame(out, "target")
    assert set(t.age) <= set(range(1, 8)) and t.hist_movies.map(len).max() == 20


def test_recbole_files_are_not_in_the_repo():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout
    assert "ml-100k" not in tracked and "u.data" not in tracked
    assert recbole_dir().exists()
