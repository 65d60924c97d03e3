"""``spec infer``: specs written from the Parquet match the shipped ones, validate, and follow fixed rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raytrain_ctr.data.dataset import CTRDataset, DataError
from raytrain_ctr.data.infer import infer_specs, stem, write_specs
from raytrain_ctr.data.validate import validate
from raytrain_ctr.spec import DomainSpec

ML_EXCLUDE = ("title", "rating")
SYNTH_EXCLUDE = ("row_id", "is_noise", "true_prob")  # a row id, and the generator's ground truth


def parquet_copy(src: str, dst: Path) -> str:
    """The domains' Parquet trees of ``src``, without its specs or dataset.yaml."""
    for d in ("source", "target"):
        shutil.copytree(Path(src) / d, dst / d)
    return str(dst)


@pytest.fixture(scope="module")
def ml_entities(tmp_path_factory) -> str:
    from raytrain_ctr.data.movielens import prepare

    out = str(tmp_path_factory.mktemp("ml") / "entities")
    prepare(out, variant="entities")
    return out


def sharing(specs: dict[str, DomainSpec], names: set[str] | None = None) -> set[frozenset[str]]:
    """The fields (of ``names``) that read each table, over all domains."""
    by_table: dict[str, set[str]] = {}
    for spec in specs.values():
        for f in spec.sparse_fields:
            if names is None or f.name in names:
                by_table.setdefault(f.table, set()).add(f.name)
    return {frozenset(v) for v in by_table.values()}


def infer_and_check(root: str, shipped_root: str, exclude: tuple[str, ...]) -> tuple[dict, list, list]:
    """Infer, compare with the shipped specs (types, ids, dims, sharing), write and validate; returns the specs,
    the split summaries and the inferred fields the shipped specs do not list."""
    shipped = {n: d.spec for n, d in CTRDataset.load(shipped_root).domains.items()}
    specs = infer_specs(root, exclude=exclude)
    assert sorted(specs) == sorted(shipped)
    extra = [(d, f.name) for d, s in specs.items() for f in s.fields
             if f.name not in {g.name for g in shipped[d].fields}]
    for d, ship in shipped.items():
        got = specs[d]
        assert (got.label, got.user_id, got.time) == (ship.label, ship.user_id, ship.time)
        for f in ship.fields:
            g = got.field(f.name)
            assert (g.type, g.ids, g.first_id) == (f.type, f.ids, f.first_id), (d, f.name, f"extra: {extra}")
            if f.is_sparse:
                assert got.tables[g.table].dim == ship.tables[f.table].dim, (d, f.name)
            if f.type == "sequence":
                assert g.max_len == f.max_len, (d, f.name)
    names = {f.name for s in shipped.values() for f in s.fields}
    assert sharing(specs, names) == sharing(shipped), f"extra inferred fields: {extra}"
    write_specs(root, specs)
    summaries = validate(CTRDataset.load(root))
    return specs, summaries, extra


@pytest.mark.parametrize("variant", ["gender", "entities"])
def test_movielens_specs_match_the_shipped_ones(variant, ml100k, ml_entities, tmp_path):
    src = ml100k if variant == "gender" else ml_entities
    specs, summaries, extra = infer_and_check(parquet_copy(src, tmp_path), src, ML_EXCLUDE)
    shipped = {n: d.spec for n, d in CTRDataset.load(src).domains.items()}
    for d, ship in shipped.items():
        for f in ship.sparse_fields:
            assert specs[d].tables[specs[d].field(f.name).table].num_embeddings == \
                ship.tables[f.table].num_embeddings, (d, f.name)
    assert specs["source"].field("genres").table != specs["source"].field("movie_id").table
    assert specs["source"].field("release_year").first_id == 1  # its few 0s mean "unknown"
    if variant == "entities":  # the Parquet holds both item fields in both domains: extra fields, listed
        assert sorted(extra) == [("source", "genres"), ("target", "release_year")]
    for s in summaries:  # only the genuine zeros (unknown release year) read the OOV row
        assert all(v == 0 for k, v in s.oov.items() if k != "release_year"), s.oov
        assert s.oov["release_year"] < 1e-3


