"""Pushing store paths to a slice of the cache server, with the daemon's own identity.

The model:

- **Who pushes.** The daemon (root) uploads with the access token it keeps fresh; the
  CLI only asks it over the control socket (``POST /push``, root or ``control_group``,
  as for login). No token is ever on a command line, in a child's argv or environment,
  or in the queue file: the CLI never holds one.
- **What is pushed.** The closure of the paths asked for (``nix path-info --recursive
  --json`` with the real Nix, so the NarHash, references, deriver and CA are Nix's own
  record), minus the paths the slice already has (``GET <slice>/<hash>.narinfo`` is a
  200) and, the **upstream filter** as attic and cachix have it, minus the paths whose
  local signatures verify with a key trusted for an upstream (the proxy's upstreams'
  ``trusted_keys`` and ``push.upstream_keys``): whoever reads the slice gets those from
  the upstream anyway.
- **How.** Each NAR is dumped from the store by :func:`nixd.nix.nar.dump` and checked
  against Nix's NarHash as it goes. The server wants a ``Content-Length`` on uploads, so a
  compressed NAR is spooled (zstd or xz, streaming, bounded memory) to a temp file under
  the state directory and then sent from it; ``compression = "none"`` streams the dump
  directly (its length is Nix's NarSize). Then the narinfo (its URL names the NAR upload;
  the server signs with its own keys). A path's narinfo goes up only after those of its
  references in the same push, so a reader never sees a path whose closure is not there.
  At most ``push.jobs`` paths at once; every request is retried (``push.retries``
  attempts, exponential backoff) on a transport error, a 5xx or a 429; a 401 renews the
  token once. A 4xx (other than those) fails that path: retrying cannot help; a 403 (this
  identity may not write the slice) or a token that cannot be renewed ends the job.
- **Jobs.** Each push is a job with progress (paths done/total, skipped, bytes, rate) that
  ``POST /push/job`` reports; the last :data:`KEEP_JOBS` are remembered.
- **The queue** (``nixd post-build-hook``, ``nixd push --queue``): a JSON line per call
  appended to ``<state_dir>/push-queue`` under ``flock``; the writer never waits for the
  daemon (so a build never does), and the daemon drains the file every
  :data:`QUEUE_POLL` seconds: it renames it aside under the same lock (a writer that
  opened it before checks the inode and writes to the new file), pushes, and deletes it
  only once every job from it succeeded, so a crash or restart pushes it again; after a
  failure it is kept and tried again later (backing off up to :data:`QUEUE_RETRY_MAX`).
  Nothing is taken while the daemon is logged out.

A failing push ends that job only (containment): the daemon and other jobs go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import lzma
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

import httpx
import trio
import zstandard

from nixd.bounds import load_json
from nixd.daemon.config import Config, PushSection
from nixd.daemon.control import ApiError, Peer
from nixd.daemon.pushqueue import QueueError, enqueue, take_queue
from nixd.errors import AuthError, FormatError, NixdError
from nixd.nix import base32
from nixd.nix.hashes import Hash
from nixd.nix.nar import dump
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey
from nixd.nix.storepath import DEFAULT_STORE_DIR, StorePath
from nixd.proxy.credential import strip_userinfo

log = logging.getLogger(__name__)

KEEP_JOBS = 50
"""Finished jobs remembered for ``/push/job``."""
QUEUE_POLL = 1.0
"""Seconds between looks at the queue file."""
QUEUE_RETRY_MAX = 600.0
"""Longest wait, in seconds, before a queued push that failed is tried again (doubling
from a minute)."""
MAX_QUEUE_BYTES = 16 << 20
"""Largest queue file read at once (a line per build; a backlog past this is refused)."""
MAX_PATHS = 10_000
"""Most store paths one request may name."""
MAX_PATH_INFO = 256 << 20
"""Largest ``nix path-info --json`` output read."""
NIX_TIMEOUT = 600.0
CHUNK = 1 << 20
BACKOFF = 0.5
"""First retry delay in seconds; doubled for each further attempt."""
_SUFFIX = {"zstd": ".nar.zst", "xz": ".nar.xz", "none": ".nar"}


class PushError(NixdError):
    """A push could not be done as asked (bad request, Nix failed, the server refused)."""


__all__ = ["Job", "PushError", "Pusher", "QueueError", "enqueue", "take_queue"]


class Refused(PushError):
    """The server refused this identity the slice (403): no other path will fare better."""


class _Retry(Exception):
    """A transient failure of one request: try again after a while."""


@dataclass(frozen=True, slots=True)
class PathRecord:
    """A valid store path as the local Nix records it."""

    path: str
    nar_hash: Hash
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None
    ca: str | None
    sigs: tuple[str, ...]

    @property
    def store_path(self) -> StorePath:
        return StorePath.parse(self.path)

    def narinfo(self, url: str, compression: str) -> NarInfo:
        return NarInfo(
            store_path=self.store_path,
            url=url,
            compression=compression,
            file_hash=None,
            file_size=None,
            nar_hash=self.nar_hash,
            nar_size=self.nar_size,
            references=tuple(StorePath.parse(r) for r in self.references),
            deriver=StorePath.parse(self.deriver) if self.deriver else None,
            system=None,
            sigs=self.sigs,
            ca=self.ca,
        )


def parse_path_info(data: Any) -> list[PathRecord]:
    """Records from ``nix path-info --json`` (Nix 2.8: a list of objects)."""
    if not isinstance(data, list):
        raise PushError("nix path-info --json did not print a list")
    records = []
    for item in data:
        try:
            if not isinstance(item, dict) or not item.get("valid", True):
                raise FormatError(f"not a valid path: {str(item)[:200]}")
            path = str(item["path"])
            StorePath.parse(path)
            refs = tuple(str(r) for r in item.get("references", []))
            for r in refs:
                StorePath.parse(r)
            deriver = item.get("deriver")
            records.append(
                PathRecord(
                    path=path,
                    nar_hash=Hash.parse(str(item["narHash"])),
                    nar_size=int(item["narSize"]),
                    references=refs,
                    deriver=str(deriver) if deriver else None,
                    ca=str(item["ca"]) if item.get("ca") else None,
                    sigs=tuple(str(s) for s in item.get("signatures", [])),
                )
            )
        except (KeyError, TypeError, ValueError, FormatError) as exc:
            raise PushError(f"nix path-info --json: unusable entry: {exc}") from exc
    return records


class NixStore:
    """The local store, through the real Nix (``--store ROOT`` for a chroot store)."""

    def __init__(self, root: str | None) -> None:
        self.root = root

    def _args(self, *args: str) -> list[str]:
        head, rest = args[0], list(args[1:])
        store = ["--store", self.root] if self.root else []
        return [head, *store, *rest]

    def real_path(self, path: str) -> str:
        """Where a logical ``/nix/store/...`` path is on disk."""
        return os.path.join(self.root, path.lstrip("/")) if self.root else path

    @property
    def store_dir(self) -> str:
        return self.real_path(DEFAULT_STORE_DIR)

    async def _run(self, args: list[str]) -> bytes:
        try:
            with trio.fail_after(NIX_TIMEOUT):
                proc = await trio.run_process(
                    args, capture_stdout=True, capture_stderr=True, check=False
                )
        except trio.TooSlowError:
            raise PushError(f"{args[0]} took longer than {NIX_TIMEOUT:.0f} s") from None
        except OSError as exc:
            raise PushError(f"cannot run {args[0]}: {exc.strerror}") from exc
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise PushError(f"{args[0]} failed: {err[-1] if err else proc.returncode}")
        if len(proc.stdout) > MAX_PATH_INFO:
            raise PushError(f"{args[0]} printed more than {MAX_PATH_INFO} bytes")
        return bytes(proc.stdout)

    async def invalid(self, paths: list[str]) -> set[str]:
        """Which of ``paths`` are not (yet) valid in the store."""
        if not paths:
            return set()
        out = await self._run(
            self._args("nix-store", "--check-validity", "--print-invalid", *paths)
        )
        return set(out.decode().split())

    async def closure(self, paths: list[str]) -> list[PathRecord]:
        """Every path in the closure of ``paths``, with Nix's record of it."""
        out = await self._run(
            self._args(
                "nix", "path-info", "--extra-experimental-features", "nix-command",
                "--json", "--sigs", "--recursive", *paths,
            )
        )  # fmt: skip
        try:
            data = load_json(out, max_bytes=MAX_PATH_INFO, max_depth=8, what="nix path-info")
        except FormatError as exc:
            raise PushError(str(exc)) from exc
        return parse_path_info(data)


