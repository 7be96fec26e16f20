"""The server database: connection settings, migrations, orgs and projects."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from nixd.errors import ConfigError
from nixd.server.storage import db

BOTH_BACKENDS = True


def has_table(conn: db.Connection, name: str) -> bool:
    if isinstance(conn, sqlite3.Connection):
        query = "SELECT 1 FROM sqlite_master WHERE name = ?"
    else:
        query = "SELECT 1 FROM pg_tables WHERE tablename = ?"
    return conn.execute(query, (name,)).fetchone() is not None


def test_open_sets_wal_foreign_keys_and_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / "server.db"
    conn = db.open_db(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == db.BUSY_TIMEOUT_MS
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(db.MIGRATIONS)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"orgs", "projects", "credentials", "schema_versions"} <= tables
    finally:
        conn.close()


def test_migrations_are_idempotent_across_opens(database: str | Path) -> None:
    path = database
    db.open_db(path).close()
    conn = db.open_db(path)
    try:
        assert db.schema_version(conn, "core") == len(db.MIGRATIONS)
        assert db.ensure_schema(conn, component="core", migrations=db.MIGRATIONS) == len(
            db.MIGRATIONS
        )
        rows = conn.execute("SELECT component, version FROM schema_versions").fetchall()
        assert rows == [("core", len(db.MIGRATIONS))]
    finally:
        conn.close()


def test_component_migrations_apply_incrementally(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "server.db")
    calls: list[int] = []

    def backfill(c: sqlite3.Connection) -> None:
        calls.append(1)
        c.execute("INSERT INTO narinfos (hash, body) VALUES ('a', 'x; y')")

    first: list[db.Migration] = [
        "CREATE TABLE narinfos (hash TEXT PRIMARY KEY, body TEXT NOT NULL);",
    ]
    second = [
        *first,
        # A trigger body has semicolons of its own; the splitter must keep it whole.
        """
        CREATE TABLE log (hash TEXT);
        CREATE TRIGGER narinfo_log AFTER INSERT ON narinfos BEGIN
            INSERT INTO log (hash) VALUES (new.hash);
        END;
        """,
        backfill,
    ]
    assert db.ensure_schema(conn, component="store", migrations=first) == 1
    assert db.ensure_schema(conn, component="store", migrations=second) == 3
    assert db.ensure_schema(conn, component="store", migrations=second) == 3
    assert calls == [1]
    assert conn.execute("SELECT hash FROM log").fetchall() == [("a",)]
    assert db.schema_version(conn, "core") == len(db.MIGRATIONS)
    conn.close()


def test_failed_migration_rolls_back_everything(database: str | Path) -> None:
    conn = db.open_db(database)
    broken: list[db.Migration] = ["CREATE TABLE t1 (x INTEGER);", "CREATE TABLE t1 (x INTEGER);"]
    with pytest.raises(db.DatabaseError, match="store schema migration 2 failed"):
        db.ensure_schema(conn, component="store", migrations=broken)
    assert db.schema_version(conn, "store") == 0
    assert not has_table(conn, "t1")
    assert not conn.in_transaction
    conn.close()


def test_newer_database_is_refused(database: str | Path) -> None:
    conn = db.open_db(database)
    first = "CREATE TABLE a (x INTEGER);"
    db.ensure_schema(conn, component="store", migrations=[first, "SELECT 1;"])
    with pytest.raises(ConfigError, match="version 2, newer than the 1"):
        db.ensure_schema(conn, component="store", migrations=[first])
    conn.close()


def test_concurrent_first_opens_migrate_once(database: str | Path) -> None:
    path = database
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            db.open_db(path).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    conn = db.open_db(path)
    assert db.schema_version(conn, "core") == len(db.MIGRATIONS)
    conn.close()


def test_transaction_commits_rolls_back_and_nests(database: str | Path) -> None:
    conn = db.open_db(database)
    with db.transaction(conn, durable=True):
        conn.execute("INSERT INTO orgs (name, created) VALUES ('a', 0)")
        with pytest.raises(RuntimeError), db.transaction(conn):
            conn.execute("INSERT INTO orgs (name, created) VALUES ('b', 0)")
            raise RuntimeError("inner")
        assert conn.in_transaction
    assert [o.name for o in db.list_orgs(conn)] == ["a"]
    if isinstance(conn, sqlite3.Connection):
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # back to NORMAL
    assert not conn.in_transaction
    with pytest.raises(RuntimeError), db.transaction(conn):
        conn.execute("INSERT INTO orgs (name, created) VALUES ('c', 0)")
        raise RuntimeError("outer")
    assert [o.name for o in db.list_orgs(conn)] == ["a"]
    conn.close()


def test_orgs_and_projects(database: str | Path) -> None:
    conn = db.open_db(database)
    org = db.create_org(conn, "acme", now=10.0)
    assert db.get_org(conn, "acme") == org
    with pytest.raises(ConfigError, match="already exists"):
        db.create_org(conn, "acme")
    with pytest.raises(ConfigError, match="invalid organization name"):
        db.create_org(conn, "a/b")
    project = db.create_project(conn, "acme", "web", now=11.0)
    assert project.slice == "acme/web" and not project.public
    with pytest.raises(ConfigError, match="already exists"):
        db.create_project(conn, "acme", "web")
    with pytest.raises(ConfigError, match="does not exist"):
        db.create_project(conn, "nope", "web")
    db.create_org(conn, "other")
    db.create_project(conn, "other", "web", public=True)
    assert db.set_project_public(conn, "acme", "web", True).public
    assert [p.slice for p in db.list_projects(conn)] == ["acme/web", "other/web"]
    assert [p.slice for p in db.list_projects(conn, "other")] == ["other/web"]
    with pytest.raises(ConfigError, match="does not exist"):
        db.set_project_public(conn, "acme", "nope", True)
    # Foreign keys are enforced: a project of a missing org cannot be inserted by hand.
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO projects (org_id, name, created) VALUES (999, 'x', 0)")
    conn.close()