def observed_max(root: str, specs: dict[str, DomainSpec]) -> dict[str, int]:
    """The largest id each table's fields hold in any domain, split and file (read here, not from footers)."""
    out: dict[str, int] = {}
    for d, spec in specs.items():
        for path in sorted(Path(root, d).rglob("*.parquet")):
            t = pq.read_table(path)
            for f in spec.sparse_fields:
                col = t.column(f.name)
                col = pc.list_flatten(col) if f.type == "sequence" else col
                if len(col):
                    out[f.table] = max(out.get(f.table, 0), pc.max(col).as_py())
    return out


@pytest.mark.parametrize("preset", ["tiny", "entities"])
def test_synth_specs_match_the_shipped_structure(preset, tiny_data, entities, tmp_path):
    src = tiny_data if preset == "tiny" else entities
    root = parquet_copy(src, tmp_path)
    specs, summaries, _ = infer_and_check(root, src, SYNTH_EXCLUDE)
    shipped = {n: d.spec for n, d in CTRDataset.load(src).domains.items()}
    seen = observed_max(root, specs)
    for d, ship in shipped.items():
        for f in ship.fields:
            g = specs[d].field(f.name)
            assert g.group == f.group or f.name == "tgt_style", (d, f.name)  # tgt_style: by name it is context
            present = sum(f.name in {h.name for h in s.fields} for s in shipped.values())
            if present == 1:
                assert g.scope == f.scope == "specific", (d, f.name)
            if not f.is_sparse:
                continue
            n, shipped_n = specs[d].tables[g.table].num_embeddings, ship.tables[f.table].num_embeddings
            assert n == seen[g.table] + 1 and n <= shipped_n, (d, f.name, n, shipped_n)
            if shipped_n <= 65:  # age, gender, cat, slot, topic, channel, style, position: every id occurs
                assert n == shipped_n, (d, f.name)
    for s in summaries:
        assert not any(s.oov.values()), (s.domain, s.split, s.oov)


def write(root: Path, domain: str, cols: dict, split: str = "train", name: str = "part-00000.parquet") -> None:
    (root / domain / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), root / domain / split / name)


def two_domains(tmp_path: Path, n: int = 30, rows: int = 600, **extra) -> str:
    """Domains a and b with 0-based user and item ids (0..n-1), a 0-based history and a rare-zero year."""
    rng = np.random.default_rng(0)
    for d in ("a", "b"):
        for split in ("train", "valid"):
            k = rows if split == "train" else rows // 5
            items = rng.permutation(np.arange(k) % n)  # every id, 0 included
            year = rng.integers(1, 50, k)
            year[0] = 0 if d == "a" and split == "train" else year[0]  # one unknown year
            cols = {"user_id": pa.array(np.arange(k) % n), "item_id": pa.array(items),
                    "hist_items": pa.array([list(rng.integers(0, n, j)) for j in rng.integers(0, 4, k)],
                                           pa.list_(pa.int64())),
                    "year": pa.array(year), "ts": pa.array(1_700_000_000 + np.arange(k)),
                    "label": pa.array(rng.integers(0, 2, k).astype(np.int8))}
            cols.update({c: v(d, k, rng) for c, v in extra.items()})
            write(tmp_path, d, {c: v for c, v in cols.items() if v is not None}, split)
    return str(tmp_path)


