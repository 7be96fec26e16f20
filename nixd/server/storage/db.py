"""The cache server's metadata: connection setup, schema migrations, orgs and projects.

One database holds all server metadata — by default an SQLite file in the state
directory, or a PostgreSQL database (``[storage] database = "postgresql://..."``, through
:class:`nixd.server.storage.sql.PgConnection`, which runs the same SQL): organizations,
their projects (the *slices* paths are pushed to), API credentials, and the store's
narinfo/NAR tables. NAR bytes live in files next to it, never in SQLite.

Connections
    :func:`open_db` returns a connection in autocommit mode (``isolation_level=None``):
    nothing is in a transaction unless a caller opens one with :func:`transaction`, which
    issues ``BEGIN IMMEDIATE`` so a writer takes the write lock up front instead of failing
    half-way with ``SQLITE_BUSY`` on upgrade. The journal is WAL (readers never block the
    writer and vice versa), foreign keys are enforced, and a busy timeout makes concurrent
    writers (the server and a ``nixd-server token`` command) wait rather than fail.

    ``synchronous=NORMAL`` is safe in WAL mode: the database can never be corrupted by a
    crash or power loss, and a committed transaction survives an application crash (the
    WAL is in the OS page cache). Only a power loss or kernel crash may roll back the last
    few commits. Where that matters — an acknowledged credential revocation must not come
    back after a power cut — use ``transaction(conn, durable=True)``, which fsyncs the WAL
    at that commit (``synchronous=FULL`` for one transaction).

    Connections are opened with ``check_same_thread=False`` so the async server may hand
    one to ``trio.to_thread.run_sync`` workers; a connection must still be used by one
    thread at a time (serialize with a lock, or open one connection per worker thread).

Migrations
    Each *component* owns an ordered list of migrations; a migration is an SQL script or a
    callable taking the connection. ``schema_versions(component, version)`` records how
    many of a component's migrations have been applied, and :func:`ensure_schema` applies
    the missing ones in one ``BEGIN IMMEDIATE`` transaction (all or nothing; two processes
    starting at once apply them exactly once). Migrations are append-only: never edit or
    reorder a released one, add a new one. This module owns the ``"core"`` component
    (:data:`MIGRATIONS`, applied by :func:`open_db`); the store registers its own::

        ensure_schema(conn, component="store", migrations=STORE_MIGRATIONS)

    ``PRAGMA user_version`` mirrors the core version so ``sqlite3 server.db 'PRAGMA
    user_version'`` tells an operator what they have.

    On PostgreSQL the same migrations run, with their column types mapped
    (:func:`nixd.server.storage.sql.postgres_ddl`); a migration that cannot be written
    for both engines is a :class:`Dialects` pair. The version check and the migrations
    run in one transaction holding the write lock (an advisory lock), so concurrent
    ``nixd-server migrate``/``serve`` processes apply each migration exactly once.

SQL
    Statements are written for both engines: ``?`` placeholders, ``INSERT ... ON
    CONFLICT``, ``RETURNING``, no ``rowid``/``PRAGMA`` outside SQLite-only code. Constraint
    violations are caught as :data:`nixd.server.storage.sql.IntegrityError`.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from nixd.errors import ConfigError, NixdError
from nixd.server.storage.sql import PgConnection, bootstrap, is_postgres, postgres_ddl

log = logging.getLogger(__name__)

Connection: TypeAlias = sqlite3.Connection | PgConnection
"""An open metadata database: SQLite's connection or the PostgreSQL pool."""


@dataclass(frozen=True, slots=True)
class Dialects:
    """A migration written separately for each engine (when one text cannot serve both)."""

    sqlite: str | Callable[[Connection], None]
    postgresql: str | Callable[[Connection], None]


Migration = str | Callable[[Connection], None] | Dialects
"""An SQL script (several statements allowed), a function run inside the transaction, or
one of each per engine."""


