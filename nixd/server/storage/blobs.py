"""Where NAR blobs live: the :class:`BlobStore` interface and the local directory behind it.

A blob is the zstd file of one NAR, named by its FileHash (``<ab>/<filehash>.nar.zst``,
the *key*). Every implementation keeps one promise: **nothing partial is ever visible
under a final key**. A new blob is streamed into a :class:`BlobWriter` and becomes visible
only by :meth:`BlobWriter.commit` (atomically, under the key its hash gave it), or is
dropped by :meth:`BlobWriter.discard`; a crash in between leaves something only
:meth:`BlobStore.sweep_partial` looks at. Keys are content-addressed, so a blob written
twice under one key is the same bytes both times.

Every method may block (a remote store does network I/O): the HTTP app calls them in a
worker thread, never on the event loop. Implementations must be safe to use from several
threads at once. :class:`LocalBlobs` is the directory layout the server always had; the
S3-compatible one is :class:`nixd.server.storage.s3.S3Blobs`.

A store that cannot be reached (a bucket that does not answer, denies or is missing)
raises :class:`~nixd.server.errors.StorageUnavailable`, a 503 that says so; a full disk is
:class:`~nixd.server.errors.StorageFull` (507). A key that is simply absent is
:class:`BlobMissing`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from nixd.errors import ConfigError, NixdError
from nixd.server.errors import StorageFull

if TYPE_CHECKING:
    from nixd.server.config import ServerConfig

READ_CHUNK = 1 << 20
"""The largest piece a blob read yields: a download never holds more of a NAR than this."""
PARTIAL_MAX_AGE = 24 * 3600.0
"""Seconds after which an unfinished upload's leftovers are swept (another instance or
worker may be receiving an upload right now, so only old ones go)."""
_KEY = re.compile(r"[0-9a-z]{2}/([0-9a-z]{52})\.nar\.zst")


class BlobMissing(NixdError):
    """No blob is stored under this key."""


class BlobEntry(NamedTuple):
    """One stored blob, as :meth:`BlobStore.iter_blobs` lists it."""

    key: str
    size: int
    mtime: float


def blob_key(file_hash: str) -> str:
    """The key of the blob whose FileHash (base32, no prefix) is ``file_hash``."""
    return f"{file_hash[:2]}/{file_hash}.nar.zst"


def file_hash_of(key: str) -> str | None:
    """The FileHash a key names, or None if the key is not a blob's name."""
    match = _KEY.fullmatch(key)
    return match.group(1) if match and key[:2] == match.group(1)[:2] else None


class BlobWriter(Protocol):
    """One new blob being streamed in (not thread-safe; may move between threads)."""

    def write(self, data: bytes) -> int:
        """Append bytes (StorageFull / StorageUnavailable when they cannot be kept)."""
        ...

    def commit(self, key: str) -> None:
        """Make everything written visible under ``key``, whole, at once; then the writer
        is spent. On failure nothing is visible under ``key`` and the writer is discarded."""
        ...

    def discard(self) -> None:
        """Drop everything written (idempotent, never raises; after commit, a no-op)."""
        ...


class BlobRead(Protocol):
    """A ranged read in progress: iterate for chunks of at most :data:`READ_CHUNK`."""

    def __iter__(self) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class BlobStore(Protocol):
    """The blob storage of one server (see the module docstring for the promises)."""

    remote: bool
    """Reached over the network: an upload asks :meth:`check` before its body is read
    (:meth:`~nixd.server.storage.store.Store.check_room`)."""

    def describe(self) -> str:
        """Where the blobs are, for log lines (no credentials in it)."""
        ...

    def writer(self) -> BlobWriter:
        """A writer for a new blob; its key is given when it is committed."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """The stored size of ``key`` (:class:`BlobMissing` if there is none)."""
        ...

    def open_read(self, key: str, start: int, end: int) -> BlobRead:
        """Bytes ``[start, end)`` of ``key``; the request is made here, so a missing key
        (:class:`BlobMissing`) or an unreachable store fails before anything is sent."""
        ...

    def local_path(self, key: str) -> Path | None:
        """A file holding ``key`` that may be opened directly (sendfile), or None."""
        ...

    def download_url(self, key: str) -> str | None:
        """A URL a client may GET ``key`` from itself for a while (presigned), or None
        when downloads go through the server."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; an absent key is not an error."""
        ...

    def iter_blobs(self) -> Iterator[BlobEntry]:
        """Every committed blob (never a partial upload), in no particular order."""
        ...

    def free_bytes(self) -> int | None:
        """Room left for new blobs, or None when the store does not say (object storage)."""
        ...

    def sweep_partial(self, older_than: float = PARTIAL_MAX_AGE) -> None:
        """Remove leftovers of uploads cut off by a crash, older than ``older_than`` s."""
        ...

    def check(self) -> str | None:
        """None when the store takes new blobs now, else why not (for the log only)."""
        ...