def test_zero_based_ids_round_trip_with_no_oov(tmp_path):
    root = two_domains(tmp_path)
    specs = infer_specs(root)
    a = specs["a"]
    assert (a.user_id, a.time) == ("user_id", "ts") and "ts" not in {f.name for f in a.fields}
    for name in ("user_id", "item_id", "hist_items"):
        assert a.field(name).first_id == 0 and a.tables[a.field(name).table].num_embeddings == 31, name
    assert a.field("hist_items").table == a.field("item_id").table == "item"
    assert a.field("user_id").table == "user" and a.field("hist_items").max_len == 3
    assert a.field("year").first_id == 1 and a.tables["year"].num_embeddings == 50  # a rare 0 is "unknown"
    assert write_specs(root, specs) == [f"{root}/a.spec.yaml", f"{root}/b.spec.yaml", f"{root}/dataset.yaml"]
    loaded = CTRDataset.load(root)
    assert loaded.domains["b"].spec == specs["b"]  # first_id survives the YAML
    for s in validate(loaded):
        assert all(v == 0 for k, v in s.oov.items() if k != "year"), s.oov
        assert s.oov.get("year", 0) < 0.01


def test_files_without_footer_statistics_are_read(tmp_path):
    root = two_domains(tmp_path)
    with_stats = infer_specs(root)
    files = sorted(tmp_path.rglob("*.parquet"))
    for path in files:
        pq.write_table(pq.read_table(path), path, write_statistics=False)
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(0).statistics is None
    assert infer_specs(root) == with_stats
    pq.write_table(pa.table({**{k: pa.array(v) for k, v in GOOD.items()}, "item_id": pa.array([3, -1])}),
                   tmp_path / "b" / "valid" / "part-00009.parquet", write_statistics=False)
    with pytest.raises(DataError, match=r"b/valid/part-00009\.parquet: column 'item_id': negative id -1"):
        infer_specs(root)


def test_strings_dense_and_scope(tmp_path):
    colors = np.array(["red", "green", "blue"])
    root = two_domains(
        tmp_path,
        color=lambda d, k, rng: pa.array(rng.choice(colors, k)),
        city=lambda d, k, rng: pa.array([f"city{i}" for i in rng.integers(0, 100, k)]),
        tags=lambda d, k, rng: pa.array([list(rng.choice(colors, j)) for j in rng.integers(0, 3, k)]),
        price=lambda d, k, rng: pa.array(np.where(np.arange(k) == 3, np.nan, rng.random(k))),
        promo=lambda d, k, rng: pa.array(rng.integers(1, 5, k)) if d == "b" else None,
    )
    specs = infer_specs(root, dim=8)
    a, b = specs["a"], specs["b"]
    color = a.field("color")
    assert (color.ids, color.vocab, a.tables["color"].num_embeddings) == ("vocab", ("blue", "green", "red"), 4)
    city = a.field("city")  # 100 distinct > vocab_max: hashed into the next power of two >= 200
    assert (city.type, city.ids, a.tables["city"].num_embeddings) == ("categorical", "hash", 256)
    tags = a.field("tags")
    assert (tags.type, tags.ids, tags.max_len, len(tags.vocab)) == ("sequence", "vocab", 2, 3)
    price = a.field("price")
    assert (price.type, price.fill, price.group) == ("dense", 0.0, "context")  # a NaN: fill 0
    assert "promo" not in {f.name for f in a.fields}
    assert b.field("promo").scope == "specific" and a.field("color").scope == "shared"
    assert all(t.dim == 8 for t in b.tables.values())
    assert infer_specs(root, dense=("promo",), domains=("b",))["b"].field("promo").type == "dense"
    assert infer_specs(root, vocab_max=200)["a"].field("city").ids == "vocab"
    write_specs(root, specs)
    validate(CTRDataset.load(root))


def test_refuses_to_overwrite(tmp_path):
    root = two_domains(tmp_path)
    specs = infer_specs(root)
    (tmp_path / "dataset.yaml").write_text("domains: {}\n")
    with pytest.raises(DataError, match=r"dataset\.yaml: already exists"):
        write_specs(root, specs)
    assert (tmp_path / "dataset.yaml").read_text() == "domains: {}\n" and not (tmp_path / "a.spec.yaml").exists()
    write_specs(root, specs, force=True)
    with pytest.raises(DataError, match="already exists"):
        write_specs(root, specs)
    assert CTRDataset.load(root).domains["a"].spec == specs["a"]
    assert not list(tmp_path.glob(".*.tmp"))


