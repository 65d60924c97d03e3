"""The data contract: feature specs per domain, loaded from YAML and validated.

A domain spec names the label, the optional user-id and time columns, the embedding
tables, and the feature fields. Every id lookup goes through a table; row 0 of every
table is the padding/OOV row, so real ids land in rows ``1..num_embeddings-1``::

    domain: target
    label: label
    user_id: user_id            # optional: GAUC groups by it
    time: ts                    # optional: unix seconds, for time windows
    tables:
      user: {num_embeddings: 100001, dim: 16}
      item: {num_embeddings: 50001, dim: 16}
    fields:
      - {name: user_id, type: categorical, table: user, group: user}
      - {name: item_id, type: categorical, table: item, group: item}
      - {name: city, type: categorical, table: city, ids: hash, group: context, scope: specific}
      - {name: hist_items, type: sequence, table: item, max_len: 20, pooling: mean, group: user}
      - {name: price, type: dense, group: item}

``ids`` says how raw values become rows: ``identity`` (non-negative ints: id ``i`` reads row
``i``, and ``0`` is the "unknown" id that reads the OOV row; with ``first_id: 0`` the ids are
0-based and id ``i`` reads row ``i + 1``), ``hash`` (ints or strings, hashed into rows
``1..n-1``), or ``vocab`` (a list of values). An identity id beyond its table, or a value not in
the vocab, is an error unless the field says ``oov: map`` (it then reads the OOV row). A dense
field's null and non-finite values are an error unless it names a ``fill`` value.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FIELD_TYPES = ("categorical", "sequence", "dense")
GROUPS = ("user", "item", "context")
SCOPES = ("shared", "specific")
ID_MODES = ("identity", "hash", "vocab")
OOV_MODES = ("error", "map")
POOLINGS = ("mean", "sum", "none")


class SpecError(ValueError):
    """A spec or config breaks the data contract; the message names the key and the rule."""


def check_keys(given: dict, allowed: set[str] | tuple[str, ...], where: str) -> None:
    """Raise a SpecError for the first key not in ``allowed``, suggesting the nearest valid one."""
    for key in given:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {sorted(allowed)}"
            raise SpecError(f"{where}: unknown key '{key}'{hint}")


def checked(value: Any, key: str, kind: type, minimum: float | None = None, exclusive: bool = False,
            below: float | None = None, optional: bool = False) -> Any:
    """A setting's ``value`` as ``kind`` (``int``, ``float``, ``bool`` or ``str``) within its range, or a SpecError
    naming ``key`` and the rule. A float may be written as a string (YAML reads ``1e-3`` as one)."""
    if value is None and optional:
        return None
    if kind is str:
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{key}: expected a non-empty string, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise SpecError(f"{key}: expected a number, got {value!r}") from None
    allowed = numbers.Real if kind is float else numbers.Integral  # numpy scalars too (Tune samples them)
    if isinstance(value, bool) or not isinstance(value, allowed) or (kind is float and not math.isfinite(value)):
        raise SpecError(f"{key}: expected {'a finite number' if kind is float else 'an integer'}, got {value!r}")
    value = kind(value)
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise SpecError(f"{key}: must be {'>' if exclusive else '≥'} {minimum}, got {value}")
    if below is not None and value >= below:
        raise SpecError(f"{key}: must be < {below}, got {value}")
    return value


def _choice(value: Any, options: tuple[str, ...], where: str) -> str:
    if value not in options:
        raise SpecError(f"{where}: '{value}' is not one of {list(options)}")
    return value


@dataclass(frozen=True)
class TableSpec:
    """One embedding table. Row 0 is the padding/OOV row."""

    name: str
    num_embeddings: int
    dim: int

    def __post_init__(self) -> None:
        if self.num_embeddings < 2:
            raise SpecError(f"table '{self.name}': num_embeddings must be >= 2 (row 0 is OOV)")
        if self.dim < 1:
            raise SpecError(f"table '{self.name}': dim must be >= 1")


@dataclass(frozen=True)
class FieldSpec:
    """One feature column of the Parquet data."""

    name: str
    type: str
    table: str | None = None
    group: str = "context"
    scope: str = "shared"
    ids: str = "identity"
    vocab: tuple = ()
    max_len: int = 1
    pooling: str = "mean"
    dim: int | None = None
    first_id: int = 1            # identity ids: the smallest real id (1, or 0 for 0-based ids)
    oov: str = "error"           # identity/vocab: an id beyond the table (a value not in the vocab) is an error, or
    #                              "map": it reads the OOV row
    fill: float | None = None    # dense: the value of a null or non-finite entry (None: such entries are an error)

    @property
    def is_sparse(self) -> bool:
        return self.type in ("categorical", "sequence")

    @property
    def is_pooled(self) -> bool:
        """Read as one vector per row: a categorical field, or a pooled sequence."""
        return self.type == "categorical" or (self.type == "sequence" and self.pooling != "none")


_FIELD_KEYS = {"name", "type", "table", "group", "scope", "ids", "vocab", "max_len", "pooling", "dim",
               "first_id", "oov", "fill"}
_DOMAIN_KEYS = {"domain", "label", "user_id", "time", "tables", "fields"}
_TABLE_KEYS = {"num_embeddings", "dim"}


def _check_id_keys(spec: FieldSpec, raw: dict, where: str) -> None:
    """``first_id`` belongs to identity ids, ``oov`` to identity and vocab ids, ``fill`` to dense fields."""
    if spec.first_id not in (0, 1) or isinstance(spec.first_id, bool):
        raise SpecError(f"{where} first_id: 0 (0-based ids) or 1 (id 0 means unknown), got {spec.first_id!r}")
    if "first_id" in raw and not (spec.is_sparse and spec.ids == "identity"):
        raise SpecError(f"{where}: first_id applies to identity ids only")
    if "oov" in raw and not (spec.is_sparse and spec.ids in ("identity", "vocab")):
        raise SpecError(f"{where}: oov applies to identity and vocab ids only (hashed ids always fit the table)")
    if "fill" in raw and spec.type != "dense":
        raise SpecError(f"{where}: fill applies to dense fields only")


@dataclass(frozen=True)
class DomainSpec:
    """The feature spec of one domain."""

    domain: str
    label: str
    fields: tuple[FieldSpec, ...]
    tables: dict[str, TableSpec] = field(default_factory=dict)
    user_id: str | None = None
    time: str | None = None

    @property
    def sparse_fields(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.is_sparse)

    @property
    def dense_fields(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.type == "dense")

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise SpecError(f"domain '{self.domain}': no field '{name}'")

    @property
    def columns(self) -> list[str]:
        """Every Parquet column this spec reads."""
        cols = [f.name for f in self.fields] + [self.label]
        for extra in (self.user_id, self.time):
            if extra and extra not in cols:
                cols.append(extra)
        return cols

    @classmethod
    def from_dict(cls, raw: dict, where: str = "spec") -> DomainSpec:
        if not isinstance(raw, dict):
            raise SpecError(f"{where}: expected a mapping at the top level")
        check_keys(raw, _DOMAIN_KEYS, where)
        for key in ("domain", "label", "fields"):
            if key not in raw:
                raise SpecError(f"{where}: missing required key '{key}'")
        tables = {}
        for name, t in (raw.get("tables") or {}).items():
            check_keys(t, _TABLE_KEYS, f"{where}: tables.{name}")
            if "num_embeddings" not in t or "dim" not in t:
                raise SpecError(f"{where}: tables.{name} needs num_embeddings and dim")
            tables[name] = TableSpec(name, int(t["num_embeddings"]), int(t["dim"]))
        fields, seen = [], set()
        for i, f in enumerate(raw["fields"]):
            fw = f"{where}: fields[{i}]"
            check_keys(f, _FIELD_KEYS, fw)
            if "name" not in f or "type" not in f:
                raise SpecError(f"{fw}: every field needs 'name' and 'type'")
            fw = f"{where}: field '{f['name']}'"
            if f["name"] in seen:
                raise SpecError(f"{fw}: defined twice")
            seen.add(f["name"])
            spec = FieldSpec(
                name=f["name"],
                type=_choice(f["type"], FIELD_TYPES, f"{fw} type"),
                table=f.get("table"),
                group=_choice(f.get("group", "context"), GROUPS, f"{fw} group"),
                scope=_choice(f.get("scope", "shared"), SCOPES, f"{fw} scope"),
                ids=_choice(f.get("ids", "identity"), ID_MODES, f"{fw} ids"),
                vocab=tuple(f.get("vocab") or ()),
                max_len=int(f.get("max_len", 1)),
                pooling=_choice(f.get("pooling", "mean"), POOLINGS, f"{fw} pooling"),
                dim=int(f["dim"]) if "dim" in f else None,
                first_id=f.get("first_id", 1),
                oov=_choice(f.get("oov", "error"), OOV_MODES, f"{fw} oov"),
                fill=checked(f.get("fill"), f"{fw} fill", float, optional=True),
            )
            _check_id_keys(spec, f, fw)
            if spec.is_sparse:
                if spec.table is None:
                    raise SpecError(f"{fw}: a {spec.type} field needs a 'table'")
                if spec.table not in tables:
                    raise SpecError(f"{fw}: table '{spec.table}' is not declared under 'tables'")
                if spec.dim is not None and spec.dim != tables[spec.table].dim:
                    raise SpecError(f"{fw}: dim {spec.dim} differs from table '{spec.table}' (dim "
                                    f"{tables[spec.table].dim}); fields sharing a table share its dim")
                if spec.ids == "vocab" and not spec.vocab:
                    raise SpecError(f"{fw}: ids 'vocab' needs a non-empty 'vocab' list")
                if spec.ids == "vocab" and len(spec.vocab) + 1 > tables[spec.table].num_embeddings:
                    raise SpecError(f"{fw}: vocab of {len(spec.vocab)} values does not fit table "
                                    f"'{spec.table}' ({tables[spec.table].num_embeddings} rows incl. OOV)")
                if spec.type == "sequence" and spec.max_len < 1:
                    raise SpecError(f"{fw}: max_len must be >= 1")
            elif spec.table is not None:
                raise SpecError(f"{fw}: a dense field has no table")
            fields.append(spec)
        if not fields:
            raise SpecError(f"{where}: 'fields' is empty")
        label = raw["label"]
        if label in seen:
            raise SpecError(f"{where}: the label '{label}' is also listed as a feature field")
        return cls(str(raw["domain"]), label, tuple(fields), tables, raw.get("user_id"), raw.get("time"))

    @classmethod
    def load(cls, path: str | Path) -> DomainSpec:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SpecError(f"{path}: cannot read spec: {e}") from e
        return cls.from_dict(raw, where=str(path))

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"domain": self.domain, "label": self.label}
        if self.user_id:
            out["user_id"] = self.user_id
        if self.time:
            out["time"] = self.time
        out["tables"] = {t.name: {"num_embeddings": t.num_embeddings, "dim": t.dim} for t in self.tables.values()}
        defaults = FieldSpec("", "dense")
        out["fields"] = []
        for f in self.fields:
            d = {"name": f.name, "type": f.type}
            for k in ("table", "group", "scope", "ids", "max_len", "pooling", "dim", "first_id", "oov", "fill"):
                v = getattr(f, k)
                if v != getattr(defaults, k) and v is not None:
                    d[k] = v
            if f.vocab:
                d["vocab"] = list(f.vocab)
            out["fields"].append(d)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def merge_tables(specs: list[DomainSpec]) -> dict[str, TableSpec]:
    """The union of the tables of several domains; a table named in two specs is one table.

    Raises when two specs declare the same table with a different shape (e.g. one
    table shared by fields of different dims).
    """
    merged: dict[str, TableSpec] = {}
    for spec in specs:
        for name, t in spec.tables.items():
            if name in merged and merged[name] != t:
                raise SpecError(
                    f"table '{name}' is declared as {merged[name].num_embeddings}x{merged[name].dim} in one "
                    f"domain and {t.num_embeddings}x{t.dim} in domain '{spec.domain}': a shared table "
                    "must have one shape"
                )
            merged[name] = t
    return merged
