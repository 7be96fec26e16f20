"""The mirror's rows: provenance of mirrored paths, roots to complete, wants not had.

Rows name slices by project id and paths by hash part, like ``slice_records``; they are
deleted with their project. Provenance is not tied to the record by a foreign key (the
GC deletes records without knowing about mirrors): it names the NarHash it vouches for,
and a record whose NarHash differs (replaced by an upload) is not mirrored any more.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nixd.server.storage.db import Connection, Migration, ensure_schema, transaction

MIGRATIONS: list[Migration] = [
    # 1: provenance, roots to complete, wants not had.
    """
    CREATE TABLE mirror_paths (
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        hash_part TEXT NOT NULL, name TEXT NOT NULL, nar_hash TEXT NOT NULL,
        upstream TEXT NOT NULL, url TEXT NOT NULL, sigs TEXT NOT NULL,
        fetched_at REAL NOT NULL,
        PRIMARY KEY (project_id, hash_part));
    CREATE INDEX mirror_paths_by_hash ON mirror_paths(hash_part);
    CREATE TABLE mirror_roots (
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        hash_part TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
        requested REAL NOT NULL, updated REAL NOT NULL, missing INTEGER NOT NULL,
        PRIMARY KEY (project_id, hash_part));
    CREATE INDEX mirror_roots_by_state ON mirror_roots(state);
    CREATE TABLE mirror_wants (
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        hash_part TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
        reason TEXT NOT NULL, attempts INTEGER NOT NULL, updated REAL NOT NULL,
        PRIMARY KEY (project_id, hash_part));
    """,
]
TABLES = ("mirror_paths", "mirror_roots", "mirror_wants")
"""For ``migrate --copy-from``, after ``slice_records``."""


def ensure(conn: Connection) -> None:
    """Create or migrate the mirror's tables (every opener of them calls this)."""
    ensure_schema(conn, component="mirror", migrations=MIGRATIONS)


PENDING, COMPLETE, INCOMPLETE = "pending", "complete", "incomplete"
MISSING, FAILED = "missing", "failed"
MAX_REASON = 500
UPLOADER_PREFIX = "mirror:"
"""A mirrored record's uploader: ``mirror:<name>`` of the upstream it came from."""


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where a mirrored record came from."""

    project_id: int
    hash_part: str
    name: str
    nar_hash: str
    upstream: str
    url: str
    sigs: tuple[str, ...]
    fetched_at: float


@dataclass(frozen=True, slots=True)
class Want:
    """A path a slice's closure needs and the mirrors did not give (yet)."""

    project_id: int
    hash_part: str
    name: str
    state: str  # missing | failed | pending
    reason: str
    attempts: int
    updated: float

    @property
    def path(self) -> str:
        return f"/nix/store/{self.hash_part}-{self.name}"


