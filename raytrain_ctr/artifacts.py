"""Stage artifacts that can be trusted: committed with a manifest, verified before they are used.

A stage's files are copied into its directory first and its manifest (``manifest.json``: each file's
size and SHA-256) is written last, in one atomic write (a temporary file renamed into place on a
local disk, one PUT on an object store). So a directory without a manifest is unfinished whatever it
holds — a crash during the commit leaves it unfinished, and the next run trains (or resumes) the
stage — and a file that no longer matches its manifest (truncated, rewritten, bit-rotted) is an
:class:`ArtifactError` naming the file and the command that rebuilds it, before a stage is skipped or
an upstream artifact is loaded. Every ``torch.load`` of an artifact or checkpoint goes through
:func:`load_tensors` (``weights_only=True``): a corrupt file is the same clear error, not a pickle
traceback.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raytrain_ctr.data.dataset import join, resolve

MANIFEST = "manifest.json"
_CHUNK = 1 << 22
_VERIFIED: set[tuple] = set()  # artifacts whose files this process hashed, with their sizes and mtimes then


class ArtifactError(RuntimeError):
    """An artifact or checkpoint that cannot be used as it is: the message names the file and how to rebuild it."""


@dataclass(frozen=True)
class Manifest:
    """What a committed artifact holds: ``files`` maps each name to ``[size, sha256]``."""

    files: dict[str, list]
    created: float
    info: dict[str, Any]


def shown(fs: pafs.FileSystem, path: str) -> str:
    """A path as the user wrote it: with its scheme on an object store (``s3://bucket/key``)."""
    scheme = {"s3": "s3://", "gcs": "gs://", "hdfs": "hdfs://"}.get(fs.type_name, "")
    return f"{scheme}{path}"


def sha256_of(fs: pafs.FileSystem, path: str) -> tuple[int, str]:
    """``(size, sha256)`` of a file, streamed."""
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


LATEST_FILE = "latest.json"  # a stage's latest epoch checkpoint, by name: STORAGE/_ray/ARTIFACT/latest.json
GROUP_RUN = "workers-"  # the name prefix of a shared worker group's Ray Train run under STORAGE/_ray


def latest_pointer(checkpoints: str, artifact: str) -> str:
    """Where a stage's latest epoch checkpoint is named: ``CHECKPOINTS/ARTIFACT/latest.json`` (the checkpoint's
    directory as ``RUN/NAME`` under ``checkpoints``, its epoch, and the training of the stage that wrote it)."""
    return join(checkpoints, artifact, LATEST_FILE)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that a reader sees the old file, no file, or the whole new one."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{time.time_ns()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:  # an object store's PUT is atomic
        with fs.open_output_stream(path) as f:
            f.write(data)


def commit(files: dict[str, str | Path], fs: pafs.FileSystem, directory: str, info: dict | None = None) -> Manifest:
    """Copy local ``files`` (name → path) into ``directory`` on ``fs``, then write the manifest: the commit point."""
    fs.create_dir(directory, recursive=True)
    local = pafs.LocalFileSystem()
    if fs.get_file_info(join(directory, MANIFEST)).type == pafs.FileType.File:
        fs.delete_file(join(directory, MANIFEST))  # re-committing: unfinished until the new manifest is written
    entries = {}
    for name, src in sorted(files.items()):
        entries[name] = list(sha256_of(local, str(src)))
        pafs.copy_files(str(src), join(directory, name), destination_filesystem=fs)
        _fault("commit")
    manifest = Manifest(entries, time.time(), info or {})
    write_atomic(fs, join(directory, MANIFEST), json.dumps(asdict(manifest), indent=1).encode())
    return manifest


def read_manifest(fs: pafs.FileSystem, directory: str) -> Manifest | None:
    """The artifact's manifest, or None when it was never committed (or its commit did not finish)."""
    path = join(directory, MANIFEST)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as f:
            return Manifest(**json.loads(f.read()))
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{shown(fs, path)}: not a manifest ({e})") from None


def verify(fs: pafs.FileSystem, directory: str, rebuild: str, names: tuple[str, ...] = ()) -> Manifest | None:
    """The manifest of a committed artifact whose every file (and every one of ``names``) matches it; None when it
    was never committed. A file that is missing, of another size or another checksum is an :class:`ArtifactError`
    naming it and ``rebuild`` (the command that makes it again)."""
    manifest = read_manifest(fs, directory)
    if manifest is None:
        return None
    missing = [n for n in names if n not in manifest.files]
    if missing:
        raise ArtifactError(f"{shown(fs, directory)}: committed without {missing}; rebuild it: {rebuild}")
    infos = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(directory))}
    seen = (shown(fs, directory), manifest.created, tuple(sorted(
        (n, i.size, i.mtime_ns) for n, i in infos.items() if n in manifest.files)))
    if seen in _VERIFIED:  # this process hashed these very files already (same sizes, same modification times)
        return manifest
    for name, (size, digest) in manifest.files.items():
        path = join(directory, name)
        found = infos.get(name)
        if found is None or found.type != pafs.FileType.File:
            problem = "is missing"
        elif found.size != size:
            problem = f"has {found.size} bytes where its manifest says {size} (truncated or rewritten)"
        elif sha256_of(fs, path)[1] != digest:
            problem = "does not match its manifest's SHA-256 (changed after the commit)"
        else:
            continue
        raise ArtifactError(f"{shown(fs, path)} {problem}; rebuild it: {rebuild}")
    _VERIFIED.add(seen)
    return manifest


