"""``nixd-server migrate STATE_DIR``: bring the metadata database's schema up to date.

Every component's migrations (core, store, accounts, device, throttle, web, keys, policy,
flakes, audit, whose tables exist on PostgreSQL only, and mirror) in the order their tables
refer to each other, each in one transaction under the write lock, so two processes
migrating at once apply each migration exactly once. ``serve`` and the admin commands
apply them too when they open the database; this command is for doing it before starting
instances (several servers on one PostgreSQL), and for checking.
A database newer than this nixd-server is refused, naming both versions.

``--copy-from OLD.db`` moves a single-box server to PostgreSQL: the configured (empty)
PostgreSQL database is migrated, then every row of the SQLite file (itself migrated to
the same versions first) is copied in one transaction, and the identity counters are
moved past the copied ids. Blobs stay where ``[storage] blobs`` points.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from nixd.errors import ConfigError
from nixd.server.access import audit_db, keys, shared_policy
from nixd.server.config import ServerConfig
from nixd.server.flakes import releases
from nixd.server.login import accounts, device, throttle, web
from nixd.server.mirror import records as mirror_records
from nixd.server.storage import db, store
from nixd.server.storage.db import (
    Connection,
    Migration,
    ensure_schema,
    is_sqlite,
    open_db,
    schema_version,
    transaction,
)

COMPONENTS: list[tuple[str, Sequence[Migration]]] = [
    ("core", db.MIGRATIONS),
    ("store", store.STORE_MIGRATIONS),
    ("accounts", accounts.MIGRATIONS),
    ("device", device.MIGRATIONS),
    ("throttle", throttle.MIGRATIONS),
    ("web", web.MIGRATIONS),
    ("keys", keys.MIGRATIONS),
    ("policy", shared_policy.MIGRATIONS),
    (releases.COMPONENT, releases.MIGRATIONS),
    ("audit", audit_db.MIGRATIONS),
    ("mirror", mirror_records.MIGRATIONS),
]
"""Every component with a schema, in dependency order (device refers to accounts)."""


def migrate(conn: Connection) -> list[tuple[str, int, int]]:
    """Apply every missing migration; ``(component, version before, version now)`` each."""
    done = []
    for component, migrations in COMPONENTS:
        before = schema_version(conn, component)
        after = ensure_schema(conn, component=component, migrations=migrations)
        done.append((component, before, after))
    return done


COPY_ORDER = [
    "orgs",
    "projects",
    "org_trust",
    "credentials",
    "key_changes",
    "nars",
    "upload_aliases",
    "slice_records",
    "pins",
    *mirror_records.TABLES,
    "logs",
    "accounts",
    "device_codes",
    "refresh_credentials",
    "throttle",
    "web_sessions",
    "web_keys",
    "keyrings",
    "policies",
    "flakes",
    "flake_releases",
]
"""Every table with rows worth keeping, parents before children."""
IDENTITIES = ("orgs", "projects", "accounts")


def copy_sqlite(source: Path, target: Connection) -> dict[str, int]:
    """Copy every row of the SQLite database ``source`` into the empty ``target``.

    Both are migrated to this nixd-server's versions first. ConfigError if ``target``
    already has organizations, or if ``source`` has a table this copy does not know
    (a newer component's: nothing would be silently left behind).
    """
    if not source.is_file():
        raise ConfigError(f"{source}: no such SQLite database")
    if is_sqlite(target):
        raise ConfigError("--copy-from copies into PostgreSQL: set [storage] database first")
    old = open_db(source, migrate=False)
    assert isinstance(old, sqlite3.Connection)  # a path, not a URL
    try:
        migrate(old)
        migrate(target)
        tables = {
            str(r[0])
            for r in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not str(r[0]).startswith("sqlite_") and r[0] != "schema_versions"
        }
        unknown = tables - set(COPY_ORDER)
        if unknown:
            raise ConfigError(f"{source}: tables {sorted(unknown)} are not known to the copy")
        if target.execute("SELECT count(*) FROM orgs").fetchone()[0]:
            raise ConfigError("the PostgreSQL database already has organizations: not empty")
        copied: dict[str, int] = {}
        with transaction(target, durable=True):
            for table in COPY_ORDER:
                cur = old.execute(f"SELECT * FROM {table}")  # noqa: S608 - fixed names
                columns = [d[0] for d in cur.description]
                insert = (
                    f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608
                    f"VALUES ({', '.join('?' * len(columns))})"
                )
                rows = cur.fetchall()
                for row in rows:
                    target.execute(insert, row)
                copied[table] = len(rows)
            for table in IDENTITIES:
                target.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608
                    f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
                )
    finally:
        old.close()
    return copied


def cmd_migrate(args: argparse.Namespace) -> int:
    config = ServerConfig.load(args.state_dir)
    conn = open_db(config.database, migrate=False)
    try:
        done = migrate(conn)
        if args.copy_from:
            copied = copy_sqlite(Path(args.copy_from), conn)
            print(f"copied {sum(copied.values())} rows from {args.copy_from}")
            for table, count in copied.items():
                print(f"  {table:<20} {count}")
    finally:
        conn.close()
    if args.json:
        print(json.dumps({c: {"from": b, "to": a} for c, b, a in done}))
        return 0
    for component, before, after in done:
        state = "up to date" if before == after else f"migrated from {before}"
        print(f"{component:<9} version {after} ({state})")
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_state: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "migrate",
        help="apply the metadata database's schema migrations (SQLite or PostgreSQL)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    add_state(p)
    p.add_argument("--json", action="store_true", help="versions as JSON")
    p.add_argument(
        "--copy-from",
        metavar="OLD.db",
        help="copy every row of this SQLite database into the (empty) PostgreSQL one",
    )
    p.set_defaults(func=cmd_migrate)
