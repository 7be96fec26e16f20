"""One upstream download per NAR, however many Nix requests want it.

A :class:`Download` streams the upstream file into a temp file, hashing as it goes, and
every Nix request for that NAR (the first one too) *tails* the growing file from its own
offset. So a slow client never slows another client (the download keeps pace with the
fastest reader only, see below), a client that joins
late or resumes with ``Range`` just starts further in, and the bytes reach Nix with
``sendfile`` from the page cache.

The tail rule is what makes "abort on mismatch" work: while the download is not yet
verified, readers may send everything but the last byte written (:meth:`Download.servable`).
Every batch of bytes from the upstream goes to a worker thread that writes it to the temp
file and feeds it to the download's :class:`~nixd.proxy.verify.NarVerifier` (FileSize and,
decompressed, the signed NarHash/NarSize: one pass, the file is never read again). Only
when the whole file has been received and the verifier passed does the last byte go out;
on a mismatch, a short or overlong body (or decompressed stream), or an upstream failure,
the download is ``failed`` and every reader cuts its connection, so Nix (which got a
``Content-Length``) sees a failed transfer.

Off the event loop, one ``trio.to_thread.run_sync`` per batch (up to 1 MiB, as the
upstream reader hands it over) rather than a long-lived thread per download fed through
a queue: the batch is a view of the reader's reused buffer, valid while the download task
waits for the thread, so nothing is copied, and the kernel's socket buffer keeps filling
meanwhile. Measured with ``bench/verify_cost.py`` (a 1 GiB NAR, 420 MiB of zstd, 1 MiB
batches; 2 cores, load 3-4 from other work; best of 3 interleaved rounds, process CPU):
per-batch ``to_thread`` 3.52 CPU-s per GiB of file (1.44 per GiB of NAR), a worker thread
fed through a queue 3.98 (1.63), the same work inline on the loop 4.04 (1.66); at 256 MiB,
3.65 / 3.77 / 3.08 (then with two sha256 a batch; a compressed file's FileHash is no
longer computed, see :mod:`nixd.proxy.verify`). The hand-off costs less than the noise;
the work itself (sha256, zstd, the write into fresh page cache) is the bill, and off the
loop it no longer holds up other requests.

Resuming: when the upstream goes away mid-body (a server restart, a reset connection, a
read timeout), the download does not fail. It asks again from the first byte it lacks
(``Range: bytes=<written>-``), after a short backoff, up to ``resumes`` times; the
verifier's state carries on, so the signed NarHash still covers every byte of the file,
whichever answer brought it. An upstream that ignores ``Range`` and resends the whole
file is fine too: the part already received is skipped. Readers meanwhile just wait for
more bytes, so a Nix request in flight sees a pause, not a failure; and a Nix that did
lose its connection and retries with its own ``Range`` tails the same download from its
offset. Only a failure before the first byte is left to Nix's own retry (no state worth
keeping), and integrity failures are never retried.

Full disk: a write that fails with ENOSPC/EDQUOT asks the store to evict (``make_room``)
and is retried; when nothing more can go, the download fails with :class:`NoRoom` and
its readers carry on from where they are with a :class:`PassThrough` of their own, which
streams the NAR from the upstream straight to one reader, verified the same way, and keeps
nothing.

Page cache: on the VMs nixd is benchmarked on, filling page cache pages that were not
used recently costs ~4 CPU-s per GiB (the host backs them afresh), ten times the cost of
reusing recently freed ones. So the writer keeps only a window of the file cached: it
starts writeback of each block as it is written and drops blocks that every reader has
sent (:class:`nixd.proxy.pagecache.Recycler`), and it stays at most ``AHEAD`` bytes ahead
of the fastest reader, so the same few hundred MiB of pages are reused for the whole NAR.
A stalled reader stops throttling after ``STALL`` seconds; a reader that falls behind the
window is served from disk.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import inspect
import logging
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Protocol

import trio

from nixd.errors import AuthError, IntegrityError, UpstreamError
from nixd.nix.narinfo import NarInfo
from nixd.proxy.errors import NotFound
from nixd.proxy.metrics import Metrics
from nixd.proxy.pagecache import Recycler
from nixd.proxy.upstream import Upstream
from nixd.proxy.verify import NarVerifier, expected_raw

log = logging.getLogger(__name__)

AHEAD = 64 << 20
"""Most bytes the download runs ahead of its fastest reader (when it has readers)."""
STALL = 10.0
"""Seconds without reader progress after which the download stops waiting for readers."""
RESUME_DELAY_MAX = 8.0
"""Longest wait between two attempts to resume a cut download."""
_FULL = (errno.ENOSPC, errno.EDQUOT)
FULL_RETRIES = 2
"""Writes in a row that may fail on a full disk (after making room) before giving up."""


class State(Enum):
    STARTING = "starting"  # waiting for the upstream's response headers
    RUNNING = "running"  # bytes are arriving
    OK = "ok"  # complete and verified: readers may send everything
    FAILED = "failed"  # readers must cut their connections


class NoRoom(Exception):
    """The proxy's store filesystem is full and nothing more could be evicted.

    Not an error a client sees: readers of the download switch to a :class:`PassThrough`.
    """


class _Transfer(abc.ABC):
    """Fetch one NAR file from the upstream, resuming when cut, verified in one pass.

    Subclasses say what becomes of each verified batch (:meth:`_take`).
    """

    def __init__(
        self,
        key: str,
        info: NarInfo,
        upstream: Upstream,
        metrics: Metrics,
        *,
        resumes: int = 8,
        resume_delay: float = 0.25,
    ) -> None:
        self.key = key
        self.resumes = resumes
        self.resume_delay = resume_delay
        self.info = info
        self.upstream = upstream
        self.metrics = metrics
        expected = expected_raw(info)
        self.size: int | None = expected[1] if expected else None
        """Bytes the file will have, if the narinfo says; readers send it as Content-Length."""
        self.verifier = NarVerifier(info, key)
        self.written = 0
        """File bytes received, verified so far and taken (:meth:`_take`)."""
        self.state = State.STARTING
        self.error: BaseException | None = None

    async def _fetch(self) -> None:
        attempt = 0
        while True:
            try:
                await self._receive()
                break
            except (IntegrityError, NotFound, NoRoom):
                raise
            except (UpstreamError, AuthError) as exc:
                # Cut mid-body (an upstream restart, a reset): resume from the bytes
                # already received and verified. Failures before any byte are Nix's to retry.
                if not self.written or attempt >= self.resumes:
                    raise
                attempt += 1
                delay = min(self.resume_delay * 2 ** (attempt - 1), RESUME_DELAY_MAX)
                self.metrics.inc("nixd_proxy_upstream_resumes_total")
                log.info(
                    "download of %s cut at byte %d (%s); resuming in %.2f s (%d of %d)",
                    self.key, self.written, exc, delay, attempt, self.resumes,
                )  # fmt: skip
                await trio.sleep(delay)
        self.metrics.inc("nixd_proxy_upstream_bytes_total", self.written)
        self.verifier.finish()  # IntegrityError unless FileSize and the signed NarHash match
        self.state = State.OK

    async def _receive(self) -> None:
        """Take the upstream's bytes from ``written`` on (the whole file the first time)."""
        size = self.size
        offset = self.written
        async with self.upstream.nar_body(self.info, offset) as body:
            length = body.length
            if size is not None and length is not None and body.start + length != size:
                raise IntegrityError(
                    f"{self.key}: upstream announces {body.start + length} bytes, "
                    f"the narinfo says {size}"
                )
            skip = offset - body.start  # an upstream that ignored Range resends the start
            if self.state is State.STARTING:
                self.state = State.RUNNING
                self._started()
            chunks = body.__aiter__()
            # An async generator left mid-way (a verification failure) is closed here,
            # not by the garbage collector.
            async with contextlib.AsyncExitStack() as closing:
                if inspect.isasyncgen(chunks):
                    closing.push_async_callback(chunks.aclose)
                async for received in chunks:
                    chunk = received
                    if skip:
                        dropped = min(skip, len(chunk))
                        skip -= dropped
                        chunk = chunk[dropped:]
                    if not len(chunk):
                        continue
                    if size is not None and self.written + len(chunk) > size:
                        raise IntegrityError(f"{self.key}: upstream sent more than {size} bytes")
                    await self._take(chunk)
            if skip:
                raise UpstreamError(f"{self.key}: upstream resent fewer bytes than it had sent")

    def _started(self) -> None:  # noqa: B027 - an optional hook; doing nothing is right
        """The upstream answered: bytes are coming."""

    @abc.abstractmethod
    async def _take(self, chunk: bytes | memoryview) -> None:
        """Verify ``chunk`` (the next file bytes) and pass it on; advance ``written``.

        ``chunk`` may be a view of a buffer the upstream reader reuses once this returns.
        """


