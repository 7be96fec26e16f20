"""The audit log in PostgreSQL: one hash chain that every server instance on the database extends.

Why a table
    With ``[storage] database = "postgresql://..."`` several ``nixd-server serve``
    instances, on several machines, serve one cache. A file in one state directory cannot
    be their log, and one file per instance would be several chains, none of them the
    whole story. So the lines go to the database the instances already share, and the
    chain stays one.

The model
    ``audit_log`` holds one row per line: ``seq``, ``prev``, ``hash`` and ``body``, the
    line's JSON members other than ``seq`` and ``prev`` exactly as :mod:`~nixd.server.access.
    audit` makes them. The line is :func:`~nixd.server.access.audit.line_of` ``(seq, body,
    prev)`` — the file format's line, byte for byte — and ``hash`` its sha256, the next
    row's ``prev``. ``audit_head`` is one row (``seq``, ``hash``) naming the last line, the
    table's ``<log>.head``: rows deleted off the end or an edit of the last row that also
    rewrote its ``hash`` break the link to the head. It is updated in the transaction
    that appends, so it never lags (unlike the file's head) and never claims an
    uncommitted row. (Anyone who may rewrite both tables can rewrite history, as with
    the file; :func:`export` ships the chain elsewhere.)

Appends
    A batch is one transaction: ``SELECT ... FROM audit_head FOR UPDATE`` (the row lock
    serializes appends of every instance, so the chain never forks), the rows chained onto
    the head, one statement that moves the head and inserts them all, ``COMMIT``. Batching is
    :class:`~nixd.server.access.audit.AuditWriter`'s, the file's: whatever arrived during
    one commit is the next batch, and each caller returns only once its batch committed
    (PostgreSQL's own ``synchronous_commit``, the server's setting, decides what a commit
    survives: at its default, a power cut). The lock is the head row, not the write lock
    of :mod:`nixd.server.storage.sql`, and the connection is the writer's own, outside the
    pool: an audit line neither waits for an upload's transaction nor moves the data
    version that every cache of every instance is keyed on.

    Measured (32 trio tasks appending in a loop, one process, PostgreSQL 15 at its
    defaults on a Unix socket, fsync on; 2 cores shared with other work): 18-22k lines/s
    at 32 lines per commit, ~22 CPU-us per line in the writing process, against 21-41k
    lines/s for the file on the same disk. Before the append was one statement and its
    arrays binary, five round trips and text arrays (which quote every ``"`` of every
    body) held it to ~6.7k lines/s.

    A broken connection (a database restart, a failover) is replaced and the batch tried
    once more. If it broke during the ``COMMIT``, the outcome is unknown: the new
    connection looks for the batch's last hash at its ``seq`` (nobody else could have
    written that seq with that hash), so a batch is never written twice and never reported
    lost when it was kept (``tests/server/test_audit_db.py`` cuts a connection just
    before and just after its ``COMMIT``).

    An instance killed mid-batch leaves no trace: its connection closes, PostgreSQL rolls
    the transaction back and the head row is free. One that hangs inside a transaction
    (a frozen host) is ended by the database after :data:`IDLE_TIMEOUT_MS`; until then
    the other instances' batches wait up to :data:`LOCK_TIMEOUT_MS` and fail (503).

Containment
    A batch that cannot be committed (the database unreachable, the lock not had within
    ``lock_timeout``) is an :class:`~nixd.server.access.audit.AuditError` for every caller
    in it: 503 ``audit_unavailable``, as when the file cannot be written. What is not
    audited is not answered. The next batch tries again on a fresh connection, so the log
    recovers with the database, without a restart (the file's writer instead stops for
    good after a failed fsync, because the file's contents are then unknown; a database
    tells).

Verifying
    :func:`verify_database` reads one snapshot of both tables in seq order and names the
    first bad record: removed (a gap in ``seq``), edited (its line no longer hashes to
    ``hash``, or its ``hash`` is not the next row's ``prev``, or for the last row the
    head's), reordered (its ``prev`` is the ``hash`` of some other row), rows cut off the
    end or added after the head. :func:`export` writes the rows as the file format (and
    a head file), which :func:`~nixd.server.access.audit.verify` accepts.

Schema
    The ``audit`` component of :func:`nixd.server.storage.db.ensure_schema`
    (:data:`MIGRATIONS`), applied on PostgreSQL only; on SQLite the log stays a file and
    the component records its version with no tables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from nixd.server.access.audit import (
    _HEAD_SIZE,
    GENESIS,
    HEAD_SUFFIX,
    AuditError,
    AuditLog,
    AuditWriter,
    VerifyResult,
    line_hash,
    line_of,
)
from nixd.server.storage.db import (
    Connection,
    DatabaseError,
    Dialects,
    Migration,
    ensure_schema,
    open_db,
)
from nixd.server.storage.sql import is_postgres

if TYPE_CHECKING:
    import psycopg

    from nixd.server.config import ServerConfig

log = logging.getLogger(__name__)


def _no_tables(conn: Connection) -> None:
    """On SQLite the audit log is a file: the component has a version and no tables."""


def _create_tables(conn: Connection) -> None:
    """Audit migration 1 on PostgreSQL: the chain and its head, at the genesis hash."""
    conn.execute(
        """CREATE TABLE audit_log (
            seq  BIGINT PRIMARY KEY CHECK (seq > 0),
            prev TEXT COLLATE "C" NOT NULL,
            hash TEXT COLLATE "C" NOT NULL,
            body TEXT COLLATE "C" NOT NULL)"""
    )
    conn.execute(
        """CREATE TABLE audit_head (
            id   INTEGER PRIMARY KEY CHECK (id = 1),
            seq  BIGINT NOT NULL,
            hash TEXT COLLATE "C" NOT NULL)"""
    )
    conn.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, ?)", (GENESIS,))


MIGRATIONS: list[Migration] = [
    # 1: the chain and its head (PostgreSQL only).
    Dialects(sqlite=_no_tables, postgresql=_create_tables),
]

LOCK_TIMEOUT_MS = 5_000
"""How long a batch waits for the head row held by another instance: then AuditError."""
IDLE_TIMEOUT_MS = 10_000
"""A writer stuck inside its transaction (a hung host) is aborted by the database after
this, releasing the head row for the other instances."""
CONNECT_TIMEOUT_S = 10
_FETCH = 2_000
_HEAD = "SELECT seq, hash FROM audit_head WHERE id = 1"
_APPEND = (
    # One statement (one round trip): the head moves and the rows go in together. Binary
    # arrays (%b): a text array would quote every '"' of every body, on both sides.
    "WITH moved AS (UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1) "
    "INSERT INTO audit_log (seq, prev, hash, body) "
    "SELECT * FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[])"
)


def _shown(url: str) -> str:
    """The URL as messages show it (its query, where options live, left out)."""
    return url.split("?", 1)[0]


class DatabaseAuditLog(AuditWriter):
    """The audit log as rows of the PostgreSQL database ``url`` (see the module docstring).

    Same API as :class:`~nixd.server.access.audit.AuditLog` (``record``, ``arecord``,
    ``arecord_body``, ``submit``, ``close``). The schema is applied on open.
    """

    def __init__(
        self,
        url: str,
        *,
        conn: Connection | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``conn``: the server's open metadata connection, for the schema (else one is
        opened for that and closed); appends always use a connection of their own."""
        super().__init__(f"{_shown(url)} (audit_log)", clock=clock)
        self.url = url
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False
        try:
            schema = conn if conn is not None else open_db(url)
        except (sqlite3.Error, DatabaseError) as exc:
            raise AuditError(f"{self.name}: cannot open the audit log: {exc}") from exc
        try:
            ensure_schema(schema, component="audit", migrations=MIGRATIONS)
            damage = _head_damage(schema)
        except (sqlite3.Error, DatabaseError) as exc:
            raise AuditError(f"{self.name}: cannot open the audit log: {exc}") from exc
        finally:
            if conn is None:
                schema.close()
        if damage is not None:
            # Appends continue from the head, so the evidence stays; put it in the chain too.
            log.error("%s: %s", self.name, damage)
            try:
                self.record(
                    {"identity": "system:nixd-server", "action": "audit:damage", "problem": damage}
                )
            except BaseException:
                self.close()
                raise

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg  # noqa: PLC0415 - only PostgreSQL deployments load psycopg

        if self._conn is not None and not self._conn.broken and not self._conn.closed:
            return self._conn
        self._drop()
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
            conn.execute(
                f"SET lock_timeout = {LOCK_TIMEOUT_MS}; "
                f"SET idle_in_transaction_session_timeout = {IDLE_TIMEOUT_MS}"
            )
        except psycopg.Error as exc:
            raise AuditError(f"{self.name}: cannot reach the audit log: {_message(exc)}") from exc
        self._conn = conn
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _write_batch(self, bodies: list[str]) -> None:
        import psycopg  # noqa: PLC0415

        with self._lock:
            if self._closed:
                raise AuditError(f"{self.name}: the audit log is closed")
            for attempt in (1, 2):
                conn = self._connect()
                intended: tuple[int, str] | None = None
                try:
                    with conn.transaction():
                        head = conn.execute(f"{_HEAD} FOR UPDATE").fetchone()
                        if head is None:
                            raise AuditError(f"{self.name}: audit_head has no row; run migrate")
                        seq, prev = int(head[0]), str(head[1])
                        seqs, prevs, hashes = [], [], []
                        for body in bodies:
                            seq += 1
                            digest = line_hash(line_of(seq, body, prev))
                            seqs.append(seq)
                            prevs.append(prev)
                            hashes.append(digest)
                            prev = digest
                        conn.execute(_APPEND, (seq, prev, seqs, prevs, hashes, bodies))
                        intended = (seq, prev)
                    self.batches += 1
                    return
                except psycopg.Error as exc:
                    broken = conn.broken or conn.closed
                    if broken:
                        self._drop()
                    if intended is not None and broken and self._was_committed(*intended):
                        log.warning(
                            "%s: connection lost at COMMIT (%s); the batch was committed",
                            self.name,
                            _message(exc),
                        )
                        self.batches += 1
                        return  # the COMMIT's answer was lost, not the commit
                    if attempt == 1 and broken:
                        log.warning("%s: connection lost (%s); trying again", self.name, exc)
                        continue
                    raise AuditError(
                        f"{self.name}: cannot write the audit log: {_message(exc)}"
                    ) from exc
            raise AssertionError("unreachable")  # pragma: no cover

    def _was_committed(self, seq: int, digest: str) -> bool:
        """Whether row ``seq`` holds ``digest`` (asked on a fresh connection)."""
        import psycopg  # noqa: PLC0415

        try:
            row = (
                self._connect()
                .execute("SELECT hash FROM audit_log WHERE seq = %s", (seq,))
                .fetchone()
            )
        except (psycopg.Error, AuditError):
            self._drop()
            return False
        return row is not None and row[0] == digest

    def _is_open(self) -> bool:
        return not self._closed

    def _release(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()

    def __enter__(self) -> DatabaseAuditLog:
        return self


def _message(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _head_damage(conn: Connection) -> str | None:
    """What is wrong if the last row is not the one the head names (cheap, on open).

    One statement, so one snapshot: other instances appending meanwhile move the head and
    the last row together.
    """
    found = conn.execute(
        "SELECT h.seq, h.hash, l.seq, l.hash FROM audit_head h LEFT JOIN LATERAL "
        "(SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1) l ON true WHERE h.id = 1"
    ).fetchone()
    if found is None:
        return "audit_head has no row"
    head_seq, head_hash, last_seq, last_hash = found
    if last_seq is None:
        return (
            None if int(head_seq) == 0 else f"audit_log is empty but audit_head records {head_seq}"
        )
    if int(last_seq) < int(head_seq):
        return f"audit_log ends at record {last_seq} but audit_head records {head_seq}"
    if int(last_seq) > int(head_seq):
        return f"audit_log holds records after {head_seq}, the one audit_head records"
    if last_hash != head_hash:
        return f"record {last_seq} does not match audit_head (edited)"
    return None


def open_audit(config: ServerConfig, conn: Connection | None = None) -> AuditWriter:
    """The server's audit log: the database's table on PostgreSQL, else the file.

    ``conn`` is the server's metadata connection if it has one open (for the schema).
    """
    if is_postgres(config.database):
        return DatabaseAuditLog(str(config.database), conn=conn)
    return AuditLog(config.audit_path)


# -- verifying and exporting ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    seq: int
    prev: str
    hash: str
    body: str

    @property
    def line(self) -> bytes:
        return line_of(self.seq, self.body, self.prev)


@contextlib.contextmanager
def _snapshot(url: str) -> Iterator[tuple[tuple[int, str] | None, Iterator[_Row]]]:
    """The head and every row in seq order, from one snapshot (appends may go on)."""
    import psycopg  # noqa: PLC0415

    try:
        conn = psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        raise AuditError(f"{_shown(url)}: cannot reach the audit log: {_message(exc)}") from exc
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        try:
            found = conn.execute(_HEAD).fetchone()
        except psycopg.errors.UndefinedTable as exc:
            raise AuditError(
                f"{_shown(url)}: no audit_log table (no server has written to it yet; "
                "run `nixd-server migrate`)"
            ) from exc
        head = (int(found[0]), str(found[1])) if found else None

        def rows() -> Iterator[_Row]:
            with conn.cursor(name="audit_rows") as cur:
                cur.itersize = _FETCH
                cur.execute("SELECT seq, prev, hash, body FROM audit_log ORDER BY seq")
                for seq, prev, digest, body in cur:
                    yield _Row(int(seq), str(prev), str(digest), str(body))

        yield head, rows()
    except psycopg.Error as exc:
        raise AuditError(f"{_shown(url)}: cannot read the audit log: {_message(exc)}") from exc
    finally:
        conn.close()


def _owner_of(url: str, digest: str) -> int | None:
    """The seq of the row whose stored hash is ``digest`` (only to name a reordering)."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        row = conn.execute(
            "SELECT seq FROM audit_log WHERE hash = %s ORDER BY seq LIMIT 1", (digest,)
        ).fetchone()
    return int(row[0]) if row else None


class _Checker:
    """Walks the rows in seq order and stops at the first one that is not as written."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.n = 0
        self.prev = GENESIS
        self.bad: tuple[int, str] | None = None

    def check(self, row: _Row) -> bool:
        """Whether ``row`` continues the chain; else :attr:`bad` says where and how."""
        n = self.n + 1
        if row.seq != n:
            gone = f"record {n} was" if row.seq == n + 1 else f"records {n}..{row.seq - 1} were"
            self.bad = (n, f"{gone} removed (the next row holds record {row.seq})")
            return False
        if row.prev != self.prev:
            owner = _owner_of(self.url, row.prev)
            if owner is not None and owner != n - 1:
                self.bad = (
                    n,
                    f"prev points at the row now at record {owner}, not record {n - 1}: "
                    "rows were reordered",
                )
            elif n == 1:
                self.bad = (1, "prev is not the genesis hash: the log does not start here")
            else:
                self.bad = (
                    n - 1,
                    f"was edited: its hash does not match the prev recorded in record {n} "
                    "(or records after it were removed and the rest renumbered)",
                )
            return False
        digest = line_hash(row.line)
        if digest != row.hash:
            self.bad = (n, "was edited: its line no longer hashes to the hash stored with it")
            return False
        self.n, self.prev = n, digest
        return True

    def result(self, head: tuple[int, str] | None) -> VerifyResult:
        n = self.n
        if self.bad is not None:
            return VerifyResult(False, n, self.bad[0], self.bad[1], unit="record")
        if head is None:
            return VerifyResult(False, n, None, "audit_head has no row", unit="record")
        if head[0] > n:
            return VerifyResult(
                False,
                n,
                n + 1,
                f"the log was truncated: {head[0] - n} record(s) after record {n} are missing "
                f"(audit_head records {head[0]})",
                unit="record",
            )
        if head[0] < n:
            return VerifyResult(
                False,
                n,
                head[0] + 1,
                f"{n - head[0]} record(s) after audit_head's record {head[0]} were added "
                "outside the log",
                unit="record",
            )
        if n and head[1] != self.prev:
            return VerifyResult(
                False, n, n, "was edited: its hash does not match audit_head", unit="record"
            )
        return VerifyResult(
            True, n, None, None, head=f"audit_head: the log reaches its head (record {n})",
            unit="record",
        )  # fmt: skip


def verify_database(url: str) -> VerifyResult:
    """Check the chain in ``url``'s ``audit_log`` and that it reaches ``audit_head``."""
    try:
        with _snapshot(url) as (head, rows):
            checker = _Checker(url)
            for row in rows:
                if not checker.check(row):
                    break
    except AuditError as exc:
        return VerifyResult(False, 0, None, str(exc), unit="record")
    return checker.result(head)


def export(url: str, out: IO[bytes]) -> tuple[VerifyResult, tuple[int, str] | None]:
    """Write every row as a line of the file format to ``out``; the chain's check and head.

    Every row is written, a broken chain included (the export is the evidence); the
    result says whether the rows verified, as :func:`verify_database` would.
    """
    with _snapshot(url) as (head, rows):
        checker = _Checker(url)
        good = True
        for row in rows:
            if good:
                good = checker.check(row)
            out.write(row.line)
            out.write(b"\n")
    return checker.result(head), head


def open_private(path: str, flags: int) -> int:
    """Open a new file owner-only from the start (audit lines name who did what)."""
    return os.open(path, flags, 0o600)


def export_file(url: str, path: Path) -> VerifyResult:
    """:func:`export` into ``path`` (written whole, then renamed) and its head file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb", opener=open_private) as out:
            result, head = export(url, out)
            out.flush()
            os.fsync(out.fileno())
        head_path = Path(f"{path}{HEAD_SUFFIX}")
        head_path.unlink(missing_ok=True)  # an older export's head is not this one's
        if result.ok and head is not None:
            text = json.dumps({"lines": head[0], "last": head[1]}, separators=(",", ":"))
            with open(head_path, "wb", opener=open_private) as head_file:
                head_file.write(text.encode().ljust(_HEAD_SIZE - 1) + b"\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return result
