"""``nixd-server gc`` and ``pin add|list|rm``: retention, roots and the sweep, by hand.

The model is :mod:`nixd.server.storage.gc`'s (what is kept, what a release is, why an
upload in flight is safe); pins are :mod:`nixd.server.storage.pins`'. Every pin change
and every GC run (a dry run too, marked so) is written to the audit log.
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from collections.abc import Callable
from typing import Any

from nixd.errors import ConfigError
from nixd.server.storage import pins
from nixd.server.storage.blobs import open_blob_store
from nixd.server.storage.db import Connection, get_project, split_slice
from nixd.server.storage.gc import closure_size, collect
from nixd.server.storage.store import Store

OpenState = Callable[[argparse.Namespace], tuple[Any, Connection]]
Audit = Callable[..., None]
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_grace(text: str) -> float:
    """``0``, ``90``, ``15m``, ``12h``, ``1d`` into seconds (0 allowed: tests, offline)."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"--grace {text!r}: use a number of seconds, or with s, m, h, d or w")
    return float(m.group(1)) * _UNITS[m.group(2)]


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_state: Callable[[argparse.ArgumentParser], None],
    open_state: OpenState,
    audit: Audit,
    admin_name: Callable[[], str],
) -> None:
    """Add ``gc`` and the ``pin`` group."""

    def project_of(conn: Connection, text: str) -> Any:
        org, name = split_slice(text)
        project = get_project(conn, org, name)
        if project is None:
            raise ConfigError(f"project {text} does not exist")
        return project

    def gc(args: argparse.Namespace) -> int:
        config, conn = open_state(args)
        try:
            grace = parse_grace(args.grace) if args.grace is not None else config.gc.grace
            store = Store(conn, open_blob_store(config))
            if args.slice:
                project_of(conn, args.slice)
            report = collect(
                store,
                config.retention,
                grace=grace,
                dry_run=args.dry_run,
                slice_name=args.slice,
                access_flush=config.gc.access_flush,
            )
        finally:
            conn.close()
        audit(  # a dry run too: someone looked at what would go
            config,
            "admin:gc",
            args.slice or "*",
            dry_run=args.dry_run,
            paths=report.paths_removed,
            nars=len(report.nars),
            orphans=len(report.orphan_blobs),
            missing=len(report.missing_blobs),
            bytes=report.bytes_freed,
        )
        print(json.dumps(report.to_json()) if args.json else report.describe())
        return 0

    def pin_add(args: argparse.Namespace) -> int:
        config, conn = open_state(args)
        try:
            project = project_of(conn, args.project)
            pin = pins.add_pin(
                conn,
                project,
                pins.parse_store_path(args.path),
                who=admin_name(),
                note=args.note,
            )
            count, size = closure_size(
                Store(conn, open_blob_store(config)), project.id, pin.hash_part
            )
        finally:
            conn.close()
        audit(config, "admin:pin.add", pin.slice, object=pin.path, note=pin.note or "")
        print(
            f"pinned {pin.path} in {pin.slice}: it and its closure are kept "
            f"({count} path(s), {size} bytes of NARs)"
        )
        return 0

    def pin_rm(args: argparse.Namespace) -> int:
        config, conn = open_state(args)
        try:
            project = project_of(conn, args.project)
            hash_part = pins.parse_store_path(args.path)
            if not pins.remove_pin(conn, project, hash_part):
                raise ConfigError(f"{project.slice} has no pin on {args.path}")
        finally:
            conn.close()
        audit(config, "admin:pin.rm", project.slice, object=hash_part)
        print(f"unpinned {args.path} in {project.slice}")
        return 0

    def pin_list(args: argparse.Namespace) -> int:
        _, conn = open_state(args)
        try:
            project = project_of(conn, args.project) if args.project else None
            found = pins.list_pins(conn, project)
        finally:
            conn.close()
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "slice": p.slice,
                            "path": p.path,
                            "pinned_by": p.pinned_by,
                            "created": p.created,
                            "note": p.note,
                            "present": p.present,
                        }
                        for p in found
                    ]
                )
            )
            return 0
        for p in found:
            gone = "" if p.present else "  (not in the slice any more)"
            note = f"  {p.note}" if p.note else ""
            print(f"{p.slice}\t{p.path}\t{p.pinned_by}{note}{gone}")
        return 0

    p = sub.add_parser(
        "gc",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="remove what no pin or retention rule keeps; --dry-run says what would go",
        description=textwrap.dedent(
            """\
            Mark every pinned closure, every record younger than the grace period and
            what each slice's [[retention]] keeps (the default: everything), then remove
            the rest: records, NARs no record uses, upload aliases older than the grace
            period, blobs without a NAR row older than it (orphans) and records whose
            blob is missing. Safe while the server runs; a download in flight completes.
            """
        ),
    )
    add_state(p)
    p.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--slice", metavar="ORG/PROJECT", help="remove records of this slice only")
    p.add_argument(
        "--grace", metavar="DURATION", help="override [gc] grace (e.g. 1d, 6h, 0 when offline)"
    )
    p.set_defaults(func=gc)

    group = sub.add_parser("pin", help="pins: paths kept with their closure").add_subparsers(
        dest="pin_command", metavar="ACTION", required=True
    )
    p = group.add_parser("add", help="keep a store path of a slice and its whole closure")
    add_state(p)
    p.add_argument("project", metavar="ORG/PROJECT")
    p.add_argument("path", metavar="STORE_PATH", help="/nix/store/HASH-NAME, HASH-NAME or HASH")
    p.add_argument("--note", help="why (shown by pin list)")
    p.set_defaults(func=pin_add)
    p = group.add_parser("list", help="list pins")
    add_state(p)
    p.add_argument("project", nargs="?", metavar="ORG/PROJECT", help="only this slice's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=pin_list)
    p = group.add_parser("rm", help="remove a pin (the path then lives by retention)")
    add_state(p)
    p.add_argument("project", metavar="ORG/PROJECT")
    p.add_argument("path", metavar="STORE_PATH")
    p.set_defaults(func=pin_rm)