def is_sqlite(conn: Connection) -> bool:
    return isinstance(conn, sqlite3.Connection)


def ddl(conn: Connection, script: str) -> str:
    """``script``'s column types for ``conn``'s engine (unchanged on SQLite)."""
    return script if isinstance(conn, sqlite3.Connection) else postgres_ddl(script)


BUSY_TIMEOUT_MS = 5_000
_savepoints = itertools.count()


def _migrate_tenancy(conn: Connection) -> None:
    """Core migration 2: case-insensitive uniqueness, priorities, org trust lists.

    A database that already holds two orgs (or two projects of one org) whose names differ
    only by case cannot get the unique index: the migration stops and names them, so the
    operator can rename one (``sqlite3 server.db "UPDATE orgs SET name = ..."``) and start
    the server again; nothing is changed until then.
    """
    for table, group in (("orgs", "lower(name)"), ("projects", "org_id, lower(name)")):
        clash = conn.execute(
            f"SELECT min(name) || ', ' || max(name) FROM {table} "  # noqa: S608 - fixed names
            f"GROUP BY {group} HAVING count(*) > 1"
        ).fetchone()
        if clash:
            raise DatabaseError(
                f"{table} {clash[0]} differ only by case; rename all but one, then start again"
            )
    conn.execute("CREATE UNIQUE INDEX orgs_name_nocase ON orgs(lower(name))")
    conn.execute("CREATE UNIQUE INDEX projects_name_nocase ON projects(org_id, lower(name))")
    conn.execute(
        ddl(
            conn,
            f"ALTER TABLE projects ADD COLUMN priority INTEGER NOT NULL DEFAULT {DEFAULT_PRIORITY}",
        )
    )
    conn.execute(
        ddl(
            conn,
            """CREATE TABLE org_trust (
            org_id   INTEGER NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
            PRIMARY KEY (org_id, project_id))""",
        )
    )


MIGRATIONS: list[Migration] = [
    # 1: organizations, their projects (slices), API credentials.
    """
    CREATE TABLE orgs (
        id      INTEGER PRIMARY KEY,
        name    TEXT NOT NULL UNIQUE,
        created REAL NOT NULL
    );
    CREATE TABLE projects (
        id      INTEGER PRIMARY KEY,
        org_id  INTEGER NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
        name    TEXT NOT NULL,
        public  INTEGER NOT NULL DEFAULT 0 CHECK (public IN (0, 1)),
        created REAL NOT NULL,
        UNIQUE (org_id, name)
    );
    CREATE TABLE credentials (
        id          TEXT PRIMARY KEY,
        org_id      INTEGER NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
        name        TEXT NOT NULL,
        kind        TEXT NOT NULL DEFAULT 'token',
        secret_hash BLOB NOT NULL,
        attributes  TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(attributes)),
        created     REAL NOT NULL,
        expires     REAL,
        revoked_at  REAL,
        last_used   REAL
    );
    -- A name is reusable once its credential is revoked (rotation: revoke, create anew).
    CREATE UNIQUE INDEX credentials_live_name
        ON credentials(org_id, name) WHERE revoked_at IS NULL;
    CREATE INDEX credentials_org ON credentials(org_id);
    """,
    # 2: names unique regardless of case; slice priorities; what each org trusts.
    _migrate_tenancy,
    # 3: when each keyring was last changed (see note_key_change).
    """
    CREATE TABLE key_changes (keyring TEXT PRIMARY KEY, changed REAL NOT NULL);
    """,
]


def note_key_change(conn: Connection, keyring: str) -> None:
    """Record that ``keyring``'s file was replaced (``nixd-server key rotate``).

    Why in the database: every server process already notices any commit by another
    process on its next request at the cost of a memory read (``PRAGMA data_version``
    through the mapped wal-index), so this commit makes each of them re-read the key
    files at once, and they need not ``stat`` them on every request.
    """
    with transaction(conn, durable=True):
        conn.execute(
            "INSERT INTO key_changes (keyring, changed) VALUES (?, ?) "
            "ON CONFLICT (keyring) DO UPDATE SET changed = excluded.changed",
            (keyring, time.time()),
        )


