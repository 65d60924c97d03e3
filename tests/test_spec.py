import pytest

from raytrain_ctr.spec import DomainSpec, SpecError, merge_tables


def base() -> dict:
    return {
        "domain": "target", "label": "label", "user_id": "user_id", "time": "ts",
        "tables": {"user": {"num_embeddings": 100, "dim": 8}, "item": {"num_embeddings": 50, "dim": 8}},
        "fields": [
            {"name": "user_id", "type": "categorical", "table": "user", "group": "user"},
            {"name": "item_id", "type": "categorical", "table": "item", "group": "item"},
            {"name": "hist", "type": "sequence", "table": "item", "max_len": 5, "group": "user"},
            {"name": "price", "type": "dense", "group": "item"},
            {"name": "city", "type": "categorical", "table": "user", "ids": "hash", "scope": "specific"},
        ],
    }


def test_valid_spec_round_trips():
    spec = DomainSpec.from_dict(base())
    assert [f.name for f in spec.sparse_fields] == ["user_id", "item_id", "hist", "city"]
    assert [f.name for f in spec.dense_fields] == ["price"]
    assert spec.field("hist").table == "item" and spec.field("item_id").table == "item"  # one shared table
    assert spec.columns == ["user_id", "item_id", "hist", "price", "city", "label", "ts"]
    import yaml

    assert DomainSpec.from_dict(yaml.safe_load(spec.to_yaml())) == spec


def mutate(fn) -> dict:
    raw = base()
    fn(raw)
    return raw


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(lable="y"), "unknown key 'lable'; did you mean 'label'"),
    (lambda r: r["fields"][0].update(tabel="user"), "unknown key 'tabel'; did you mean 'table'"),
    (lambda r: r["tables"]["user"].update(dims=3), "unknown key 'dims'; did you mean 'dim'"),
    (lambda r: r.pop("label"), "missing required key 'label'"),
    (lambda r: r["fields"][0].update(type="categorial"), "'categorial' is not one of"),
    (lambda r: r["fields"][0].update(group="usr"), "'usr' is not one of"),
    (lambda r: r["fields"][1].update(table="items"), "table 'items' is not declared"),
    (lambda r: r["fields"][2].update(dim=16), "dim 16 differs from table 'item'"),
    (lambda r: r["fields"][3].update(table="item"), "a dense field has no table"),
    (lambda r: r["fields"][1].update(ids="vocab"), "ids 'vocab' needs a non-empty 'vocab'"),
    (lambda r: r["fields"][1].update(ids="vocab", vocab=list(range(60))), "does not fit table 'item'"),
    (lambda r: r["fields"].append({"name": "user_id", "type": "dense"}), "defined twice"),
    (lambda r: r["fields"].append({"name": "label", "type": "dense"}), "also listed as a feature"),
    (lambda r: r["tables"]["user"].update(num_embeddings=1), "num_embeddings must be >= 2"),
])
def test_bad_spec_names_key_and_rule(change, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("'", "'")):
        DomainSpec.from_dict(mutate(change), where="target.spec.yaml")


def test_error_names_the_file(tmp_path):
    p = tmp_path / "bad.spec.yaml"
    p.write_text("domain: t\nlabel: y\nfields: []\nextra: 1\n")
    with pytest.raises(SpecError, match=r"bad\.spec\.yaml: unknown key 'extra'"):
        DomainSpec.load(p)


def test_shared_table_must_have_one_shape():
    a = DomainSpec.from_dict(base())
    raw = base()
    raw["domain"] = "source"
    raw["tables"]["item"]["dim"] = 16
    b = DomainSpec.from_dict(raw)
    with pytest.raises(SpecError, match="table 'item' is declared as 50x8 .* and 50x16 in domain 'source'"):
        merge_tables([a, b])
    assert set(merge_tables([a, a])) == {"user", "item"}
