"""A self-describing dataset directory: ``dataset.yaml``, one spec per domain, sharded Parquet.

Layout written by ``synth`` and ``movielens`` (and expected from users)::

    DIR/dataset.yaml
    DIR/source.spec.yaml   DIR/source/{train,valid,test}/*.parquet
    DIR/target.spec.yaml   DIR/target/{train,valid,test}/*.parquet

``dataset.yaml``::

    domains:
      source: {spec: source.spec.yaml, path: source}
      target: {spec: target.spec.yaml, path: target}
    # or one Parquet dataset with a domain column for both:
    #   target: {spec: target.spec.yaml, path: all, where: {domain: target}}

DIR may be a local path or a URI that pyarrow understands (``s3://``, ``gs://``). The domains may have any
names: a config's ``roles: {source: video, target: game}`` says which plays the part the methods read
(:meth:`CTRDataset.with_roles`).
"""

from __future__ import annotations

import difflib
import hashlib
import posixpath
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import yaml

from raytrain_ctr.spec import DomainSpec, SpecError, check_keys, merge_tables

SPLITS = ("train", "valid", "test")
ROLES = ("source", "target")  # the domains the methods read
_DOMAIN_KEYS = {"spec", "path", "where"}


class DataError(ValueError):
    """The data breaks the contract; the message names the file, column and rule."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or a URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), posixpath.abspath(uri)


def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def filter_rows(batch: pa.Table, where: dict, time_col: str | None = None, start: int | None = None,
                end: int | None = None) -> pa.Table:
    """The rows of ``batch`` a domain reads: its ``where`` columns equal their values, its time in ``[start, end)``."""
    mask = None
    conds = [pc.equal(batch.column(c), pa.scalar(v)) for c, v in where.items()]
    if time_col and start is not None:
        conds.append(pc.greater_equal(batch.column(time_col), start))
    if time_col and end is not None:
        conds.append(pc.less(batch.column(time_col), end))
    for c in conds:
        mask = c if mask is None else pc.and_(mask, c)
    return batch if mask is None else batch.filter(mask)


def parquet_under(fs: pafs.FileSystem, path: str) -> list[str]:
    """The Parquet files under a directory (recursively), sorted."""
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


@dataclass(frozen=True)
class Domain:
    """One domain of a dataset: its spec, where its Parquet lies, and an optional row filter."""

    name: str
    spec: DomainSpec
    path: str
    where: dict = field(default_factory=dict)
    named: str | None = None  # its name in dataset.yaml, when a role renames it

    @property
    def columns(self) -> list[str]:
        """Columns to read: the spec's plus the ``where`` filter's."""
        return self.spec.columns + [c for c in self.where if c not in self.spec.columns]


@dataclass(frozen=True)
class CTRDataset:
    """A loaded ``dataset.yaml``: domains by name, their files per split."""

    root: str
    domains: dict[str, Domain]

    @classmethod
    def load(cls, root: str, roles: dict[str, str] | None = None) -> CTRDataset:
        """Read ``root/dataset.yaml`` and the specs it names; ``roles`` renames domains (:meth:`with_roles`)."""
        fs, base = resolve(root)
        meta_path = join(base, "dataset.yaml")
        try:
            with fs.open_input_stream(meta_path) as f:
                meta = yaml.safe_load(f.read())
        except (OSError, FileNotFoundError) as e:
            raise DataError(f"{meta_path}: not a raytrain-ctr dataset (cannot read dataset.yaml: {e})") from e
        except yaml.YAMLError as e:
            raise DataError(f"{meta_path}: invalid YAML: {e}") from e
        if not isinstance(meta, dict) or not meta.get("domains"):
            raise DataError(f"{meta_path}: needs a non-empty 'domains' mapping")
        check_keys(meta, {"domains", "description"}, meta_path)
        domains = {}
        for name, d in meta["domains"].items():
            where = f"{meta_path}: domains.{name}"
            check_keys(d, _DOMAIN_KEYS, where)
            for key in ("spec", "path"):
                if key not in d:
                    raise DataError(f"{where}: missing '{key}'")
            spec_path = join(base, d["spec"])
            try:
                with fs.open_input_stream(spec_path) as f:
                    spec = DomainSpec.from_dict(yaml.safe_load(f.read()), where=spec_path)
            except (OSError, FileNotFoundError) as e:
                raise DataError(f"{spec_path}: cannot read spec: {e}") from e
            if spec.domain != name:
                raise SpecError(f"{spec_path}: spec says domain '{spec.domain}' but dataset.yaml lists it as '{name}'")
            domains[name] = Domain(name, spec, join(base, d["path"]), dict(d.get("where") or {}))
        merge_tables([d.spec for d in domains.values()])  # shared tables must agree
        dataset = cls(root if "://" in root else base, domains)
        return dataset.with_roles(roles) if roles else dataset

    def with_roles(self, roles: dict[str, str]) -> CTRDataset:
        """The dataset with the domains named in ``roles`` (role → domain, e.g. ``{source: video, target: game}``)
        renamed to their roles, the names the methods read; other domains keep theirs."""
        check_keys(roles, ROLES, "roles")
        for role, name in roles.items():
            if name not in self.domains:
                near = difflib.get_close_matches(str(name), list(self.domains), n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise SpecError(f"roles.{role}: the data at {self.root} has no domain '{name}' (its domains: "
                                f"{sorted(self.domains)}){hint}")
        if len(set(roles.values())) < len(roles):
            raise SpecError(f"roles: a domain plays one role, got {roles}")
        renamed = {name: role for role, name in roles.items()}
        domains = {}
        for name, d in self.domains.items():
            if name not in renamed:
                if name in roles:
                    raise SpecError(f"roles: the data has a domain '{name}' and the roles give that name to domain "
                                    f"'{roles[name]}': map '{name}' to a role too")
                domains[name] = d
                continue
            role = renamed[name]
            domains[role] = replace(d, name=role, spec=replace(d.spec, domain=role), named=name)
        return CTRDataset(self.root, domains)

    @cached_property
    def filesystem(self) -> pafs.FileSystem:
        return resolve(self.root)[0]

    def specs(self) -> dict[str, DomainSpec]:
        """Every domain's spec, by name."""
        return {name: d.spec for name, d in self.domains.items()}

    def domain(self, name: str) -> Domain:
        if name not in self.domains:
            hint = ("; name the data's domains after the roles, or map them in the config: roles: {source: "
                    "DOMAIN, target: DOMAIN}" if name in ROLES else "")
            raise DataError(f"{self.root}: no domain '{name}' (has {sorted(self.domains)}){hint}")
        return self.domains[name]

    def files(self, domain: str, split: str) -> list[str]:
        """Sorted Parquet files of one domain's split; raises if there are none."""
        d = self.domain(domain)
        path = join(d.path, split)
        info = self.filesystem.get_file_info(path)
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{path}: split '{split}' of domain '{domain}' does not exist")
        files = parquet_under(self.filesystem, path)
        if not files:
            raise DataError(f"{path}: empty domain: no Parquet files for domain '{domain}', split '{split}'")
        return files

    @cached_property
    def _listing(self) -> dict[str, list[tuple[str, int, int]]]:
        """Per domain, every file under its path: (path, size, modification time), listed once."""
        out = {}
        for name, d in self.domains.items():
            sel = pafs.FileSelector(d.path, recursive=True, allow_not_found=True)
            out[name] = sorted((i.path, i.size, i.mtime_ns) for i in self.filesystem.get_file_info(sel)
                               if i.type == pafs.FileType.File)
        return out

    @cached_property
    def _time_ranges(self) -> dict[str, tuple[int, int] | None]:
        """Each Parquet file's ``[min, max]`` of its domain's time field (unix seconds), from the footer
        statistics (None where the footers have none, or the column is not integer seconds: such files
        count as meeting every window)."""
        import pyarrow.parquet as pq

        out: dict[str, tuple[int, int] | None] = {}
        for name, d in self.domains.items():
            for path, _, _ in self._listing[name]:
                out[path] = None
                if not d.spec.time or not path.endswith(".parquet"):
                    continue
                meta = pq.read_metadata(path, filesystem=self.filesystem)
                leaves = [meta.schema.column(c).path for c in range(meta.num_columns)]
                if d.spec.time not in leaves:
                    continue
                col = leaves.index(d.spec.time)
                stats = [meta.row_group(g).column(col).statistics for g in range(meta.num_row_groups)]
                if stats and all(s is not None and s.has_min_max and isinstance(s.min, int) for s in stats):
                    out[path] = (min(s.min for s in stats), max(s.max for s in stats))
        return out

    def version(self, within: tuple[int, int] | None = None) -> str:
        """A digest of the specs and of the files under the domains' paths (name, size, modification
        time): it changes when the data is rewritten, so stage artifacts of the old data are not reused.
        ``within`` (``[start, end)`` of the time field): files whose rows all lie outside it are left out,
        so data arriving after a cadenced stage's window does not change that stage's key."""
        h = hashlib.sha256()
        for name in sorted(self.domains):
            d = self.domains[name]
            h.update(repr((name, asdict(d.spec), sorted(d.where.items()), *([d.named] if d.named else []))).encode())
            for path, size, mtime in self._listing[name]:
                span = self._time_ranges[path] if within else None
                if span is None or (span[0] < within[1] and span[1] >= within[0]):
                    h.update(repr((path[len(d.path):], size, mtime)).encode())
        return h.hexdigest()[:16]

    @property
    def size_bytes(self) -> int:
        """Bytes on disk under the domains' paths."""
        return sum(size for files in self._listing.values() for _, size, _ in files)

    @property
    def fingerprint(self) -> str:
        """:meth:`version` of every file."""
        return self.version()

    def has_split(self, domain: str, split: str) -> bool:
        return self.filesystem.get_file_info(join(self.domain(domain).path, split)).type == pafs.FileType.Directory


def write_dataset_yaml(root: str, domains: dict[str, dict], description: str = "") -> None:
    """Write ``dataset.yaml`` (domains: name -> {spec, path[, where]})."""
    fs, base = resolve(root)
    meta = {"description": description, "domains": domains} if description else {"domains": domains}
    with fs.open_output_stream(join(base, "dataset.yaml")) as f:
        f.write(yaml.safe_dump(meta, sort_keys=False).encode())
