"""Flakes and their releases: the ``flakes`` schema component, its rows and its blobs.

Tables (component ``flakes``, SQLite and PostgreSQL alike)::

    flakes          (org, name) -> visibility, description, created
    flake_releases  (org, name, version) -> the version's sort key (its bytes in SemVer
                    precedence: :meth:`nixd.semver.Version.sort_text`), the canonical
                    tarball (blob key, sha256, size), the source tree as a store path
                    (NarHash, NarSize, store path, the zstd NAR's blob key, FileHash and
                    FileSize), lastModified, commit, ref, metadata (lock, outputs: JSON),
                    published_by, published_at

``org`` is the organization's name as the ``orgs`` table spells it; flake names are
unique in an organization ignoring case, like projects. Blobs go through the server's
:class:`~nixd.server.storage.blobs.BlobStore` (a directory or S3) under ``flakes/``
keys, which are not blob names of the cache (``<ab>/<filehash>.nar.zst``), so its
garbage collector never lists or removes them.

Rows are read on the event loop's connection (small indexed SELECTs); blobs are written
in a worker thread (:meth:`FlakeStore.store_blobs`), and a release's row is committed only
after both of its blobs are (so a row never names a missing blob). A publish that fails
between the two leaves at most unnamed content-addressed blobs, which the next publish
of the same content reuses.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

import zstandard

from nixd.errors import NixdError
from nixd.nix import base32
from nixd.nix.flaketarball import Source
from nixd.semver import Version, parse_version
from nixd.server.flakes.metadata import ReleaseMetadata
from nixd.server.storage.blobs import BlobRead, BlobStore, BlobWriter
from nixd.server.storage.db import Connection, Migration, ensure_schema, transaction

MIGRATIONS: list[Migration] = [
    # 1: flakes and their immutable releases.
    """
    CREATE TABLE flakes (
        org TEXT NOT NULL, name TEXT NOT NULL,
        visibility TEXT NOT NULL CHECK (visibility IN ('private', 'public')),
        description TEXT NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (org, name));
    CREATE UNIQUE INDEX flakes_name_nocase ON flakes(lower(org), lower(name));
    CREATE TABLE flake_releases (
        org TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL,
        sort_key TEXT NOT NULL,
        tarball_key TEXT NOT NULL, tarball_sha256 TEXT NOT NULL, tarball_size INTEGER NOT NULL,
        nar_hash TEXT NOT NULL, nar_size INTEGER NOT NULL, store_path TEXT NOT NULL,
        nar_key TEXT NOT NULL, nar_file_hash TEXT NOT NULL, nar_file_size INTEGER NOT NULL,
        last_modified INTEGER NOT NULL, commit_id TEXT NOT NULL, ref TEXT NOT NULL,
        metadata TEXT NOT NULL, published_by TEXT NOT NULL, published_at REAL NOT NULL,
        PRIMARY KEY (org, name, version),
        FOREIGN KEY (org, name) REFERENCES flakes(org, name) ON DELETE CASCADE);
    CREATE INDEX flake_releases_by_order ON flake_releases(org, name, sort_key);
    CREATE INDEX flake_releases_by_path ON flake_releases(store_path);
    CREATE INDEX flake_releases_by_nar_file ON flake_releases(nar_file_hash);
    """,
]
COMPONENT = "flakes"
ZSTD_LEVEL = 19
"""The source NAR's compression: written once per release, read by every fresh machine."""
_SOURCES_MAX = 100_000


class FlakeStoreError(NixdError):
    """A release could not be recorded as asked (the caller maps it to an answer)."""


class VersionTaken(FlakeStoreError):
    """The version is published already with another source tree (versions are immutable)."""


@dataclass(frozen=True, slots=True)
class Flake:
    org: str
    name: str
    visibility: str
    description: str
    created: float

    @property
    def resource(self) -> str:
        """The policy resource, ``org/name``."""
        return f"{self.org}/{self.name}"

    @property
    def public(self) -> bool:
        return self.visibility == "public"