def record_provenance(conn: Connection, p: Provenance) -> None:
    """Note where a record came from (inside the caller's transaction, if any); the
    want it satisfies is gone."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO mirror_paths (project_id, hash_part, name, nar_hash, upstream, url, "
            "sigs, fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (project_id, hash_part) DO UPDATE SET name = excluded.name, "
            "nar_hash = excluded.nar_hash, upstream = excluded.upstream, url = excluded.url, "
            "sigs = excluded.sigs, fetched_at = excluded.fetched_at",
            (
                p.project_id,
                p.hash_part,
                p.name,
                p.nar_hash,
                p.upstream,
                p.url,
                "\n".join(p.sigs),
                p.fetched_at,
            ),
        )
        conn.execute(
            "DELETE FROM mirror_wants WHERE project_id = ? AND hash_part = ?",
            (p.project_id, p.hash_part),
        )


def _provenance(row: Sequence[Any]) -> Provenance:
    pid, hp, name, nh, up, url, sigs, when = row
    return Provenance(int(pid), hp, name, nh, up, url, tuple(sigs.split("\n")), float(when))


_PROV_COLS = (
    "m.project_id, m.hash_part, m.name, m.nar_hash, m.upstream, m.url, m.sigs, m.fetched_at"
)


def provenance_of(
    conn: Connection, hash_part: str, nar_hash: str, upstream: str
) -> Provenance | None:
    """Provenance of a slice's record of this path with this NarHash mirrored from
    ``upstream`` (the signatures are that upstream's, whichever slice fetched them)."""
    row = conn.execute(
        f"SELECT {_PROV_COLS} FROM mirror_paths m "  # noqa: S608 - fixed columns
        "WHERE m.hash_part = ? AND m.nar_hash = ? AND m.upstream = ? "
        "ORDER BY m.fetched_at LIMIT 1",
        (hash_part, nar_hash, upstream),
    ).fetchone()
    return _provenance(row) if row else None


def mirrored_record(conn: Connection, project_id: int, hash_part: str, nar_hash: str) -> bool:
    """Whether this slice's record of the path (with this NarHash) came from a mirror."""
    row = conn.execute(
        "SELECT 1 FROM mirror_paths WHERE project_id = ? AND hash_part = ? AND nar_hash = ?",
        (project_id, hash_part, nar_hash),
    ).fetchone()
    return row is not None


def live_provenance(conn: Connection, project_id: int | None = None) -> list[Provenance]:
    """Provenance of the mirrored records still held (same NarHash), by slice and path."""
    where = "" if project_id is None else "WHERE m.project_id = ?"
    args: tuple[Any, ...] = () if project_id is None else (project_id,)
    rows = conn.execute(
        f"SELECT {_PROV_COLS} FROM mirror_paths m JOIN slice_records s "  # noqa: S608
        "ON s.project_id = m.project_id AND s.hash_part = m.hash_part "
        f"AND s.nar_hash = m.nar_hash {where} ORDER BY m.project_id, m.hash_part",
        args,
    ).fetchall()
    return [_provenance(r) for r in rows]


def note_want(
    conn: Connection, project_id: int, hash_part: str, name: str, *, state: str, reason: str
) -> None:
    """A path the slice needs was not had: why (the attempts are counted)."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO mirror_wants (project_id, hash_part, name, state, reason, attempts, "
            "updated) VALUES (?, ?, ?, ?, ?, 1, ?) ON CONFLICT (project_id, hash_part) DO "
            "UPDATE SET name = excluded.name, state = excluded.state, "
            "reason = excluded.reason, attempts = mirror_wants.attempts + 1, "
            "updated = excluded.updated",
            (project_id, hash_part, name, state, reason[:MAX_REASON], time.time()),
        )


def forget_want(conn: Connection, project_id: int, hash_part: str) -> None:
    """The slice holds the path now (uploaded meanwhile)."""
    with transaction(conn):
        conn.execute(
            "DELETE FROM mirror_wants WHERE project_id = ? AND hash_part = ?",
            (project_id, hash_part),
        )


def wants(conn: Connection, project_id: int | None = None) -> list[Want]:
    where = "" if project_id is None else "WHERE project_id = ?"
    args: tuple[Any, ...] = () if project_id is None else (project_id,)
    rows = conn.execute(
        "SELECT project_id, hash_part, name, state, reason, attempts, updated "  # noqa: S608
        f"FROM mirror_wants {where} ORDER BY project_id, state, name, hash_part",
        args,
    ).fetchall()
    return [Want(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), float(r[6])) for r in rows]


def add_root(conn: Connection, project_id: int, hash_part: str, name: str) -> None:
    """Remember that this path's closure in the slice is to be completed (durable work)."""
    now = time.time()
    with transaction(conn):
        conn.execute(
            "INSERT INTO mirror_roots (project_id, hash_part, name, state, requested, updated, "
            "missing) VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT (project_id, hash_part) DO "
            "UPDATE SET state = excluded.state, requested = excluded.requested, "
            "updated = excluded.updated",
            (project_id, hash_part, name, PENDING, now, now),
        )


def finish_root(
    conn: Connection, project_id: int, hash_part: str, missing: int, *, retry: bool = False
) -> None:
    """A completion ended: complete, incomplete, or (``retry``) pending for a later try."""
    state = PENDING if retry and missing else COMPLETE if missing == 0 else INCOMPLETE
    with transaction(conn):
        conn.execute(
            "UPDATE mirror_roots SET state = ?, missing = ?, updated = ? "
            "WHERE project_id = ? AND hash_part = ?",
            (state, missing, time.time(), project_id, hash_part),
        )


def roots(
    conn: Connection,
    *,
    state: str | None = None,
    project_id: int | None = None,
    before: float | None = None,
) -> list[tuple[int, str, str, str, int]]:
    """``(project id, hash part, name, state, missing)`` of the roots, oldest first;
    ``before``: only those not updated since."""
    clauses: list[str] = []
    args: list[Any] = []
    if before is not None:
        clauses.append("updated < ?")
        args.append(before)
    if state is not None:
        clauses.append("state = ?")
        args.append(state)
    if project_id is not None:
        clauses.append("project_id = ?")
        args.append(project_id)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        "SELECT project_id, hash_part, name, state, missing FROM mirror_roots "  # noqa: S608
        f"{where} ORDER BY requested, project_id, hash_part",
        tuple(args),
    ).fetchall()
    return [(int(r[0]), r[1], r[2], r[3], int(r[4])) for r in rows]


def counts(conn: Connection) -> dict[int, dict[str, int]]:
    """Per project id: mirrored records held, roots by state, wants by state."""
    out: dict[int, dict[str, int]] = {}

    def add(pid: int, key: str, n: int) -> None:
        out.setdefault(pid, {}).setdefault(key, 0)
        out[pid][key] += n

    for pid, n in conn.execute(
        "SELECT m.project_id, count(*) FROM mirror_paths m JOIN slice_records s "
        "ON s.project_id = m.project_id AND s.hash_part = m.hash_part "
        "AND s.nar_hash = m.nar_hash GROUP BY m.project_id"
    ).fetchall():
        add(int(pid), "mirrored", int(n))
    for pid, state, n in conn.execute(
        "SELECT project_id, state, count(*) FROM mirror_roots GROUP BY project_id, state"
    ).fetchall():
        add(int(pid), f"roots_{state}", int(n))
    for pid, state, n in conn.execute(
        "SELECT project_id, state, count(*) FROM mirror_wants GROUP BY project_id, state"
    ).fetchall():
        add(int(pid), state, int(n))
    return out
