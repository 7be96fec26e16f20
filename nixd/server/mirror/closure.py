"""A slice's closure of a store path: what it holds of it, and what it lacks.

"Complete" is a property of one slice: every path the closure references, transitively,
is a record of that slice. (A unified view might serve a missing reference from another
slice, but a deployment from this slice must not depend on what another slice happens to
hold, or keep.) The walk is level by level, one indexed query per few hundred paths, so
checking a closure of thousands of paths costs a handful of queries.
"""

from __future__ import annotations

from nixd.server.storage.db import Project
from nixd.server.storage.pins import parse_store_path
from nixd.server.storage.store import Store

_BATCH = 400
MAX_CLOSURE = 1_000_000
"""Paths a walk follows at most (a bound on memory; real closures are far smaller)."""


def walk(
    store: Store, project: Project, hash_part: str, name: str = ""
) -> tuple[dict[str, str], dict[str, str]]:
    """``(held, missing)`` of the closure of ``hash_part`` in ``project``: hash part ->
    name. A missing path's references are unknown, so the walk stops there."""
    held: dict[str, str] = {}
    missing: dict[str, str] = {}
    level: dict[str, str] = {hash_part: name}
    while level and len(held) + len(missing) < MAX_CLOSURE:
        found: dict[str, tuple[str, str]] = {}
        parts = list(level)
        for i in range(0, len(parts), _BATCH):
            chunk = parts[i : i + _BATCH]
            marks = ", ".join("?" * len(chunk))
            rows = store.conn.execute(
                f"SELECT hash_part, name, refs FROM slice_records "  # noqa: S608 - placeholders
                f"WHERE project_id = ? AND hash_part IN ({marks})",
                (project.id, *chunk),
            ).fetchall()
            for hp, n, refs in rows:
                found[hp] = (n, refs or "")
        nxt: dict[str, str] = {}
        for hp, hint in level.items():
            if hp not in found:
                missing[hp] = hint
                continue
            n, refs = found[hp]
            held[hp] = n
            for ref in refs.split():
                rhp, _, rname = ref.partition("-")
                if rhp not in held and rhp not in missing and rhp not in level:
                    nxt[rhp] = rname
        level = {hp: n for hp, n in nxt.items() if hp not in held}
    return held, missing


def closure_missing(store: Store, project: Project, store_path: str) -> list[str]:
    """The store paths of ``store_path``'s closure that ``project`` does not hold, sorted;
    ``[]`` means complete. A path the slice does not hold at all is its own first miss.

    ``store_path`` is ``/nix/store/<hash>-<name>``, a basename, or a hash part.
    """
    hash_part = parse_store_path(store_path)
    name = store_path.rstrip("/").rsplit("/", 1)[-1].partition("-")[2]
    _, missing = walk(store, project, hash_part, name)
    return sorted(f"/nix/store/{hp}-{n}" if n else f"/nix/store/{hp}" for hp, n in missing.items())
