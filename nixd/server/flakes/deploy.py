"""Closures of recorded outputs, in the deploy view of a flake's organization.

A release records output store paths (``nixd publish --include-output``); deploying one
means substituting its whole closure. The **deploy view** of organization O is what a
deploy fetches from: O's own slices (private ones included: O's admin granted the
deploy), by priority, then the record that came first, then name; then the public
slices of other organizations that O trusts (``nixd-server org trust``), in trust order.
A private slice of another organization is never in it, trusted or not: its owner granted
nothing. The first record there of each path is the one served, and its references are
the ones followed, as Nix follows the narinfos it is served.

A closure is **complete** when every path reached has a record in the deploy view. The
server refuses to record an incomplete output at publish and to resolve one, so what
resolves can be fetched whole by a deploy-only credential, which is served exactly these
records (:mod:`nixd.server.http.deploy`).

Walks go breadth first, one batched SELECT per level (a few hundred hashes at a time),
and are remembered per (organization, output path) until the database changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nixd.server.storage.db import Project
from nixd.server.storage.store import PathInfo, Store

MAX_CLOSURE = 100_000
"""Most paths walked for one output; a bigger closure is reported as incomplete."""
_BATCH = 500
_CACHE_MAX = 1_000


@dataclass(frozen=True, slots=True)
class Closure:
    """The closure of one store path in one organization's deploy view."""

    org: str
    store_path: str  # /nix/store/<basename>
    records: dict[str, tuple[Project, PathInfo]] = field(default_factory=dict)
    """hash part -> the record served (its slice and its fields)."""
    missing: tuple[str, ...] = ()
    """Store paths reached without a record in the view, sorted."""
    truncated: bool = False

    @property
    def complete(self) -> bool:
        return not self.missing and not self.truncated

    @property
    def nar_size(self) -> int:
        return sum(info.nar.nar_size for _, info in self.records.values())

    @property
    def root_slice(self) -> str | None:
        """The slice whose record of the output itself is served, if there is one."""
        found = self.records.get(self.store_path.removeprefix("/nix/store/")[:32])
        return found[0].slice if found else None

    def file_hashes(self) -> Iterable[str]:
        return (info.nar.file_hash for _, info in self.records.values())


def _rank(project: Project, info: PathInfo, org: str, trust: dict[int, int]) -> tuple[Any, ...]:
    if project.org.lower() == org.lower():
        return (0, 0, project.priority, info.created, project.org, project.name)
    return (1, trust[project.id], project.priority, info.created, project.org, project.name)


def _in_view(project: Project, org: str, trust: dict[int, int]) -> bool:
    return project.org.lower() == org.lower() or (project.id in trust and project.public)


def _records(store: Store, hashes: list[str]) -> dict[str, list[tuple[Project, PathInfo]]]:
    """Every slice's record of each hash part (one SELECT per batch)."""
    found: dict[str, list[tuple[Project, PathInfo]]] = {}
    for start in range(0, len(hashes), _BATCH):
        batch = hashes[start : start + _BATCH]
        marks = ", ".join("?" * len(batch))
        rows = store.conn.execute(
            f"SELECT {store._PROJECT_COLS}, {store._PATH_COLS} FROM slice_records s "  # noqa: S608
            f"{store._PROJECT_JOIN} JOIN nars n ON n.nar_hash = s.nar_hash "
            f"WHERE s.hash_part IN ({marks})",
            batch,
        ).fetchall()
        for row in rows:
            info = store._path(row[6:])
            found.setdefault(info.hash_part, []).append((store._project(row[:6]), info))
    return found


def walk(store: Store, org: str, store_path: str, *, limit: int = MAX_CLOSURE) -> Closure:
    """The closure of ``store_path`` (``/nix/store/<basename>``) in ``org``'s deploy view."""
    trust = store.trust(org)
    root = store_path.removeprefix("/nix/store/")
    names = {root[:32]: root}
    records: dict[str, tuple[Project, PathInfo]] = {}
    missing: list[str] = []
    level = [root[:32]]
    truncated = False
    while level:
        holders = _records(store, level)
        following: list[str] = []
        for hash_part in level:
            candidates = [
                (_rank(p, i, org, trust), p, i)
                for p, i in holders.get(hash_part, [])
                if _in_view(p, org, trust)
            ]
            if not candidates:
                missing.append(f"/nix/store/{names[hash_part]}")
                continue
            _, project, info = min(candidates, key=lambda c: c[0])
            records[hash_part] = (project, info)
            for ref in info.references:
                if ref[:32] not in names:
                    if len(names) >= limit:
                        truncated = True
                        break
                    names[ref[:32]] = ref
                    following.append(ref[:32])
        level = following
    return Closure(org, store_path, records, tuple(sorted(missing)), truncated)


class Closures:
    """Closures remembered until the database changes (``data_version``)."""

    def __init__(self, store: Store, data_version: Callable[[], Any]) -> None:
        self.store = store
        self._data_version = data_version
        self._seen: Any = None
        self._cache: dict[tuple[str, str], Closure] = {}

    def version(self) -> Any:
        """The database's version now; the cache is dropped when it moved."""
        version = self._data_version()
        if version != self._seen:
            self._seen = version
            self._cache.clear()
        return version

    def of(self, org: str, store_path: str) -> Closure:
        self.version()
        key = (org.lower(), store_path)
        found = self._cache.get(key)
        if found is None:
            found = walk(self.store, org, store_path)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = found
        return found
