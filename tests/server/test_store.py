"""The blob store: streaming ingest of every compression, dedup, aliases, refusals."""

from __future__ import annotations

import bz2
import gc
import gzip
import hashlib
import lzma
import os
import sqlite3
import struct
import subprocess
import time
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import lz4.frame
import pytest
import zstandard

from nixd.nix import base32
from nixd.nix.nar import NarParser, dump
from nixd.server.errors import BadUpload, StorageFull, TooLarge, UnsupportedCompression, answer_of
from nixd.server.storage.blobs import BlobStore
from nixd.server.storage.db import Connection, create_org, create_project, open_db
from nixd.server.storage.store import Nar, PathInfo, Store, compression_of
from tests.s3server import unfinished

BOTH_BACKENDS = True
BOTH_BLOBS = True  # a local directory and an S3 bucket (moto), see tests/server/conftest.py


@pytest.fixture
def conn(database: str | Path) -> Iterator[Connection]:
    c = open_db(database)
    create_org(c, "acme")
    yield c
    c.close()


@pytest.fixture
def store(conn: Connection, blob_store: BlobStore) -> Store:
    return Store.open(conn, blob_store)


def blob_bytes(store: Store, file_hash: str) -> bytes:
    size = store.blob_size(file_hash)
    read = store.open_blob(file_hash, 0, size)
    try:
        return b"".join(read)
    finally:
        read.close()


def nar_of(tmp_path: Path, content: bytes) -> bytes:
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    (tree / "file").write_bytes(content)
    (tree / "link").unlink(missing_ok=True)
    (tree / "link").symlink_to("file")
    return b"".join(dump(tree))


def lzip(data: bytes) -> bytes:
    """An lzip member made by hand: the header, raw LZMA1 with end marker, the trailer."""
    body = lzma.compress(
        data,
        format=lzma.FORMAT_RAW,
        filters=[{"id": lzma.FILTER_LZMA1, "dict_size": 1 << 20, "lc": 3, "lp": 0, "pb": 2}],
    )
    member = b"LZIP\x01\x14" + body  # 0x14: dictionary 2**20
    return member + struct.pack("<IQQ", zlib.crc32(data), len(data), len(member) + 20)


COMPRESS = {
    "none": lambda b: b,
    "xz": lzma.compress,
    "bzip2": bz2.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
    "gzip": gzip.compress,
    "br": brotli.compress,
    "lz4": lz4.frame.compress,
    "lzip": lzip,
    "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
}


@pytest.mark.parametrize("compression", sorted(COMPRESS))
def test_ingest_decompresses_hashes_and_stores_zstd(
    store: Store, conn: Connection, tmp_path: Path, compression: str
) -> None:
    project = create_project(conn, "acme", "app")
    nar = nar_of(tmp_path, b"hello world\n" * 50_000)
    data = COMPRESS[compression](nar)
    ingest = store.begin_nar(compression, max_nar_size=1 << 30, checker=NarParser())
    for i in range(0, len(data), 7_777):  # odd chunking: boundaries everywhere
        ingest.feed(data[i : i + 7_777])
    finished = ingest.finish()
    stored = store.commit_nar(ingest, finished, project, "nar/x.nar")
    assert stored.nar_hash == f"sha256:{base32.encode(hashlib.sha256(nar).digest())}"
    assert stored.nar_size == len(nar)
    blob = blob_bytes(store, stored.file_hash)
    assert base32.encode(hashlib.sha256(blob).digest()) == stored.file_hash
    assert len(blob) == stored.file_size
    assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) == nar
    assert store.alias(project, "nar/x.nar") == stored
    assert not unfinished(store.blobs)


def test_same_nar_is_stored_once(store: Store, conn: Connection, tmp_path: Path) -> None:
    a = create_project(conn, "acme", "a")
    b = create_project(conn, "acme", "b")
    nar = nar_of(tmp_path, b"same")
    results = []
    for project, comp in ((a, "xz"), (b, "none")):
        ingest = store.begin_nar(comp, max_nar_size=1 << 20, checker=NarParser())
        ingest.feed(COMPRESS[comp](nar))
        results.append(store.commit_nar(ingest, ingest.finish(), project, f"nar/{comp}"))
    assert results[0] == results[1]
    assert store.stats()["nars"] == 1
    assert len(list(store.iter_blobs())) == 1


