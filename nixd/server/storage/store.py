"""Content storage of the cache server: NAR blobs and slice records.

Blobs live in a :class:`~nixd.server.storage.blobs.BlobStore` — a local directory
(:class:`~nixd.server.storage.blobs.LocalBlobs`, the default) or S3-compatible object
storage (:class:`~nixd.server.storage.s3.S3Blobs`); metadata in SQLite or PostgreSQL
(:mod:`.db`). The Store never touches a blob file itself.

The model:

- A **NAR** is stored once, whatever slice or client compression it came in (its bytes are
  checked against the NarHash a slice record names, so sharing them cannot change what any
  reader receives): decompressed
  and hashed as it streams in, then recompressed as zstd into the blob store's writer and
  committed under the key ``<ab>/<filehash32>.nar.zst`` (``filehash`` = sha256 of that
  file) only once it is whole and verified. The ``nars`` table maps its NarHash to that
  blob; a second upload of the same NarHash keeps the first blob.
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
worker thread in ~1 MiB batches, so one NAR never sits in memory whole. Every blob
operation may block (network I/O on S3): the methods that do one either run where
blocking is fine (``NarIngest.feed``/``finish`` in a worker thread, the CLI, tests) or have
an ``_async`` twin that makes the blob calls in a worker thread and the database calls on
the loop (:meth:`Store.commit_nar_async`, :meth:`Store.drop_alias_async`).

A full disk (or quota) is :class:`~nixd.server.errors.StorageFull`, a 507 that says so:
an upload whose length exceeds the free space is refused before its body is read
(:meth:`Store.check_room`), one that fills the disk while it is written is dropped with
its temp file; nothing partial is recorded. A blob store that does not answer (a bucket
unreachable, denied or missing) is :class:`~nixd.server.errors.StorageUnavailable`, a 503
that says so, with the same guarantee.

The garbage collector's view of blobs is :meth:`Store.iter_blobs`,
:meth:`Store.blob_exists` and :meth:`Store.delete_blob` (by FileHash).
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import lzma
import mmap
import os
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol, cast

import trio
import zstandard

from nixd.errors import FormatError, NixdError
from nixd.nix import base32
from nixd.nix.hashes import Hash
from nixd.server.errors import (
    BadUpload,
    StorageFull,
    StorageUnavailable,
    TooLarge,
    UnsupportedCompression,
)
from nixd.server.storage.blobs import (
    BlobRead,
    BlobStore,
    BlobWriter,
    LocalBlobs,
    blob_key,
    file_hash_of,
    full_disk_refused,
)
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
    """A write-only file that hashes and counts what passes into the blob writer."""

    def __init__(self, f: BlobWriter) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        return None  # the writer keeps what it was given; commit makes it durable


class StoredBlob(NamedTuple):
    """A blob as the GC sees it (:meth:`Store.iter_blobs`): FileHash, bytes, modified."""

    file_hash: str
    size: int
    mtime: float


class NarIngest:
    """One NAR upload in progress: feed compressed bytes, get NarHash/NarSize and a blob.

    Not thread-safe, but may move between threads: the app calls :meth:`feed`,
    :meth:`finish`, :meth:`keep` and :meth:`discard` through ``trio.to_thread.run_sync``
    (each may block on the blob store).
    """

    def __init__(
        self,
        writer: BlobWriter,
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
        self._raw = writer
        self._file = _HashingFile(writer)
        self.file_hash = ""
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
        with full_disk_refused():
            self._decoder.feed(data, self._nar_bytes)

    def finish(self) -> tuple[Hash, int, str, int]:
        """End of the upload: NarHash, NarSize, FileHash (base32) and FileSize.

        The blob is complete in its writer but not yet visible: :meth:`keep` commits it.
        """
        with full_disk_refused():
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
        nar_hash = Hash("sha256", self._nar_sha.digest())
        self.file_hash = base32.encode(self._file.sha.digest())
        return nar_hash, self.nar_size, self.file_hash, self._file.size

    def keep(self) -> None:
        """Commit the finished blob under its FileHash's key (durable, whole or not at all)."""
        if not self.file_hash:
            raise StoreError("a NAR upload is kept only once it is finished")
        self._raw.commit(blob_key(self.file_hash))

    def discard(self) -> None:
        """Drop the upload (idempotent; never raises)."""
        self._raw.discard()


