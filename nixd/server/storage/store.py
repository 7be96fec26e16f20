"""Content storage of the cache server: NAR blobs on disk, metadata in SQLite or PostgreSQL.

The model:

- A **NAR** is stored once, whatever slice or client compression it came in (its bytes are
  checked against the NarHash a slice record names, so sharing them cannot change what any
  reader receives): decompressed
  and hashed as it streams in, then recompressed as zstd into
  ``blobs/<ab>/<filehash32>.nar.zst`` (``filehash`` = sha256 of that file). The ``nars`` table
  maps its NarHash to that file; a second upload of the same NarHash keeps the first file.
- A **slice record** is one slice's copy of a store path's narinfo fields (StorePath,
  NarHash, NarSize, References, Deriver, System, CA), exactly as that slice's writer
  uploaded them, with the identity that uploaded them. Records are never shared between
  slices: two slices may hold the same store path with different metadata, and what one
  slice's writer uploads cannot change what another slice serves (``slice_records``,
  keyed by (slice, store-path hash)). A second upload of a path the slice already holds
  must be identical, or come from someone allowed to replace it (``cache:admin``).
  Signatures are never stored: the server signs when it serves.
- A **slice** is ``org/project``. A slice is what policy talks about; which slices answer
  a reader, and in what order, is the unified view's business (:mod:`nixd.server.http.app`).
- A record's **last access** (``slice_records.last_access``) is when a reader was last
  served its narinfo or NAR: noted in memory per request, written in batches
  (:meth:`Store.flush_accesses`), read by retention (:mod:`nixd.server.storage.gc`).
- An **upload alias** remembers, per slice, the NAR URL a client used for a PUT
  (``nar/<its filehash>.nar.xz``) and the NarHash it turned out to have, so that the narinfo
  PUT that follows can be checked against the bytes actually received.

Reads are small indexed SELECTs on the event loop's own connection (WAL, so writers never
block them). The CPU-heavy part of an upload (decompress, hash, parse, recompress) runs in a
worker thread in ~1 MiB batches, so one NAR never sits in memory whole.

A full disk (or quota) is :class:`~nixd.server.errors.StorageFull`, a 507 that says so:
an upload whose length exceeds the free space is refused before its body is read
(:meth:`Store.check_room`), one that fills the disk while it is written is dropped with
its temp file; nothing partial is recorded.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import hashlib
import logging
import lzma
import mmap
import os
import sqlite3
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard

from nixd.errors import FormatError, NixdError
from nixd.nix import base32
from nixd.nix.hashes import Hash
from nixd.server.errors import BadUpload, StorageFull, TooLarge, UnsupportedCompression
from nixd.server.storage.db import (
    Connection,
    Migration,
    Project,
    ensure_schema,
    get_project,
    org_trust,
    project_from_row,
    transaction,
)

log = logging.getLogger(__name__)

STORE_MIGRATIONS: list[Migration] = [
    # 1: NARs, paths, which slices hold them, upload aliases, build logs.
    """
    CREATE TABLE nars (
        nar_hash TEXT PRIMARY KEY, nar_size INTEGER NOT NULL,
        file_hash TEXT NOT NULL UNIQUE, file_size INTEGER NOT NULL, created REAL NOT NULL);
    CREATE TABLE paths (
        hash_part TEXT NOT NULL, nar_hash TEXT NOT NULL REFERENCES nars(nar_hash),
        name TEXT NOT NULL, refs TEXT NOT NULL, deriver TEXT, system TEXT, ca TEXT,
        created REAL NOT NULL, PRIMARY KEY (hash_part, nar_hash));
    CREATE TABLE slice_paths (
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        hash_part TEXT NOT NULL, nar_hash TEXT NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (project_id, hash_part));
    CREATE INDEX slice_paths_by_hash ON slice_paths(hash_part);
    CREATE INDEX slice_paths_by_nar ON slice_paths(nar_hash);
    CREATE TABLE upload_aliases (
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        url TEXT NOT NULL, nar_hash TEXT NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (project_id, url));
    CREATE INDEX upload_aliases_by_nar ON upload_aliases(nar_hash);
    CREATE TABLE logs (
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        drv TEXT NOT NULL, data BLOB NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (project_id, drv));
    CREATE INDEX logs_by_drv ON logs(drv);
    """,
    # 2: per-slice path records. Version 1 shared one metadata row per (path, NarHash)
    # among all slices (the first uploader's); each slice keeps that copy, marked migrated.
    """
    CREATE TABLE slice_records (
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        hash_part TEXT NOT NULL, name TEXT NOT NULL,
        nar_hash TEXT NOT NULL REFERENCES nars(nar_hash),
        refs TEXT NOT NULL, deriver TEXT, system TEXT, ca TEXT,
        uploader TEXT NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (project_id, hash_part));
    INSERT INTO slice_records (project_id, hash_part, name, nar_hash, refs, deriver, system,
            ca, uploader, created)
        SELECT s.project_id, s.hash_part, p.name, s.nar_hash, p.refs, p.deriver, p.system,
            p.ca, 'migrated:v1', s.created
        FROM slice_paths s JOIN paths p ON p.hash_part = s.hash_part AND p.nar_hash = s.nar_hash;
    DROP TABLE slice_paths;
    DROP TABLE paths;
    CREATE INDEX slice_records_by_hash ON slice_records(hash_part);
    CREATE INDEX slice_records_by_nar ON slice_records(nar_hash);
    """,
    # 3: retention and GC (nixd.server.storage.gc): when a record was last read (NULL:
    # not since it was uploaded), and the pins whose closures are kept whatever the rules.
    """
    ALTER TABLE slice_records ADD COLUMN last_access REAL;
    CREATE TABLE pins (
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        hash_part TEXT NOT NULL, name TEXT NOT NULL,
        pinned_by TEXT NOT NULL, created REAL NOT NULL, note TEXT,
        PRIMARY KEY (project_id, hash_part));
    """,
]
COMPRESSIONS = ("none", "xz", "zstd", "bzip2", "br", "gzip", "lz4", "lzip", "lzma")
"""What an upload may be compressed with: everything Nix 2.8's ``?compression=`` offers
that it can write without an external program, except ``compress`` (see :data:`REFUSED`)."""
SUFFIX_COMPRESSION = {
    # The file names Nix 2.8 gives each (``nix copy --to 'file://...?compression=X'``):
    # gzip, lzma and compress get no suffix of their own, so a ``.nar`` upload is told
    # apart by its first bytes (:class:`_Sniffed`).
    ".nar": "none",
    ".nar.xz": "xz",
    ".nar.zst": "zstd",
    ".nar.bz2": "bzip2",
    ".nar.br": "br",
    ".nar.lz4": "lz4",
    ".nar.lzip": "lzip",
    ".nar.lz": "lzip",
    ".nar.gz": "gzip",
}
REFUSED = {
    "compress": "Unix compress (.Z, LZW) has no maintained streaming decoder for Python",
    "lzop": "lzop has no maintained streaming decoder for Python",
    "lrzip": "lrzip needs the external lrzip program, which this server does not run",
    "grzip": "grzip needs the external grzip program, which this server does not run",
}
"""Methods Nix 2.8 can upload that this server refuses, and why (a 415 says so)."""
_NAR_MAGIC = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1"
_MAGICS = (
    # (first bytes, method) for a ``.nar`` upload; the NAR magic itself means "none"
    (b"\x1f\x8b", "gzip"),
    (b"\x1f\x9d", "compress"),
    (b"\x89LZO\x00\r\n\x1a\n", "lzop"),
    (b"LRZI", "lrzip"),
    (b"GRZipII", "grzip"),
    (b"\x5d\x00\x00", "lzma"),  # lzma_alone: lc/lp/pb byte 0x5d, then the dict size
)
_SNIFF = 16
_CHUNK = 1 << 20
_HOLDERS_CACHE_MAX = 100_000
_ACCESS_NOTES_MAX = 200_000
_WAL_HEADER = 48
"""Bytes of SQLite's wal-index header (https://www.sqlite.org/walformat.html): every commit
rewrites it (``iChange``, ``mxFrame``, salts), so while it is unchanged nobody committed."""


class StoreError(NixdError):
    """The store was asked for something it cannot do (bad name, unknown slice)."""


class PathConflict(NixdError):
    """A slice already holds this store path with other contents or metadata."""


@dataclass(frozen=True, slots=True)
class Nar:
    """A stored NAR: its NarHash/NarSize and the zstd file holding it."""

    nar_hash: str  # sha256:<base32>
    nar_size: int
    file_hash: str  # base32 of the zstd file's sha256, no prefix
    file_size: int

    @property
    def url(self) -> str:
        return f"nar/{self.file_hash}.nar.zst"


@dataclass(frozen=True, slots=True)
class PathInfo:
    """A store path's narinfo fields, as stored (no URL, no signatures)."""

    hash_part: str
    name: str
    nar: Nar
    references: tuple[str, ...]  # basenames, sorted
    deriver: str | None
    system: str | None
    ca: str | None
    uploader: str = ""
    """Who uploaded this record (``kind:subject``); not served, kept for provenance."""
    created: float = 0.0
    """When the slice got this record: among equals in a view, the oldest answers."""

    @property
    def basename(self) -> str:
        return f"{self.hash_part}-{self.name}"

    def same_contents(self, other: PathInfo) -> bool:
        """Whether two records would serve the same narinfo (uploader aside)."""
        return (
            self.hash_part == other.hash_part
            and self.name == other.name
            and self.nar.nar_hash == other.nar.nar_hash
            and self.nar.nar_size == other.nar.nar_size
            and tuple(sorted(self.references)) == tuple(sorted(other.references))
            and self.deriver == other.deriver
            and self.system == other.system
            and self.ca == other.ca
        )