def load_tensors(path: str | Path, rebuild: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; an unreadable file is an :class:`ArtifactError`
    naming it and ``rebuild``."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and unpickler errors alike: the file is unusable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path}: cannot be loaded ({first}); rebuild it: {rebuild}") from None


def _fault(point: str) -> None:
    """Testing aid: ``RAYTRAIN_CTR_FAULT=POINT`` kills this process at ``point`` (a crash during a commit)."""
    import os

    if os.environ.get("RAYTRAIN_CTR_FAULT") == point:
        os._exit(3)


@dataclass(frozen=True)
class Listed:
    """One stage of a storage, as ``raytrain-ctr runs`` shows it."""

    artifact: str
    state: str  # committed | damaged: … | unfinished (no manifest) | training or interrupted (N checkpoints)
    metrics: dict[str, Any]
    created: float | None
    bytes: int


def inventory(storage: str) -> list[Listed]:
    """Every stage artifact under ``storage`` (``stages/``) and every stage trained there without one yet
    (``_ray/``), each verified against its manifest, with its metrics; newest first."""
    fs, root = resolve(storage)
    found: list[Listed] = []

    def children(path: str) -> list[pafs.FileInfo]:
        return [i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                if i.type == pafs.FileType.Directory]

    for info in children(join(root, "stages")):
        try:
            manifest = verify(fs, info.path, "raytrain-ctr run … --stage STAGE --force")
            state = "committed" if manifest else "unfinished (no manifest)"
        except ArtifactError as e:
            manifest, state = None, f"damaged: {str(e).split('; rebuild')[0]}"
        metrics: dict[str, Any] = {}
        if manifest is not None:
            with fs.open_input_stream(join(info.path, "metrics.json")) as f:
                metrics = {k: v for k, v in json.loads(f.read()).items() if k != "history"}
        size = sum(s for s, _ in manifest.files.values()) if manifest else 0
        found.append(Listed(info.base_name, state, metrics, manifest.created if manifest else None, size))
    listed = {x.artifact for x in found if x.state == "committed"}
    for info in children(join(root, "_ray")):
        name = info.base_name
        if name.startswith(GROUP_RUN) or name in listed or any(name.startswith(f"{a}-") for a in listed):
            continue  # a shared worker group's run (its stages are listed by name), or a committed stage's
        pointer = fs.get_file_info(join(info.path, LATEST_FILE))
        if pointer.type == pafs.FileType.File:
            with fs.open_input_stream(pointer.path) as f:
                epoch = json.loads(f.read()).get("epoch")
            found.append(Listed(name, f"training or interrupted (epoch {epoch} checkpointed)", {},
                                pointer.mtime.timestamp() if pointer.mtime else None, 0))
            continue
        checkpoints = [c for c in children(info.path) if c.base_name.startswith("checkpoint")]
        found.append(Listed(name, f"training or interrupted ({len(checkpoints)} checkpoints)", {},
                            max((c.mtime.timestamp() for c in checkpoints if c.mtime), default=None), 0))
    return sorted(found, key=lambda x: -(x.created or 0.0))