@dataclass(frozen=True, slots=True)
class Release:
    org: str
    name: str
    version: str
    tarball_key: str
    tarball_sha256: str  # hex
    tarball_size: int
    nar_hash: str  # sha256:<nix base32>
    nar_size: int
    store_path: str  # basename <hash>-source
    nar_key: str
    nar_file_hash: str  # nix base32 of the zstd NAR's sha256
    nar_file_size: int
    last_modified: int
    commit: str
    ref: str
    metadata: dict[str, Any]
    published_by: str
    published_at: float

    @property
    def parsed(self) -> Version:
        return parse_version(self.version)

    @property
    def hash_part(self) -> str:
        return self.store_path[:32]


@dataclass(frozen=True, slots=True)
class StoredBlobs:
    """What :meth:`FlakeStore.store_blobs` wrote for one source."""

    tarball_key: str
    nar_key: str
    nar_file_hash: str
    nar_file_size: int


_FLAKE_COLS = "org, name, visibility, description, created"
_RELEASE_COLS = (
    "org, name, version, tarball_key, tarball_sha256, tarball_size, nar_hash, nar_size, "
    "store_path, nar_key, nar_file_hash, nar_file_size, last_modified, commit_id, ref, "
    "metadata, published_by, published_at"
)


def _flake(row: Sequence[Any]) -> Flake:
    return Flake(str(row[0]), str(row[1]), str(row[2]), str(row[3]), float(row[4]))


def _release(row: Sequence[Any]) -> Release:
    return Release(
        org=str(row[0]),
        name=str(row[1]),
        version=str(row[2]),
        tarball_key=str(row[3]),
        tarball_sha256=str(row[4]),
        tarball_size=int(row[5]),
        nar_hash=str(row[6]),
        nar_size=int(row[7]),
        store_path=str(row[8]),
        nar_key=str(row[9]),
        nar_file_hash=str(row[10]),
        nar_file_size=int(row[11]),
        last_modified=int(row[12]),
        commit=str(row[13]),
        ref=str(row[14]),
        metadata=json.loads(row[15]),
        published_by=str(row[16]),
        published_at=float(row[17]),
    )


def newest_first(releases: Iterable[Release]) -> list[Release]:
    """Releases by SemVer precedence, highest first."""
    return sorted(releases, key=lambda r: r.parsed, reverse=True)


class _Hashing:
    """A write-only file that hashes and counts what it passes to a blob writer."""

    def __init__(self, writer: BlobWriter) -> None:
        self._w = writer
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._w.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        return None