class NarChecker(Protocol):
    """Strict NAR structure check fed with the decompressed bytes (NarParser)."""

    def feed(self, data: bytes) -> None: ...
    def close(self) -> None: ...


def compression_of(url_name: str) -> str:
    """The compression a client's NAR file name says (``abc.nar.xz`` → ``xz``)."""
    for suffix, comp in sorted(SUFFIX_COMPRESSION.items(), key=lambda kv: -len(kv[0])):
        if url_name.endswith(suffix):
            return comp
    raise BadUpload(f"NAR file name {url_name!r} does not end in .nar, .nar.xz, .nar.zst, ...")


class _Decoder(Protocol):
    def feed(self, data: bytes, out: Callable[[bytes], None]) -> None: ...
    def finish(self, out: Callable[[bytes], None]) -> None: ...


class _Plain:
    def feed(self, data: bytes, out: Callable[[bytes], None]) -> None:
        out(data)

    def finish(self, out: Callable[[bytes], None]) -> None:
        return None


class _Bounded:
    """xz/lzma/bzip2/lz4 with bounded output per call, so a small bomb cannot fill memory.

    (lz4.frame raises RuntimeError for bad input.)
    """

    def __init__(self, factory: Callable[[], Any], name: str) -> None:
        self._d = factory()
        self._name = name

    def feed(self, data: bytes, out: Callable[[bytes], None]) -> None:
        try:
            if self._d.eof:
                if data:
                    raise BadUpload(f"{self._name} stream has trailing data after its end")
                return
            chunk = self._d.decompress(data, _CHUNK)
            out(chunk)
            while not self._d.eof and not self._d.needs_input:
                out(self._d.decompress(b"", _CHUNK))
            if self._d.eof and self._d.unused_data:
                raise BadUpload(f"{self._name} stream has trailing data after its end")
        except (lzma.LZMAError, OSError, EOFError, ValueError, RuntimeError) as exc:
            raise BadUpload(f"the upload is not valid {self._name}: {exc}") from exc

    def finish(self, out: Callable[[bytes], None]) -> None:
        if not self._d.eof:
            raise BadUpload(f"the {self._name} stream of the upload is truncated")


