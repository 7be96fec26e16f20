"""``nixd-server mirror status|complete|verify``: closures completed from upstream caches.

Each [[mirror]] in config.toml names an upstream binary cache, the keys its paths must be
signed with and the slices that may use it; after each upload to such a slice the
server fetches, in the background, what the slice lacks of the path's closure. "status"
shows per slice what is mirrored, which closures are pending, complete or incomplete,
and every path no upstream gave (missing, or failed with why); "complete" runs a
completion now, in this process, printing each path as it comes; "verify" re-checks
every mirrored path's upstream signature and stored NAR. "complete" is audited.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import trio

from nixd.errors import ConfigError
from nixd.server.mirror import records
from nixd.server.mirror.service import MirrorService, verify_mirrored
from nixd.server.storage import pins
from nixd.server.storage.blobs import open_blob_store
from nixd.server.storage.db import Connection, Project, get_project, list_projects, split_slice
from nixd.server.storage.store import Store

OpenState = Callable[[argparse.Namespace], tuple[Any, Connection]]
Audit = Callable[..., None]


def _project_of(conn: Connection, text: str) -> Project:
    org, name = split_slice(text)
    project = get_project(conn, org, name)
    if project is None:
        raise ConfigError(f"project {text} does not exist")
    return project


def status_of(conn: Connection, project: Project | None = None) -> list[dict[str, Any]]:
    """Per slice: mirrored paths held, roots by state, and each want with its reason."""
    records.ensure(conn)
    projects = [project] if project else list_projects(conn)
    counts = records.counts(conn)
    by_project: dict[int, list[records.Want]] = {}
    for w in records.wants(conn, project.id if project else None):
        by_project.setdefault(w.project_id, []).append(w)
    out = []
    for p in projects:
        c = counts.get(p.id, {})
        ws = by_project.get(p.id, [])
        if not c and not ws and project is None:
            continue
        out.append(
            {
                "slice": p.slice,
                "mirrored": c.get("mirrored", 0),
                "roots": {
                    s: c.get(f"roots_{s}", 0)
                    for s in (records.PENDING, records.COMPLETE, records.INCOMPLETE)
                },
                "missing": [_want(w) for w in ws if w.state == records.MISSING],
                "failures": [_want(w) for w in ws if w.state == records.FAILED],
            }
        )
    return out


def _want(w: records.Want) -> dict[str, Any]:
    return {"path": w.path, "reason": w.reason, "attempts": w.attempts, "updated": w.updated}


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_state: Callable[[argparse.ArgumentParser], None],
    open_state: OpenState,
    audit: Audit,
) -> None:
    """Add the ``mirror`` group."""

    def status(args: argparse.Namespace) -> int:
        _, conn = open_state(args)
        try:
            project = _project_of(conn, args.slice) if args.slice else None
            found = status_of(conn, project)
        finally:
            conn.close()
        if args.json:
            print(json.dumps(found))
            return 0
        if not found:
            print("nothing mirrored, nothing pending")
        for s in found:
            r = s["roots"]
            print(
                f"{s['slice']}: {s['mirrored']} path(s) mirrored; closures: {r['pending']} "
                f"pending, {r['complete']} complete, {r['incomplete']} incomplete; "
                f"{len(s['missing'])} missing, {len(s['failures'])} failed"
            )
            for w in s["missing"]:
                print(f"  missing  {w['path']}: {w['reason']}")
            for w in s["failures"]:
                print(f"  failed   {w['path']}: {w['reason']}")
        return 0

    def complete(args: argparse.Namespace) -> int:
        config, conn = open_state(args)
        try:
            project = _project_of(conn, args.slice)
            if not any(m.serves(project.slice) for m in config.mirror):
                raise ConfigError(
                    f"no [[mirror]] lists {project.slice} in its slices: nothing to fetch from"
                )
            hash_part = pins.parse_store_path(args.path)
            name = args.path.rstrip("/").rsplit("/", 1)[-1].partition("-")[2]
            store = Store(conn, open_blob_store(config))
            mirror = MirrorService(
                config.mirror, store, max_nar_size=config.storage.max_upload_bytes
            )
            records.add_root(conn, project.id, hash_part, name)

            def progress(what: str, path: str) -> None:
                if not args.quiet:
                    print(f"{what:<8} {path}", flush=True)

            async def run() -> Any:
                try:
                    return await mirror.complete(
                        project, hash_part, name, deep=True, progress=progress
                    )
                finally:
                    await mirror.aclose()

            result = trio.run(run)
        finally:
            conn.close()
        audit(
            config,
            "admin:mirror.complete",
            project.slice,
            object=args.path,
            fetched=result.fetched,
            missing=len(result.missing),
        )
        print(
            f"{project.slice}: fetched {result.fetched} path(s); "
            + (
                "the closure is complete"
                if not result.missing
                else f"{len(result.missing)} path(s) still missing (see `mirror status`)"
            )
        )
        return 0 if not result.missing else 1

    def verify(args: argparse.Namespace) -> int:
        config, conn = open_state(args)
        try:
            records.ensure(conn)
            project = _project_of(conn, args.slice) if args.slice else None
            store = Store(conn, open_blob_store(config))
            found = list(verify_mirrored(store, config.mirror, project=project))
        finally:
            conn.close()
        bad = [v for v in found if not v.ok]
        if args.json:
            print(json.dumps({"checked": len(found), "bad": [v.to_json() for v in bad]}))
        else:
            for v in bad:
                print(
                    f"{v.slice}\t{v.path}\t{v.upstream}\tsignature: {v.signature}\tNAR: {v.nar}",
                    file=sys.stderr,
                )
            print(f"checked {len(found)} mirrored path(s): {len(bad)} bad")
        return 1 if bad else 0

    group = sub.add_parser(
        "mirror",
        help="closures completed from upstream caches ([[mirror]])",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    ).add_subparsers(dest="mirror_command", metavar="ACTION", required=True)
    p = group.add_parser(
        "status",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="what is mirrored, pending, missing or failed, per slice",
        description=textwrap.dedent(
            """\
            Per slice: how many records came from an upstream, how many closures wait for
            completion, are complete or incomplete, and every path of a closure that no
            upstream gave: "missing" (each upstream answered it does not have it) or
            "failed" (an upstream's answer failed a check, or it did not answer), with
            the reasons. `mirror complete` retries them.
            """
        ),
    )
    add_state(p)
    p.add_argument("slice", nargs="?", metavar="ORG/PROJECT", help="only this slice")
    p.add_argument("--json", action="store_true", help="the status as JSON")
    p.set_defaults(func=status)

    p = group.add_parser(
        "complete",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="complete a closure in a slice now, printing each path fetched",
        description=textwrap.dedent(
            """\
            Walk the closure of STORE_PATH in ORG/PROJECT and fetch every path the slice
            does not hold from the upstreams the slice may use (by priority), verified
            like an upload, recursively. Exits 0 when the closure is complete, 1 when
            paths are still missing (listed by `mirror status`). The server may run
            meanwhile; the work is shared through the database.
            """
        ),
    )
    add_state(p)
    p.add_argument("slice", metavar="ORG/PROJECT")
    p.add_argument("path", metavar="STORE_PATH", help="/nix/store/HASH-NAME, HASH-NAME or HASH")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.set_defaults(func=complete)

    p = group.add_parser(
        "verify",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="re-check mirrored paths' upstream signatures and stored NARs",
        description=textwrap.dedent(
            """\
            For every mirrored record still held: an upstream Sig it was fetched with
            must verify with the keys now configured for that [[mirror]] (a mirror
            removed from the config, or a key dropped, fails its paths), and the stored
            NAR must decompress to the recorded NarHash and NarSize. Reads every mirrored
            blob. Exits 1 if any path fails.
            """
        ),
    )
    add_state(p)
    p.add_argument("slice", nargs="?", metavar="ORG/PROJECT", help="only this slice")
    p.add_argument("--json", action="store_true", help="the findings as JSON")
    p.set_defaults(func=verify)
