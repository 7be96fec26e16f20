"""The server's metadata on PostgreSQL: a pooled connection that runs the same SQL as SQLite.

The server's SQL is written once, for both engines: ``?`` placeholders, ``INSERT ... ON
CONFLICT``, ``RETURNING``, plain types. :class:`PgConnection` offers the part of
:class:`sqlite3.Connection` the server uses (``execute``/``executemany`` returning rows,
``rowcount``, ``in_transaction``, ``close``), backed by a bounded
:class:`psycopg_pool.ConnectionPool`:

- A statement outside a transaction borrows a pooled connection (autocommit) for itself;
  its rows are fetched before the connection goes back. A broken connection (a restarted
  server) is dropped by the pool and replaced, so one failure ends one request only.
- :meth:`PgConnection.transaction` (what :func:`nixd.server.storage.db.transaction` calls)
  pins one connection to the calling thread until the commit: statements in the block run
  on it, a nested block is a savepoint. It also takes one advisory lock
  (:data:`WRITE_LOCK`) for the transaction, so write transactions are serialized across
  every process on the database exactly as SQLite's ``BEGIN IMMEDIATE`` serializes them:
  code that reads, decides and writes in one transaction (refresh-credential rotation,
  throttle counts, migrations) means the same on both engines. Readers never wait.
  ``durable=False`` commits with ``synchronous_commit = off`` (like SQLite's
  ``synchronous=NORMAL``: a crash may lose the last commits, never corrupts); durable
  commits use the server's setting.
- :meth:`PgConnection.data_version` is SQLite's ``PRAGMA data_version`` for PostgreSQL:
  the ``nixd_data_version`` sequence, advanced after every commit (before the committing
  call returns) together with a ``NOTIFY nixd_data_version``. Each process LISTENs on a
  connection of its own, and :meth:`~nixd.server.storage.store.Store.sync` (once per
  request) reads that connection's socket without blocking: a request costs no round
  trip unless something was committed, then one. Every in-process cache keyed on the
  version (narinfo holders, revocations, keys) so sees a commit by any other instance
  as soon as PostgreSQL delivered the notification — it does so at the commit, so the
  window is the delivery (well under a millisecond on one host), not a polling period.
  Without a listening connection (it failed or was cut) every request reads the
  sequence, which is exact, until a new listener is up.

Errors come out as the :mod:`sqlite3` (DB-API) classes re-exported here —
:data:`IntegrityError` for a constraint, :data:`OperationalError` for an unreachable
server, a lock or pool timeout — so callers catch one hierarchy whatever the engine.

Dialect differences handled here, explicitly: placeholders (``?`` → ``%s``, ``%`` doubled,
quotes and comments respected), and in migration scripts the column types
(:func:`postgres_ddl`: ``INTEGER`` → ``BIGINT``, ``INTEGER PRIMARY KEY`` → an identity,
``REAL`` → ``DOUBLE PRECISION``, ``BLOB`` → ``BYTEA``, ``TEXT`` → ``TEXT COLLATE "C"`` so
that ordering and comparison are bytewise as in SQLite). ``PRAGMA`` statements are
SQLite's only and never reach here. ``json_valid`` (used in a CHECK) is provided as a
function by :func:`bootstrap`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

IntegrityError = sqlite3.IntegrityError
OperationalError = sqlite3.OperationalError
Error = sqlite3.Error

SCHEMES = ("postgresql://", "postgres://")
WRITE_LOCK = 0x6E6978642D777269
"""The advisory lock every write transaction holds ("nixd-wri"): one writer at a time."""
LOCK_TIMEOUT_MS = 5_000
"""How long a writer waits for the lock (SQLite's busy timeout): then OperationalError."""
POOL_MAX = 4
"""Connections per server process: the loop thread and a few worker threads."""
RELISTEN_S = 5.0
"""How often a process without a listening connection tries to open one again."""
_CHANNEL = "nixd_data_version"
_VERSION = "SELECT last_value FROM nixd_data_version"
_BUMP = f"SELECT nextval('nixd_data_version'); NOTIFY {_CHANNEL}"
"""Run after every commit: the version moves, and every listening process hears of it."""
_savepoints = itertools.count()
log = logging.getLogger(__name__)
_WRITES = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER)\b", re.IGNORECASE)