def check_paths(paths: Any) -> list[str]:
    """The store paths of a request, each checked (``/nix/store/<hash>-<name>``)."""
    if not isinstance(paths, list) or not paths:
        raise PushError('"paths" must be a non-empty list of store paths')
    if len(paths) > MAX_PATHS:
        raise PushError(f"at most {MAX_PATHS} paths at once")
    out = []
    for p in paths:
        if not isinstance(p, str):
            raise PushError("every path must be a string")
        try:
            sp = StorePath.parse(p.rstrip("/"))
        except FormatError as exc:
            raise PushError(str(exc)) from exc
        if not all(c in base32.ALPHABET for c in sp.hash_part):
            raise PushError(f"{p!r} is not a store path (bad hash)")
        out.append(sp.path())
    return list(dict.fromkeys(out))


def check_slice(to: Any) -> tuple[str, str]:
    if not isinstance(to, str) or to.count("/") != 1:
        raise PushError("no slice to push to: pass --to ORG/PROJECT or set push.to")
    org, project = to.split("/")
    chars_ok = all(c.isascii() and (c.isalnum() or c in "._-") for c in org + project)
    if not (org and project and chars_ok):
        raise PushError(f"{to!r} is not ORG/PROJECT")
    return org, project


@dataclass
class Job:
    """One push and its progress."""

    id: str
    to: str
    requested: list[str]
    source: str = "cli"
    state: str = "running"
    total: int = 0
    pushed: int = 0
    present: int = 0
    upstream: int = 0
    failed: int = 0
    bytes: int = 0
    nar_bytes: int = 0
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    failures: dict[str, str] = field(default_factory=dict)
    skip_invalid: bool = False
    invalid: list[str] = field(default_factory=list)
    finished: trio.Event = field(default_factory=trio.Event)

    @property
    def done(self) -> int:
        return self.pushed + self.present + self.upstream + self.failed

    def summary(self) -> dict[str, Any]:
        end = self.finished_at or time.time()
        elapsed = max(end - self.started_at, 1e-6)
        return {
            "job": self.id,
            "to": self.to,
            "source": self.source,
            "state": self.state,
            "requested": len(self.requested),
            "total": self.total,
            "done": self.done,
            "pushed": self.pushed,
            "skipped_present": self.present,
            "skipped_upstream": self.upstream,
            "failed": self.failed,
            "bytes": self.bytes,
            "nar_bytes": self.nar_bytes,
            "elapsed": round(end - self.started_at, 3),
            "rate": round(self.bytes / elapsed, 1),
            "error": self.error,
            "invalid": self.invalid[:1000],
            "failures": dict(itertools.islice(self.failures.items(), 20)),
        }