class Store:
    """Blobs and metadata of one server; open with :meth:`open`, close with :meth:`close`.

    Orgs and projects are :mod:`nixd.server.storage.db`'s; this class adds what slices hold.
    """

    def __init__(self, conn: Connection, blobs: BlobStore, *, zstd_level: int = 3) -> None:
        self.conn = conn
        self._pg = None if isinstance(conn, sqlite3.Connection) else conn
        self.blobs = blobs
        self.zstd_level = zstd_level
        self._holders: dict[str, list[tuple[Project, PathInfo]]] = {}
        self._trust: dict[str, dict[int, int]] = {}
        self._data_version = -1
        self._version = -1
        self._wal_seen = b""
        self._wal_index = _map_wal_index(conn) if isinstance(conn, sqlite3.Connection) else None
        self.writes = 0
        """How many times this connection wrote records (its own commits do not move
        ``data_version``): with it, a cache of reads knows when to start over."""
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
        self.writes += 1
        self._holders.clear()
        self._trust.clear()

    @classmethod
    def open(
        cls, conn: Connection, blobs: Path | BlobStore, *, zstd_level: int = 3, sweep: bool = True
    ) -> Store:
        """Use ``conn`` (from :func:`nixd.server.storage.db.open_db`); create the store's tables.

        ``blobs`` is a blob store (:func:`~nixd.server.storage.blobs.open_blob_store`), or a
        directory for :class:`~nixd.server.storage.blobs.LocalBlobs`. With ``sweep``,
        leftovers of uploads cut off by a crash are removed (only old ones: another
        worker or instance may be receiving an upload right now); a blob store that does
        not answer then is logged and left for later, not fatal.
        """
        store_blobs = LocalBlobs.open(blobs) if isinstance(blobs, Path) else blobs
        ensure_schema(conn, component="store", migrations=STORE_MIGRATIONS)
        store = cls(conn, store_blobs, zstd_level=zstd_level)
        if sweep:
            try:
                store_blobs.sweep_partial()
            except NixdError as exc:
                log.warning("unfinished uploads were not swept: %s", exc)
        return store

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

    # -- blobs (each call may block: see the module docstring) ---------------------------

    def blob_local_path(self, file_hash: str) -> Path | None:
        """A file holding the blob that may be sent with sendfile, if the store has one."""
        return self.blobs.local_path(blob_key(file_hash))

    def blob_download_url(self, file_hash: str) -> str | None:
        """Where a client may fetch the blob itself (a presigned URL), or None."""
        return self.blobs.download_url(blob_key(file_hash))

    def open_blob(self, file_hash: str, start: int, end: int) -> BlobRead:
        """Bytes ``[start, end)`` of a blob (BlobMissing if it is not stored)."""
        return self.blobs.open_read(blob_key(file_hash), start, end)

    def blob_size(self, file_hash: str) -> int:
        """The stored size of a blob (BlobMissing if it is not stored)."""
        return self.blobs.size(blob_key(file_hash))

    def blob_exists(self, file_hash: str) -> bool:
        """Whether a blob is stored under this FileHash (a store that does not answer
        raises StorageUnavailable, never answers False)."""
        return self.blobs.exists(blob_key(file_hash))

    def delete_blob(self, file_hash: str) -> None:
        """Remove the blob of this FileHash (absent is fine). The caller makes sure no
        ``nars`` row names it any more (the GC, :meth:`drop_alias`)."""
        self.blobs.delete(blob_key(file_hash))

    def iter_blobs(self) -> Iterator[StoredBlob]:
        """Every committed blob as (file_hash, size, mtime); never a partial upload, never
        anything in the store that is not named like a blob."""
        for entry in self.blobs.iter_blobs():
            file_hash = file_hash_of(entry.key)
            if file_hash is not None:
                yield StoredBlob(file_hash, entry.size, entry.mtime)

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
        ``"blobs"``: the blob store's own check (a directory: its ``tmp/`` takes a new file
        and lets it go, what every upload does first, so a missing, moved or read-only
        directory fails it; S3: the bucket answers a HEAD with these credentials).
        Causes (paths, errors) are logged here at WARNING and never returned: the
        answer goes to anyone. Called from a worker thread, so it may block (an SQLite
        connection serializes its own use).
        """
        failed = []
        try:
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            log.warning("readiness: the database does not answer: %s", exc)
            failed.append("database")
        try:
            reason = self.blobs.check()
        except Exception as exc:  # readiness must answer, whatever the cause
            reason = f"the blob store {self.blobs.describe()} failed its check: {exc}"
        if reason is not None:
            log.warning("readiness: %s", reason)
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
        _decoder(compression)  # an unsupported one is refused before a writer exists
        return NarIngest(
            self.blobs.writer(),
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

        Object storage has no free space to ask; for the same reason it is asked whether
        it answers at all (:meth:`BlobStore.check`, a HEAD of the bucket): a bucket that
        does not is :class:`~nixd.server.errors.StorageUnavailable` before the body, not
        after it. ``size`` 0 (no Content-Length) checks only that. Blocking: on the
        loop, :meth:`check_room_async`.
        """
        if self.blobs.remote:
            reason = self.blobs.check()
            if reason is not None:
                raise StorageUnavailable(reason)
        free = self.blobs.free_bytes()
        if free is None:
            return  # the write will tell
        if size > free:
            raise StorageFull(
                f"no room to store the upload: it is {size} bytes and the server's "
                f"storage has {free} bytes free"
            )

    async def check_room_async(self, size: int) -> None:
        """:meth:`check_room` in a worker thread (a bucket's HEAD must not block the loop)."""
        await trio.to_thread.run_sync(self.check_room, size)

    def commit_nar(
        self,
        ingest: NarIngest,
        finished: tuple[Hash, int, str, int],
        project: Project,
        url: str,
    ) -> Nar:
        """Keep a finished upload's blob once (dedup by NarHash) and alias ``url`` to it.

        ``finished`` is what :meth:`NarIngest.finish` returned. Blocking: the blob is
        committed here; on an event loop use :meth:`commit_nar_async`.
        """
        if self.nar_by_hash(str(finished[0])) is not None:
            nar = self.record_nar(finished, project, url, existing_only=True)
            if nar is not None:  # stored already: this upload's bytes are not needed
                ingest.discard()
                return nar
        try:
            ingest.keep()
        except BaseException:
            ingest.discard()
            raise
        nar = self.record_nar(finished, project, url)
        assert nar is not None
        if nar.file_hash != finished[2]:
            self.delete_blob(finished[2])  # another upload of this NarHash got in first
        return nar

    async def commit_nar_async(
        self,
        ingest: NarIngest,
        finished: tuple[Hash, int, str, int],
        project: Project,
        url: str,
    ) -> Nar:
        """:meth:`commit_nar` on the event loop: blob calls in a worker thread, database
        calls here (the loop's connection)."""
        if self.nar_by_hash(str(finished[0])) is not None:
            nar = self.record_nar(finished, project, url, existing_only=True)
            if nar is not None:
                await trio.to_thread.run_sync(ingest.discard)
                return nar
        try:
            await trio.to_thread.run_sync(ingest.keep)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(ingest.discard)
            raise
        nar = self.record_nar(finished, project, url)
        assert nar is not None
        if nar.file_hash != finished[2]:
            await trio.to_thread.run_sync(self.delete_blob, finished[2])
        return nar

    def record_nar(
        self,
        finished: tuple[Hash, int, str, int],
        project: Project,
        url: str,
        *,
        existing_only: bool = False,
    ) -> Nar | None:
        """Record a committed blob (once per NarHash) and alias ``url`` to it; the NAR now
        recorded for that NarHash (an earlier upload's, if one got in first).

        ``existing_only``: this upload's blob is not kept, so alias ``url`` only to a NAR
        still recorded under the write lock, and answer None (nothing written) if it went
        meanwhile (a GC or a refused upload removed it after the caller looked): the caller
        then keeps its own blob. Otherwise a ``nars`` row could name a blob nobody stored.
        """
        nar_hash, nar_size, file_hash, file_size = finished
        key = str(nar_hash)
        now = time.time()
        with transaction(self.conn):
            if existing_only:
                if self.nar_by_hash(key) is None:
                    return None
            else:
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
        """Forget a refused upload; its blob goes too unless something else uses it.

        Blocking (the blob is deleted here); on an event loop use :meth:`drop_alias_async`.
        """
        gone = self.forget_alias(project, url)
        if gone is not None:
            self.delete_blob(gone)

    async def drop_alias_async(self, project: Project, url: str) -> None:
        """:meth:`drop_alias` on the event loop: the blob is deleted in a worker thread."""
        gone = self.forget_alias(project, url)
        if gone is not None:
            await trio.to_thread.run_sync(self.delete_blob, gone)

    def forget_alias(self, project: Project, url: str) -> str | None:
        """The database half of :meth:`drop_alias`: the FileHash of a blob that nothing
        uses any more (its ``nars`` row is gone), for the caller to delete."""
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
                return None
            used = self.conn.execute(
                "SELECT 1 FROM slice_records WHERE nar_hash = ? UNION ALL "
                "SELECT 1 FROM upload_aliases WHERE nar_hash = ? LIMIT 1",
                (row[0], row[0]),
            ).fetchone()
            if not used:
                gone = self.nar_by_hash(row[0])
                self.conn.execute("DELETE FROM nars WHERE nar_hash = ?", (row[0],))
        return gone.file_hash if gone is not None else None

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
