"""Per-slice path records: each slice serves what its own writer uploaded, nothing else.

Also the upgrade path: a version-1 database (one metadata row per path and NarHash,
shared by every slice) is migrated in place when the server opens it.
"""

from __future__ import annotations

import lzma
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixd.errors import ConfigError
from nixd.nix.nar import dump
from nixd.server.errors import BadUpload
from nixd.server.storage import db
from nixd.server.storage.blobs import BlobStore
from nixd.server.storage.db import (
    create_org,
    create_project,
    ensure_schema,
    open_db,
    set_org_trust,
    set_project_priority,
)
from nixd.server.storage.store import STORE_MIGRATIONS, PathConflict, PathInfo, Store

BOTH_BLOBS = True  # a local directory and an S3 bucket (tests/server/conftest.py)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = open_db(tmp_path / "server.db")
    create_org(c, "acme")
    yield c
    c.close()


@pytest.fixture
def store(conn: sqlite3.Connection, blob_store: BlobStore) -> Store:
    return Store.open(conn, blob_store)


def _nar(store: Store, tmp_path: Path, project: db.Project, content: bytes, url: str) -> PathInfo:
    tree = tmp_path / f"t-{len(content)}-{content[:4].hex()}"
    tree.mkdir()
    (tree / "f").write_bytes(content)
    ingest = store.begin_nar("none", max_nar_size=1 << 20, checker=None)
    ingest.feed(b"".join(dump(tree)))
    nar = store.commit_nar(ingest, ingest.finish(), project, url)
    return PathInfo("1" * 32, "p", nar, (), None, "x86_64-linux", None, uploader="token:acme/a")


def test_each_slice_keeps_its_own_metadata(
    store: Store, conn: sqlite3.Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    lib = create_project(conn, "acme", "lib")
    info = _nar(store, tmp_path, app, b"same bytes", "nar/x.nar")
    assert store.add_path(app, info)
    other_meta = PathInfo(
        info.hash_part,
        info.name,
        info.nar,
        ("2" * 32 + "-evil",),
        "3" * 32 + "-evil.drv",
        "aarch64-linux",
        None,
        uploader="token:acme/b",
    )
    assert store.add_path(lib, other_meta)
    mine = store.in_slice(app, info.hash_part)
    theirs = store.in_slice(lib, info.hash_part)
    assert mine is not None and mine.same_contents(info) and mine.uploader == "token:acme/a"
    assert theirs is not None and theirs.same_contents(other_meta)
    assert mine.references == () and mine.deriver is None


def test_conflicting_upload_into_the_same_slice_is_refused(
    store: Store, conn: sqlite3.Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    first = _nar(store, tmp_path, app, b"first", "nar/a.nar")
    second = _nar(store, tmp_path, app, b"second!", "nar/b.nar")
    assert store.add_path(app, first)
    assert not store.add_path(app, first)  # identical again: nothing changes
    with pytest.raises(PathConflict, match="needs cache:admin"):
        store.add_path(app, second)
    kept = store.in_slice(app, first.hash_part)
    assert kept is not None and kept.same_contents(first)
    assert store.add_path(app, second, replace=True)
    replaced = store.in_slice(app, first.hash_part)
    assert replaced is not None and replaced.same_contents(second)


def test_xz_with_trailing_data_is_refused(
    store: Store, conn: sqlite3.Connection, tmp_path: Path
) -> None:
    tree = tmp_path / "x"
    tree.mkdir()
    (tree / "f").write_bytes(b"x" * 1000)
    data = lzma.compress(b"".join(dump(tree))) + b"trailing garbage"
    ingest = store.begin_nar("xz", max_nar_size=1 << 20, checker=None)
    with pytest.raises(BadUpload, match="trailing data"):
        ingest.feed(data)
        ingest.finish()
    ingest.discard()


def test_names_differing_only_by_case_are_refused(conn: sqlite3.Connection) -> None:
    with pytest.raises(ConfigError, match="only by case"):
        create_org(conn, "ACME")
    create_project(conn, "acme", "App")
    with pytest.raises(ConfigError, match="already exists"):
        create_project(conn, "acme", "app")
    with pytest.raises(ConfigError, match="reserved"):
        create_project(conn, "acme", "nar")


def test_priority_and_trust_lists(conn: sqlite3.Connection) -> None:
    create_org(conn, "nixos")
    create_project(conn, "nixos", "pkgs", public=True)
    create_project(conn, "acme", "app")
    assert set_project_priority(conn, "acme", "app", 5).priority == 5
    assert [p.slice for p in set_org_trust(conn, "acme", ["nixos/pkgs"])] == ["nixos/pkgs"]
    with pytest.raises(ConfigError, match="own"):
        set_org_trust(conn, "acme", ["acme/app"])
    with pytest.raises(ConfigError, match="does not exist"):
        set_org_trust(conn, "acme", ["nixos/nope"])


def test_version_1_database_is_migrated(tmp_path: Path) -> None:
    """What an upgrade does: every slice keeps the record it served before, marked migrated."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    ensure_schema(old, component="core", migrations=db.MIGRATIONS[:1])
    ensure_schema(old, component="store", migrations=STORE_MIGRATIONS[:1])
    old.executescript(
        """
        INSERT INTO orgs (id, name, created) VALUES (1, 'acme', 0);
        INSERT INTO projects (id, org_id, name, public, created) VALUES (1, 1, 'app', 0, 0);
        INSERT INTO projects (id, org_id, name, public, created) VALUES (2, 1, 'lib', 1, 0);
        INSERT INTO nars VALUES ('sha256:n', 5, 'f', 4, 0);
        INSERT INTO paths VALUES ('h', 'sha256:n', 'p', 'r1 r2', 'd.drv', 'x86_64-linux', NULL, 0);
        INSERT INTO slice_paths VALUES (1, 'h', 'sha256:n', 1);
        INSERT INTO slice_paths VALUES (2, 'h', 'sha256:n', 2);
        """
    )
    old.close()
    conn = open_db(path)
    store = Store.open(conn, tmp_path / "blobs")
    holders = store.holders("h")
    assert [(p.slice, p.priority) for p, _ in holders] == [("acme/app", 100), ("acme/lib", 100)]
    for _, info in holders:
        assert info.references == ("r1", "r2") and info.deriver == "d.drv"
        assert info.uploader == "migrated:v1"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "paths" not in tables and "slice_paths" not in tables
    conn.close()


def test_migration_stops_on_names_differing_only_by_case(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    ensure_schema(old, component="core", migrations=db.MIGRATIONS[:1])
    old.executescript(
        "INSERT INTO orgs (name, created) VALUES ('acme', 0);"
        "INSERT INTO orgs (name, created) VALUES ('ACME', 0);"
    )
    old.close()
    with pytest.raises(db.DatabaseError, match="differ only by case"):
        open_db(path)