def _nowhere(data: bytes) -> None:
    return None


class _Sink:
    """Where zstandard's stream_writer puts decompressed bytes.

    ``out`` is set only for the duration of one call: it is a bound method of the
    :class:`NarIngest` that owns this decoder, and a reference kept past the call would
    close the cycle ingest → decoder → stream_writer → sink → ingest. The stream_writer
    (a C object) is invisible to the cycle collector, so every zstd upload then leaked its
    whole ingest, decompression window included (~0.85 MiB per ``nix copy``).
    """

    def __init__(self) -> None:
        self.out: Callable[[bytes], None] = _nowhere

    def write(self, data: bytes) -> int:
        self.out(data)
        return len(data)


class _Zstd:
    def __init__(self) -> None:
        self._sink = _Sink()
        self._w = zstandard.ZstdDecompressor().stream_writer(
            cast("IO[bytes]", self._sink), write_size=_CHUNK, write_return_read=True
        )

    def feed(self, data: bytes, out: Callable[[bytes], None]) -> None:
        self._sink.out = out
        try:
            self._w.write(data)
        except zstandard.ZstdError as exc:
            raise BadUpload(f"the upload is not valid zstd: {exc}") from exc
        finally:
            self._sink.out = _nowhere

    def finish(self, out: Callable[[bytes], None]) -> None:
        self._sink.out = out
        try:
            self._w.flush()  # type: ignore[no-untyped-call]
        except zstandard.ZstdError as exc:
            raise BadUpload(f"the zstd stream of the upload is truncated: {exc}") from exc
        finally:
            self._sink.out = _nowhere