@contextlib.contextmanager
def full_disk_refused() -> Iterator[None]:
    """A full disk or quota while a blob is written: :class:`StorageFull` (a 507 that says
    so), not an OSError answered as an internal error."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"no room to store the upload: {exc.strerror}") from exc
        raise


class _LocalWriter:
    """A temp file in ``tmp/``, fsynced and renamed into place on commit."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self._root = root
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".nar.zst", dir=tmp)
        self.tmp_path = Path(name)
        self._f = os.fdopen(fd, "wb")
        self._done = False

    def write(self, data: bytes) -> int:
        with full_disk_refused():
            return self._f.write(data)

    def commit(self, key: str) -> None:
        try:
            with full_disk_refused():
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                dest = self._root / key
                dest.parent.mkdir(exist_ok=True)
                os.replace(self.tmp_path, dest)
                self._done = True
                _fsync_dir(dest.parent)
        finally:
            if not self._done:
                self.discard()

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp_path.unlink()


class _LocalRead:
    """pread()s of at most :data:`READ_CHUNK` from an open file."""

    def __init__(self, fd: int, start: int, end: int, key: str) -> None:
        self._fd, self._pos, self._end, self._key = fd, start, end, key

    def __iter__(self) -> Iterator[bytes]:
        while self._pos < self._end:
            chunk = os.pread(self._fd, min(READ_CHUNK, self._end - self._pos), self._pos)
            if not chunk:
                raise NixdError(f"stored NAR {self._key} shrank while being read")
            self._pos += len(chunk)
            yield chunk

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalBlobs:
    """Blobs as files ``<root>/<ab>/<filehash>.nar.zst``; uploads in ``<root>/tmp``.

    A commit is fsync, ``rename`` into place, fsync of the directory: the file appears whole
    or not at all, and survives a power cut once the upload was acknowledged. Downloads go
    from the page cache to the socket with sendfile (:meth:`local_path`).
    """

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    @classmethod
    def open(cls, root: Path) -> LocalBlobs:
        from nixd.server.storage.store import StoreError  # noqa: PLC0415 - no import cycle

        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / "tmp").mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{root}: cannot create the blob directory: {exc}") from exc
        return cls(root)

    def describe(self) -> str:
        return str(self.root)

    def writer(self) -> _LocalWriter:
        return _LocalWriter(self.root, self.tmp)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def size(self, key: str) -> int:
        try:
            return (self.root / key).stat().st_size
        except FileNotFoundError:
            raise BlobMissing(f"no blob {key} in {self.root}") from None

    def open_read(self, key: str, start: int, end: int) -> _LocalRead:
        try:
            fd = os.open(self.root / key, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobMissing(f"no blob {key} in {self.root}") from None
        return _LocalRead(fd, start, end, key)

    def local_path(self, key: str) -> Path:
        return self.root / key

    def download_url(self, key: str) -> None:
        return None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / key).unlink()

    def iter_blobs(self) -> Iterator[BlobEntry]:
        for sub in sorted(self.root.iterdir()):
            if sub.name == "tmp" or len(sub.name) != 2 or not sub.is_dir():
                continue
            for f in sub.iterdir():
                key = f"{sub.name}/{f.name}"
                if file_hash_of(key) is None:
                    continue
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    st = f.stat()
                    yield BlobEntry(key, st.st_size, st.st_mtime)

    def free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.tmp)
        except OSError:
            return None  # the write will tell
        return st.f_bavail * st.f_frsize

    def sweep_partial(self, older_than: float = PARTIAL_MAX_AGE) -> None:
        cutoff = time.time() - older_than
        for p in self.tmp.glob("upload-*"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()

    def check(self) -> str | None:
        """``tmp/`` takes a new file and lets it go (what every upload does first), so a
        missing, moved or read-only blob directory fails."""
        probe = self.tmp / f"ready-{os.getpid()}-{threading.get_ident()}"
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            os.unlink(probe)
        except OSError as exc:
            return f"the blob directory {self.root} does not answer: {exc}"
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_blob_store(config: ServerConfig) -> BlobStore:
    """The blob store ``[storage] blobs`` names: a directory, or an ``s3://`` bucket."""
    target = config.blobs_s3
    if target is None:
        return LocalBlobs.open(config.blobs_path)
    try:
        from nixd.server.storage.s3 import S3Blobs  # noqa: PLC0415 - boto3 is optional
    except ImportError as exc:
        raise ConfigError(
            f"storage.blobs is {config.storage.blobs!r}, which needs boto3: install "
            f"nixd[s3] ({exc})"
        ) from exc
    s3 = config.storage.s3
    return S3Blobs(
        target[0],
        target[1],
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        addressing_style=s3.addressing_style,
        part_size=s3.part_size,
        redirect_ttl=s3.redirect_ttl if s3.redirect else None,
    )
