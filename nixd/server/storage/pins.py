"""Pins: GC roots an admin sets by hand (``nixd-server pin add|list|rm``).

A pin names a slice and a store path that slice holds. The garbage collector
(:mod:`nixd.server.storage.gc`) keeps the pinned record **and its whole closure** (its
References, transitively, as recorded in that slice, and in any slice for a reference the
slice itself does not hold), whatever the slice's retention says. A pin outlives its
record: if the path is removed anyway (its blob was lost) and uploaded again, it is
pinned again. Pins are per slice, like records: pinning ``acme/app``'s copy of a path
says nothing about ``acme/lib``'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nixd.errors import ConfigError, FormatError
from nixd.nix.storepath import HASH_LEN, StorePath
from nixd.server.storage.db import Connection, Project, transaction


@dataclass(frozen=True, slots=True)
class Pin:
    slice: str
    hash_part: str
    name: str
    pinned_by: str
    created: float
    note: str | None
    present: bool
    """Whether the slice still holds the path."""

    @property
    def path(self) -> str:
        return f"/nix/store/{self.hash_part}-{self.name}"


def parse_store_path(text: str) -> str:
    """The hash part of ``/nix/store/<hash>-<name>``, ``<hash>-<name>`` or ``<hash>``."""
    value = text.strip()
    if value.startswith("/"):
        try:
            return StorePath.parse(value).hash_part
        except FormatError as exc:
            raise ConfigError(f"{text!r}: not a store path: {exc}") from exc
    base = value if "-" in value else f"{value}-x"
    try:
        return StorePath.from_basename(base).hash_part
    except FormatError as exc:
        raise ConfigError(
            f"{text!r}: expected /nix/store/HASH-NAME, HASH-NAME or a {HASH_LEN}-character hash"
        ) from exc


def add_pin(
    conn: Connection, project: Project, hash_part: str, *, who: str, note: str | None = None
) -> Pin:
    """Pin a path the slice holds (again: the note and who are replaced); ConfigError if not."""
    now = time.time()
    with transaction(conn, durable=True):
        row = conn.execute(
            "SELECT name FROM slice_records WHERE project_id = ? AND hash_part = ?",
            (project.id, hash_part),
        ).fetchone()
        if row is None:
            raise ConfigError(f"{project.slice} holds no store path with hash {hash_part}")
        conn.execute(
            "INSERT INTO pins (project_id, hash_part, name, pinned_by, created, note) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (project_id, hash_part) DO UPDATE SET "
            "pinned_by = excluded.pinned_by, created = excluded.created, note = excluded.note",
            (project.id, hash_part, row[0], who, now, note),
        )
    return Pin(project.slice, hash_part, str(row[0]), who, now, note, True)


def remove_pin(conn: Connection, project: Project, hash_part: str) -> bool:
    """Unpin; False if it was not pinned. The path then lives by the slice's retention."""
    with transaction(conn, durable=True):
        cur = conn.execute(
            "DELETE FROM pins WHERE project_id = ? AND hash_part = ?", (project.id, hash_part)
        )
    return bool(cur.rowcount)


def list_pins(conn: Connection, project: Project | None = None) -> list[Pin]:
    """Every pin (of one slice), by slice and path name."""
    sql = (
        "SELECT o.name, pr.name, p.hash_part, p.name, p.pinned_by, p.created, p.note, "
        "(SELECT count(*) FROM slice_records s WHERE s.project_id = p.project_id "
        "AND s.hash_part = p.hash_part) "
        "FROM pins p JOIN projects pr ON pr.id = p.project_id JOIN orgs o ON o.id = pr.org_id"
    )
    params: tuple[int, ...] = ()
    if project is not None:
        sql += " WHERE p.project_id = ?"
        params = (project.id,)
    rows = conn.execute(sql + " ORDER BY o.name, pr.name, p.name, p.hash_part", params).fetchall()
    return [Pin(f"{r[0]}/{r[1]}", r[2], r[3], r[4], float(r[5]), r[6], bool(r[7])) for r in rows]