GOOD = {"user_id": [1, 2], "item_id": [1, 2], "hist_items": [[1], [2]], "year": [1, 2], "ts": [1, 2], "label": [0, 1]}


@pytest.mark.parametrize("change, kwargs, message", [
    ({"user_id": [1, -2]}, {}, r"b/train/part-00001\.parquet: column 'user_id': negative id -2"),
    ({"hist_items": [[1], [-5]]}, {}, r"b/train/part-00001\.parquet: column 'hist_items': negative id -5"),
    ({"item_id": [1, None]}, {}, r"b/train/part-00001\.parquet: column 'item_id': 1 null ids"),
    ({"label": None}, {}, r"b/train/part-00001\.parquet: missing label column 'label'"),
    ({"promo": [1, 2]}, {}, r"b/train/part-00000\.parquet: missing column 'promo' \(present in .*part-00001"),
    ({"year": ["x", "y"]}, {}, r"column 'year' has type string but int64 in .*: a column needs one type"),
    ({}, {"time": "when"}, r"a/train/part-00000\.parquet: missing time column 'when'"),
    ({}, {"exclude": ("ratings",)}, r"exclude names \['ratings'\], in no file of domains \['a', 'b'\]"),
])
def test_bad_data_names_file_and_column(change, kwargs, message, tmp_path):
    root = two_domains(tmp_path)
    cols = {k: pa.array(v) for k, v in {**GOOD, **change}.items() if v is not None}
    write(tmp_path, "b", cols, name="part-00001.parquet")
    with pytest.raises(DataError, match=message):
        infer_specs(root, **kwargs)


def test_bool_columns_are_refused_unless_excluded(tmp_path):
    root = two_domains(tmp_path, flag=lambda d, k, rng: pa.array(rng.random(k) < 0.5) if d == "b" else None)
    with pytest.raises(DataError, match=r"b/train/part-00000\.parquet: column 'flag' has type bool: .*cast it to int8"):
        infer_specs(root)
    specs = infer_specs(root, exclude=("flag", "year"))
    assert {f.name for f in specs["b"].fields} == {"user_id", "item_id", "hist_items"}


def test_sequence_sharing_rule():
    assert stem("hist_movies") == stem("movie_id") == "movie"
    assert stem("hist_items") == stem("item_id") == "item" and stem("hist_ad_ids") == stem("ad_id") == "ad"
    assert stem("genres") == "genre" != stem("movie_id")


def test_ray_tasks_give_the_same_specs(ray_local, entities, tmp_path, monkeypatch):
    root = parquet_copy(entities, tmp_path)
    with_ray = infer_specs(root, exclude=SYNTH_EXCLUDE)  # a Ray task per file
    monkeypatch.setattr(ray_local, "is_initialized", lambda: False)
    assert infer_specs(root, exclude=SYNTH_EXCLUDE) == with_ray


def test_sparse_int_ids_are_hashed_not_given_a_huge_table(tmp_path):
    """64-bit-style ids (a few hundred values up to 2^40) would make a 2^40-row identity table: hashed instead."""
    root = two_domains(tmp_path, sid=lambda d, k, rng: pa.array(rng.integers(1, 2**40, k)))
    a = infer_specs(root)["a"]
    distinct = len(np.unique(np.concatenate([pq.read_table(p, columns=["sid"])["sid"].to_numpy()
                                             for p in Path(root).rglob("*.parquet")])))
    assert a.field("sid").ids == "hash" and a.tables[a.field("sid").table].num_embeddings == 1 << int(
        np.ceil(np.log2(2 * distinct)))
    assert a.field("item_id").ids == "identity"
    write_specs(root, infer_specs(root))
    validate(CTRDataset.load(root))