class Download(_Transfer):
    """A NAR being fetched from ``upstream`` into ``temp``; see the module docstring."""

    def __init__(
        self,
        key: str,
        info: NarInfo,
        upstream: Upstream,
        temp: Path,
        metrics: Metrics,
        *,
        resumes: int = 8,
        resume_delay: float = 0.25,
        make_room: Callable[[int], bool] | None = None,
    ) -> None:
        super().__init__(key, info, upstream, metrics, resumes=resumes, resume_delay=resume_delay)
        self.temp = temp
        self.make_room = make_room
        """Called with a byte count when the disk is full: True if room was made."""
        self._changed = trio.Event()
        self._fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._readers: dict[object, int] = {}
        """Position of each reader sending the file (see :meth:`reader_at`)."""
        self._progress: trio.Event | None = None
        self._throttle = True
        self._recycler = Recycler(self._fd)

    def open_reader(self) -> int:
        """A read-only fd on the temp file; valid even after the file is renamed or removed."""
        return os.open(self.temp, os.O_RDONLY | os.O_CLOEXEC)

    @property
    def failed(self) -> bool:
        return self.state is State.FAILED

    def servable(self) -> int:
        """How many bytes from the start readers may send now."""
        if self.state is State.OK:
            return self.written
        return max(0, self.written - 1)

    def reader_at(self, reader: object, pos: int | None) -> None:
        """Record how far ``reader`` has sent the file (None: it is done or gone)."""
        if pos is None:
            self._readers.pop(reader, None)
        else:
            self._readers[reader] = pos
        if self._progress is not None:
            self._progress.set()

    async def _keep_pace(self) -> None:
        """Wait while the fastest reader is more than AHEAD bytes behind the writer."""
        while self._throttle and self._readers:
            if self.written - max(self._readers.values()) <= AHEAD:
                return
            self._progress = trio.Event()
            with trio.move_on_after(STALL) as scope:
                await self._progress.wait()
            self._progress = None
            if scope.cancelled_caught:
                log.info("%s: readers stalled; downloading without waiting for them", self.key)
                self._throttle = False

    def _low_water(self) -> int:
        """Below this offset every current reader has sent the file."""
        return min(self._readers.values(), default=self.written)

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self) -> None:
        """Fetch, write and verify; never raises (the outcome is in ``state``/``error``)."""
        self.upstream.acquire()
        try:
            await self._fetch()
            self._notify()
        except trio.Cancelled:
            self._fail(UpstreamError(f"download of {self.key} was cancelled"))
            raise
        except Exception as exc:
            self._fail(exc)
        finally:
            self.upstream.release()
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def _started(self) -> None:
        self._notify()

    async def _take(self, chunk: bytes | memoryview) -> None:
        total = len(chunk)
        done = await trio.to_thread.run_sync(self._absorb, chunk)
        stuck = 0
        while done < len(chunk):  # the disk is full: make room and write the rest, or stop
            self.written += done
            chunk = chunk[done:]
            self._notify()
            stuck = stuck + 1 if not done else 0
            need = self.size - self.written if self.size is not None else len(chunk)
            if stuck > FULL_RETRIES or self.make_room is None or not self.make_room(need):
                raise NoRoom(f"{self.key}: the proxy store's filesystem is full")
            done = await trio.to_thread.run_sync(self._write, chunk)
        self.written += done
        self.metrics.inc("nixd_proxy_verified_bytes_total", total)
        self._notify()
        self._recycler.written(self.written, self._low_water())
        await self._keep_pace()

    def _absorb(self, chunk: bytes | memoryview) -> int:
        """In a worker thread: verify and write ``chunk``; the bytes written (all of them
        unless the disk is full)."""
        self.verifier.feed(chunk)
        return self._write(chunk)

    def _write(self, chunk: bytes | memoryview) -> int:
        view = memoryview(chunk)
        done = 0
        while done < len(view):
            try:
                done += os.write(self._fd, view[done:])
            except OSError as exc:
                if exc.errno in _FULL:
                    return done
                raise
        return done

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, IntegrityError):
            self.metrics.inc("nixd_proxy_verification_failures_total", stage="file")
            log.warning("upstream %s: %s", self.upstream.name, exc)
        elif isinstance(exc, NoRoom):
            pass  # said by the proxy, once per NAR
        else:
            log.info("download of %s failed: %s", self.key, exc)
        self.error = exc
        self.state = State.FAILED
        with contextlib.suppress(OSError):
            os.unlink(self.temp)
        self._notify()


