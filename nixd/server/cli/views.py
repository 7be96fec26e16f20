"""``nixd-server org trust|view`` and ``project priority``: the order of a unified view.

An organization's view (``/cache/<org>/``, and ``/cache/`` for its own members) asks its own
slices first, lower priority first, then the other organizations' slices it trusts, in the
order given to ``org trust``; see :mod:`nixd.server.http.app`. These commands set that
order and show it, so an admin never has to guess which slice answers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from nixd.errors import ConfigError
from nixd.server.storage.db import (
    Connection,
    get_org,
    list_projects,
    org_trust,
    set_org_trust,
    set_project_priority,
    split_slice,
)

OpenState = Callable[[argparse.Namespace], tuple[Any, Connection]]
Audit = Callable[..., None]


def view_order(conn: Connection, org: str) -> list[dict[str, Any]]:
    """The slices ``org``'s view asks, in order (before each reader's own permissions)."""
    if get_org(conn, org) is None:
        raise ConfigError(f"organization {org!r} does not exist")
    own = sorted(list_projects(conn, org), key=lambda p: (p.priority, p.name))
    rows = [
        {"slice": p.slice, "why": "own", "priority": p.priority, "public": p.public} for p in own
    ]
    rows += [
        {"slice": p.slice, "why": f"trusted #{i + 1}", "priority": p.priority, "public": p.public}
        for i, p in enumerate(org_trust(conn, org))
    ]
    return rows


def register(
    org: argparse._SubParsersAction[argparse.ArgumentParser],
    project: argparse._SubParsersAction[argparse.ArgumentParser],
    add_state: Callable[[argparse.ArgumentParser], None],
    open_state: OpenState,
    audit: Audit,
) -> None:
    """Add the commands to the ``org`` and ``project`` groups."""

    def trust(args: argparse.Namespace) -> int:
        config, conn = open_state(args)
        try:
            if args.slices or args.none:
                trusted = set_org_trust(conn, args.org, [] if args.none else args.slices)
                audit(
                    config,
                    "admin:org.trust",
                    f"{args.org}/*",
                    trusted=",".join(p.slice for p in trusted),
                )
            else:
                trusted = org_trust(conn, args.org)
        finally:
            conn.close()
        for p in trusted:
            print(p.slice)
        if not trusted:
            print(f"{args.org} trusts no other organization's slices")
        return 0

    def view(args: argparse.Namespace) -> int:
        _, conn = open_state(args)
        try:
            rows = view_order(conn, args.org)
        finally:
            conn.close()
        if args.json:
            print(json.dumps({"org": args.org, "order": rows}))
            return 0
        print(f"/cache/{args.org}/ (and /cache/ for {args.org}'s members) asks, in order:")
        for n, row in enumerate(rows, 1):
            flag = " public" if row["public"] else ""
            print(f"  {n}. {row['slice']}\t{row['why']}, priority {row['priority']}{flag}")
        print(
            "  then slices of other organizations granted to the reader by an explicit "
            "policy rule (never ones that are only public)"
        )
        return 0

    def priority(args: argparse.Namespace) -> int:
        org_name, name = split_slice(args.project)
        config, conn = open_state(args)
        try:
            found = set_project_priority(conn, org_name, name, args.priority)
        finally:
            conn.close()
        audit(config, "admin:project.priority", found.slice, priority=str(found.priority))
        print(f"{found.slice}: priority {found.priority}")
        return 0

    p = org.add_parser(
        "trust",
        help="set or show the other organizations' slices ORG's view asks after its own",
        description="With SLICE arguments, replace ORG's trust list with them (asked in "
        "that order, after ORG's own slices); with --none, empty it; with neither, show it. "
        "Another organization's slice is never asked only because it is public.",
    )
    add_state(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("slices", nargs="*", metavar="OTHER/PROJECT")
    p.add_argument("--none", action="store_true", help="trust no other organization's slice")
    p.set_defaults(func=trust)
    p = org.add_parser("view", help="show the order in which ORG's unified view asks slices")
    add_state(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=view)
    p = project.add_parser(
        "priority",
        help="set a slice's place in its organization's view (lower is asked first)",
        description="Slices of one organization are asked by priority (default 100), then "
        "the record uploaded first answers.",
    )
    add_state(p)
    p.add_argument("project", metavar="ORG/PROJECT")
    p.add_argument("priority", type=int, metavar="N")
    p.set_defaults(func=priority)