_SCHEMA_VERSIONS = """
CREATE TABLE IF NOT EXISTS schema_versions (
    component TEXT PRIMARY KEY,
    version   INTEGER NOT NULL
)
"""

DEFAULT_PRIORITY = 100
"""A slice's place in its organization's unified view: lower is asked first."""

RESERVED_PROJECT_NAMES = frozenset({"nar", "log", "realisations", "nix-cache-info"})
"""Names that would collide with the files of an organization's view ``/cache/<org>/``."""

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""Org and project names: they appear in URLs (``/cache/<org>/<project>/``) and in
policy resources (``org/project`` globs), so no slashes, globs or spaces."""


class DatabaseError(NixdError):
    """The metadata database could not be opened, migrated or written."""


def open_db(path: str | os.PathLike[str], *, migrate: bool = True) -> Connection:
    """Open (creating if needed, mode 0600) the server database and apply core migrations.

    ``path`` is an SQLite file, or a PostgreSQL URL (``postgresql://...``; see
    :func:`open_postgres`). The SQLite file holds credential hashes, so it is created
    owner-only before SQLite touches it; SQLite gives its ``-wal`` and ``-shm`` files the
    same mode.
    """
    if is_postgres(path):
        return open_postgres(str(path), migrate=migrate)
    where = os.fspath(path)
    try:
        if where != ":memory:":
            Path(where).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(where, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        conn = sqlite3.connect(
            where,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
    except (OSError, sqlite3.Error) as exc:
        raise DatabaseError(f"{where}: cannot open the database: {exc}") from exc
    try:
        _retry_while_busy(conn, lambda: _set_up(conn, where, migrate=migrate))
    except sqlite3.Error as exc:
        conn.close()
        raise DatabaseError(f"{where}: cannot set up the database: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _set_up(conn: sqlite3.Connection, where: str, *, migrate: bool) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal" and where != ":memory:":
        raise DatabaseError(f"{where}: SQLite refused WAL mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    size_for(conn, where)
    if migrate:
        ensure_schema(conn, component="core", migrations=MIGRATIONS)


_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def _retry_while_busy(conn: sqlite3.Connection, step: Callable[[], None]) -> None:
    """Run ``step`` (idempotent), again while SQLite says busy, for up to the busy timeout.

    Why: the busy handler does not cover every first-open race. Switching a new file to
    WAL needs an exclusive lock that SQLite does not wait for, and a statement that read
    an older snapshot cannot upgrade to a write (``SQLITE_BUSY_SNAPSHOT``), so several
    processes creating one database at once saw "database is locked" at once. Every step
    of the set-up is idempotent (pragmas; migrations re-read the version under the lock).
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code is None or code & 0xFF not in _BUSY or time.monotonic() > deadline:
                raise
            if conn.in_transaction:
                conn.rollback()
            time.sleep(0.02)


