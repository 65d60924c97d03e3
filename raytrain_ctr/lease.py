"""One run at a time per stage: a lease in the storage, so concurrent runs wait instead of colliding.

Two runs of one config on one storage would otherwise train the same stage twice into the same
directories, and one could delete the checkpoint the other had restored. ``stage_lease`` is held
by the driver while it trains and commits a stage; a second run waits for it, then finds the
artifact committed and skips the stage.

- Local storage (or any mounted disk): ``fcntl.flock`` on ``STORAGE/locks/NAME.lock``; the kernel
  frees it when the holder dies, however it dies.
- ``s3://``: an object created with a conditional PUT (``If-None-Match: *``: one writer wins),
  renewed by a heartbeat thread (``If-Match`` its own ETag), and taken over when its heartbeat is
  older than ``ttl`` (``If-Match`` the stale ETag: one taker wins). A holder that finds its lease
  taken over stops renewing and the run fails at its next check (:meth:`Lease.check`).
- Other URIs (``gs://``, ``hdfs://``): pyarrow offers no conditional write there; the stage runs
  unlocked with a warning.

Credentials and the endpoint (``AWS_ENDPOINT_URL``) come from the environment, as for pyarrow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

log = logging.getLogger(__name__)


class LeaseError(RuntimeError):
    """A lease could not be taken in time, or was lost while held."""


class Lease(ABC):
    """An exclusive claim on ``name`` under a storage root, waited for up to ``timeout`` seconds."""

    def __init__(self, name: str, timeout: float = 24 * 3600.0, poll: float = 1.0):
        self.name, self.timeout, self.poll = name, timeout, poll
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    @abstractmethod
    def try_acquire(self) -> bool:
        """Take the lease if it is free (or stale); True when this lease now holds it."""

    @abstractmethod
    def release(self) -> None:
        """Give the lease up (a no-op when it is not held)."""

    def check(self) -> None:  # noqa: B027 - a lease that cannot be lost has nothing to check
        """Raise :class:`LeaseError` when the lease was lost while held."""

    def holder(self) -> str:
        """Who holds the lease (for the log line of a waiting run)."""
        return "another run"

    def acquire(self) -> None:
        deadline, said = time.monotonic() + self.timeout, False
        while not self.try_acquire():
            if not said:
                log.warning("stage %s is being trained by %s; waiting for it", self.name, self.holder())
                said = True
            if time.monotonic() > deadline:
                raise LeaseError(f"stage {self.name}: still held by {self.holder()} after {self.timeout:.0f} s")
            time.sleep(self.poll)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class FileLease(Lease):
    """``flock`` on a local (or mounted) file: freed by the kernel when its holder dies."""

    def __init__(self, path: str, name: str, **kw):
        super().__init__(name, **kw)
        self.path, self._fd = Path(path), None

    def try_acquire(self) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, self.owner.encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def holder(self) -> str:
        with contextlib.suppress(OSError):
            return self.path.read_text().strip() or "another run"
        return "another run"


class S3Lease(Lease):
    """A lease object in S3 created and renewed with conditional PUTs; stale after ``ttl`` seconds unrenewed."""

    def __init__(self, bucket: str, key: str, name: str, ttl: float = 60.0, **kw):
        super().__init__(name, **kw)
        try:
            import boto3
        except ImportError:
            raise LeaseError("s3:// storage locks its stages with boto3: pip install 'raytrain-ctr[s3]'") from None
        self.client = boto3.client("s3")
        self.bucket, self.key, self.ttl = bucket, key, ttl
        self._etag: str | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "beat": time.time()}).encode()

    def _put(self, **condition) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)["ETag"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                           "NoSuchKey", "412", "409", "404"):
                return None
            raise

    def _current(self) -> tuple[dict, str] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return json.loads(got["Body"].read()), got["ETag"]

    def try_acquire(self) -> bool:
        etag = self._put(IfNoneMatch="*")
        if etag is None:
            current = self._current()
            if current is None:
                return False  # released in between: the next poll creates it
            held, stale_etag = current
            if time.time() - float(held.get("beat", 0)) <= self.ttl:
                return False
            log.warning("stage %s: taking over the lease of %s (no heartbeat for %.0f s)", self.name,
                        held.get("owner"), time.time() - float(held.get("beat", 0)))
            etag = self._put(IfMatch=stale_etag)
            if etag is None:
                return False
        self._etag = etag
        self._lost.clear()
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"lease-{self.name}")
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            etag = self._put(IfMatch=self._etag)
            if etag is None:
                self._lost.set()
                return
            self._etag = etag

    def check(self) -> None:
        if self._lost.is_set():
            raise LeaseError(f"stage {self.name}: the lease s3://{self.bucket}/{self.key} was taken over while held "
                             f"(this run stalled for over {self.ttl:.0f} s)")

    def release(self) -> None:
        if self._beat is None:
            return
        self._stop.set()
        self._beat.join()
        self._beat = None
        if not self._lost.is_set():
            self.client.delete_object(Bucket=self.bucket, Key=self.key)

    def holder(self) -> str:
        current = self._current()
        return current[0].get("owner", "another run") if current else "another run"


class NoLease(Lease):
    """Storage without a conditional write: the stage runs unlocked."""

    def try_acquire(self) -> bool:
        log.warning("stage %s: no lock on this storage (only local paths and s3:// have one); concurrent runs "
                    "of this stage would train it twice", self.name)
        return True

    def release(self) -> None:
        return None


def stage_lease(storage: str, name: str, timeout: float = 24 * 3600.0, ttl: float = 60.0) -> Lease:
    """The lease of artifact ``name`` under ``storage`` (a local path or a URI): ``STORAGE/locks/NAME.lock``;
    ``ttl``: how long an S3 lease lives without a heartbeat."""
    if "://" not in storage:
        return FileLease(str(Path(storage).absolute() / "locks" / f"{name}.lock"), name, timeout=timeout)
    scheme, _, rest = storage.partition("://")
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        key = "/".join(p for p in (prefix.strip("/"), "locks", f"{name}.lock") if p)
        return S3Lease(bucket, key, name, ttl=ttl, timeout=timeout)
    return NoLease(name, timeout=timeout)
