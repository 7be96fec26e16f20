"""Retention and garbage collection: what each slice keeps, and the sweep of the rest.

What is kept (the **mark**), in every slice at once:

- every **pinned** record (:mod:`.pins`) and its closure;
- every record uploaded within ``[gc] grace`` and its closure (an upload in flight, whose
  top-level path is not there yet, is never half-collected);
- per slice, what its retention rule (:class:`~nixd.server.config.RetentionSection`, the
  first ``[[retention]]`` whose glob matches the slice; none = ``keep = "all"``) keeps:
  ``keep = "all"``: every record; ``days = N``: every record read (narinfo or NAR, see
  :meth:`~nixd.server.storage.store.Store.note_access`) or uploaded within N days, and its
  closure; ``releases = N``: the closures of the slice's N latest **releases**.

A **release** is a top-level path of a slice: a record that no other record of the same
slice references — what ``nix copy --to`` pushed as the root of a closure (an application,
a system, a dev shell). "Latest" is by upload time; a record younger than ``grace`` does
not count as one (it is kept anyway), so a closure half pushed, whose dependencies are
momentarily top-level, does not push real releases out.

A **closure** follows References transitively. A reference the slice itself holds is that
slice's record; one it does not hold could be served to a reader from any slice of a
unified view, so every slice's record of that path is kept (and followed). So GC never
removes a path that a pinned or retained closure references, whichever slice serves it.

The **sweep** removes, in one write transaction: every record not marked, upload aliases
older than ``grace`` (they pair a NAR PUT with its narinfo PUT, and keep a NAR uploaded
without its narinfo alive until then), NAR rows nothing uses any more, and records whose
blob is missing (reported: the bytes are lost, serving them would fail). The mark is
made without the write lock (uploads go on meanwhile), and checked under it before the
deletions: if any record, read time, alias or pin it depends on changed in between
(:func:`_fingerprint`), it is made again under the lock, so no upload commits between what
was decided and what is deleted. Blobs are deleted after the commit, each only if no NAR
row names it by then: a crash (kill -9) at any point leaves the metadata consistent, and
at worst blobs without a row, which the next sweep removes as **orphans**: blobs no NAR
row names, older than ``grace`` (a younger one may be an upload between its rename and
its commit).

GC is online: a download that opened its blob before the unlink completes (an open file
survives its unlink on Linux; the server opens the blob before it sends the head). A dry
run computes the same plan without the transaction and deletes nothing.

Known window: access times are noted in memory and flushed every ``[gc] access_flush``
seconds, so a ``nixd-server gc`` in another process sees reads up to that long late (the
server's own periodic GC flushes first). For ``days`` counted in days this is immaterial.
"""

from __future__ import annotations

import fnmatch
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nixd.server.config import RetentionSection
from nixd.server.metrics import metrics
from nixd.server.storage.db import transaction
from nixd.server.storage.store import Store, StoreError

log = logging.getLogger(__name__)

Key = tuple[int, str]
"""A record: (project id, hash part)."""