class Sender(Protocol):
    async def send(self, data: bytes) -> None: ...


class PassThrough(_Transfer):
    """The NAR streamed from the upstream to one reader and not kept (the store is full).

    The reader's response is already started; bytes ``[start, stop)`` of the file go to
    it as they are verified, except the file's last byte, which waits for the verifier
    (as for a :class:`Download`). The whole file is fetched and verified even when the
    reader wants only its end, since the signed NarHash covers all of it. Paced by the
    reader: one batch in memory at a time.
    """

    def __init__(
        self,
        key: str,
        info: NarInfo,
        upstream: Upstream,
        metrics: Metrics,
        *,
        sender: Sender,
        start: int,
        stop: int | None,
        resumes: int = 8,
        resume_delay: float = 0.25,
    ) -> None:
        super().__init__(key, info, upstream, metrics, resumes=resumes, resume_delay=resume_delay)
        self.sender = sender
        self.start = start
        self.stop = stop
        self.sent = 0
        self._held = b""
        """The last byte received, not sent until the next batch or the verdict."""

    async def run(self) -> None:
        """Fetch, verify and send; raises what failed (the caller cuts the connection)."""
        self.upstream.acquire()
        try:
            await self._fetch()
            await self._send_part(self._held, self.written - len(self._held))
        except IntegrityError as exc:
            self.metrics.inc("nixd_proxy_verification_failures_total", stage="file")
            log.warning("upstream %s: %s", self.upstream.name, exc)
            raise
        finally:
            self.upstream.release()

    async def _take(self, chunk: bytes | memoryview) -> None:
        await trio.to_thread.run_sync(self.verifier.feed, chunk)
        self.metrics.inc("nixd_proxy_verified_bytes_total", len(chunk))
        at = self.written
        self.written += len(chunk)
        await self._send_part(self._held, at - len(self._held))
        await self._send_part(chunk[:-1], at)
        self._held = bytes(chunk[-1:])

    async def _send_part(self, data: bytes | memoryview, at: int) -> None:
        """Send what of ``data`` (file bytes from offset ``at``) lies in ``[start, stop)``."""
        lo = max(self.start - at, 0)
        hi = len(data) if self.stop is None else min(len(data), self.stop - at)
        if hi > lo:
            await self.sender.send(bytes(data[lo:hi]))
            self.sent += hi - lo