def open_postgres(url: str, *, migrate: bool = True) -> PgConnection:
    """A pool of connections to the PostgreSQL database ``url``, set up and migrated.

    The URL is libpq's, with no password in it: a password comes from ``PGPASSFILE`` /
    ``~/.pgpass`` or ``PGPASSWORD``, or none is needed (peer authentication on a Unix
    socket, certificates).
    """
    shown = url.split("?", 1)[0]
    try:
        conn = PgConnection(url)
    except sqlite3.Error as exc:
        raise DatabaseError(f"{shown}: cannot connect to the database: {exc}") from exc
    try:
        bootstrap(conn)
        if migrate:
            ensure_schema(conn, component="core", migrations=MIGRATIONS)
    except sqlite3.Error as exc:
        conn.close()
        raise DatabaseError(f"{shown}: cannot set up the database: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


CACHE_MIN = 16 << 20
CACHE_MAX = 256 << 20
MMAP_MAX = 1 << 30


def size_for(conn: Connection, where: str) -> None:
    """Size SQLite's page cache and memory map for the database it has.

    Why: SQLite's default cache is 2 MiB, and a server's database with 50k+ paths is
    tens of MiB, so a narinfo miss (an index lookup nobody cached) read its pages with
    ``pread`` from the OS each time. The cache gets the file's size (at least
    :data:`CACHE_MIN`, at most :data:`CACHE_MAX`; memory is only used as pages are
    read), and reads go through a memory map of up to :data:`MMAP_MAX` (address space,
    not memory), so a page that is in the OS page cache costs no system call.
    """
    try:
        size = os.stat(where).st_size if where != ":memory:" else 0
    except OSError:
        size = 0
    cache = min(CACHE_MAX, max(CACHE_MIN, size + size // 4))
    conn.execute(f"PRAGMA cache_size = -{cache // 1024}")
    conn.execute(f"PRAGMA mmap_size = {MMAP_MAX}")
    conn.execute("PRAGMA temp_store = MEMORY")


@contextmanager
def transaction(conn: Connection, *, durable: bool = False) -> Iterator[None]:
    """Run the block in one write transaction; commit on success, roll back on error.

    Nested use becomes a savepoint of the outer transaction. ``durable=True`` fsyncs the
    WAL at this commit (for acknowledged admin changes such as a revocation); it has no
    effect on a nested block, whose durability is the outer one's. On PostgreSQL see
    :meth:`nixd.server.storage.sql.PgConnection.transaction` (same guarantees).
    """
    if not isinstance(conn, sqlite3.Connection):
        with conn.transaction(durable=durable):
            yield
        return
    if conn.in_transaction:
        name = f"sp_{next(_savepoints)}"
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            conn.execute(f"ROLLBACK TO {name}")
            conn.execute(f"RELEASE {name}")
            raise
        conn.execute(f"RELEASE {name}")
        return
    if durable:
        conn.execute("PRAGMA synchronous = FULL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
    finally:
        if durable:
            conn.execute("PRAGMA synchronous = NORMAL")


def schema_version(conn: Connection, component: str) -> int:
    """How many of ``component``'s migrations this database has (0 if none)."""
    if isinstance(conn, sqlite3.Connection) or conn.in_transaction:
        conn.execute(_SCHEMA_VERSIONS)  # on PostgreSQL only under the write lock
    query = "SELECT version FROM schema_versions WHERE component = ?"
    try:
        row = conn.execute(query, (component,)).fetchone()
    except sqlite3.DatabaseError:
        if isinstance(conn, sqlite3.Connection):
            raise
        return 0  # PostgreSQL without the table yet
    return int(row[0]) if row else 0


def ensure_schema(conn: Connection, *, component: str, migrations: Sequence[Migration]) -> int:
    """Apply the migrations of ``component`` the database does not have yet; return the version.

    Idempotent and safe against a concurrent process doing the same: the version is
    re-read under the write lock. A database newer than ``migrations`` (a downgrade) is
    refused rather than silently used.
    """
    if isinstance(conn, sqlite3.Connection):
        conn.execute(_SCHEMA_VERSIONS)
    if schema_version(conn, component) == len(migrations):
        return len(migrations)  # the common case, without taking the write lock
    with transaction(conn):
        have = schema_version(conn, component)
        if have > len(migrations):
            raise ConfigError(
                f"database schema of {component!r} is at version {have}, newer than the "
                f"{len(migrations)} this nixd-server knows; upgrade nixd-server"
            )
        for number in range(have + 1, len(migrations) + 1):
            log.info("applying %s schema migration %d", component, number)
            migration = migrations[number - 1]
            if isinstance(migration, Dialects):
                migration = migration.sqlite if is_sqlite(conn) else migration.postgresql
            try:
                if isinstance(migration, str):
                    for statement in _split_sql(ddl(conn, migration)):
                        conn.execute(statement)
                else:
                    migration(conn)
            except sqlite3.Error as exc:
                raise DatabaseError(f"{component} schema migration {number} failed: {exc}") from exc
        conn.execute(
            "INSERT INTO schema_versions (component, version) VALUES (?, ?) "
            "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
            (component, len(migrations)),
        )
        if component == "core" and is_sqlite(conn):
            conn.execute(f"PRAGMA user_version = {len(migrations)}")
    return len(migrations)


def _split_sql(script: str) -> Iterator[str]:
    """Split a script into statements (``executescript`` would COMMIT our transaction).

    Pieces are joined until SQLite says the statement is complete, so a ``;`` inside a
    string literal or a trigger body does not split it.
    """
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                yield pending
            pending = ""
    if pending.strip(" \t\r\n;"):
        raise DatabaseError(f"incomplete SQL statement in migration: {pending.strip()[:60]!r}")


# --- organizations and projects -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Org:
    id: int
    name: str
    created: float


@dataclass(frozen=True, slots=True)
class Project:
    id: int
    org: str
    name: str
    public: bool
    created: float
    priority: int = DEFAULT_PRIORITY

    @property
    def slice(self) -> str:
        """The policy resource name, ``org/project``."""
        return f"{self.org}/{self.name}"


def split_slice(text: str) -> tuple[str, str]:
    """``org/project`` as ``(org, project)``; ConfigError if either part is missing."""
    org, sep, name = text.partition("/")
    if not sep or not org or not name:
        raise ConfigError(f"{text!r}: expected ORG/PROJECT")
    return org, name


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid org/project name, else raise ConfigError."""
    if not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 63, starting with a letter or digit)"
        )
    return name


def create_org(conn: Connection, name: str, *, now: float | None = None) -> Org:
    """Create an organization; ConfigError if the name is invalid or taken."""
    check_name("organization", name)
    created = time.time() if now is None else now
    try:
        with transaction(conn, durable=True):
            row = conn.execute(
                "INSERT INTO orgs (name, created) VALUES (?, ?) RETURNING id", (name, created)
            ).fetchone()
    except sqlite3.IntegrityError as exc:
        row = conn.execute("SELECT name FROM orgs WHERE lower(name) = lower(?)", (name,)).fetchone()
        taken = row[0] if row else name
        raise ConfigError(
            f"organization {name!r} already exists"
            if taken == name
            else f"organization {name!r} would differ from {taken!r} only by case"
        ) from exc
    return Org(int(row[0]), name, created)


def get_org(conn: Connection, name: str) -> Org | None:
    row = conn.execute("SELECT id, name, created FROM orgs WHERE name = ?", (name,)).fetchone()
    return Org(row[0], row[1], row[2]) if row else None


def list_orgs(conn: Connection) -> list[Org]:
    rows = conn.execute("SELECT id, name, created FROM orgs ORDER BY name").fetchall()
    return [Org(r[0], r[1], r[2]) for r in rows]


def create_project(
    conn: Connection,
    org: str,
    name: str,
    *,
    public: bool = False,
    now: float | None = None,
) -> Project:
    """Create project ``name`` in ``org``; ConfigError if the org is missing or name taken."""
    check_name("project", name)
    if name.lower() in RESERVED_PROJECT_NAMES:
        raise ConfigError(f"{name!r} is reserved (it names files of the view /cache/{org}/)")
    created = time.time() if now is None else now
    try:
        with transaction(conn, durable=True):
            found = get_org(conn, org)
            if found is None:
                raise ConfigError(f"organization {org!r} does not exist")
            row = conn.execute(
                "INSERT INTO projects (org_id, name, public, created) VALUES (?, ?, ?, ?) "
                "RETURNING id",
                (found.id, name, int(public), created),
            ).fetchone()
    except sqlite3.IntegrityError as exc:
        raise ConfigError(
            f"project {org}/{name} already exists (project names are compared ignoring case)"
        ) from exc
    return Project(int(row[0]), org, name, public, created)


_PROJECT_SELECT = (
    "SELECT p.id, o.name, p.name, p.public, p.created, p.priority FROM projects p "
    "JOIN orgs o ON o.id = p.org_id"
)


def project_from_row(row: Sequence[Any]) -> Project:
    """A :class:`Project` from ``id, org, name, public, created, priority`` columns."""
    pid, org, name, public, created, priority = row
    return Project(int(pid), str(org), str(name), bool(public), float(created), int(priority))


def get_project(conn: Connection, org: str, name: str) -> Project | None:
    row = conn.execute(f"{_PROJECT_SELECT} WHERE o.name = ? AND p.name = ?", (org, name)).fetchone()
    return project_from_row(row) if row else None


def list_projects(conn: Connection, org: str | None = None) -> list[Project]:
    if org is None:
        rows = conn.execute(f"{_PROJECT_SELECT} ORDER BY o.name, p.name").fetchall()
    else:
        rows = conn.execute(
            f"{_PROJECT_SELECT} WHERE o.name = ? ORDER BY p.name", (org,)
        ).fetchall()
    return [project_from_row(r) for r in rows]


def set_project_public(conn: Connection, org: str, name: str, public: bool) -> Project:
    """Mark a project readable by anyone (or not); ConfigError if it does not exist."""
    with transaction(conn, durable=True):
        conn.execute(
            "UPDATE projects SET public = ? WHERE name = ? "
            "AND org_id = (SELECT id FROM orgs WHERE name = ?)",
            (int(public), name, org),
        )
        project = get_project(conn, org, name)
    if project is None:
        raise ConfigError(f"project {org}/{name} does not exist")
    return project


def set_project_priority(conn: Connection, org: str, name: str, priority: int) -> Project:
    """Set a slice's place in its org's unified view (lower first); ConfigError if absent."""
    if not 0 <= priority <= 1_000_000:
        raise ConfigError(f"priority {priority} is outside 0..1000000")
    with transaction(conn, durable=True):
        conn.execute(
            "UPDATE projects SET priority = ? WHERE name = ? "
            "AND org_id = (SELECT id FROM orgs WHERE name = ?)",
            (priority, name, org),
        )
        project = get_project(conn, org, name)
    if project is None:
        raise ConfigError(f"project {org}/{name} does not exist")
    return project


def org_trust(conn: Connection, org: str) -> list[Project]:
    """The other organizations' slices ``org`` opted in to, in the order they are asked."""
    rows = conn.execute(
        f"{_PROJECT_SELECT} JOIN org_trust t ON t.project_id = p.id "  # noqa: S608
        "WHERE t.org_id = (SELECT id FROM orgs WHERE lower(name) = lower(?)) ORDER BY t.position",
        (org,),
    ).fetchall()
    return [project_from_row(r) for r in rows]


def set_org_trust(conn: Connection, org: str, slices: Sequence[str]) -> list[Project]:
    """Replace ``org``'s trust list with ``slices`` (``other/project``, asked in this order).

    Only slices of other organizations belong here (an org's own slices are always asked
    first, by priority); each must exist. ConfigError otherwise.
    """
    with transaction(conn, durable=True):
        found = get_org(conn, org)
        if found is None:
            raise ConfigError(f"organization {org!r} does not exist")
        conn.execute("DELETE FROM org_trust WHERE org_id = ?", (found.id,))
        for position, slice_name in enumerate(slices):
            project = get_project(conn, *split_slice(slice_name))
            if project is None:
                raise ConfigError(f"project {slice_name} does not exist")
            if project.org == found.name:
                raise ConfigError(f"{slice_name} is {org}'s own: own slices are always trusted")
            conn.execute(
                "INSERT INTO org_trust (org_id, position, project_id) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (found.id, position, project.id),
            )
    return org_trust(conn, org)