def is_postgres(target: object) -> bool:
    """Whether a ``[storage] database`` value names a PostgreSQL database (a libpq URL)."""
    return isinstance(target, str) and target.startswith(SCHEMES)


@functools.lru_cache(maxsize=2048)
def placeholders(sql: str) -> str:
    """``sql`` with ``?`` placeholders as psycopg's ``%s`` and literal ``%`` doubled.

    A ``?`` inside a string literal, a quoted identifier or a comment is left alone; a
    ``%`` is doubled everywhere (psycopg reads the whole text for placeholders).
    """
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"":
            end = i + 1
            while end < n:
                if sql[end] == c:
                    if end + 1 < n and sql[end + 1] == c:  # doubled quote: still inside
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i : end + 1].replace("%", "%%"))
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif c == "?":
            out.append("%s")
            i += 1
        elif c == "%":
            out.append("%%")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


_DDL_TYPES = [
    (
        re.compile(r"\bINTEGER\s+PRIMARY\s+KEY\b", re.I),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b", re.I), "BIGINT"),
    (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b", re.I), "BYTEA"),
    (re.compile(r"\bTEXT\b", re.I), 'TEXT COLLATE "C"'),
]


def postgres_ddl(script: str) -> str:
    """A migration script's column types as PostgreSQL's (see the module docstring).

    Only for migration scripts, whose type names are never inside string literals.
    """
    for pattern, replacement in _DDL_TYPES:
        script = pattern.sub(replacement, script)
    return script


class Rows:
    """A statement's result, fetched whole: what a :class:`sqlite3.Cursor` offers us."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return list(self._rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


def _mapped(exc: Exception) -> sqlite3.Error:
    """The DB-API class of a psycopg or pool error (see the module docstring)."""
    import psycopg  # noqa: PLC0415 - only PostgreSQL deployments load psycopg
    import psycopg_pool  # noqa: PLC0415

    message = str(exc).strip() or type(exc).__name__
    if isinstance(exc, psycopg.IntegrityError):
        return IntegrityError(message)
    if isinstance(
        exc, psycopg.OperationalError | psycopg_pool.PoolTimeout | psycopg.InterfaceError
    ):
        return OperationalError(message)
    return sqlite3.DatabaseError(message)


def _from_driver(exc: Exception) -> bool:
    """Whether psycopg or its pool raised ``exc`` (not the caller's block)."""
    return type(exc).__module__.split(".")[0] in {"psycopg", "psycopg_pool"}


class PgConnection:
    """A pool of connections to one PostgreSQL database, used like one sqlite3 connection."""

    dialect = "postgresql"

    def __init__(self, url: str, *, max_size: int = POOL_MAX, timeout: float = 10.0) -> None:
        import psycopg_pool  # noqa: PLC0415

        self.url = url
        self._local = threading.local()
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            kwargs={"autocommit": True},
            configure=self._configure,
            timeout=LOCK_TIMEOUT_MS / 1000,
            open=False,
            name="nixd-metadata",
        )
        try:
            self._pool.open(wait=True, timeout=timeout)
        except Exception as exc:
            self._pool.close()
            raise _mapped(exc) from exc
        self._listener: psycopg.Connection[Any] | None = None
        self._version: int | None = None
        self._relisten_at = 0.0

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")

    @property
    def in_transaction(self) -> bool:
        return getattr(self._local, "conn", None) is not None

    def _run(self, conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> Rows:
        try:
            cur = conn.execute(placeholders(sql), params) if params else conn.execute(sql)
            rows = cur.fetchall() if cur.description is not None else []
        except Exception as exc:
            raise _mapped(exc) from exc
        return Rows(rows, cur.rowcount)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        """Run one statement (in the thread's transaction if it has one) and fetch its rows.

        Outside a transaction, a read that finds its pooled connection broken (the server
        restarted, a failover) is tried once more on a fresh one; a write is not (it may
        have committed), and its error goes to the caller.
        """
        pinned = getattr(self._local, "conn", None)
        if pinned is not None:
            return self._run(pinned, sql, params)
        write = _WRITES.match(sql) is not None
        for attempt in range(1 if write else 2):
            try:
                with self._pool.connection() as conn:
                    try:
                        rows = self._run(conn, sql, params)
                    except OperationalError:
                        if write or attempt or not conn.broken:
                            raise
                        continue  # the pool drops the broken connection on the way out
                    if write:
                        conn.execute(_BUMP)
                    return rows
            except Exception as exc:
                if _from_driver(exc):
                    raise _mapped(exc) from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> None:
        with self.transaction():
            for params in seq:
                self.execute(sql, params)

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[None]:
        """One write transaction (the advisory lock held), or a savepoint when nested."""
        local = self._local
        pinned = getattr(local, "conn", None)
        if pinned is not None:
            name = f"sp_{next(_savepoints)}"
            self._run(pinned, f"SAVEPOINT {name}", ())
            try:
                yield
            except BaseException:
                self._run(pinned, f"ROLLBACK TO {name}", ())
                self._run(pinned, f"RELEASE {name}", ())
                raise
            self._run(pinned, f"RELEASE {name}", ())
            return
        try:
            with self._pool.connection() as conn:
                begin = "BEGIN" if durable else "BEGIN; SET LOCAL synchronous_commit = off"
                self._run(conn, f"{begin}; SELECT pg_advisory_xact_lock({WRITE_LOCK})", ())
                local.conn = conn
                try:
                    yield
                except BaseException:
                    local.conn = None
                    self._run(conn, "ROLLBACK", ())
                    raise
                local.conn = None
                # The version moves only once the commit is visible, before the caller
                # is told it is done: a reader seeing the new version sees the change.
                self._run(conn, f"COMMIT; {_BUMP}", ())
        except Exception as exc:
            if _from_driver(exc):
                raise _mapped(exc) from exc
            raise

    def data_version(self) -> int:
        """Changes whenever any connection, of any process, committed (see the docstring).

        Read from the database only when a ``nixd_data_version`` notification arrived on
        the listening connection since the last call (a non-blocking read of its socket,
        a few µs), or whenever there is no listening connection (then every call is a
        round trip, and a new listener is tried every :data:`RELISTEN_S` seconds).
        """
        if self._listener is not None:
            try:
                pgconn = self._listener.pgconn
                pgconn.consume_input()
                notified = False
                while pgconn.notifies() is not None:
                    notified = True
                if not notified and self._version is not None:
                    return self._version
            except Exception as exc:  # the listener is gone: round trips until it is back
                if not _from_driver(exc):
                    raise
                self._drop_listener()
        elif time.monotonic() >= self._relisten_at:
            self._listen()
        self._version = int(self.execute(_VERSION).fetchone()[0])
        return self._version

    def _listen(self) -> None:
        """Open the connection notifications of commits arrive on (LISTEN before reading)."""
        import psycopg  # noqa: PLC0415

        self._relisten_at = time.monotonic() + RELISTEN_S
        self._version = None  # read afresh after LISTEN: no commit falls in between
        try:
            self._listener = psycopg.connect(self.url, autocommit=True)
            self._listener.execute(f"LISTEN {_CHANNEL}")
        except psycopg.Error as exc:
            log.warning("no change notifications from the database (%s): polling", exc)
            self._drop_listener()

    def _drop_listener(self) -> None:
        listener, self._listener, self._version = self._listener, None, None
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.close()

    def commit(self) -> None:
        """Nothing to do: outside :meth:`transaction` every statement commits itself."""

    def close(self) -> None:
        self._drop_listener()
        self._pool.close()


_BOOTSTRAP = [
    "CREATE SEQUENCE IF NOT EXISTS nixd_data_version",
    # SQLite's json_valid(), for the CHECK of a released migration.
    """CREATE OR REPLACE FUNCTION json_valid(doc text) RETURNS boolean
        LANGUAGE plpgsql IMMUTABLE AS $$
        BEGIN PERFORM doc::jsonb; RETURN true;
        EXCEPTION WHEN others THEN RETURN false; END $$""",
]


def bootstrap(conn: PgConnection) -> None:
    """What every nixd PostgreSQL database has before any migration (idempotent).

    Taken under the write lock: concurrent ``CREATE ... IF NOT EXISTS`` can still collide.
    """
    try:
        conn.execute("SELECT last_value FROM nixd_data_version")
        conn.execute("SELECT json_valid('{}')")
        return
    except sqlite3.DatabaseError:
        pass
    with conn.transaction(durable=True):
        for statement in _BOOTSTRAP:
            conn.execute(statement)
