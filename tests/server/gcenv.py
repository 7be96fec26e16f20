"""Building slices with reference graphs for the GC tests: real NARs through the real store."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from nixd.nix import base32
from nixd.nix.nar import dump
from nixd.server.storage.db import Connection, Project, transaction
from nixd.server.storage.store import Nar, PathInfo, Store

DAY = 86400.0


def hash_of(label: str) -> str:
    """A valid store path hash part, derived from a label (stable across runs)."""
    return base32.encode(hashlib.sha256(label.encode()).digest()[:20])


def nar(store: Store, tmp: Path, project: Project, content: bytes) -> Nar:
    """Ingest a one-file NAR of ``content`` through the store, as an upload does."""
    tree = tmp / f"tree-{hashlib.sha256(content).hexdigest()[:16]}"
    tree.mkdir(parents=True, exist_ok=True)
    (tree / "f").write_bytes(content)
    ingest = store.begin_nar("none", max_nar_size=1 << 30, checker=None)
    ingest.feed(b"".join(dump(tree / "f")))
    return store.commit_nar(ingest, ingest.finish(), project, f"nar/{tree.name}.nar")


def put(
    store: Store,
    tmp: Path,
    project: Project,
    label: str,
    refs: tuple[str, ...] = (),
    *,
    age_days: float = 0.0,
    content: bytes | None = None,
    shared: Nar | None = None,
) -> PathInfo:
    """A record ``label`` in ``project`` referencing the labels ``refs``, uploaded
    ``age_days`` ago (its NAR and upload alias made as old too)."""
    body = content if content is not None else f"contents of {label}".encode()
    stored = shared or nar(store, tmp, project, body)
    info = PathInfo(
        hash_of(label),
        label,
        stored,
        tuple(sorted(f"{hash_of(r)}-{r}" for r in refs)),
        None,
        "x86_64-linux",
        None,
        uploader="token:acme/test",
    )
    store.add_path(project, info)
    if age_days:
        age(store.conn, project, label, age_days, nar_hash=stored.nar_hash)
    return info


def age(
    conn: Connection, project: Project, label: str, days: float, *, nar_hash: str | None = None
) -> None:
    """Make a record (and its NAR row and aliases) look ``days`` old."""
    when = time.time() - days * DAY
    with transaction(conn):
        conn.execute(
            "UPDATE slice_records SET created = ? WHERE project_id = ? AND hash_part = ?",
            (when, project.id, hash_of(label)),
        )
        if nar_hash is not None:
            conn.execute(
                "UPDATE nars SET created = ? WHERE nar_hash = ? AND created > ?",
                (when, nar_hash, when),
            )
            conn.execute(
                "UPDATE upload_aliases SET created = ? WHERE nar_hash = ? AND created > ?",
                (when, nar_hash, when),
            )


def labels(store: Store, project: Project) -> set[str]:
    rows = store.conn.execute(
        "SELECT name FROM slice_records WHERE project_id = ?", (project.id,)
    ).fetchall()
    return {str(r[0]) for r in rows}