@dataclass(frozen=True, slots=True)
class Record:
    """What the mark needs of one slice record."""

    project_id: int
    hash_part: str
    name: str
    refs: tuple[str, ...]  # hash parts of the References (self-references included)
    nar_hash: str
    created: float
    last_access: float  # the upload time if never read since
    key: Key = (0, "")
    """(project id, hash part); filled in by :meth:`__post_init__` (read very often)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.project_id, self.hash_part))


def rule_for(slice_name: str, rules: Sequence[RetentionSection]) -> RetentionSection | None:
    """The first rule whose slice glob matches (ignoring case, as names are); None = keep all."""
    lowered = slice_name.lower()
    for rule in rules:
        if fnmatch.fnmatchcase(lowered, rule.slice.lower()):
            return rule
    return None


def roots(
    records: Iterable[Record],
    pins: Iterable[Key],
    rules_by_project: Mapping[int, RetentionSection | None],
    *,
    now: float,
    grace: float,
) -> dict[Key, str]:
    """Every record kept in its own right, with why: pin, recent, all, read, release."""
    by_project: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        by_project[r.project_id].append(r)
    found: dict[Key, str] = {}
    for pid, recs in by_project.items():
        rule = rules_by_project.get(pid)
        if rule is None or rule.keeps_all:
            for r in recs:
                found[r.key] = "all"
            continue
        young = now - grace
        for r in recs:
            if r.created > young:
                found[r.key] = "recent"
        if rule.days:
            since = now - rule.days * 86400.0
            for r in recs:
                if r.last_access >= since or r.created >= since:
                    found.setdefault(r.key, "read")
        if rule.releases:
            referenced = {ref for r in recs for ref in r.refs if ref != r.hash_part}
            releases = sorted(
                (r for r in recs if r.hash_part not in referenced and r.created <= young),
                key=lambda r: (r.created, r.hash_part),
                reverse=True,
            )
            for r in releases[: rule.releases]:
                found.setdefault(r.key, "release")
    held = {r.key for recs in by_project.values() for r in recs}
    for key in pins:
        if key in held:
            found[key] = "pin"
    return found


def mark(records: Iterable[Record], start: Iterable[Key]) -> set[Key]:
    """The closure of ``start`` (see the module docstring for references across slices)."""
    by_key: dict[Key, Record] = {}
    by_hash: dict[str, list[Key]] = defaultdict(list)
    for r in records:
        by_key[r.key] = r
        by_hash[r.hash_part].append(r.key)
    marked: set[Key] = set()
    todo = [k for k in start if k in by_key]
    while todo:
        key = todo.pop()
        if key in marked:
            continue
        marked.add(key)
        pid = key[0]
        for ref in by_key[key].refs:
            own = (pid, ref)
            if own in by_key:
                todo.append(own)
            else:
                todo.extend(by_hash.get(ref, ()))
    return marked


def closure_size(store: Store, project_id: int, hash_part: str) -> tuple[int, int]:
    """How many records a pin on this record keeps, and their NARs' stored bytes."""
    records, _ = _load(store)
    kept = mark(records, [(project_id, hash_part)])
    nar_hashes = {r.nar_hash for r in records if r.key in kept}
    sizes = dict(store.conn.execute("SELECT nar_hash, file_size FROM nars").fetchall())
    return len(kept), sum(int(sizes.get(h, 0)) for h in nar_hashes)


# -- a run -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GoneNar:
    nar_hash: str
    file_hash: str
    file_size: int