class _Gzip:
    """gzip (one member, as libarchive writes it) through zlib, bounded like :class:`_Bounded`."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)

    def feed(self, data: bytes, out: Callable[[bytes], None]) -> None:
        try:
            if self._d.eof:
                if data:
                    raise BadUpload("gzip stream has trailing data after its end")
                return
            out(self._d.decompress(data, _CHUNK))
            while not self._d.eof and self._d.unconsumed_tail:
                out(self._d.decompress(self._d.unconsumed_tail, _CHUNK))
            if self._d.eof and self._d.unused_data:
                raise BadUpload("gzip stream has trailing data after its end")
        except zlib.error as exc:
            raise BadUpload(f"the upload is not valid gzip: {exc}") from exc

    def finish(self, out: Callable[[bytes], None]) -> None:
        if not self._d.eof:
            raise BadUpload("the gzip stream of the upload is truncated")


class _Brotli:
    """brotli through the ``Brotli`` package, with its output limit per call."""

    def __init__(self) -> None:
        import brotli  # noqa: PLC0415 - only uploads in brotli pay for the import

        self._error = brotli.error
        self._d = brotli.Decompressor()

    def feed(self, data: bytes, out: Callable[[bytes], None]) -> None:
        try:
            if self._d.is_finished():
                if data:
                    raise BadUpload("brotli stream has trailing data after its end")
                return
            out(self._d.process(data, output_buffer_limit=_CHUNK))
            while not self._d.can_accept_more_data():
                out(self._d.process(b"", output_buffer_limit=_CHUNK))
        except self._error as exc:
            # brotli says "BrotliDecoderDecompressStream failed" also for bytes after the end
            raise BadUpload(f"the upload is not valid brotli: {exc}") from exc

    def finish(self, out: Callable[[bytes], None]) -> None:
        if not self._d.is_finished():
            raise BadUpload("the brotli stream of the upload is truncated")


class _Lzip:
    """lzip: a header, raw LZMA1 (lc=3 lp=0 pb=2, end marker) and a CRC32/size trailer.

    Decoded with the standard library's raw LZMA1 decoder, bounded per call; the trailer
    is checked (CRC32 and both sizes), and further members (plzip writes several) follow.
    See https://www.nongnu.org/lzip/manual/lzip_manual.html#File-format.
    """

    def __init__(self) -> None:
        self._head = b""
        self._d: Any = None
        self._crc = 0
        self._size = 0
        self._member = 0
        self._tail = b""
        self._members = 0

    def _start(self, header: bytes) -> None:
        if header[:4] != b"LZIP" or header[4] != 1:
            raise BadUpload("the upload is not valid lzip: bad member header")
        code = header[5]
        dict_size = 1 << (code & 0x1F)
        dict_size -= (dict_size // 16) * ((code >> 5) & 7)
        if not (1 << 12) <= dict_size <= (1 << 29):
            raise BadUpload("the upload is not valid lzip: dictionary size out of range")
        self._d = lzma.LZMADecompressor(
            lzma.FORMAT_RAW,
            filters=[{"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": 3, "lp": 0, "pb": 2}],
        )
        self._crc, self._size, self._member = 0, 0, 6

    def _emit(self, chunk: bytes, out: Callable[[bytes], None]) -> None:
        self._crc = zlib.crc32(chunk, self._crc)
        self._size += len(chunk)
        out(chunk)

    def feed(self, data: bytes, out: Callable[[bytes], None]) -> None:
        try:
            while data:
                if self._d is None:
                    need = 6 - len(self._head)
                    self._head += data[:need]
                    data = data[need:]
                    if len(self._head) < 6:
                        return
                    self._start(self._head)
                    self._head = b""
                if not self._d.eof:
                    self._member += len(data)
                    self._emit(self._d.decompress(data, _CHUNK), out)
                    while not self._d.eof and not self._d.needs_input:
                        self._emit(self._d.decompress(b"", _CHUNK), out)
                    if not self._d.eof:
                        return
                    data = self._d.unused_data
                    self._member -= len(data)
                need = 20 - len(self._tail)
                self._tail += data[:need]
                data = data[need:]
                if len(self._tail) == 20:
                    self._end_member()
        except lzma.LZMAError as exc:
            raise BadUpload(f"the upload is not valid lzip: {exc}") from exc

    def _end_member(self) -> None:
        crc, size, member = struct.unpack("<IQQ", self._tail)
        if crc != self._crc or size != self._size or member != self._member + 20:
            raise BadUpload("the upload is not valid lzip: its trailer does not match the data")
        self._d, self._tail = None, b""
        self._members += 1

    def finish(self, out: Callable[[bytes], None]) -> None:
        if self._d is not None or self._head or not self._members:
            raise BadUpload("the lzip stream of the upload is truncated")


class _Sniffed:
    """A ``.nar`` upload: plain NAR, or gzip/lzma/compress, which Nix names ``.nar`` too.

    The first bytes decide (the NAR magic, or a compressor's); until then they are held.
    """

    def __init__(self) -> None:
        self._head = b""
        self._inner: _Decoder | None = None

    def _choose(self) -> _Decoder:
        if _NAR_MAGIC.startswith(self._head[: len(_NAR_MAGIC)]):
            return _Plain()
        for magic, method in _MAGICS:
            if self._head.startswith(magic):
                return _decoder(method)
        return _Plain()  # not a NAR: the NAR check says what is wrong with it

    def feed(self, data: bytes, out: Callable[[bytes], None]) -> None:
        if self._inner is None:
            self._head += data
            if len(self._head) < _SNIFF:
                return
            self._inner = self._choose()
            data, self._head = self._head, b""
        self._inner.feed(data, out)

    def finish(self, out: Callable[[bytes], None]) -> None:
        if self._inner is None:
            self._inner = self._choose()
            if self._head:
                self._inner.feed(self._head, out)
        self._inner.finish(out)


def _decoder(compression: str) -> _Decoder:
    if compression == "none":
        return _Sniffed()
    if compression == "xz":
        return _Bounded(lzma.LZMADecompressor, "xz")
    if compression == "lzma":
        return _Bounded(lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE), "lzma")
    if compression == "bzip2":
        return _Bounded(bz2.BZ2Decompressor, "bzip2")
    if compression == "zstd":
        return _Zstd()
    if compression == "gzip":
        return _Gzip()
    if compression == "br":
        return _Brotli()
    if compression == "lz4":
        import lz4.frame  # noqa: PLC0415 - only lz4 uploads pay for the import

        return _Bounded(lz4.frame.LZ4FrameDecompressor, "lz4")
    if compression == "lzip":
        return _Lzip()
    if compression in REFUSED:
        others = ", ".join(c for c in COMPRESSIONS if c != "zstd")
        raise UnsupportedCompression(
            f"NARs compressed with {compression} are not accepted: {REFUSED[compression]}; "
            f"upload with ?compression=zstd (or {others})"
        )
    raise UnsupportedCompression(f"unknown NAR compression {compression!r}")


class _HashingFile:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._f.flush()


@contextlib.contextmanager
def _full_disk_refused() -> Iterator[None]:
    """A full disk or quota while an upload is written: :class:`StorageFull` (a 507 that
    says so), not an OSError answered as an internal error."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"no room to store the upload: {exc.strerror}") from exc
        raise


class NarIngest:
    """One NAR upload in progress: feed compressed bytes, get NarHash/NarSize and a blob.

    Not thread-safe, but may move between threads: the app calls :meth:`feed` and
    :meth:`finish` through ``trio.to_thread.run_sync``.
    """

    def __init__(
        self,
        tmp_dir: Path,
        compression: str,
        *,
        zstd_level: int,
        max_nar_size: int,
        checker: NarChecker | None,
    ) -> None:
        self._decoder = _decoder(compression)
        self._nar_sha = hashlib.sha256()
        self.nar_size = 0
        self._max = max_nar_size
        self._checker = checker
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".nar.zst", dir=tmp_dir)
        self.tmp_path = Path(name)
        self._raw = os.fdopen(fd, "wb")
        self._file = _HashingFile(self._raw)
        self._zw = zstandard.ZstdCompressor(level=zstd_level).stream_writer(
            cast("IO[bytes]", self._file), closefd=False
        )

    def _nar_bytes(self, data: bytes) -> None:
        if not data:
            return
        self.nar_size += len(data)
        if self.nar_size > self._max:
            raise TooLarge(f"the NAR is larger than this server accepts ({self._max} bytes)")
        self._nar_sha.update(data)
        if self._checker is not None:
            try:
                self._checker.feed(data)
            except FormatError as exc:
                raise BadUpload(f"the uploaded NAR is malformed: {exc}") from exc
        self._zw.write(data)

    def feed(self, data: bytes) -> None:
        with _full_disk_refused():
            self._decoder.feed(data, self._nar_bytes)

    def finish(self) -> tuple[Hash, int, str, int]:
        """End of the upload: NarHash, NarSize, FileHash (base32) and FileSize; fsynced."""
        with _full_disk_refused():
            return self._finish()

    def _finish(self) -> tuple[Hash, int, str, int]:
        self._decoder.finish(self._nar_bytes)
        if self._checker is not None:
            try:
                self._checker.close()
            except FormatError as exc:
                raise BadUpload(f"the uploaded NAR is malformed: {exc}") from exc
        if self.nar_size == 0:
            raise BadUpload("the uploaded NAR is empty")
        self._zw.flush(zstandard.FLUSH_FRAME)
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        nar_hash = Hash("sha256", self._nar_sha.digest())
        return nar_hash, self.nar_size, base32.encode(self._file.sha.digest()), self._file.size

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._raw.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp_path.unlink()


