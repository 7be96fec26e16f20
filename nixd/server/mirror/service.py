"""Closure completion, pull-through and verification over the configured upstreams.

One :class:`MirrorService` per server process, on that process's event loop and database
connection (the store's). The app calls :meth:`MirrorService.uploaded` after a narinfo
upload (a row and a queue entry, nothing slow) and :meth:`MirrorService.pull` on a
reader's miss; :meth:`MirrorService.run` is the background task (in ``serve``'s nursery)
that completes queued roots, resuming pending ones from the database when it starts.

Completion of a root fetches what the slice lacks of its closure: each reference the
slice does not hold is fetched from the slice's upstreams in priority order (the first
that gives a verified path wins; one that refuses or fails is noted and the next asked),
then that path's references likewise. From an upload, a reference the slice already
holds is not descended into: it was uploaded (and became a root itself) or mirrored (and
its references were seen to then); ``mirror complete`` walks the whole closure. At most
:data:`PARALLEL_FETCHES` paths are fetched at a time per process (level by level, by
that many workers; one completion follows at most ``max_closure`` paths, so an upstream's
endless signed closure ends there as incomplete), and each upstream
keeps its own limits (:mod:`.upstream`). One fetch per (slice, path) is in flight: a
second asker — another root, a pull-through reader — waits for the first's outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
import zstandard

from nixd.errors import NixdError
from nixd.nix import base32
from nixd.nix.hashes import Hash
from nixd.nix.nar import NarParser
from nixd.nix.narinfo import NarInfo
from nixd.nix.storepath import StorePath
from nixd.server.config import MirrorSection
from nixd.server.errors import BadUpload, TooLarge, UnsupportedCompression, UpstreamUnavailable
from nixd.server.mirror import records
from nixd.server.mirror.closure import MAX_CLOSURE, walk
from nixd.server.mirror.upstream import (
    Absent,
    Fetched,
    Refused,
    Unavailable,
    Upstream,
    UpstreamError,
)
from nixd.server.storage.db import Project, list_projects, transaction
from nixd.server.storage.store import COMPRESSIONS, PathConflict, PathInfo, Store

log = logging.getLogger(__name__)

PARALLEL_FETCHES = 16
ROOT_WORKERS = 4
QUEUE_MAX = 100_000
"""Roots queued in memory; beyond, they wait in the database for the next rescan."""
RESCAN_EVERY = 60.0


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    result: PathInfo | None = None
    error: UpstreamError | None = None


@dataclass
class Progress:
    """What one completion did (``mirror complete`` prints it as it goes)."""

    fetched: int = 0
    failed: int = 0
    unavailable: int = 0
    """Of the failed, how many because an upstream did not answer (worth a retry)."""
    missing: list[str] = field(default_factory=list)


class MirrorService:
    """Upstreams of one server; see the module docstring."""

    def __init__(
        self,
        mirrors: tuple[MirrorSection, ...],
        store: Store,
        *,
        max_nar_size: int,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.store = store
        records.ensure(store.conn)
        self._client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self.upstreams = [
            Upstream(m, max_nar_size=max_nar_size, client=self._client)
            for m in sorted(mirrors, key=lambda m: (m.priority, m.name))
        ]
        self._by_name = {u.name: u for u in self.upstreams}
        self.pull_through = any(m.pull_through for m in mirrors)
        self._flights: dict[tuple[int, str], _Flight] = {}
        self.max_closure = MAX_CLOSURE
        """Paths one completion follows at most (the closure walk's bound)."""
        self._limiter = trio.CapacityLimiter(PARALLEL_FETCHES)
        self._send, self._recv = trio.open_memory_channel[tuple[int, str, str]](QUEUE_MAX)
        self._queued: set[tuple[int, str]] = set()
        self._overflow = False

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- which upstreams a slice may use -------------------------------------------------

    def for_slice(self, project: Project, *, pull: bool = False) -> list[Upstream]:
        return [
            u
            for u in self.upstreams
            if u.section.serves(project.slice) and (u.section.pull_through or not pull)
        ]

    def pulls(self, project: Project) -> bool:
        """Whether a reader's miss in this slice is fetched (``pull_through``)."""
        return bool(self.for_slice(project, pull=True))

    # -- fetching one path ---------------------------------------------------------------

    async def fetch(
        self, project: Project, hash_part: str, name: str = "", *, pull: bool = False
    ) -> PathInfo:
        """The slice's record of ``hash_part``, fetched and stored; an UpstreamError if no
        upstream gave a verified path (noted as a want, with why). Single flight."""
        key = (project.id, hash_part)
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result
        flight = self._flights[key] = _Flight()
        try:
            flight.result = await self._fetch(project, hash_part, name, pull=pull)
            return flight.result
        except UpstreamError as exc:
            flight.error = exc
            raise
        finally:
            flight.done.set()
            del self._flights[key]

    async def _fetch(self, project: Project, hash_part: str, name: str, *, pull: bool) -> PathInfo:
        held = self.store.in_slice(project, hash_part)
        if held is not None:
            return held  # uploaded meanwhile
        errors: list[UpstreamError] = []
        for up in self.for_slice(project, pull=pull):
            try:
                fetched = await up.narinfo(hash_part)
                if name and fetched.info.store_path.name != name:
                    raise Refused(up.name, f"its narinfo names {fetched.info.store_path}")
                async with self._limiter:
                    return await self._ingest(project, up, fetched)
            except UpstreamError as exc:
                log.info("mirror %s: %s of %s: %s", up.name, hash_part, project.slice, exc.reason)
                errors.append(exc)
        if not errors:
            raise Absent("-", f"no mirror is configured for {project.slice}")
        reason = "; ".join(str(e) for e in errors)
        label = f"{hash_part}-{name}" if name else hash_part
        if all(isinstance(e, Absent) for e in errors):
            if not pull:  # a reader's miss is not the slice's want (readers may probe)
                records.note_want(
                    self.store.conn,
                    project.id,
                    hash_part,
                    name,
                    state=records.MISSING,
                    reason=reason,
                )
            raise Absent(errors[0].upstream, f"no upstream has {label}: {reason}")
        if not pull:
            records.note_want(
                self.store.conn, project.id, hash_part, name, state=records.FAILED, reason=reason
            )
        kind = Unavailable if any(isinstance(e, Unavailable) for e in errors) else Refused
        raise kind(errors[0].upstream, reason)

    async def _ingest(self, project: Project, up: Upstream, fetched: Fetched) -> PathInfo:
        """The NAR through the upload path's checks into the blob store; then the record."""
        info = fetched.info
        if info.compression not in COMPRESSIONS:
            raise Refused(up.name, f"NAR compression {info.compression!r} is not accepted")
        try:
            ingest = self.store.begin_nar(
                info.compression, max_nar_size=info.nar_size, checker=NarParser()
            )
        except UnsupportedCompression as exc:
            raise Refused(up.name, str(exc)) from exc
        alias = f"nar/mirror-{info.store_path.hash_part}.nar"
        try:

            async def feed(data: bytes) -> None:
                await trio.to_thread.run_sync(ingest.feed, data)

            try:
                await up.nar(fetched, feed)
                finished = await trio.to_thread.run_sync(ingest.finish)
            except (BadUpload, TooLarge) as exc:
                raise Refused(up.name, f"NAR of {info.store_path}: {exc}") from exc
            except NixdError as exc:
                if isinstance(exc, UpstreamError):
                    raise
                raise Unavailable(up.name, f"storing the NAR: {exc}") from exc
            if str(finished[0]) != str(info.nar_hash) or finished[1] != info.nar_size:
                raise Refused(
                    up.name,
                    f"NAR mismatch for {info.store_path}: signed NarHash {info.nar_hash} "
                    f"NarSize {info.nar_size}, received NarHash {finished[0]} NarSize "
                    f"{finished[1]}",
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(ingest.discard)
            raise
        try:
            nar = await self.store.commit_nar_async(ingest, finished, project, alias)
        except NixdError as exc:  # a full disk, a bucket that does not answer: retry later
            raise Unavailable(up.name, f"storing the NAR: {exc}") from exc
        record = PathInfo(
            hash_part=info.store_path.hash_part,
            name=info.store_path.name,
            nar=nar,
            references=tuple(sorted(r.basename for r in info.references)),
            deriver=info.deriver.basename if info.deriver else None,
            system=info.system,
            ca=info.ca,
            uploader=f"{records.UPLOADER_PREFIX}{up.name}",
        )
        conn = self.store.conn
        try:
            with transaction(conn, durable=True):
                self.store.add_path(project, record)
                records.record_provenance(
                    conn,
                    records.Provenance(
                        project.id,
                        record.hash_part,
                        record.name,
                        nar.nar_hash,
                        up.name,
                        fetched.url,
                        fetched.sigs,
                        time.time(),
                    ),
                )
        except PathConflict:
            pass  # the slice's own upload got in first: it stands
        finally:
            await self.store.drop_alias_async(project, alias)
        got = self.store.in_slice(project, record.hash_part)
        assert got is not None
        log.info("mirrored %s into %s from %s", info.store_path.path(), project.slice, up.name)
        return got

    # -- closures ------------------------------------------------------------------------

    async def complete(
        self,
        project: Project,
        hash_part: str,
        name: str = "",
        *,
        deep: bool = False,
        progress: Callable[[str, str], None] | None = None,
    ) -> Progress:
        """Fetch what ``project`` lacks of the closure of ``hash_part``; see the module
        docstring (``deep``: descend through held paths too). Marks the root's state."""
        records.add_root(self.store.conn, project.id, hash_part, name)
        done = Progress()
        seen = {hash_part}
        note = progress or (lambda what, path: None)
        level: list[tuple[str, str]] = [(hash_part, name)]
        deeper: list[tuple[str, str]] = []

        async def visit(hp: str, nm: str) -> None:
            info = self.store.in_slice(project, hp)
            if info is None:
                try:
                    info = await self.fetch(project, hp, nm)
                except UpstreamError as exc:
                    done.failed += 1
                    done.unavailable += isinstance(exc, Unavailable)
                    note("failed", f"/nix/store/{hp}-{nm}: {exc}")
                    return
                done.fetched += 1
                note("fetched", f"/nix/store/{info.basename}")
            elif hp != hash_part and not deep:
                return
            for ref in info.references:
                rhp, _, rname = ref.partition("-")
                if rhp not in seen and len(seen) < self.max_closure:
                    seen.add(rhp)
                    deeper.append((rhp, rname))

        async def worker(todo: Iterator[tuple[str, str]]) -> None:
            for hp, nm in todo:  # shared by the level's workers: each path once
                await visit(hp, nm)

        # Level by level, a fixed number of workers: what waits is a tuple, not a task, and
        # an upstream's endless (signed) closure stops at max_closure paths.
        while level and self.for_slice(project):
            todo = iter(level)
            async with trio.open_nursery() as nursery:
                for _ in range(PARALLEL_FETCHES):
                    nursery.start_soon(worker, todo)
            level, deeper = deeper, []
        _, missing = walk(self.store, project, hash_part, name)
        done.missing = sorted(f"/nix/store/{hp}-{n}" for hp, n in missing.items())
        # An upstream that did not answer leaves the root pending: retried later.
        records.finish_root(
            self.store.conn, project.id, hash_part, len(missing), retry=done.unavailable > 0
        )
        return done

    def uploaded(self, project: Project, info: PathInfo) -> None:
        """A narinfo was stored in ``project``: complete its closure in the background."""
        if not self.for_slice(project):
            return
        records.add_root(self.store.conn, project.id, info.hash_part, info.name)
        self._enqueue(project.id, info.hash_part, info.name)

    def _enqueue(self, project_id: int, hash_part: str, name: str) -> None:
        key = (project_id, hash_part)
        if key in self._queued:
            return
        try:
            self._send.send_nowait((project_id, hash_part, name))
        except trio.WouldBlock:
            self._overflow = True  # the row is pending: the next rescan finds it
            return
        self._queued.add(key)

    async def run(self, *, resume: bool = True) -> None:
        """The background completion (until cancelled): pending roots of the database
        first (with ``resume``), then whatever uploads queue."""
        try:
            if resume:
                self._rescan()
            async with trio.open_nursery() as nursery:
                for _ in range(ROOT_WORKERS):
                    nursery.start_soon(self._worker)
                if resume:
                    nursery.start_soon(self._rescanner)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    def _rescan(self, before: float | None = None) -> None:
        self._overflow = False
        pending = records.roots(self.store.conn, state=records.PENDING, before=before)
        for pid, hp, name, _, _ in pending:
            self._enqueue(pid, hp, name)

    async def _rescanner(self) -> None:
        """Every :data:`RESCAN_EVERY`: roots left pending (an upstream did not answer, the
        queue overflowed, another process died with them) and untouched since."""
        while True:
            await trio.sleep(RESCAN_EVERY)
            self._rescan(before=time.time() - RESCAN_EVERY)

    async def _worker(self) -> None:
        async for pid, hp, name in self._recv:
            try:
                project = self._project(pid)
                if project is None:
                    continue
                result = await self.complete(project, hp, name)
                if result.missing:
                    log.warning(
                        "the closure of %s-%s in %s lacks %d path(s); see `nixd-server mirror "
                        "status`",
                        hp,
                        name,
                        project.slice,
                        len(result.missing),
                    )
            except Exception:  # one root's failure ends that root only
                log.exception("completing the closure of %s in project %d failed", hp, pid)
            finally:
                self._queued.discard((pid, hp))  # only now: a rescan meanwhile skips it

    def _project(self, project_id: int) -> Project | None:
        return next((p for p in list_projects(self.store.conn) if p.id == project_id), None)

    # -- pull-through ----------------------------------------------------------------------

    async def pull(self, project: Project, hash_part: str) -> PathInfo | None:
        """A reader's miss in ``project``: the path fetched from a pull-through upstream,
        or None if none has it (a 404 is right); UpstreamUnavailable if one did not answer."""
        if not self.pulls(project):
            return None
        try:
            info = await self.fetch(project, hash_part, pull=True)
        except Unavailable as exc:
            raise UpstreamUnavailable(
                f"the upstream cache did not answer for {hash_part}; try again ({exc.upstream})"
            ) from exc
        except UpstreamError:
            return None
        if self.for_slice(project):
            records.add_root(self.store.conn, project.id, info.hash_part, info.name)
            self._enqueue(project.id, info.hash_part, info.name)
        return info

    def pull_targets(self, org: str | None) -> list[Project]:
        """The slices of ``org`` a view miss may be pulled into (the caller ranks them)."""
        if org is None or not self.pull_through:
            return []
        return [p for p in list_projects(self.store.conn, org) if self.pulls(p)]

    # -- serving and checking provenance ---------------------------------------------------

    def upstream_sigs(self, info: PathInfo, fingerprint: bytes) -> tuple[str, ...]:
        """The upstream's Sig lines of a mirrored record that still verify for the narinfo
        being served (its fingerprint), with that upstream's keys. Only a record the
        mirror wrote carries them: the same path uploaded into another slice is answered
        alike whether or not some slice mirrored it."""
        name = info.uploader.removeprefix(records.UPLOADER_PREFIX)
        up = self._by_name.get(name) if info.uploader.startswith(records.UPLOADER_PREFIX) else None
        if up is None:
            return ()
        prov = records.provenance_of(self.store.conn, info.hash_part, info.nar.nar_hash, name)
        if prov is None:
            return ()
        return tuple(s for s in prov.sigs if any(k.verify(fingerprint, s) for k in up.keys))

    def mirrored(self, project: Project, info: PathInfo) -> bool:
        """Whether the slice's record came from a mirror (an upload may replace it)."""
        return records.mirrored_record(
            self.store.conn, project.id, info.hash_part, info.nar.nar_hash
        )


@dataclass(frozen=True, slots=True)
class Verified:
    """``mirror verify``'s finding for one mirrored record."""

    slice: str
    path: str
    upstream: str
    signature: str  # "ok", or why not
    nar: str  # "ok", or why not

    @property
    def ok(self) -> bool:
        return self.signature == "ok" and self.nar == "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "slice": self.slice,
            "path": self.path,
            "upstream": self.upstream,
            "signature": self.signature,
            "nar": self.nar,
            "ok": self.ok,
        }


def verify_mirrored(
    store: Store, mirrors: tuple[MirrorSection, ...], *, project: Project | None = None
) -> Iterator[Verified]:
    """Re-check every mirrored record held: an upstream Sig verifies with the keys now
    configured for its upstream (a removed mirror's paths fail), and the stored NAR
    decompresses to the recorded NarHash/NarSize. Blocking (reads every blob)."""
    keys = {m.name: [_public(k) for k in m.public_keys] for m in mirrors}
    projects = {p.id: p for p in list_projects(store.conn)}
    for prov in records.live_provenance(store.conn, project.id if project else None):
        proj = projects.get(prov.project_id)
        if proj is None:
            continue
        info = store.in_slice(proj, prov.hash_part)
        if info is None:
            continue
        ni = _narinfo(info)
        fingerprint = ni.fingerprint()
        trusted = keys.get(prov.upstream)
        if trusted is None:
            sig = f"mirror {prov.upstream!r} is no longer configured"
        elif any(k.verify(fingerprint, s) for k in trusted for s in prov.sigs):
            sig = "ok"
        else:
            sig = "no upstream signature verifies with the configured keys"
        yield Verified(
            proj.slice, f"/nix/store/{info.basename}", prov.upstream, sig, _check_nar(store, info)
        )


def _public(text: str) -> Any:
    from nixd.nix.signing import PublicKey  # noqa: PLC0415

    return PublicKey.parse(text)


def _narinfo(info: PathInfo) -> NarInfo:
    return NarInfo(
        store_path=StorePath(info.hash_part, info.name),
        url=info.nar.url,
        compression="zstd",
        file_hash=Hash("sha256", base32.decode(info.nar.file_hash)),
        file_size=info.nar.file_size,
        nar_hash=Hash.parse(info.nar.nar_hash),
        nar_size=info.nar.nar_size,
        references=tuple(StorePath.from_basename(r) for r in info.references),
        deriver=StorePath.from_basename(info.deriver) if info.deriver else None,
        system=info.system,
        sigs=(),
        ca=info.ca,
    )


def _check_nar(store: Store, info: PathInfo) -> str:
    import hashlib  # noqa: PLC0415

    sha = hashlib.sha256()
    size = 0
    try:
        read = store.open_blob(info.nar.file_hash, 0, info.nar.file_size)
        try:
            d = zstandard.ZstdDecompressor().decompressobj()
            for chunk in read:
                out = d.decompress(chunk)
                sha.update(out)
                size += len(out)
        finally:
            read.close()
    except (NixdError, zstandard.ZstdError, OSError) as exc:
        return f"the stored NAR cannot be read: {exc}"
    got = str(Hash("sha256", sha.digest()))
    if got != info.nar.nar_hash or size != info.nar.nar_size:
        return f"the stored NAR has NarHash {got} NarSize {size}, not {info.nar.nar_hash}"
    return "ok"
