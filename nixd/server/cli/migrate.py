"""``nixd-server migrate STATE_DIR``: bring the metadata database's schema up to date.

Every component's migrations (core, store, accounts, device, throttle, web) in the order
their tables refer to each other, each in one transaction under the write lock, so two
processes migrating at once apply each migration exactly once. ``serve`` and the admin
commands apply them too when they open the database; this command is for doing it
before starting instances (several servers on one PostgreSQL), and for checking.
A database newer than this nixd-server is refused, naming both versions.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

from nixd.server.config import ServerConfig
from nixd.server.login import accounts, device, throttle, web
from nixd.server.storage import db, store
from nixd.server.storage.db import Connection, Migration, ensure_schema, open_db, schema_version

COMPONENTS: list[tuple[str, Sequence[Migration]]] = [
    ("core", db.MIGRATIONS),
    ("store", store.STORE_MIGRATIONS),
    ("accounts", accounts.MIGRATIONS),
    ("device", device.MIGRATIONS),
    ("throttle", throttle.MIGRATIONS),
    ("web", web.MIGRATIONS),
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


def cmd_migrate(args: argparse.Namespace) -> int:
    config = ServerConfig.load(args.state_dir)
    conn = open_db(config.database, migrate=False)
    try:
        done = migrate(conn)
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
    p.set_defaults(func=cmd_migrate)