class Store:
    """Blobs and metadata of one server; open with :meth:`open`, close with :meth:`close`.

    Orgs and projects are :mod:`nixd.server.storage.db`'s; this class adds what slices hold.
    """

    def __init__(self, conn: Connection, blobs: Path, *, zstd_level: int = 3) -> None:
        self.conn = conn
        self._pg = None if isinstance(conn, sqlite3.Connection) else conn
        self.blobs = blobs
        self.tmp = blobs / "tmp"
        self.zstd_level = zstd_level
        self._holders: dict[str, list[tuple[Project, PathInfo]]] = {}
        self._trust: dict[str, dict[int, int]] = {}
        self._data_version = -1
        self._version = -1
        self._wal_seen = b""
        self._wal_index = _map_wal_index(conn) if isinstance(conn, sqlite3.Connection) else None
        self._accessed: dict[tuple[int, str], float] = {}
        self._nar_accessed: dict[tuple[int, str], float] = {}

    def sync(self) -> None:
        """Learn whether another process committed, once per request (PostgreSQL only).

        SQLite's :meth:`data_version` costs a memory read, so it is asked afresh each
        time; PostgreSQL's is asked here at the start of each request and answered from
        memory for the rest of it. It costs a non-blocking read of the listening
        connection's socket, and a round trip only when a commit was announced there
        (:meth:`nixd.server.storage.sql.PgConnection.data_version`), so a commit on any
        instance is seen by the first request after PostgreSQL delivered its notice.
        """
        if self._pg is not None:
            self._version = self._pg.data_version()

    def data_version(self) -> int:
        """Changes whenever another connection (e.g. an admin command) commits.

        Asked of SQLite (``PRAGMA data_version``: a read transaction, three system calls)
        only when the wal-index header in ``<db>-shm`` changed since the last time; reading
        it is a memory access. The header is read before the pragma, so a commit racing
        with the check changes the header again and is seen by the next call. On
        PostgreSQL: the version :meth:`sync` last read.
        """
        index = self._wal_index
        if index is not None:
            header = index[:_WAL_HEADER]
            if header == self._wal_seen:
                return self._version
            self._wal_seen = header
        elif self._pg is not None:
            if self._version < 0:
                self.sync()
            return self._version
        self._version = int(self.conn.execute("PRAGMA data_version").fetchone()[0])
        return self._version

    def _fresh(self) -> None:
        """Drop cached reads if another connection (process) committed since."""
        version = self.data_version()
        if version != self._data_version:
            self._data_version = version
            self._holders.clear()
            self._trust.clear()

    def _changed(self) -> None:
        """This connection wrote: cached reads may be stale."""
        self._holders.clear()
        self._trust.clear()

    @classmethod
    def open(cls, conn: Connection, blobs: Path, *, zstd_level: int = 3) -> Store:
        """Use ``conn`` (from :func:`nixd.server.storage.db.open_db`); create the store's tables."""
        try:
            blobs.mkdir(parents=True, exist_ok=True)
            (blobs / "tmp").mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{blobs}: cannot create the blob directory: {exc}") from exc
        ensure_schema(conn, component="store", migrations=STORE_MIGRATIONS)
        store = cls(conn, blobs, zstd_level=zstd_level)
        store._sweep_tmp()
        return store

    def _sweep_tmp(self) -> None:
        """Uploads cut off by a crash leave temp files; nothing refers to them.

        Only old ones go: another worker process may be receiving an upload right now.
        """
        cutoff = time.time() - 24 * 3600
        for p in self.tmp.glob("upload-*"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()

    # -- reads --------------------------------------------------------------------------

    def project(self, org: str, name: str) -> Project | None:
        return get_project(self.conn, org, name)

    _PATH_COLS = (
        "s.hash_part, s.name, s.refs, s.deriver, s.system, s.ca, "
        "n.nar_hash, n.nar_size, n.file_hash, n.file_size, s.uploader, s.created"
    )
    _PROJECT_COLS = "pr.id, o.name, pr.name, pr.public, pr.created, pr.priority"
    _PROJECT_JOIN = "JOIN projects pr ON pr.id = s.project_id JOIN orgs o ON o.id = pr.org_id"

    @staticmethod
    def _path(row: Sequence[Any]) -> PathInfo:
        hp, name, refs, deriver, system, ca, nh, ns, fh, fs, uploader, created = row
        return PathInfo(
            hash_part=hp,
            name=name,
            nar=Nar(nh, ns, fh, fs),
            references=tuple(refs.split()) if refs else (),
            deriver=deriver,
            system=system,
            ca=ca,
            uploader=uploader,
            created=created,
        )

    @staticmethod
    def _project(row: Sequence[Any]) -> Project:
        return project_from_row(row)

    def holders(self, hash_part: str) -> list[tuple[Project, PathInfo]]:
        """Every slice holding a store path, with the path as that slice has it.

        The hot path of every narinfo request: answered from memory while the database
        is unchanged (``PRAGMA data_version`` notices other processes' commits).
        """
        self._fresh()
        cached = self._holders.get(hash_part)
        if cached is not None:
            return cached
        rows = self.conn.execute(
            f"SELECT {self._PROJECT_COLS}, {self._PATH_COLS} FROM slice_records s "  # noqa: S608
            f"{self._PROJECT_JOIN} "
            "JOIN nars n ON n.nar_hash = s.nar_hash WHERE s.hash_part = ? "
            "ORDER BY o.name, pr.name",
            (hash_part,),
        ).fetchall()
        found = [(self._project(r[:6]), self._path(r[6:])) for r in rows]
        if len(self._holders) >= _HOLDERS_CACHE_MAX:
            self._holders.clear()
        self._holders[hash_part] = found
        return found

    def in_slice(self, project: Project, hash_part: str) -> PathInfo | None:
        row = self.conn.execute(
            f"SELECT {self._PATH_COLS} FROM slice_records s "  # noqa: S608
            "JOIN nars n ON n.nar_hash = s.nar_hash "
            "WHERE s.project_id = ? AND s.hash_part = ?",
            (project.id, hash_part),
        ).fetchone()
        return self._path(row) if row else None

    def nar_holders(self, file_hash: str) -> tuple[Nar | None, list[Project]]:
        """A stored NAR file by its FileHash, and the slices holding a path that uses it."""
        row = self.conn.execute(
            "SELECT nar_hash, nar_size, file_hash, file_size FROM nars WHERE file_hash = ?",
            (file_hash,),
        ).fetchone()
        if row is None:
            return None, []
        rows = self.conn.execute(
            f"SELECT DISTINCT {self._PROJECT_COLS} FROM slice_records s {self._PROJECT_JOIN} "  # noqa: S608
            "WHERE s.nar_hash = ? ORDER BY o.name, pr.name",
            (row[0],),
        ).fetchall()
        return Nar(*row), [self._project(r) for r in rows]

    def blob_path(self, file_hash: str) -> Path:
        return self.blobs / file_hash[:2] / f"{file_hash}.nar.zst"

    def nar_by_hash(self, nar_hash: str) -> Nar | None:
        row = self.conn.execute(
            "SELECT nar_hash, nar_size, file_hash, file_size FROM nars WHERE nar_hash = ?",
            (nar_hash,),
        ).fetchone()
        return Nar(*row) if row else None

    def alias(self, project: Project, url: str) -> Nar | None:
        """The NAR a client uploaded to this slice under ``url`` (e.g. ``nar/x.nar.xz``)."""
        row = self.conn.execute(
            "SELECT n.nar_hash, n.nar_size, n.file_hash, n.file_size FROM upload_aliases a "
            "JOIN nars n ON n.nar_hash = a.nar_hash WHERE a.project_id = ? AND a.url = ?",
            (project.id, url),
        ).fetchone()
        return Nar(*row) if row else None

    def log_holders(self, drv: str) -> list[tuple[Project, float, bytes]]:
        """Every slice's build log of ``drv``, with when the slice got it."""
        rows = self.conn.execute(
            f"SELECT {self._PROJECT_COLS}, s.created, s.data FROM logs s "  # noqa: S608
            f"{self._PROJECT_JOIN} WHERE s.drv = ? ORDER BY o.name, pr.name",
            (drv,),
        ).fetchall()
        return [(self._project(r[:6]), float(r[6]), zstandard.decompress(r[7])) for r in rows]

    def trust(self, org: str) -> dict[int, int]:
        """Project id -> position for the other orgs' slices ``org`` opted in to (cached)."""
        self._fresh()
        cached = self._trust.get(org)
        if cached is None:
            cached = {p.id: i for i, p in enumerate(org_trust(self.conn, org))}
            if len(self._trust) >= _HOLDERS_CACHE_MAX:
                self._trust.clear()
            self._trust[org] = cached
        return cached

    def check(self) -> list[str]:
        """The parts of the storage that do not answer now: [] when ready.

        The readiness hook behind ``/readyz`` (:mod:`nixd.server.http.ops`); every backend
        implements it for its parts. ``"database"``: a trivial query that must read the
        database (the schema page), so a database that cannot be read fails it.
        ``"blobs"``: the blob directory's ``tmp/`` takes a new file and lets it go (what
        every upload does first), so a missing, moved or read-only blob directory fails
        it. Causes (paths, errors) are logged here at WARNING and never returned: the
        answer goes to anyone. Called from a worker thread, so it may block (an SQLite
        connection serializes its own use).
        """
        failed = []
        try:
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            log.warning("readiness: the database does not answer: %s", exc)
            failed.append("database")
        probe = self.tmp / f"ready-{os.getpid()}-{threading.get_ident()}"
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            os.unlink(probe)
        except OSError as exc:
            log.warning("readiness: the blob directory %s does not answer: %s", self.blobs, exc)
            failed.append("blobs")
        return failed

    def stats(self) -> dict[str, int]:
        q = self.conn.execute
        return {
            "nars": int(q("SELECT count(*) FROM nars").fetchone()[0]),
            "paths": int(q("SELECT count(*) FROM slice_records").fetchone()[0]),
            "bytes": int(q("SELECT coalesce(sum(file_size), 0) FROM nars").fetchone()[0]),
        }

    # -- writes -------------------------------------------------------------------------

    def begin_nar(
        self, compression: str, *, max_nar_size: int, checker: NarChecker | None
    ) -> NarIngest:
        return NarIngest(
            self.tmp,
            compression,
            zstd_level=self.zstd_level,
            max_nar_size=max_nar_size,
            checker=checker,
        )

    def check_room(self, size: int) -> None:
        """StorageFull now if an upload of ``size`` bytes cannot fit in the free space.

        The stored file's size is known only once it is written, so the body's is the
        estimate (a recompressed compressed NAR is about its size, an uncompressed one at
        most). Refusing before the body is read matters to the real client: Nix 2.8 does
        not rewind its upload when it retries (its read offset stays where the failed
        attempt stopped), so a retry after a refusal mid-body sends the body's tail, seen
        as "not valid zstd"; a refusal before ``100 Continue`` leaves it unread, and every
        retry is refused the same clear way.
        """
        try:
            st = os.statvfs(self.tmp)
        except OSError:
            return  # the write will tell
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise StorageFull(
                f"no room to store the upload: it is {size} bytes and the server's "
                f"storage has {free} bytes free"
            )

    def commit_nar(
        self,
        ingest: NarIngest,
        finished: tuple[Hash, int, str, int],
        project: Project,
        url: str,
    ) -> Nar:
        """Keep a finished upload's blob once (dedup by NarHash) and alias ``url`` to it.

        ``finished`` is what :meth:`NarIngest.finish` returned (run that in a worker thread;
        this method touches the database and must run on the loop's thread).
        """
        nar_hash, nar_size, file_hash, file_size = finished
        key = str(nar_hash)
        existing = self.nar_by_hash(key)
        if existing is not None:
            ingest.discard()
        else:
            dest = self.blob_path(file_hash)
            dest.parent.mkdir(exist_ok=True)
            os.replace(ingest.tmp_path, dest)
            _fsync_dir(dest.parent)
        now = time.time()
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO nars(nar_hash, nar_size, file_hash, file_size, created) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (key, nar_size, file_hash, file_size, now),
            )
            self.conn.execute(
                "INSERT INTO upload_aliases(project_id, url, nar_hash, created) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (project_id, url) DO UPDATE SET "
                "nar_hash = excluded.nar_hash, created = excluded.created",
                (project.id, url, key, now),
            )
        return self.nar_by_hash(key) or Nar(key, nar_size, file_hash, file_size)

    def add_path(self, project: Project, info: PathInfo, *, replace: bool = False) -> bool:
        """Put a (verified) path record into a slice; its NAR must be stored already.

        The record is the slice's own. If the slice already holds the store path, an
        identical upload changes nothing (False); a different one raises
        :class:`PathConflict` unless ``replace`` (the caller may ``cache:admin`` there).
        Durable: the client is told the upload succeeded only after this commit.
        """
        self._changed()
        now = time.time()
        with transaction(self.conn, durable=True):
            existing = self.in_slice(project, info.hash_part)
            if existing is not None and existing.same_contents(info):
                return False
            if existing is not None and not replace:
                raise PathConflict(
                    f"{project.slice} already holds /nix/store/{existing.basename} with NarHash "
                    f"{existing.nar.nar_hash}; the upload (NarHash {info.nar.nar_hash}) would "
                    "replace it, which needs cache:admin on the slice"
                )
            self.conn.execute(
                "INSERT INTO slice_records (project_id, hash_part, name, nar_hash, "
                "refs, deriver, system, ca, uploader, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (project_id, hash_part) DO UPDATE SET name = excluded.name, "
                "nar_hash = excluded.nar_hash, refs = excluded.refs, "
                "deriver = excluded.deriver, system = excluded.system, ca = excluded.ca, "
                "uploader = excluded.uploader, created = excluded.created",
                (
                    project.id,
                    info.hash_part,
                    info.name,
                    info.nar.nar_hash,
                    " ".join(sorted(info.references)),
                    info.deriver,
                    info.system,
                    info.ca,
                    info.uploader or "unknown",
                    now,
                ),
            )
        return True

    def drop_alias(self, project: Project, url: str) -> None:
        """Forget a refused upload; its blob goes too unless something else uses it."""
        self._changed()
        gone: Nar | None = None
        with transaction(self.conn):
            row = self.conn.execute(
                "SELECT nar_hash FROM upload_aliases WHERE project_id = ? AND url = ?",
                (project.id, url),
            ).fetchone()
            self.conn.execute(
                "DELETE FROM upload_aliases WHERE project_id = ? AND url = ?", (project.id, url)
            )
            if row is None:
                return
            used = self.conn.execute(
                "SELECT 1 FROM slice_records WHERE nar_hash = ? UNION ALL "
                "SELECT 1 FROM upload_aliases WHERE nar_hash = ? LIMIT 1",
                (row[0], row[0]),
            ).fetchone()
            if not used:
                gone = self.nar_by_hash(row[0])
                self.conn.execute("DELETE FROM nars WHERE nar_hash = ?", (row[0],))
        if gone is not None:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(gone.file_hash).unlink()

    # -- access times (retention by days since last access, nixd.server.storage.gc) -------

    def note_access(self, project_id: int, hash_part: str) -> None:
        """A reader was served this slice's narinfo of ``hash_part``: remember when.

        In memory only (a dict store per request): :meth:`flush_accesses` writes them in
        one transaction every ``[gc] access_flush`` seconds and at shutdown, so a narinfo
        or NAR request never waits for the database's write lock or an fsync. At most
        :data:`_ACCESS_NOTES_MAX` distinct records wait for one flush (a few MiB); beyond
        that only those already noted are updated until the next flush.
        """
        notes = self._accessed
        key = (project_id, hash_part)
        if key in notes or len(notes) < _ACCESS_NOTES_MAX:
            notes[key] = time.time()

    def note_nar_access(self, project_id: int, nar_hash: str) -> None:
        """A NAR of this slice was served (Nix may keep a narinfo for days and ask no more)."""
        notes = self._nar_accessed
        key = (project_id, nar_hash)
        if key in notes or len(notes) < _ACCESS_NOTES_MAX:
            notes[key] = time.time()

    def flush_accesses(self) -> int:
        """Write the noted access times (never moving one back); how many were noted.

        On a database error the notes are kept for the next flush and the error raised.
        """
        paths, nars = self._accessed, self._nar_accessed
        if not paths and not nars:
            return 0
        self._accessed, self._nar_accessed = {}, {}
        try:
            with transaction(self.conn):
                for (pid, hash_part), when in paths.items():
                    self.conn.execute(
                        "UPDATE slice_records SET last_access = ? WHERE project_id = ? "
                        "AND hash_part = ? AND (last_access IS NULL OR last_access < ?)",
                        (when, pid, hash_part, when),
                    )
                for (pid, nar_hash), when in nars.items():
                    self.conn.execute(
                        "UPDATE slice_records SET last_access = ? WHERE project_id = ? "
                        "AND nar_hash = ? AND (last_access IS NULL OR last_access < ?)",
                        (when, pid, nar_hash, when),
                    )
        except BaseException:
            for old, new in ((paths, self._accessed), (nars, self._nar_accessed)):
                for key, when in new.items():
                    old[key] = max(when, old.get(key, when))
            self._accessed, self._nar_accessed = paths, nars
            raise
        return len(paths) + len(nars)

    def forget_cached(self) -> None:
        """Drop cached reads after this connection's own deletions (GC): they may be stale."""
        self._changed()

    def put_log(self, project: Project, drv: str, data: bytes) -> None:
        self._changed()
        with transaction(self.conn):
            self.conn.execute(
                # A slice's writer may correct its own log; the log keeps its place in views.
                "INSERT INTO logs(project_id, drv, data, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (project_id, drv) DO UPDATE SET data = excluded.data",
                (project.id, drv, zstandard.compress(data), time.time()),
            )

    # -- blobs as GC sees them --------------------------------------------------------
    # The only blob operations nixd.server.storage.gc uses, so that it works unchanged
    # on any blob backend that implements these three.

    def iter_blobs(self) -> Iterator[tuple[str, int, float]]:
        """Every stored blob: ``(file_hash, size, mtime)``; files that vanish are skipped."""
        try:
            shards = [e for e in os.scandir(self.blobs) if len(e.name) == 2 and e.is_dir()]
        except FileNotFoundError:
            return
        for shard in shards:  # not tmp/, nor anything an operator left there
            try:
                entries = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for entry in entries:
                file_hash, dot, suffix = entry.name.partition(".")
                if suffix != "nar.zst" or not dot or file_hash[:2] != shard.name:
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                yield file_hash, st.st_size, st.st_mtime

    def delete_blob(self, file_hash: str) -> None:
        """Remove a blob (gone already is fine). A download that opened it completes."""
        self.blob_path(file_hash).unlink(missing_ok=True)

    def blob_exists(self, file_hash: str) -> bool:
        return self.blob_path(file_hash).is_file()


def _map_wal_index(conn: sqlite3.Connection) -> mmap.mmap | None:
    """The start of the database's ``-shm`` file, mapped read-only; None if there is none.

    The connection keeps the file in use (it only goes away when the last connection to
    the database closes), so the mapping stays the one SQLite writes.
    """
    row = conn.execute("PRAGMA database_list").fetchone()
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if not row or not row[2] or mode != "wal":
        return None
    conn.execute("PRAGMA data_version").fetchone()  # a read: SQLite sets up the wal-index
    try:
        fd = os.open(f"{row[2]}-shm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size < _WAL_HEADER:
            return None
        return mmap.mmap(fd, _WAL_HEADER, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError:
        return None
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
