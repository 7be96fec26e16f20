"""``nixd-server policy apply|show``: put a checked policy in force, and show what is.

On a single box the policy is ``policy.toml`` (``apply`` replaces it atomically; the server
reloads it on change); with the metadata on PostgreSQL it is the database's, shared by
every instance (:mod:`nixd.server.access.shared_policy`), and ``apply`` is the way to
change it. Either way a broken file is refused with its ``file:line`` and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nixd.server.access.shared_policy import PolicyTable, apply_policy
from nixd.server.storage.db import Connection, is_sqlite

OpenState = Callable[[argparse.Namespace], tuple[Any, Connection]]
Audit = Callable[..., None]


def register(
    policy: argparse._SubParsersAction[argparse.ArgumentParser],
    add_state: Callable[[argparse.ArgumentParser], None],
    open_state: OpenState,
    audit: Audit,
) -> None:
    """Add ``apply`` and ``show`` to the ``policy`` group."""

    def apply(args: argparse.Namespace) -> int:
        config, conn = open_state(args)
        try:
            source = Path(args.file) if args.file else config.policy_path
            rules, changed, digest = apply_policy(source, config.policy_path, conn)
            where = config.policy_path if is_sqlite(conn) else PolicyTable.where
        finally:
            conn.close()
        if changed:
            audit(config, "admin:policy.apply", "*", sha256=digest, rules=len(rules.rules))
        if args.json:
            print(json.dumps({"changed": changed, "sha256": digest, "rules": len(rules.rules),
                              "where": str(where)}))  # fmt: skip
        else:
            state = "now in force" if changed else "already in force"
            print(f"policy {state} ({where}): {len(rules.rules)} rules, sha256 {digest[:16]}")
        return 0

    def show(args: argparse.Namespace) -> int:
        config, conn = open_state(args)
        try:
            stored = None if is_sqlite(conn) else PolicyTable(conn).read()
        finally:
            conn.close()
        text = stored if stored is not None else config.policy_path.read_bytes()
        print(text.decode(), end="")
        return 0

    fmt = argparse.RawDescriptionHelpFormatter
    p = policy.add_parser(
        "apply",
        formatter_class=fmt,
        help="check a policy file and put it in force",
        description=textwrap.dedent(
            """\
            Check FILE (default: the config's policy.toml) and put it in force. On a single
            box it replaces policy.toml; with PostgreSQL metadata it becomes the policy every
            instance reads (within a second). A broken file is refused with file:line and
            nothing changes. Audited when it changes something.
            """
        ),
    )
    add_state(p)
    p.add_argument("file", nargs="?", metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=apply)
    p = policy.add_parser(
        "show",
        help="print the policy in force (the database's with PostgreSQL metadata)",
    )
    add_state(p)
    p.set_defaults(func=show)