def test_malformed_nar_is_refused_and_leaves_nothing(store: Store, tmp_path: Path) -> None:
    nar = nar_of(tmp_path, b"x")
    ingest = store.begin_nar("none", max_nar_size=1 << 20, checker=NarParser())
    with pytest.raises(BadUpload, match="malformed"):
        ingest.feed(nar[:-8] + b"garbage!")
        ingest.finish()
    ingest.discard()
    assert not unfinished(store.blobs)


def test_truncated_xz_is_refused(store: Store, tmp_path: Path) -> None:
    data = lzma.compress(nar_of(tmp_path, b"x" * 10_000))
    ingest = store.begin_nar("xz", max_nar_size=1 << 20, checker=None)
    ingest.feed(data[: len(data) // 2])
    with pytest.raises(BadUpload, match="truncated"):
        ingest.finish()
    ingest.discard()


def test_size_limit_applies_to_decompressed_bytes(store: Store) -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(5 << 20))
    ingest = store.begin_nar("zstd", max_nar_size=1 << 20, checker=None)
    with pytest.raises(TooLarge):
        ingest.feed(bomb)
    ingest.discard()


@pytest.mark.parametrize("compression", sorted(COMPRESS))
def test_bombs_are_cut_at_the_limit_in_every_compression(store: Store, compression: str) -> None:
    """64 MiB of zeros compress to little; decoding stops at the limit, never buffers it all."""
    bomb = COMPRESS[compression](bytes(64 << 20))
    ingest = store.begin_nar(compression, max_nar_size=1 << 20, checker=None)
    with pytest.raises(TooLarge):
        for i in range(0, len(bomb), 1 << 16):
            ingest.feed(bomb[i : i + (1 << 16)])
        ingest.finish()
    ingest.discard()


@pytest.mark.parametrize("compression", sorted(set(COMPRESS) - {"none"}))
def test_truncated_and_trailing_data_are_refused(
    store: Store, tmp_path: Path, compression: str
) -> None:
    data = COMPRESS[compression](nar_of(tmp_path, b"x" * 100_000 + os.urandom(2000)))
    ingest = store.begin_nar(compression, max_nar_size=1 << 30, checker=None)
    ingest.feed(data[:-7])
    with pytest.raises(BadUpload, match=r"truncated|not valid|empty"):  # zstd: no output
        ingest.finish()
    ingest.discard()
    ingest = store.begin_nar(compression, max_nar_size=1 << 30, checker=None)
    with pytest.raises(BadUpload, match=r"trailing|not valid|trailer"):
        ingest.feed(data + b"junk" * 10)
        ingest.finish()
    ingest.discard()


def test_a_bad_lzip_trailer_is_refused(store: Store, tmp_path: Path) -> None:
    data = bytearray(lzip(nar_of(tmp_path, b"payload")))
    data[-20] ^= 1  # the CRC32
    ingest = store.begin_nar("lzip", max_nar_size=1 << 30, checker=None)
    with pytest.raises(BadUpload, match="trailer"):
        ingest.feed(bytes(data))
        ingest.finish()
    ingest.discard()


@pytest.mark.parametrize(
    ("compress", "method"), [(gzip.compress, "gzip"), (lambda b: b"\x1f\x9d\x90" + b, "compress")]
)
def test_a_plain_nar_name_is_told_apart_by_its_first_bytes(
    store: Store, conn: Connection, tmp_path: Path, compress: Any, method: str
) -> None:
    """Nix 2.8 names gzip, lzma and compress uploads ``.nar``: the magic decides."""
    nar = nar_of(tmp_path, b"sniffed\n" * 1000)
    ingest_or_error: Any
    if method == "compress":
        ingest = store.begin_nar("none", max_nar_size=1 << 30, checker=NarParser())
        with pytest.raises(UnsupportedCompression, match=r"compress \(\.Z, LZW\)"):
            ingest.feed(compress(nar))
        ingest.discard()
        return
    ingest_or_error = store.begin_nar("none", max_nar_size=1 << 30, checker=NarParser())
    ingest_or_error.feed(compress(nar))
    finished = ingest_or_error.finish()
    project = create_project(conn, "acme", "sniff")
    stored = store.commit_nar(ingest_or_error, finished, project, "nar/x.nar")
    assert stored.nar_size == len(nar)


def test_refused_compressions_say_what_to_use(store: Store) -> None:
    for method in ("lzop", "lrzip", "grzip"):
        with pytest.raises(UnsupportedCompression, match=rf"{method}.*compression=zstd"):
            store.begin_nar(method, max_nar_size=1, checker=None)


def test_compression_of_names() -> None:
    assert compression_of("nar/abc.nar.xz") == "xz"
    assert compression_of("nar/abc.nar") == "none"
    assert compression_of("nar/abc.nar.zst") == "zstd"
    assert compression_of("nar/abc.nar.br") == "br"
    assert compression_of("nar/abc.nar.lz4") == "lz4"
    assert compression_of("nar/abc.nar.lzip") == "lzip"
    with pytest.raises(BadUpload):
        compression_of("nar/abc.tar")


def test_paths_slices_and_dropped_aliases(store: Store, conn: Connection, tmp_path: Path) -> None:
    app = create_project(conn, "acme", "app")
    other = create_project(conn, "acme", "other", public=True)
    ingest = store.begin_nar("none", max_nar_size=1 << 20, checker=None)
    ingest.feed(nar_of(tmp_path, b"a"))
    nar = store.commit_nar(ingest, ingest.finish(), app, "nar/a.nar")
    info = PathInfo("0" * 32, "a", nar, (), None, "x86_64-linux", None)
    store.add_path(app, info)
    store.add_path(other, info)
    holders = store.holders("0" * 32)
    assert [p.slice for p, _ in holders] == ["acme/app", "acme/other"]  # the view orders them
    assert all(i.same_contents(info) for _, i in holders)
    found_here = store.in_slice(app, "0" * 32)
    assert found_here is not None and found_here.same_contents(info)
    found, users = store.nar_holders(nar.file_hash)
    assert found == nar and {p.slice for p in users} == {"acme/app", "acme/other"}
    # A refused upload whose NAR nothing uses disappears with its blob.
    ingest = store.begin_nar("none", max_nar_size=1 << 20, checker=None)
    ingest.feed(nar_of(tmp_path, b"b"))
    lone = store.commit_nar(ingest, ingest.finish(), app, "nar/b.nar")
    store.drop_alias(app, "nar/b.nar")
    assert store.nar_holders(lone.file_hash) == (None, [])
    assert not store.blob_exists(lone.file_hash)
    # ... but not a NAR a stored path still uses.
    store.drop_alias(app, "nar/a.nar")
    assert store.blob_exists(nar.file_hash)


def test_a_nar_removed_while_its_twin_upload_commits_keeps_the_new_blob(
    store: Store, conn: Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second upload of a NarHash finds it stored and would drop its own bytes; if a GC
    (or a refused upload) removes the stored one before the alias is written, the second
    upload keeps its own blob instead: no ``nars`` row ever names a blob nobody stored."""
    app = create_project(conn, "acme", "app")
    nar_bytes = nar_of(tmp_path, b"twin")
    first = store.begin_nar("none", max_nar_size=1 << 20, checker=None)
    first.feed(nar_bytes)
    stored = store.commit_nar(first, first.finish(), app, "nar/first.nar")
    look = store.nar_by_hash
    armed = [True]

    def removed_right_after_the_look(nar_hash: str) -> Nar | None:
        found = look(nar_hash)
        if armed[0] and found is not None:  # what a GC between the look and the write does
            armed[0] = False
            gone = store.forget_alias(app, "nar/first.nar")
            assert gone == stored.file_hash
            store.delete_blob(gone)
        return found

    monkeypatch.setattr(store, "nar_by_hash", removed_right_after_the_look)
    second = store.begin_nar("none", max_nar_size=1 << 20, checker=None)
    second.feed(nar_bytes)
    again = store.commit_nar(second, second.finish(), app, "nar/second.nar")
    assert again.nar_hash == stored.nar_hash
    assert store.nar_by_hash(again.nar_hash) == again
    assert store.blob_exists(again.file_hash)  # the second upload's own bytes
    assert store.alias(app, "nar/second.nar") == again


def test_data_version_sees_every_commit_of_another_connection(
    store: Store, conn: Connection, database: str | Path
) -> None:
    if not isinstance(conn, sqlite3.Connection):
        # PostgreSQL: every commit is announced (NOTIFY) to each process's listening
        # connection; a request learns of it from that socket, without a query otherwise.
        statements: list[str] = []
        run = conn._run
        conn._run = lambda c, sql, params: statements.append(sql) or run(c, sql, params)  # type: ignore[method-assign]
        store.sync()
        first = store.data_version()
        before = len(statements)
        for _ in range(100):
            store.sync()
        assert store.data_version() == first and len(statements) == before
        other = open_db(database)
        try:
            seen = {first}
            for n in range(20):
                create_org(other, f"org{n}")
                deadline = time.monotonic() + 30  # a hang guard, not a timing assertion
                while store.data_version() in seen and time.monotonic() < deadline:
                    store.sync()  # what each request does first
                version = store.data_version()
                assert version not in seen  # every commit of another process is noticed
                seen.add(version)
        finally:
            other.close()
        return
    pragmas: list[str] = []
    conn.set_trace_callback(lambda sql: pragmas.append(sql) if "data_version" in sql else None)
    first = store.data_version()
    # Unchanged database: answered from the wal-index header, without asking SQLite.
    asked = len(pragmas)
    assert [store.data_version() for _ in range(100)] == [first] * 100
    assert len(pragmas) == asked
    other = open_db(conn.execute("PRAGMA database_list").fetchone()[2])
    try:
        seen = {first}
        for n in range(20):
            create_org(other, f"org{n}")
            version = store.data_version()
            assert version not in seen  # every commit, however quick, is noticed
            seen.add(version)
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL restarts from zero
    finally:
        other.close()


@pytest.mark.parametrize("compression", sorted(COMPRESS))
@pytest.mark.parametrize("outcome", ["finished", "refused"])
def test_an_ingest_is_freed_once_done(
    store: Store, tmp_path: Path, compression: str, outcome: str
) -> None:
    """Nothing keeps an upload alive once it is done or refused. The zstd decoder's
    stream_writer is a C object the cycle collector cannot see into, so a cycle through it
    (ingest -> decoder -> writer -> sink -> ingest) was never collected: every zstd
    upload leaked whole."""
    nar = nar_of(tmp_path, b"hello world\n" * 5_000)
    data = COMPRESS[compression](nar)
    ingest = store.begin_nar(compression, max_nar_size=1 << 30, checker=NarParser())
    if outcome == "finished":
        ingest.feed(data)
        ingest.finish()
    else:
        with pytest.raises(BadUpload):
            ingest.feed(data[: len(data) // 2] + b"\xff" * 64)
            ingest.finish()
    ingest.discard()
    gone = weakref.ref(ingest)
    del ingest
    gc.collect()
    assert gone() is None, "the ingest is still referenced after a collection"


def test_a_full_disk_refuses_the_upload_as_such_and_keeps_nothing(
    conn: Connection, tmp_path: Path
) -> None:
    """ENOSPC while an upload is written is a 507 that says so, not an internal error or
    a complaint about the bytes; the temp file goes, and once there is room the same
    upload is stored."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        store = Store.open(conn, small / "blobs")
        nar = nar_of(tmp_path, os.urandom(3 << 20))
        data = COMPRESS["zstd"](nar)
        ingest = store.begin_nar("zstd", max_nar_size=1 << 30, checker=NarParser())
        with pytest.raises(StorageFull) as caught:
            for i in range(0, len(data), 1 << 16):
                ingest.feed(data[i : i + (1 << 16)])
            ingest.finish()
        ingest.discard()
        assert answer_of(caught.value) == (507, "insufficient_storage")
        assert "no room" in str(caught.value)
        assert not unfinished(store.blobs)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    roomy = Store.open(conn, tmp_path / "blobs")
    ingest = roomy.begin_nar("zstd", max_nar_size=1 << 30, checker=NarParser())
    ingest.feed(data)
    stored = roomy.commit_nar(
        ingest, ingest.finish(), create_project(conn, "acme", "app"), "nar/x.nar.zst"
    )
    assert stored.nar_size == len(nar)