class FlakeStore:
    """Flake rows on the server's connection and blobs in its blob store.

    ``data_version`` is the store's (:meth:`nixd.server.storage.store.Store.data_version`):
    the set of source store paths, asked on every cache miss, is remembered until the
    database changes.
    """

    def __init__(self, conn: Connection, blobs: BlobStore, data_version: Any = None) -> None:
        self.conn = conn
        self.blobs = blobs
        self._data_version = data_version
        self._seen = -2
        self.writes = 0
        self._paths: frozenset[str] = frozenset()
        self._files: frozenset[str] = frozenset()

    @classmethod
    def open(cls, conn: Connection, blobs: BlobStore, data_version: Any = None) -> FlakeStore:
        ensure_schema(conn, component=COMPONENT, migrations=MIGRATIONS)
        return cls(conn, blobs, data_version)

    # -- reads ----------------------------------------------------------------------------

    def flake(self, org: str, name: str) -> Flake | None:
        """The flake ``org/name``, names compared ignoring case."""
        row = self.conn.execute(
            f"SELECT {_FLAKE_COLS} FROM flakes "  # noqa: S608 - fixed columns
            "WHERE lower(org) = lower(?) AND lower(name) = lower(?)",
            (org, name),
        ).fetchone()
        return _flake(row) if row else None

    def flakes(self, org: str | None = None) -> list[Flake]:
        if org is None:
            rows = self.conn.execute(
                f"SELECT {_FLAKE_COLS} FROM flakes ORDER BY org, name"  # noqa: S608
            ).fetchall()
        else:
            rows = self.conn.execute(
                f"SELECT {_FLAKE_COLS} FROM flakes WHERE lower(org) = lower(?) "  # noqa: S608
                "ORDER BY org, name",
                (org,),
            ).fetchall()
        return [_flake(r) for r in rows]

    def releases(self, flake: Flake) -> list[Release]:
        """Every release of ``flake``, newest (highest precedence) first."""
        rows = self.conn.execute(
            f"SELECT {_RELEASE_COLS} FROM flake_releases "  # noqa: S608
            "WHERE org = ? AND name = ? ORDER BY sort_key DESC",
            (flake.org, flake.name),
        ).fetchall()
        return [_release(r) for r in rows]

    def release(self, flake: Flake, version: str) -> Release | None:
        row = self.conn.execute(
            f"SELECT {_RELEASE_COLS} FROM flake_releases "  # noqa: S608
            "WHERE org = ? AND name = ? AND version = ?",
            (flake.org, flake.name, version),
        ).fetchone()
        return _release(row) if row else None

    def _fresh(self) -> None:
        version = self._data_version() if self._data_version is not None else -1
        if version == self._seen and version != -1:
            return
        self._seen = version
        rows = self.conn.execute(
            "SELECT DISTINCT store_path, nar_file_hash FROM flake_releases"
        ).fetchall()
        self._paths = frozenset(str(r[0])[:32] for r in rows)
        self._files = frozenset(str(r[1]) for r in rows)

    def forget_cached(self) -> None:
        """This connection wrote: the remembered source paths may be stale."""
        self._seen = -2
        self.writes += 1

    def is_source(self, hash_part: str) -> bool:
        """Whether some release's source tree has this store path hash (memory, usually)."""
        self._fresh()
        return hash_part in self._paths

    def is_source_file(self, file_hash: str) -> bool:
        """Whether some release's source NAR is stored as this FileHash."""
        self._fresh()
        return file_hash in self._files

    def sources(self, hash_part: str) -> list[tuple[Flake, Release]]:
        """Every release whose source tree is this store path, with its flake."""
        return self._sources("r.store_path LIKE ?", f"{hash_part}-%")

    def source_files(self, file_hash: str) -> list[tuple[Flake, Release]]:
        """Every release whose source NAR is stored as this FileHash, with its flake."""
        return self._sources("r.nar_file_hash = ?", file_hash)

    def _sources(self, where: str, value: str) -> list[tuple[Flake, Release]]:
        flake_cols = ", ".join(f"f.{c.strip()}" for c in _FLAKE_COLS.split(","))
        release_cols = ", ".join(f"r.{c.strip()}" for c in _RELEASE_COLS.split(","))
        rows = self.conn.execute(
            f"SELECT {flake_cols}, {release_cols} FROM flake_releases r "  # noqa: S608
            "JOIN flakes f ON f.org = r.org AND f.name = r.name "
            f"WHERE {where} ORDER BY r.org, r.name, r.published_at",
            (value,),
        ).fetchall()
        return [(_flake(r[:5]), _release(r[5:])) for r in rows]

    def counts(self) -> dict[str, int]:
        """How many flakes and releases are stored (for tests and status)."""
        q = self.conn.execute
        return {
            "flakes": int(q("SELECT count(*) FROM flakes").fetchone()[0]),
            "releases": int(q("SELECT count(*) FROM flake_releases").fetchone()[0]),
        }

    # -- blobs (blocking: call from a worker thread) ----------------------------------------

    def open_tarball(self, release: Release) -> BlobRead:
        return self.blobs.open_read(release.tarball_key, 0, release.tarball_size)

    def open_nar(self, release: Release, start: int, end: int) -> BlobRead:
        return self.blobs.open_read(release.nar_key, start, end)

    def store_blobs(self, source: Source, *, zstd_level: int = ZSTD_LEVEL) -> StoredBlobs:
        """Write the canonical tarball and the source NAR (zstd) as blobs, each once.

        Content-addressed keys: a blob already there is the same bytes and is kept.
        """
        tarball_key = f"flakes/{source.tarball_sha256}.tar.gz"
        if not self.blobs.exists(tarball_key):
            writer = self.blobs.writer()
            try:
                writer.write(source.tarball)
                writer.commit(tarball_key)
            except BaseException:
                writer.discard()
                raise
        writer = self.blobs.writer()
        try:
            hashing = _Hashing(writer)
            zw = zstandard.ZstdCompressor(level=zstd_level).stream_writer(
                cast("IO[bytes]", hashing), closefd=False
            )
            for chunk in source.nar_chunks():
                zw.write(chunk)
            zw.flush(zstandard.FLUSH_FRAME)
            file_hash = base32.encode(hashing.sha.digest())
            nar_key = f"flakes/{file_hash}.nar.zst"
            if self.blobs.exists(nar_key):
                writer.discard()
            else:
                writer.commit(nar_key)
        except BaseException:
            writer.discard()
            raise
        return StoredBlobs(tarball_key, nar_key, file_hash, hashing.size)

    # -- writes (on the connection's thread) -------------------------------------------------

    def record(
        self,
        org: str,
        name: str,
        version: Version,
        *,
        meta: ReleaseMetadata,
        source: Source,
        blobs: StoredBlobs,
        published_by: str,
        now: float | None = None,
    ) -> tuple[bool, Release]:
        """Commit a release whose blobs are stored: ``(True, it)``, or ``(False, the one
        already there)`` when the same version holds the same tree.

        :class:`VersionTaken` when the version holds another tree. The flake is created
        by its first release; each new release sets its visibility and description.
        Durable: the publisher is told only after this commit.
        """
        when = time.time() if now is None else now
        text = str(version)
        self.forget_cached()
        try:
            with transaction(self.conn, durable=True):
                flake = self.flake(org, name)
                if flake is not None:
                    existing = self.release(flake, text)
                    if existing is not None:
                        return self._same(existing, source)
                    self.conn.execute(
                        "UPDATE flakes SET visibility = ?, description = ? "
                        "WHERE org = ? AND name = ?",
                        (meta.visibility, meta.description, flake.org, flake.name),
                    )
                else:
                    self.conn.execute(
                        "INSERT INTO flakes (org, name, visibility, description, created) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (org, name, meta.visibility, meta.description, when),
                    )
                    flake = Flake(org, name, meta.visibility, meta.description, when)
                self.conn.execute(
                    f"INSERT INTO flake_releases ({_RELEASE_COLS}, sort_key) "  # noqa: S608
                    f"VALUES ({', '.join('?' * 19)})",
                    (
                        flake.org,
                        flake.name,
                        text,
                        blobs.tarball_key,
                        source.tarball_sha256,
                        source.tarball_size,
                        str(source.nar_hash),
                        source.nar_size,
                        source.store_path.basename,
                        blobs.nar_key,
                        blobs.nar_file_hash,
                        blobs.nar_file_size,
                        source.last_modified,
                        meta.commit,
                        meta.ref,
                        json.dumps({"lock": meta.lock, "outputs": meta.outputs}),
                        published_by,
                        when,
                        version.sort_text(),
                    ),
                )
        except sqlite3.IntegrityError:
            # Another publish of this flake got in between (both engines raise this class).
            flake = self.flake(org, name)
            existing = self.release(flake, text) if flake is not None else None
            if existing is None:
                raise
            return self._same(existing, source)
        finally:
            self.forget_cached()
        release = self.release(flake, text)
        assert release is not None
        return True, release

    @staticmethod
    def _same(existing: Release, source: Source) -> tuple[bool, Release]:
        if existing.nar_hash == str(source.nar_hash):
            return False, existing
        raise VersionTaken(
            f"version {existing.version} of {existing.org}/{existing.name} is already "
            "published with other content; versions are immutable"
        )