class TokenSource(Protocol):
    async def get(self) -> Any: ...
    async def refresh(self, stale: Any) -> Any: ...


class PushHost(Protocol):
    """What the pusher needs of the daemon (:class:`nixd.daemon.main.Daemon`)."""

    config: Config
    http: httpx.AsyncClient

    @property
    def push_server(self) -> str | None: ...

    @property
    def push_tokens(self) -> TokenSource: ...


def upstream_filter_keys(config: Config) -> tuple[PublicKey, ...]:
    """Keys whose signature on a local path means an upstream serves it: not pushed."""
    texts = list(config.push.upstream_keys)
    for u in config.proxy.upstreams:
        texts.extend(u.trusted_keys)
    return tuple(PublicKey.parse(t) for t in dict.fromkeys(texts))


def _signed_upstream(record: PathRecord, keys: tuple[PublicKey, ...]) -> bool:
    if not keys or not record.sigs:
        return False
    try:
        return bool(record.narinfo("nar/x.nar", "none").verify(keys))
    except FormatError:
        return False


def _spool(real: str, record: PathRecord, compression: str, tmp_dir: str) -> tuple[str, int]:
    """Dump and compress into a temp file; checks Nix's NarHash/NarSize. (thread)"""
    fd, name = tempfile.mkstemp(prefix="push-", dir=tmp_dir)
    sha = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            writer: Any
            if compression == "zstd":
                writer = zstandard.ZstdCompressor(level=3).stream_writer(
                    cast("IO[bytes]", raw), closefd=False
                )
            else:
                writer = lzma.LZMAFile(raw, "wb", preset=6)  # noqa: SIM115 - `with` below
            with writer:
                for chunk in dump(real):
                    sha.update(chunk)
                    size += len(chunk)
                    writer.write(chunk)
            raw.flush()
            length = raw.tell()
        _check_nar(record, sha.digest(), size)
        return name, length
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def _check_nar(record: PathRecord, digest: bytes, size: int) -> None:
    if size != record.nar_size or digest != record.nar_hash.digest:
        raise PushError(
            f"{record.path} does not match Nix's record of it (NarHash/NarSize): "
            "the store is corrupt here (`nix-store --verify --check-contents`)"
        )


