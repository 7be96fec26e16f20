"""The policy in force where it lives: ``policy.toml``, or the PostgreSQL database.

A single box (SQLite metadata) keeps its policy in the file the config names, reloaded on
change (:class:`~nixd.server.access.policy.PolicyHolder`). Several instances on one
PostgreSQL database share one policy: the document (the same TOML) is the one row of the
``policies`` table, and each instance's holder reads it every second, so a policy applied
through any host is in force on every instance within a second — a deny included. An
instance never takes its policy from ``policy.toml`` then, except once: when the
database has none yet (a fresh database, or a single box moved with ``migrate
--copy-from``), the file's policy is checked and copied in. After that an edited file
changes nothing by itself (a WARNING says so at start, and on each edit while the server
runs); ``nixd-server policy apply`` checks a file and puts it in force, on either kind of
server.

Why not keep a file on every host: an operator who tightens the policy must not depend on
every host's copy being replaced before the next request, and a policy that differs by
host answers the same caller differently behind a load balancer.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from nixd.errors import ConfigError
from nixd.server.access.keys import write_atomically
from nixd.server.access.policy import (
    Policy,
    PolicyHolder,
    load_policy,
    parse_policy_bytes,
    read_policy_file,
)
from nixd.server.storage.db import Connection, ensure_schema, is_sqlite, transaction

log = logging.getLogger(__name__)

MIGRATIONS = [
    # 1: the policy document in force, its version (bumped on each change) and when
    """
    CREATE TABLE policies (
        name TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        version INTEGER NOT NULL,
        changed REAL NOT NULL
    );
    """,
]
"""The ``policy`` component's schema; used only when the metadata is on PostgreSQL."""

MAX_POLICY_BYTES = 4 << 20
"""A policy bigger than this is refused before it is parsed or stored."""

_NAME = "policy"


class PolicyTable:
    """The shared policy: one row of ``policies`` in the metadata database."""

    where = "the database's policy"

    def __init__(self, conn: Connection) -> None:
        ensure_schema(conn, component="policy", migrations=MIGRATIONS)
        self.conn = conn

    def read(self) -> bytes | None:
        row = self.conn.execute("SELECT body FROM policies WHERE name = ?", (_NAME,)).fetchone()
        return None if row is None else str(row[0]).encode()

    def store(self, data: bytes, *, only_if_absent: bool = False) -> bool:
        """Put ``data`` (already checked) in force; True if the stored policy changed."""
        with transaction(self.conn, durable=True):
            old = self.read()
            if old == data or (only_if_absent and old is not None):
                return False
            self.conn.execute(
                "INSERT INTO policies (name, body, version, changed) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (name) DO UPDATE SET body = excluded.body, "
                "version = policies.version + 1, changed = excluded.changed",
                (_NAME, data.decode(), time.time()),
            )
        return True


def _checked(data: bytes, where: str) -> Policy:
    if len(data) > MAX_POLICY_BYTES:
        raise ConfigError(f"{where}: {len(data)} bytes is too big for a policy")
    return parse_policy_bytes(data, where)


def open_policy(path: Path, conn: Connection) -> PolicyHolder:
    """The server's holder: of ``path`` on SQLite, of the database's row on PostgreSQL.

    On PostgreSQL a database without a policy gets the file's first (checked; a broken
    file stops the start with its ``file:line``); a file that differs from the policy in
    force is only warned about.
    """
    if is_sqlite(conn):
        return PolicyHolder(path)
    table = PolicyTable(conn)
    stored = table.read()
    if stored is None:
        data = read_policy_file(path)
        _checked(data, str(path))
        if table.store(data, only_if_absent=True):
            log.warning(
                "copied the policy of %s into the database, where every instance reads it "
                "from now on: change it with `nixd-server policy apply`",
                path,
            )
    else:
        try:
            differs = path.read_bytes() != stored
        except OSError:
            differs = False  # no file on this host: nothing to warn about
        if differs:
            log.warning(
                "%s differs from the policy in force (the database's): it is not read; "
                "`nixd-server policy apply` puts a file in force",
                path,
            )
    return PolicyHolder(path, source=table)


def policy_in_force(path: Path, conn: Connection) -> tuple[Policy, str]:
    """The policy an instance would decide with now, and where it is kept."""
    if is_sqlite(conn):
        return load_policy(path), str(path)
    stored = PolicyTable(conn).read()
    if stored is None:
        return load_policy(path), str(path)  # copied in by the first instance to start
    return _checked(stored, PolicyTable.where), PolicyTable.where


def apply_policy(source: Path, path: Path, conn: Connection) -> tuple[Policy, bool, str]:
    """Check the file ``source`` and put it in force; ``(policy, changed, sha256)``.

    On PostgreSQL it becomes the database's policy (every instance within a second); on
    SQLite it replaces ``path`` atomically (the server reloads it on change). Nothing
    changes if it is broken.
    """
    data = read_policy_file(source)
    policy = _checked(data, str(source))
    digest = hashlib.sha256(data).hexdigest()
    if not is_sqlite(conn):
        return policy, PolicyTable(conn).store(data), digest
    if source.resolve() == path.resolve():
        return policy, False, digest  # checked in place: the server reads it already
    try:
        old = path.read_bytes()
    except OSError:
        old = None
    if old == data:
        return policy, False, digest
    write_atomically(path, data)
    return policy, True, digest
