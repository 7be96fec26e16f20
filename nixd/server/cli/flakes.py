"""``nixd-server flake list|show``: the published flakes and their releases, for an admin.

Read-only and local (the state directory's database, no policy): what the server holds,
whoever may read it. Publishing happens only through ``PUT /api/v1/flakes/...`` from CI
(:mod:`nixd.server.http.flakes`); a release is never changed or removed here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from nixd.errors import ConfigError
from nixd.server.config import ServerConfig
from nixd.server.flakes.releases import FlakeStore
from nixd.server.storage.blobs import open_blob_store
from nixd.server.storage.db import Connection, split_slice


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_state: Callable[[argparse.ArgumentParser], None],
    open_state: Callable[[argparse.Namespace], tuple[ServerConfig, Connection]],
) -> None:
    """``nixd-server flake list [ORG]`` and ``flake show ORG/NAME``."""
    group = sub.add_parser("flake", help="published flakes (read-only)").add_subparsers(
        dest="flake_command", metavar="ACTION", required=True
    )

    def store(args: argparse.Namespace) -> tuple[FlakeStore, Connection]:
        config, conn = open_state(args)
        return FlakeStore.open(conn, open_blob_store(config)), conn

    def list_flakes(args: argparse.Namespace) -> int:
        flakes, conn = store(args)
        try:
            rows: list[dict[str, Any]] = []
            for flake in flakes.flakes(args.org):
                releases = flakes.releases(flake)
                rows.append(
                    {
                        "flake": flake.resource,
                        "visibility": flake.visibility,
                        "latest": releases[0].version if releases else None,
                        "releases": len(releases),
                        "description": flake.description,
                    }
                )
        finally:
            conn.close()
        if args.json:
            print(json.dumps(rows))
            return 0
        for row in rows:
            print(
                f"{row['flake']:<32} {row['visibility']:<8} {row['latest'] or '-':<16} "
                f"{row['releases']:>4} release(s)  {row['description']}"
            )
        return 0

    def show(args: argparse.Namespace) -> int:
        org, name = split_slice(args.flake)
        flakes, conn = store(args)
        try:
            flake = flakes.flake(org, name)
            if flake is None:
                raise ConfigError(f"no flake {args.flake}")
            releases = flakes.releases(flake)
        finally:
            conn.close()
        if args.json:
            print(
                json.dumps(
                    {
                        "flake": flake.resource,
                        "visibility": flake.visibility,
                        "description": flake.description,
                        "releases": [
                            {
                                "version": r.version,
                                "store_path": f"/nix/store/{r.store_path}",
                                "nar_hash": r.nar_hash,
                                "commit": r.commit,
                                "ref": r.ref,
                                "published_by": r.published_by,
                                "published_at": r.published_at,
                            }
                            for r in releases
                        ],
                    }
                )
            )
            return 0
        print(f"{flake.resource} ({flake.visibility}): {flake.description}")
        for r in releases:
            print(f"  {r.version:<20} /nix/store/{r.store_path}  {r.commit[:12]}  {r.published_by}")
        return 0

    p = group.add_parser("list", help="the flakes, with their latest version")
    add_state(p)
    p.add_argument("org", metavar="ORG", nargs="?", help="only this organization's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_flakes)
    p = group.add_parser("show", help="one flake's releases, newest first")
    add_state(p)
    p.add_argument("flake", metavar="ORG/NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=show)