async def _thread_chunks(make: Callable[[], Iterator[bytes]]) -> AsyncIterator[bytes]:
    """Chunks of a blocking iterator, about :data:`CHUNK` at a time, pulled in a thread."""
    it = make()

    def batch() -> bytes:
        out = bytearray()
        for chunk in it:
            out += chunk
            if len(out) >= CHUNK:
                break
        return bytes(out)

    while data := await trio.to_thread.run_sync(batch):
        yield data


class Pusher:
    """The push jobs and the queue drain of one daemon."""

    def __init__(self, host: PushHost) -> None:
        self.host = host
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self.queue_error: str | None = None
        self._retry_at: dict[Path, tuple[float, float]] = {}
        """Taken queue files whose push failed: (when to try again, the last delay)."""

    @property
    def config(self) -> Config:
        return self.host.config

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run jobs and drain the queue until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._drain_forever)
            task_status.started()

    # -- control API -----------------------------------------------------------------------

    def submit(self, paths: Any, to: Any, *, source: str = "cli") -> Job:
        """Start a push job (raises :class:`PushError` for a bad request)."""
        if self._nursery is None:
            raise PushError("the pusher is not running")
        checked = check_paths(paths)
        target = to or self.config.push.to
        check_slice(target)
        if self.host.push_server is None:
            raise PushError("not logged in: run `nixd login` first")
        job = Job(id=str(next(self._ids)), to=str(target), requested=checked, source=source)
        self.jobs[job.id] = job
        ended = [j.id for j in self.jobs.values() if j.state != "running"]
        for old in ended[: max(0, len(self.jobs) - KEEP_JOBS)]:
            del self.jobs[old]
        self._nursery.start_soon(self._run_job, job)
        return job

    async def api_push(self, _peer: Peer | None, body: Any) -> dict[str, Any]:
        """``POST /push {"paths": [...], "to": "org/project" | null, "skip_invalid": bool}``
        -> the new job. ``skip_invalid`` (watch-store): paths not yet valid are reported
        in the job's ``invalid`` instead of failing it."""
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "expected a JSON object")
        try:
            job = self.submit(body.get("paths"), body.get("to"))
            job.skip_invalid = body.get("skip_invalid") is True
            return job.summary()
        except PushError as exc:
            raise ApiError(400, "bad_request", str(exc)) from exc

    async def api_job(self, _peer: Peer | None, body: Any) -> dict[str, Any]:
        """``POST /push/job {"job": id}`` -> its progress."""
        job_id = body.get("job") if isinstance(body, dict) else None
        try:
            return self.job(job_id).summary()
        except PushError as exc:
            raise ApiError(404, "not_found", str(exc)) from exc

    async def api_status(self, _peer: Peer | None, _body: Any) -> dict[str, Any]:
        """``GET /push`` -> every remembered job and the queue."""
        return self.status()

    def job(self, job_id: Any) -> Job:
        job = self.jobs.get(str(job_id))
        if job is None:
            raise PushError(f"no such push job {str(job_id)[:40]!r}")
        return job

    # -- a job -----------------------------------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        settings = self.config.push
        try:
            store = NixStore(settings.store)
            invalid = await store.invalid(job.requested)
            if invalid and not job.skip_invalid:
                raise PushError(f"not valid in the store: {', '.join(sorted(invalid)[:5])}")
            job.invalid = sorted(invalid)
            wanted = [p for p in job.requested if p not in invalid]
            records = await store.closure(wanted) if wanted else []
            job.total = len(records)
            await self._push_all(job, store, records, settings)
            job.state = "failed" if job.failed else "done"
        except Exception as exc:  # containment: the job fails, the daemon goes on
            job.state = "failed"
            job.error = str(exc) if isinstance(exc, NixdError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, NixdError):
                log.error("push job %s failed", job.id, exc_info=exc)
        finally:
            job.finished_at = time.time()
            job.finished.set()
        log.info(
            "push %s to %s: %s (%d pushed, %d present, %d from upstreams, %d failed, %d bytes)",
            job.id, job.to, job.state, job.pushed, job.present, job.upstream, job.failed,
            job.bytes,
        )  # fmt: skip

    async def _push_all(
        self, job: Job, store: NixStore, records: list[PathRecord], settings: PushSection
    ) -> None:
        keys = upstream_filter_keys(self.config)
        server = self.host.push_server
        if server is None:
            raise PushError("not logged in: run `nixd login` first")
        org, project = check_slice(job.to)
        base = f"{strip_userinfo(server).rstrip('/')}/cache/{org}/{project}"
        ready = {r.path: trio.Event() for r in records}
        ok: dict[str, bool] = {}
        limit = trio.Semaphore(settings.jobs)
        tmp_dir = Path(self.config.daemon.state_dir) / "push-tmp"
        await trio.to_thread.run_sync(lambda: tmp_dir.mkdir(mode=0o700, exist_ok=True))

        async def one(record: PathRecord) -> None:
            try:
                if _signed_upstream(record, keys):
                    job.upstream += 1
                    ok[record.path] = True
                    return
                async with limit:
                    if await self._present(base, record):
                        job.present += 1
                        ok[record.path] = True
                        return
                    url = await self._upload_nar(
                        job, base=base, store=store, record=record, settings=settings,
                        tmp_dir=tmp_dir,
                    )  # fmt: skip
                for ref in record.references:
                    if ref != record.path and ref in ready:
                        await ready[ref].wait()
                        if not ok.get(ref):
                            raise PushError(f"its reference {ref} was not pushed")
                async with limit:
                    info = record.narinfo(url, settings.compression)
                    await self._request("PUT", f"{base}/{record.store_path.hash_part}.narinfo",
                                        content=info.render().encode(),
                                        headers={"content-type": "text/x-nix-narinfo"})  # fmt: skip
                job.pushed += 1
                ok[record.path] = True
            except Exception as exc:
                job.failed += 1
                ok[record.path] = False
                message = str(exc) if isinstance(exc, NixdError) else f"{type(exc).__name__}: {exc}"
                job.failures[record.path] = message
                log.warning("push %s: %s: %s", job.id, record.path, message)
                if isinstance(exc, Refused | AuthError):  # the same for every path: stop
                    job.error = message
                    nursery.cancel_scope.cancel()
            finally:
                ready[record.path].set()

        async with trio.open_nursery() as nursery:
            for record in records:
                nursery.start_soon(one, record)
        job.failed = job.total - job.pushed - job.present - job.upstream

    async def _present(self, base: str, record: PathRecord) -> bool:
        response = await self._request(
            "GET", f"{base}/{record.store_path.hash_part}.narinfo", allow=(404, 403)
        )
        return response.status_code == 200

    async def _upload_nar(
        self,
        job: Job,
        *,
        base: str,
        store: NixStore,
        record: PathRecord,
        settings: PushSection,
        tmp_dir: Path,
    ) -> str:
        compression = settings.compression
        url = f"nar/{record.nar_hash.encode('base32', prefix=False)}{_SUFFIX[compression]}"
        real = store.real_path(record.path)

        def counted(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            async def gen() -> AsyncIterator[bytes]:
                async for chunk in source:
                    job.bytes += len(chunk)
                    yield chunk

            return gen()

        if compression == "none":
            length = record.nar_size

            def body() -> AsyncIterator[bytes]:
                return counted(_thread_chunks(lambda: _checked_dump(real, record)))
        else:
            spooled, length = await trio.to_thread.run_sync(
                _spool, real, record, compression, str(tmp_dir)
            )

            def body() -> AsyncIterator[bytes]:
                return counted(_file_chunks(spooled))

        try:
            await self._request(
                "PUT",
                f"{base}/{url}",
                body=body,
                headers={"content-length": str(length), "content-type": "application/x-nix-nar"},
            )
        finally:
            if compression != "none":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spooled)
        job.nar_bytes += record.nar_size
        return url

    async def _request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        body: Callable[[], AsyncIterator[bytes]] | None = None,
        headers: dict[str, str] | None = None,
        allow: Iterable[int] = (),
    ) -> httpx.Response:
        """One request with the daemon's token, retried (see the module docstring)."""
        attempts = self.config.push.retries
        tokens = self.host.push_tokens
        renewed = False
        delay = BACKOFF
        for attempt in range(1, attempts + 1):
            token = await tokens.get()
            hs = {**(headers or {}), "authorization": f"Bearer {token.value}"}
            try:
                response = await self.host.http.request(
                    method,
                    url,
                    content=body() if body is not None else content,
                    headers=hs,
                    timeout=httpx.Timeout(300.0, connect=15.0),
                )
                status = response.status_code
                if status == 401 and not renewed:
                    renewed = True
                    await tokens.refresh(token)
                    continue
                if status >= 500 or status == 429:
                    raise _Retry(f"{method} {_shown(url)}: the server answered {status}")
                if status == 401:
                    raise AuthError(f"{method} {_shown(url)}: the server refused the token (401)")
                if status >= 400 and status not in allow:
                    text = response.text.strip()[:300]
                    kind = Refused if status == 403 else PushError
                    raise kind(f"{method} {_shown(url)}: {status} {text}")
                return response
            except (httpx.TransportError, _Retry) as exc:
                if attempt == attempts:
                    raise PushError(f"{exc} (after {attempts} attempts)") from exc
                log.info("push: %s; retrying in %.1f s", exc, delay)
                await trio.sleep(delay)
                delay *= 2
        raise PushError(f"{method} {_shown(url)}: the server kept refusing the token")

    # -- the queue ---------------------------------------------------------------------------

    async def _drain_forever(self) -> None:
        while True:
            try:
                await self.drain_once()
                self.queue_error = None
            except Exception as exc:  # containment: logged, tried again at the next poll
                self.queue_error = str(exc)
                log.warning("push queue: %s", exc)
            await trio.sleep(QUEUE_POLL)

    async def drain_once(self) -> list[Job]:
        """Take what the queue holds (and what a crash left aside) and push it."""
        if self.host.push_server is None:
            return []  # kept until a login: the queue is durable
        queue = Path(self.config.push_queue)
        taken = await trio.to_thread.run_sync(take_queue, queue)
        jobs: list[Job] = []
        now = trio.current_time()
        for batch_file in taken:
            if self._retry_at.get(batch_file, (0.0, 0.0))[0] > now:
                continue
            entries = await trio.to_thread.run_sync(read_queue, batch_file)
            by_slice: dict[str, list[str]] = {}
            for entry in entries:
                to = entry.get("to") or self.config.push.to
                by_slice.setdefault(str(to), []).extend(entry["paths"])
            batch_jobs = []
            failed = False
            for to, paths in by_slice.items():
                try:
                    batch_jobs.append(self.submit(paths, to, source="queue"))
                except PushError as exc:
                    failed = True
                    log.warning("push queue: %d paths for %s not pushed: %s", len(paths), to, exc)
            jobs.extend(batch_jobs)
            for job in batch_jobs:
                await job.finished.wait()
                failed = failed or job.state != "done"
            if failed:  # kept, and tried again later: the queue is durable
                delay = min(QUEUE_RETRY_MAX, 2 * self._retry_at.get(batch_file, (0.0, 30.0))[1])
                self._retry_at[batch_file] = (trio.current_time() + delay, delay)
                log.warning("push queue: %s kept; tried again in %.0f s", batch_file.name, delay)
                continue
            self._retry_at.pop(batch_file, None)
            await trio.to_thread.run_sync(_unlink, batch_file)
        return jobs

    def status(self) -> dict[str, Any]:
        queue = Path(self.config.push_queue)
        try:
            pending = queue.stat().st_size
        except OSError:
            pending = 0
        return {
            "jobs": [j.summary() for j in self.jobs.values()],
            "queue": {"file": str(queue), "bytes": pending, "error": self.queue_error},
        }


