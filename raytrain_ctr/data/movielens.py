"""MovieLens → a raytrain-ctr dataset in the AutoFT §4.1 setting.

Male users are the source domain, female users the target; rating > 3 is a positive.
Fields: user id, gender, age, occupation, movie id, release year, genres (multi-hot) and
the user's behaviour sequence: the movies they rated strictly before the row's
timestamp (ratings at the same second are not "before": no leakage), most recent last.
The movie's ``title`` is kept as a column no spec lists (for inspection, e.g. the CDAnet probe).

``variant="entities"`` (MKT's multi-entity setting, mkt.txt §3.2.1) splits by item instead: the
catalogue (movies released before 1997) is the source entity, the new releases (1997–98, about
16% of the ratings) the target; users are shared. Each row holds one behaviour sequence per
entity (``hist_catalogue``, ``hist_new``), and the field sets differ: ``release_year`` is specific
to the catalogue (all new releases share two years) and ``genres`` to the new releases.

Reads three layouts: RecBole's atomic files (``ml-100k.{inter,user,item}``, shipped in
the ``recbole==1.2.1`` wheel, never committed here: its licence forbids redistribution),
GroupLens ml-100k (``u.data``, ``u.user``, ``u.item``) and GroupLens ml-1m
(``ratings.dat``, ``users.dat``, ``movies.dat``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raytrain_ctr.data.dataset import DataError, join, resolve, write_dataset_yaml
from raytrain_ctr.spec import DomainSpec

ML1M_AGES = (1, 18, 25, 35, 45, 50, 56)  # ml-1m's age buckets; ml-100k's raw ages map onto them
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
HIST_LEN = 20
NEW_RELEASES = 1997  # variant "entities": movies released from this year on are the target entity
VARIANTS = ("gender", "entities")
FILE_ROWS = 8192  # several files per split, so Ray Data can spread a split over workers


def recbole_dir() -> Path:
    """The ml-100k folder inside an installed ``recbole`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MovieLens-100K not found: install it with `pip install --no-deps recbole==1.2.1` "
                        "or pass --from DIR with ml-100k (u.data) or ml-1m (ratings.dat) files")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").exists():
        raise DataError(f"{path}: recbole is installed but has no ml-100k.inter")
    return path


def _read_recbole(d: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    def atomic(name: str) -> pd.DataFrame:
        df = pd.read_csv(d / name, sep="\t", dtype=str, keep_default_na=False)
        df.columns = [c.split(":")[0] for c in df.columns]
        return df

    inter, user, item = atomic("ml-100k.inter"), atomic("ml-100k.user"), atomic("ml-100k.item")
    ratings = pd.DataFrame({"user": inter.user_id.astype(int), "item": inter.item_id.astype(int),
                            "rating": inter.rating.astype(float), "ts": inter.timestamp.astype(float).astype(int)})
    users = pd.DataFrame({"user": user.user_id.astype(int), "age": user.age.astype(int),
                          "gender": user.gender, "occupation": user.occupation})
    items = pd.DataFrame({"item": item.item_id.astype(int), "title": item.movie_title,
                          "year": pd.to_numeric(item.release_year, errors="coerce"),
                          "genres": item["class"].str.split()})
    return ratings, users, items


def _read_ml100k(d: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = pd.read_csv(d / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    users = pd.read_csv(d / "u.user", sep="|", names=["user", "age", "gender", "occupation", "zip"])
    cols = ["item", "title", "date", "video", "url", *ML100K_GENRES]
    raw = pd.read_csv(d / "u.item", sep="|", names=cols, encoding="latin-1")
    flags = raw[list(ML100K_GENRES)].to_numpy().astype(bool)
    genres = [[g for g, on in zip(ML100K_GENRES, row) if on] for row in flags]
    year = pd.to_datetime(raw.date, format="%d-%b-%Y", errors="coerce").dt.year
    items = pd.DataFrame({"item": raw.item, "title": raw.title, "year": year, "genres": genres})
    return ratings, users[["user", "age", "gender", "occupation"]], items


def _read_ml1m(d: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    kw = {"sep": "::", "engine": "python", "encoding": "latin-1"}
    ratings = pd.read_csv(d / "ratings.dat", names=["user", "item", "rating", "ts"], **kw)
    users = pd.read_csv(d / "users.dat", names=["user", "gender", "age", "occupation", "zip"], **kw)
    movies = pd.read_csv(d / "movies.dat", names=["item", "title", "genres"], **kw)
    year = pd.to_numeric(movies.title.str.extract(r"\((\d{4})\)\s*$")[0], errors="coerce")
    items = pd.DataFrame({"item": movies.item, "title": movies.title, "year": year,
                          "genres": movies.genres.str.split("|")})
    return ratings, users[["user", "age", "gender", "occupation"]].astype({"occupation": str}), items


def read_raw(path: str | Path | None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    """(ratings, users, items, layout name) from a folder in any of the three layouts."""
    d = Path(path) if path else recbole_dir()
    if (d / "ml-100k.inter").exists():
        return (*_read_recbole(d), "recbole-ml-100k")
    if (d / "u.data").exists():
        return (*_read_ml100k(d), "grouplens-ml-100k")
    if (d / "ratings.dat").exists():
        return (*_read_ml1m(d), "grouplens-ml-1m")
    raise DataError(f"{d}: no MovieLens files (expected ml-100k.inter, u.data or ratings.dat)")


def _codes(values: pd.Series) -> tuple[np.ndarray, int]:
    """1-based codes of a categorical series (0 for missing) and the table size."""
    cats = sorted(values.dropna().unique())
    index = {v: i + 1 for i, v in enumerate(cats)}
    return values.map(index).fillna(0).astype(np.int64).to_numpy(), len(cats) + 1


def history(users: np.ndarray, items: np.ndarray, ts: np.ndarray, max_len: int = HIST_LEN,
            among: np.ndarray | None = None) -> pa.ListArray:
    """For each row, the user's items rated strictly before its timestamp (last ``max_len``, most recent
    last); with ``among`` (a row mask), only the items of those rows count as history."""
    order = np.lexsort((items, ts, users))  # by user, then time
    u, t, it = users[order], ts[order], items[order]
    n = len(u)
    idx = np.arange(n)
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_tie = new_user | np.r_[True, t[1:] != t[:-1]]
    tie_start = np.maximum.accumulate(np.where(new_tie, idx, 0))
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))
    counted = np.ones(n, dtype=bool) if among is None else np.asarray(among, dtype=bool)[order]
    before = np.r_[0, np.cumsum(counted)]  # counted rows in sorted positions [0, i)
    end = before[tie_start]
    start = np.maximum(before[user_start], end - max_len)
    lengths = end - start
    offsets = np.r_[0, np.cumsum(lengths)]
    flat = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    sorted_hist = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(it[counted][flat]))
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = idx
    return sorted_hist.take(pa.array(inverse))


def build_table(ratings: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """One row per rating with every feature; returns the frame and table sizes."""
    df = ratings.merge(users, on="user", how="left").merge(items, on="item", how="left")
    missing = df.gender.isna().sum()
    if missing:
        raise DataError(f"{missing} ratings reference users missing from the user file")
    age = np.searchsorted(np.array(ML1M_AGES), df.age.to_numpy(), side="right")  # 1..7
    occupation, n_occ = _codes(df.occupation.astype(str))
    year, n_year = _codes(df.year)
    genre_vocab = sorted({g for gs in items.genres.dropna() for g in gs})
    gindex = {g: i + 1 for i, g in enumerate(genre_vocab)}
    genres = [[gindex[g] for g in gs] if isinstance(gs, list) else [] for gs in df.genres]
    out = pd.DataFrame({
        "user_id": df.user.astype(np.int64), "gender": np.where(df.gender == "M", 1, 2),
        "age": age.astype(np.int64), "occupation": occupation, "movie_id": df.item.astype(np.int64),
        "release_year": year, "genres": genres, "title": df.title.fillna("").astype(str),
        "ts": df.ts.astype(np.int64), "rating": df.rating.astype(np.float32),
        "label": (df.rating > 3).astype(np.int8), "year_value": df.year.fillna(0).to_numpy(),
    })
    sizes = {"user": int(out.user_id.max()) + 1, "movie": int(out.movie_id.max()) + 1, "gender": 3,
             "age": len(ML1M_AGES) + 1, "occupation": n_occ, "year": n_year, "genre": len(genre_vocab) + 1,
             "genres_max_len": max(len(g) for g in genres)}
    return out, sizes


def make_spec(domain: str, sizes: dict, dim: int = 16, variant: str = "gender") -> DomainSpec:
    tables = {k: {"num_embeddings": v, "dim": dim} for k, v in sizes.items() if k != "genres_max_len"}
    year = {"name": "release_year", "type": "categorical", "table": "year", "group": "item"}
    genres = {"name": "genres", "type": "sequence", "table": "genre", "group": "item",
              "max_len": sizes["genres_max_len"], "pooling": "mean"}
    hist = {"name": "hist_movies", "type": "sequence", "table": "movie", "group": "user", "max_len": HIST_LEN,
            "pooling": "mean"}
    if variant == "entities":  # a sequence per entity; release year specific to the catalogue, genres to the new
        item = [{**year, "scope": "specific"}] if domain == "source" else [{**genres, "scope": "specific"}]
        item += [{**hist, "name": f"hist_{e}"} for e in ("catalogue", "new")]
        del tables["genre" if domain == "source" else "year"]
    else:
        item = [year, genres, hist]
    flds = [
        {"name": "user_id", "type": "categorical", "table": "user", "group": "user"},
        {"name": "gender", "type": "categorical", "table": "gender", "group": "user"},
        {"name": "age", "type": "categorical", "table": "age", "group": "user"},
        {"name": "occupation", "type": "categorical", "table": "occupation", "group": "user"},
        {"name": "movie_id", "type": "categorical", "table": "movie", "group": "item"},
        *item,
    ]
    return DomainSpec.from_dict({"domain": domain, "label": "label", "user_id": "user_id", "time": "ts",
                                 "tables": tables, "fields": flds})


def split_index(df: pd.DataFrame, how: str, seed: int) -> np.ndarray:
    """0/1/2 = train/valid/test, 8:1:1, randomly (seeded) or chronologically."""
    n = len(df)
    if how == "random":
        rank = np.random.default_rng(seed).permutation(n)
    elif how == "time":
        rank = np.empty(n, dtype=np.int64)
        rank[np.lexsort((df.movie_id.to_numpy(), df.user_id.to_numpy(), df.ts.to_numpy()))] = np.arange(n)
    else:
        raise ValueError(f"split must be 'random' or 'time', got '{how}'")
    return np.digitize(rank, [int(0.8 * n), int(0.9 * n)])


def prepare(out: str, source: str | Path | None = None, split: str = "random", seed: int = 0,
            dim: int = 16, variant: str = "gender") -> dict[str, dict[str, int]]:
    """Write the MovieLens dataset into ``out``: male→female users (``variant="gender"``), or the
    catalogue→new-release entities (``"entities"``); returns rows per domain and split."""
    if variant not in VARIANTS:
        raise DataError(f"MovieLens variant '{variant}' is not one of {list(VARIANTS)}")
    ratings, users, items, layout = read_raw(source)
    table, sizes = build_table(ratings, users, items)
    who, when, what = table.user_id.to_numpy(), table.ts.to_numpy(), table.movie_id.to_numpy()
    if variant == "entities":
        new = (table.year_value.to_numpy() >= NEW_RELEASES)
        table["hist_catalogue"] = history(who, what, when, among=~new).to_pylist()
        table["hist_new"] = history(who, what, when, among=new).to_pylist()
        domain_of = np.where(new, 2, 1)
        description = (f"MovieLens ({layout}), two item entities: the catalogue (released before {NEW_RELEASES}) "
                       f"= source, the new releases = target, {split} split")
    else:
        table["hist_movies"] = history(who, what, when).to_pylist()
        domain_of = table.gender.to_numpy()
        description = f"MovieLens ({layout}), male=source, female=target, {split} split"
    table = table.drop(columns=["year_value"])
    fs, base = resolve(out)
    counts: dict[str, dict[str, int]] = {}
    for domain, g in (("source", 1), ("target", 2)):
        part = table[domain_of == g].reset_index(drop=True)
        which = split_index(part, split, seed + g)
        counts[domain] = {}
        for i, name in enumerate(("train", "valid", "test")):
            rows = pa.Table.from_pandas(part[which == i], preserve_index=False)
            fs.create_dir(join(base, domain, name), recursive=True)
            for k, start in enumerate(range(0, max(rows.num_rows, 1), FILE_ROWS)):  # several files per split
                pq.write_table(rows.slice(start, FILE_ROWS), join(base, domain, name, f"part-{k:05d}.parquet"),
                               filesystem=fs)
            counts[domain][name] = rows.num_rows
        with fs.open_output_stream(join(base, f"{domain}.spec.yaml")) as f:
            f.write(make_spec(domain, sizes, dim, variant).to_yaml().encode())
    write_dataset_yaml(out, {d: {"spec": f"{d}.spec.yaml", "path": d} for d in ("source", "target")},
                       description=description)
    return counts
