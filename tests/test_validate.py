"""Bad input gets a clear error naming the file, the column and the rule, before training."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raytrain_ctr.data.dataset import CTRDataset, DataError
from raytrain_ctr.data.validate import validate
from raytrain_ctr.spec import SpecError

SPEC = {
    "domain": "target", "label": "label", "user_id": "user_id", "time": "ts",
    "tables": {"user": {"num_embeddings": 50, "dim": 4}, "item": {"num_embeddings": 30, "dim": 4},
               "color": {"num_embeddings": 4, "dim": 4}},
    "fields": [
        {"name": "user_id", "type": "categorical", "table": "user"},
        {"name": "item_id", "type": "categorical", "table": "item"},
        {"name": "hist", "type": "sequence", "table": "item", "max_len": 3},
        {"name": "color", "type": "categorical", "table": "color", "ids": "vocab", "vocab": ["red", "green", "blue"]},
        {"name": "price", "type": "dense"},
    ],
}


def good_table(n: int = 40) -> dict:
    rng = np.random.default_rng(0)
    return {
        "user_id": pa.array(rng.integers(1, 50, n)), "item_id": pa.array(rng.integers(1, 30, n)),
        "hist": pa.array([list(rng.integers(1, 30, k)) for k in rng.integers(0, 5, n)], pa.list_(pa.int64())),
        "color": pa.array(rng.choice(["red", "green", "blue"], n)), "price": pa.array(rng.random(n)),
        "ts": pa.array(1_700_000_000 + np.arange(n) * 60), "label": pa.array(rng.integers(0, 2, n).astype(np.int8)),
    }


def write(root, cols: dict | None = None, spec: dict | None = None, raw_file: bytes | None = None) -> str:
    (root / "target" / "train").mkdir(parents=True)
    (root / "target.spec.yaml").write_text(yaml.safe_dump(spec or SPEC))
    (root / "dataset.yaml").write_text(yaml.safe_dump({"domains": {"target": {"spec": "target.spec.yaml",
                                                                              "path": "target"}}}))
    path = root / "target" / "train" / "part-00000.parquet"
    if raw_file is not None:
        path.write_bytes(raw_file)
    elif cols is not None:
        pq.write_table(pa.table(cols), path)
    return str(root)


def test_good_data_summarised(tmp_path):
    (s,) = validate(CTRDataset.load(write(tmp_path, good_table())))
    assert s.rows == 40 and 0 < s.positive_rate < 1
    assert s.cardinality["user_id"] > 1 and s.list_len["hist"]["max"] == 4


def with_(**changes) -> dict:
    t = good_table()
    for k, v in changes.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    return t


@pytest.mark.parametrize("cols, message", [
    (with_(item_id=None), "missing column 'item_id' required by the spec"),
    (with_(item_id=pa.array(["a"] * 40)), "column 'item_id' has type string: ids 'identity' need ints"),
    (with_(hist=pa.array(range(40))), "column 'hist' has type int64: a sequence field must be a list column"),
    (with_(price=pa.array(["x"] * 40)), "column 'price' has type string: a dense field must be a float"),
    (with_(label=pa.array([0, 1, None, 1] * 10, pa.int8())),
     r"column 'label': null label \(labels are required\) \(10 rows, the first at row 2\)"),
    (with_(label=pa.array([0, 1, 2, 1] * 10, pa.int8())),
     r"column 'label': label 2 outside \{0, 1\} \(10 rows, the first at row 2\)"),
    (with_(user_id=pa.array([-3] + [1] * 39)), "column 'user_id': negative id -3"),
    (with_(item_id=pa.array([None] + [1] * 39, pa.int64())),
     r"column 'item_id': null id .* \(1 rows, the first at row 0\)"),
    (with_(label=pa.array(["yes"] * 40)), "label column 'label' has type string"),
])
def test_bad_data_names_file_column_rule(tmp_path, cols, message):
    root = write(tmp_path, cols)
    with pytest.raises(DataError, match=message) as e:
        validate(CTRDataset.load(root))
    assert "part-00000.parquet" in str(e.value)


def test_empty_domain(tmp_path):
    root = write(tmp_path)  # no files at all
    with pytest.raises(DataError, match="empty domain: no Parquet files for domain 'target', split 'train'"):
        validate(CTRDataset.load(root))
    t = pa.table({k: v.slice(0, 0) for k, v in good_table().items()})
    pq.write_table(t, tmp_path / "target" / "train" / "part-00000.parquet")
    with pytest.raises(DataError, match="empty domain: domain 'target' has no rows in split 'train'"):
        validate(CTRDataset.load(root))


def test_unreadable_file(tmp_path):
    root = write(tmp_path, raw_file=b"this is not parquet")
    with pytest.raises(DataError, match="part-00000.parquet: unreadable Parquet file"):
        validate(CTRDataset.load(root))


def test_unknown_key_in_spec_and_dataset(tmp_path):
    root = write(tmp_path, good_table(), spec={**SPEC, "labels": "y"})
    with pytest.raises(SpecError, match=r"target\.spec\.yaml: unknown key 'labels'; did you mean 'label'"):
        CTRDataset.load(root)
    (tmp_path / "dataset.yaml").write_text("domains:\n  target: {spec: target.spec.yaml, pth: target}\n")
    with pytest.raises(SpecError, match="unknown key 'pth'; did you mean 'path'"):
        CTRDataset.load(root)


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a raytrain-ctr dataset"):
        CTRDataset.load(str(tmp_path))


def test_domain_column_layout(tmp_path):
    """One Parquet dataset with a domain column serves both domains through 'where'."""
    t = good_table(60)
    t["domain"] = pa.array(["source", "target", "target"] * 20)
    (tmp_path / "all" / "train").mkdir(parents=True)
    pq.write_table(pa.table(t), tmp_path / "all" / "train" / "p.parquet")
    for d in ("source", "target"):
        (tmp_path / f"{d}.spec.yaml").write_text(yaml.safe_dump({**SPEC, "domain": d}))
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({"domains": {
        d: {"spec": f"{d}.spec.yaml", "path": "all", "where": {"domain": d}} for d in ("source", "target")}}))
    rows = {s.domain: s.rows for s in validate(CTRDataset.load(str(tmp_path)))}
    assert rows == {"source": 20, "target": 40}


def _set(values: list, at: int, value) -> list:
    return values[:at] + [value] + values[at + 1:]


BAD_VALUES = {  # kind: (column, a column with one bad value at row 7 (or from row 7), the rule's words)
    "label 2": ("label", pa.array(_set([0, 1] * 20, 7, 2), pa.int8()), r"label 2 outside \{0, 1\}"),
    "label 0.5": ("label", pa.array(_set([0.0, 1.0] * 20, 7, 0.5)), r"label 0.5 outside \{0, 1\}"),
    "label -1": ("label", pa.array(_set([0, 1] * 20, 7, -1), pa.int64()), r"label -1 outside \{0, 1\}"),
    "label true/false ok, null not": ("label", pa.array(_set([False, True] * 20, 7, None)), "null label"),
    "null label": ("label", pa.array(_set([0, 1] * 20, 7, None), pa.int8()), "null label"),
    "negative user id": ("user_id", pa.array(_set(list(range(1, 41)), 7, -3)), "negative id -3"),
    "null user id": ("user_id", pa.array(_set(list(range(1, 41)), 7, None), pa.int64()), "null id"),
    "negative item id": ("item_id", pa.array(_set([5] * 40, 7, -1)), "negative id -1"),
    "null item id": ("item_id", pa.array(_set([5] * 40, 7, None), pa.int64()), "null id"),
    "negative list element": ("hist", pa.array(_set([[1, 2]] * 40, 7, [3, -2]), pa.list_(pa.int64())),
                              "negative id -2"),
    "null list element": ("hist", pa.array(_set([[1, 2]] * 40, 7, [3, None]), pa.list_(pa.int64())),
                          "null list element"),
    "NaN dense": ("price", pa.array(_set([0.5] * 40, 7, float("nan"))), "dense value nan is not finite"),
    "inf dense": ("price", pa.array(_set([0.5] * 40, 7, float("inf"))), "dense value inf is not finite"),
    "-inf dense": ("price", pa.array(_set([0.5] * 40, 7, float("-inf"))), "dense value -inf is not finite"),
    "NaN dense, float32": ("price", pa.array(_set([0.5] * 40, 7, float("nan")), pa.float32()),
                           "dense value nan is not finite"),
    "null dense": ("price", pa.array(_set([0.5] * 40, 7, None)), "missing dense value"),
    "null dense, int column": ("price", pa.array(_set([3] * 40, 7, None), pa.int32()), "missing dense value"),
    "user id beyond its table": ("user_id", pa.array(_set(list(range(1, 41)), 7, 50)),
                                 r"id 50 beyond table 'user' \(50 rows: ids up to 49"),
    "item id far beyond its table": ("item_id", pa.array(_set([5] * 40, 7, 10**12)), "id 1000000000000 beyond"),
    "list element beyond its table": ("hist", pa.array(_set([[1, 2]] * 40, 7, [3, 30]), pa.list_(pa.int64())),
                                      "id 30 beyond table 'item'"),
    "value not in the vocab": ("color", pa.array(_set(["red"] * 40, 7, "purple")),
                               "value 'purple' is not in the vocab"),
    "null time": ("ts", pa.array(_set(list(range(40)), 7, None), pa.int64()), "null time"),
}


@pytest.mark.parametrize("kind", sorted(BAD_VALUES))
def test_every_path_that_reads_data_stops_at_a_bad_value(kind, tmp_path):
    """validate, the driver's read of a small split (file named) and the workers' encoder (each batch) refuse
    the same value, naming the column, the rule and the row."""
    from raytrain_ctr.data.encode import FeatureEncoder
    from raytrain_ctr.data.ingest import small_split

    column, values, rule = BAD_VALUES[kind]
    root = write(tmp_path, {**good_table(), column: values})
    ds = CTRDataset.load(root)
    where = rf"column '{column}': {rule}.*the first at row 7"
    with pytest.raises(DataError, match=rf"part-00000\.parquet: {where}"):
        validate(ds)
    with pytest.raises(DataError, match=rf"part-00000\.parquet: {where}"):
        small_split(ds, "target", "train", None, ds.domain("target").columns, 1 << 30)
    table = pq.read_table(ds.files("target", "train"))
    with pytest.raises(DataError, match=rf"domain 'target', a batch of 40 rows: {where}"):
        FeatureEncoder(ds.domain("target").spec).encode(table)
    FeatureEncoder(ds.domain("target").spec).encode(table.filter(pa.array([i != 7 for i in range(40)])))


@pytest.mark.parametrize("kind", sorted(BAD_VALUES))
def test_run_stops_at_a_bad_value_before_training(kind, tmp_path, ray_local):
    """``raytrain-ctr run``'s path: the stage refuses the bad split by file, column, rule and row, and nothing is
    trained or cached."""
    from raytrain_ctr import pipeline
    from raytrain_ctr.config import from_dict

    column, values, rule = BAD_VALUES[kind]
    root = write(tmp_path / "data", {**good_table(), column: values})
    for split in ("valid", "test"):
        (tmp_path / "data" / "target" / split).mkdir()
        pq.write_table(pa.table(good_table()), tmp_path / "data" / "target" / split / "part-00000.parquet")
    cfg = from_dict({"data": root, "method": "target_only", "storage": str(tmp_path / "runs"),
                     "model": {"backbone": "dnn", "deep": [8]}, "train": {"epochs": 1, "batch_size": 16}})
    with pytest.raises(DataError, match=rf"part-00000\.parquet: column '{column}': {rule}.*the first at row 7"):
        pipeline.run(cfg)
    assert not list((tmp_path / "runs").rglob("model.pt"))


def _spec_with(**field_keys) -> dict:
    """SPEC with extra keys on its fields, by field name."""
    return {**SPEC, "fields": [{**f, **field_keys.get(f["name"], {})} for f in SPEC["fields"]]}


def test_zero_based_ids_round_trip_with_no_id_on_the_oov_row(tmp_path):
    """``first_id: 0``: id i reads row i + 1, so the first user and the first item are rows of their own; the same
    data read as 1-based puts them on the OOV row and validate says by how much."""
    from raytrain_ctr.data.encode import FeatureEncoder

    n = 40
    t = {**good_table(n), "user_id": pa.array(np.arange(n) % 49), "item_id": pa.array(np.arange(n) % 29),
         "hist": pa.array([[i % 29, (i + 1) % 29] for i in range(n)], pa.list_(pa.int64()))}
    zero = {"first_id": 0}
    root = write(tmp_path / "a", t, spec=_spec_with(user_id=zero, item_id=zero, hist=zero))
    ds = CTRDataset.load(root)
    (s,) = validate(ds)
    assert s.oov["user_id"] == s.oov["item_id"] == s.oov["hist"] == 0.0
    batch = FeatureEncoder(ds.domain("target").spec).encode(pq.read_table(ds.files("target", "train")))
    assert batch.sparse["user_id"].tolist() == [i % 49 + 1 for i in range(n)]
    assert batch.sparse["item_id"].min() == 1 and batch.sparse["item_id"].max() == 29  # table 'item' has 30 rows
    assert (batch.sparse["hist"][:, :2] > 0).all()
    beyond = {**t, "item_id": pa.array(np.arange(n) % 30)}  # 0-based id 29 needs row 30: beyond the 30-row table
    with pytest.raises(DataError, match=r"column 'item_id': id 29 beyond table 'item' \(30 rows: 0-based ids up to 28"):
        validate(CTRDataset.load(write(tmp_path / "b", beyond, spec=_spec_with(user_id=zero, item_id=zero,
                                                                                  hist=zero))))
    one_based = {**t, "user_id": pa.array(np.arange(n) % 5)}  # 0-based ids read as 1-based: a fifth are id 0
    with pytest.raises(DataError, match=r"column 'user_id': 20\.0% of its ids read the OOV row .*first_id: 0"):
        validate(CTRDataset.load(write(tmp_path / "c", one_based)))
    (s,) = validate(CTRDataset.load(str(tmp_path / "c")), max_oov=0.25)
    assert s.oov["user_id"] == pytest.approx(0.2)


def test_oov_map_and_fill_are_opt_in(tmp_path):
    """``oov: map`` reads ids beyond the table (and unknown vocab values) as the OOV row, counted by validate;
    ``fill`` replaces missing and non-finite dense values."""
    from raytrain_ctr.data.encode import FeatureEncoder

    t = {**good_table(), "item_id": pa.array(_set([5] * 40, 7, 31)), "color": pa.array(_set(["red"] * 40, 3, "x")),
         "price": pa.array(_set(_set([0.5] * 40, 2, None), 9, float("nan")))}
    spec = _spec_with(item_id={"oov": "map"}, color={"oov": "map"}, price={"fill": -1.0})
    ds = CTRDataset.load(write(tmp_path, t, spec=spec))
    (s,) = validate(ds)
    assert s.oov["item_id"] == s.oov["color"] == pytest.approx(1 / 40)
    batch = FeatureEncoder(ds.domain("target").spec).encode(pq.read_table(ds.files("target", "train")))
    assert batch.sparse["item_id"][7] == 0 and batch.sparse["color"][3] == 0 and batch.sparse["color"][4] > 0
    assert batch.dense[[2, 9], 0].tolist() == [-1.0, -1.0] and batch.dense[0, 0] == pytest.approx(0.5)


@pytest.mark.parametrize("keys, message", [
    ({"user_id": {"first_id": 2}}, "first_id: 0 .* or 1 .*got 2"),
    ({"color": {"first_id": 0}}, "first_id applies to identity ids only"),
    ({"price": {"oov": "map"}}, "oov applies to identity and vocab ids only"),
    ({"user_id": {"oov": "ignore"}}, r"oov: 'ignore' is not one of \['error', 'map'\]"),
    ({"item_id": {"fill": 0}}, "fill applies to dense fields only"),
    ({"price": {"fill": "nan"}}, "fill: expected a finite number"),
])
def test_bad_id_keys(keys, message, tmp_path):
    with pytest.raises(SpecError, match=message):
        CTRDataset.load(write(tmp_path, good_table(), spec=_spec_with(**keys)))
