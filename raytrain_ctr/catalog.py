"""The artifact catalog: which artifacts of a stage exist, and for which ``as_of`` date.

A stage's *family* hashes everything that shapes it except the date (its windows stay relative);
its *key* adds the resolved windows and the upstream artifacts. Every finished stage is recorded
as ``STORAGE/catalog/FAMILY/AS_OF--ARTIFACT.json`` (one small file per entry: concurrent writers
never rewrite each other's entries). :meth:`Catalog.latest` answers "the newest artifact of this
stage valid as of date D" (a daily job reads last week's model without recomputing its key), and
:meth:`Catalog.prune` keeps the last N, deleting the older artifacts.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from raytrain_ctr.artifacts import ArtifactError, shown
from raytrain_ctr.data.dataset import join, resolve

UNDATED = "0000-00-00"  # the as_of of a run without one: older than every date


@dataclass(frozen=True)
class Entry:
    family: str
    artifact: str  # the artifact's name (``STAGE-KEY``)
    path: str  # its directory
    as_of: str  # ISO date, or UNDATED
    created: float


class Catalog:
    """Entries of finished stage artifacts under ``root`` (a local path or a URI)."""

    def __init__(self, root: str):
        self.fs, self.root = resolve(root)

    def _dir(self, family: str) -> str:
        return join(self.root, family)

    def record(self, family: str, artifact: str, path: str, as_of: str | None) -> Entry:
        """Add an entry (a re-run that finds its entry keeps it as it was)."""
        date = as_of or UNDATED
        file = join(self._dir(family), f"{date}--{artifact}.json")
        if self.fs.get_file_info(file).type == pafs.FileType.File:
            return self._read(file)
        entry = Entry(family, artifact, path, date, time.time())
        self.fs.create_dir(self._dir(family), recursive=True)
        tmp = f"{file}.tmp-{time.time_ns()}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(asdict(entry)).encode())
        self.fs.move(tmp, file)
        return entry

    def _read(self, file: str) -> Entry:
        with self.fs.open_input_stream(file) as f:
            raw = f.read()
        try:
            return Entry(**json.loads(raw))
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{shown(self.fs, file)}: not a catalog entry ({e}); delete it and re-run its stage "
                                f"(raytrain-ctr run … --stage STAGE) to record it again") from None

    def entries(self, family: str) -> list[Entry]:
        """Oldest first (by ``as_of``, then by when they were recorded)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._dir(family), allow_not_found=True))
        found = [self._read(i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(".json")]
        return sorted(found, key=lambda e: (e.as_of, e.created))

    def latest(self, family: str, as_of: str | None = None) -> Entry | None:
        """The newest entry valid as of ``as_of`` (its date on or before it; any date without one)."""
        valid = [e for e in self.entries(family) if as_of is None or e.as_of <= as_of]
        return valid[-1] if valid else None

    def prune(self, family: str, keep: int) -> list[Entry]:
        """Delete all but the ``keep`` newest entries and their artifacts; returns the deleted ones."""
        entries = self.entries(family)
        gone = entries[: max(len(entries) - keep, 0)]
        for e in gone:
            fs, path = resolve(e.path)
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                fs.delete_dir(path)
            self.fs.delete_file(join(self._dir(family), f"{e.as_of}--{e.artifact}.json"))
        return gone