def _shown(url: str) -> str:
    return strip_userinfo(url)


def _checked_dump(real: str, record: PathRecord) -> Iterator[bytes]:
    sha = hashlib.sha256()
    size = 0
    for chunk in dump(real):
        sha.update(chunk)
        size += len(chunk)
        yield chunk
    _check_nar(record, sha.digest(), size)


async def _file_chunks(path: str) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as f:
        while data := await f.read(CHUNK):
            yield data


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# -- the queue file (appending and taking: nixd.daemon.pushqueue) -----------------------------


def read_queue(path: Path) -> list[dict[str, Any]]:
    """The entries of a taken queue file; a malformed line is logged and skipped."""
    with open(path, "rb") as f:
        raw = f.read(MAX_QUEUE_BYTES + 1)
    if len(raw) > MAX_QUEUE_BYTES:
        log.error("push queue %s is larger than %d bytes; set aside", path, MAX_QUEUE_BYTES)
        os.rename(path, path.with_suffix(".too-large"))
        return []
    entries = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = load_json(line, max_bytes=MAX_QUEUE_BYTES, max_depth=4, what="a queue entry")
            if not isinstance(entry, dict):
                raise FormatError("not an object")
            entry["paths"] = check_paths(entry.get("paths"))
            to = entry.get("to")
            if to is not None:
                check_slice(to)
            entries.append(entry)
        except (FormatError, PushError) as exc:
            log.warning("push queue %s line %d skipped: %s", path, n, exc)
    return entries