@dataclass
class GcReport:
    """What a run removed (or, with ``dry_run``, would remove)."""

    dry_run: bool
    slice: str | None = None
    kept: int = 0
    paths: dict[str, list[str]] = field(default_factory=dict)
    """Removed records by slice: ``/nix/store/<hash>-<name>`` each."""
    nars: list[GoneNar] = field(default_factory=list)
    """NAR rows no record uses any more (their blobs go after the commit)."""
    aliases: int = 0
    orphan_blobs: list[tuple[str, int]] = field(default_factory=list)
    """Blobs without a NAR row, older than grace: (file hash, size)."""
    missing_blobs: dict[str, list[str]] = field(default_factory=dict)
    """NARs whose blob is gone, by file hash: the slice records (``slice:path``) removed."""

    @property
    def paths_removed(self) -> int:
        return sum(len(v) for v in self.paths.values())

    @property
    def bytes_freed(self) -> int:
        present = sum(n.file_size for n in self.nars if n.file_hash not in self.missing_blobs)
        return present + sum(size for _, size in self.orphan_blobs)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "slice": self.slice,
            "kept_paths": self.kept,
            "paths_removed": self.paths_removed,
            "paths": self.paths,
            "nars_removed": len(self.nars),
            "aliases_removed": self.aliases,
            "orphan_blobs": [{"file_hash": h, "size": s} for h, s in self.orphan_blobs],
            "missing_blobs": [
                {"file_hash": h, "records": r} for h, r in self.missing_blobs.items()
            ],
            "bytes_freed": self.bytes_freed,
        }

    def describe(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [
            f"{verb} {self.paths_removed} path(s), {len(self.nars)} NAR(s), "
            f"{len(self.orphan_blobs)} orphan blob(s), {self.aliases} stale upload alias(es): "
            f"{self.bytes_freed} bytes; {self.kept} path(s) kept"
        ]
        for slice_name, paths in sorted(self.paths.items()):
            lines.append(f"  {slice_name}: {len(paths)} path(s)")
            lines += [f"    {p}" for p in paths]
        for file_hash, size in self.orphan_blobs:
            lines.append(f"  orphan blob {file_hash} ({size} bytes)")
        for file_hash, records in self.missing_blobs.items():
            lines.append(f"  blob {file_hash} is missing: records {', '.join(records)} removed")
        return "\n".join(lines)


@dataclass
class _Plan:
    report: GcReport
    records: list[Key]
    alias_cutoff: float
    alias_projects: tuple[int, ...] | None
    nar_hashes: list[str]


def _load(store: Store) -> tuple[list[Record], dict[int, str]]:
    q = store.conn.execute
    slices = {
        int(r[0]): f"{r[1]}/{r[2]}"
        for r in q("SELECT p.id, o.name, p.name FROM projects p JOIN orgs o ON o.id = p.org_id")
    }
    records = [
        Record(
            int(pid),
            hp,
            name,
            tuple(ref[:32] for ref in refs.split()) if refs else (),
            nar_hash,
            float(created),
            float(created if last is None else max(last, created)),
        )
        for pid, hp, name, refs, nar_hash, created, last in q(
            "SELECT project_id, hash_part, name, refs, nar_hash, created, last_access "
            "FROM slice_records"
        )
    ]
    return records, slices


def _plan(
    store: Store,
    rules: Sequence[RetentionSection],
    blobs: Mapping[str, tuple[int, float]],
    *,
    now: float,
    grace: float,
    only: int | None,
    dry_run: bool,
    slice_name: str | None,
) -> _Plan:
    q = store.conn.execute
    records, slices = _load(store)
    pins = [(int(r[0]), str(r[1])) for r in q("SELECT project_id, hash_part FROM pins")]
    rules_by_project = {pid: rule_for(name, rules) for pid, name in slices.items()}
    kept = mark(records, roots(records, pins, rules_by_project, now=now, grace=grace))
    report = GcReport(dry_run=dry_run, slice=slice_name, kept=len(kept))
    nars: dict[str, GoneNar] = {}
    nar_created: dict[str, float] = {}
    for nar_hash, file_hash, file_size, created in q(
        "SELECT nar_hash, file_hash, file_size, created FROM nars"
    ):
        nars[str(nar_hash)] = GoneNar(str(nar_hash), str(file_hash), int(file_size))
        nar_created[str(nar_hash)] = float(created)
    young = now - grace
    # records whose blob is gone (never judged while young: the rename may be under way)
    missing = {
        n.nar_hash
        for n in nars.values()
        if n.file_hash not in blobs
        and nar_created[n.nar_hash] <= young
        and not store.blob_exists(n.file_hash)
    }
    removed: list[Record] = []
    for r in records:
        if only is not None and r.project_id != only:
            continue
        if r.key not in kept or r.nar_hash in missing:
            removed.append(r)
    gone_keys = {r.key for r in removed}
    for r in sorted(removed, key=lambda r: (slices[r.project_id], r.name, r.hash_part)):
        report.paths.setdefault(slices[r.project_id], []).append(
            f"/nix/store/{r.hash_part}-{r.name}"
        )
        if r.nar_hash in missing:
            report.missing_blobs.setdefault(nars[r.nar_hash].file_hash, []).append(
                f"{slices[r.project_id]}:/nix/store/{r.hash_part}-{r.name}"
            )
    report.kept = len(kept - gone_keys)
    # what still uses each NAR afterwards: records left, and aliases younger than grace
    by_records = {r.nar_hash for r in records if r.key not in gone_keys}
    used = set(by_records)
    alias_rows = q("SELECT project_id, nar_hash, created FROM upload_aliases").fetchall()
    for pid, nar_hash, created in alias_rows:
        stale = float(created) <= young and (only is None or int(pid) == only)
        if stale:
            report.aliases += 1
        else:
            used.add(str(nar_hash))
    # A NAR whose blob is lost goes with its aliases even if one is young: a new upload of
    # the same NAR must store its bytes again, not find a row and discard them.
    gone_nars = sorted(
        (
            n
            for h, n in nars.items()
            if (h not in used and nar_created[h] <= young) or (h in missing and h not in by_records)
        ),
        key=lambda n: n.nar_hash,
    )
    report.nars = gone_nars
    for h in missing:  # a missing blob whose NAR stays used elsewhere (--slice) is listed too
        report.missing_blobs.setdefault(nars[h].file_hash, [])
    if only is None:
        named = {n.file_hash for n in nars.values()}
        report.orphan_blobs = sorted(
            (fh, size) for fh, (size, mtime) in blobs.items() if fh not in named and mtime <= young
        )
    return _Plan(
        report,
        [r.key for r in removed],
        young,
        None if only is None else (only,),
        [n.nar_hash for n in gone_nars],
    )


def _delete(store: Store, plan: _Plan) -> None:
    """The plan's metadata deletions (inside the caller's write transaction)."""
    ex = store.conn.execute
    for pid, hash_part in plan.records:
        ex("DELETE FROM slice_records WHERE project_id = ? AND hash_part = ?", (pid, hash_part))
    if plan.alias_projects is None:
        ex("DELETE FROM upload_aliases WHERE created <= ?", (plan.alias_cutoff,))
    else:
        for pid in plan.alias_projects:
            ex(
                "DELETE FROM upload_aliases WHERE created <= ? AND project_id = ?",
                (plan.alias_cutoff, pid),
            )
    for nar_hash in plan.nar_hashes:
        ex("DELETE FROM upload_aliases WHERE nar_hash = ?", (nar_hash,))  # a missing blob's
        ex("DELETE FROM nars WHERE nar_hash = ?", (nar_hash,))


def collect(
    store: Store,
    rules: Sequence[RetentionSection],
    *,
    grace: float,
    dry_run: bool = False,
    slice_name: str | None = None,
    now: float | None = None,
    access_flush: float = 3600.0,
) -> GcReport:
    """One GC run over ``store`` (see the module docstring); what went, or would go.

    ``slice_name`` (``org/project``) limits the removal of records (and aliases) to that
    slice; the mark still spans every slice, and orphan blobs are left to a full run.
    ``access_flush`` is the servers' ``[gc] access_flush``: how old a read time can be
    when it is written, so how far back :func:`_fingerprint` must look.
    """
    only: int | None = None
    if slice_name is not None:
        org, _, name = slice_name.partition("/")
        project = store.project(org, name)
        if project is None:
            raise StoreError(f"project {slice_name} does not exist")
        only = project.id
    started = time.time() if now is None else now
    # Listed before the plan: a blob that appears later is younger than grace anyway.
    blobs = {fh: (size, mtime) for fh, size, mtime in store.iter_blobs()}
    kw: dict[str, Any] = {"now": started, "grace": grace, "only": only, "slice_name": slice_name}
    if dry_run:
        return _plan(store, rules, blobs, dry_run=True, **kw).report
    # Marked without the write lock (uploads go on), then checked under it: if nothing
    # the mark depends on changed meanwhile, the plan stands; else it is made again
    # under the lock, where nothing can change.
    window = time.time() - access_flush - _CLOCK_SLACK
    before = _fingerprint(store, window)
    plan = _plan(store, rules, blobs, dry_run=False, **kw)
    with transaction(store.conn, durable=True):
        if _fingerprint(store, window) != before:
            log.info("gc: the cache changed while marking; marking again under the lock")
            plan = _plan(store, rules, blobs, dry_run=False, **kw)
        _delete(store, plan)
    store.forget_cached()
    report = plan.report
    for nar in report.nars:
        _drop_blob(store, nar.file_hash)
    for file_hash, _ in report.orphan_blobs:
        _drop_blob(store, file_hash)
    m = metrics()
    m.gc_runs.inc()
    m.gc_paths_removed.inc(report.paths_removed)
    m.gc_bytes_freed.inc(report.bytes_freed)
    log.info("gc: %s", report.describe().splitlines()[0])
    return report


_CLOCK_SLACK = 120.0
"""Seconds the clocks of the hosts writing one database may differ by (NTP keeps far less)."""


def _fingerprint(store: Store, since: float) -> tuple[object, ...]:
    """What the mark depends on that a writer may have changed since ``since``.

    Every write that can change a mark stamps the time it happened: an upload or replace
    sets ``created`` to now, a read time flushed is at most ``access_flush`` old, an upload
    alias is created now, and counts catch anything else that adds or removes rows. Pins
    are few and compared whole.
    """
    q = store.conn.execute
    return (
        q("SELECT count(*) FROM slice_records").fetchone()[0],
        q("SELECT count(*) FROM nars").fetchone()[0],
        q("SELECT count(*) FROM upload_aliases").fetchone()[0],
        sorted(
            tuple(r)
            for r in q(
                "SELECT project_id, hash_part, nar_hash, refs, created, last_access "
                "FROM slice_records WHERE created >= ? OR last_access >= ?",
                (since, since),
            )
        ),
        sorted(
            tuple(r)
            for r in q(
                "SELECT project_id, url, nar_hash, created FROM upload_aliases WHERE created >= ?",
                (since,),
            )
        ),
        sorted(tuple(r) for r in q("SELECT project_id, hash_part FROM pins")),
    )


def _drop_blob(store: Store, file_hash: str) -> None:
    """Delete a blob unless a NAR row names it again (an upload of the same NAR since)."""
    again = store.conn.execute("SELECT 1 FROM nars WHERE file_hash = ?", (file_hash,)).fetchone()
    if again is None:
        try:
            store.delete_blob(file_hash)
        except OSError as exc:  # left as an orphan for the next run
            log.warning("gc: cannot delete blob %s: %s", file_hash, exc)


# -- the server's own runs -------------------------------------------------------------


async def serve_gc(
    store: Store,
    open_store: Callable[[], Store],
    rules: Sequence[RetentionSection],
    *,
    interval: float,
    grace: float,
    access_flush: float,
    audit: Callable[[GcReport], Awaitable[None]],
) -> None:
    """Flush read times every ``access_flush`` s; collect every ``interval`` s (0: never).

    ``store`` is the server's (its connection belongs to the event loop's thread: the
    flush is a short transaction there). A collection runs in a worker thread on a store
    of its own (``open_store``), so requests keep being answered while it marks. Errors
    end the run (logged), never the server.
    """
    import trio  # noqa: PLC0415 - the CLI's gc never needs trio

    next_gc = trio.current_time() + interval if interval else float("inf")
    try:
        while True:
            await trio.sleep(min(access_flush, max(0.0, next_gc - trio.current_time())))
            flush_reads(store)
            if trio.current_time() < next_gc:
                continue
            next_gc = trio.current_time() + interval

            def run() -> GcReport:
                own = open_store()
                try:
                    return collect(own, rules, grace=grace, access_flush=access_flush)
                finally:
                    own.conn.close()

            try:
                report = await trio.to_thread.run_sync(run)
                await audit(report)
            except (sqlite3.Error, OSError) as exc:
                log.warning("gc: the run failed and is tried again in %.0f s: %s", interval, exc)
            except Exception:  # a bug in one run must not end the server
                log.exception("gc: the run failed; tried again in %.0f s", interval)
    finally:
        flush_reads(store)


def flush_reads(store: Store) -> None:
    """:meth:`Store.flush_accesses`, a database error logged (the notes wait for the next)."""
    try:
        store.flush_accesses()
    except sqlite3.Error as exc:
        log.warning("could not record read times (kept for the next try): %s", exc)
