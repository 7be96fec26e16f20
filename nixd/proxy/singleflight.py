"""One upstream download per NAR, however many Nix requests want it.

A :class:`Download` streams the upstream file into a temp file, hashing as it goes, and
every Nix request for that NAR (the first one too) *tails* the growing file from its own
offset. So a slow client never slows another client (the download keeps pace with the
fastest reader only, see below), a client that joins
late or resumes with ``Range`` just starts further in, and the bytes reach Nix with
``sendfile`` from the page cache.

The tail rule is what makes "abort on mismatch" work: while the download is not yet
verified, readers may send everything but the last byte written (:meth:`Download.servable`).
Only when the whole file has been received and its FileHash/FileSize (or NarHash/NarSize
for uncompressed NARs) match does the last byte go out; on a mismatch, a short or overlong
body, or an upstream failure, the download is ``failed`` and every reader cuts its
connection, so Nix (which got a ``Content-Length``) sees a failed transfer.

Resuming: when the upstream goes away mid-body (a server restart, a reset connection, a
read timeout), the download does not fail. It asks again from the first byte it lacks
(``Range: bytes=<written>-``), after a short backoff, up to ``resumes`` times; the hash
state carries on, so the FileHash still covers every byte of the file, whichever answer
brought it. An upstream that ignores ``Range`` and resends the whole file is fine too:
the part already received is skipped. Readers meanwhile just wait for more bytes, so a
Nix request in flight sees a pause, not a failure; and a Nix that did lose its
connection and retries with its own ``Range`` tails the same download from its offset.
Only a failure before the first byte is left to Nix's own retry (no state worth keeping),
and integrity failures are never retried.

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

import contextlib
import hashlib
import logging
import os
from enum import Enum
from pathlib import Path

import trio

from nixd.errors import AuthError, IntegrityError, UpstreamError
from nixd.nix.narinfo import NarInfo
from nixd.proxy.errors import NotFound
from nixd.proxy.metrics import Metrics
from nixd.proxy.pagecache import Recycler
from nixd.proxy.upstream import Upstream
from nixd.proxy.verify import can_verify, expected_raw, nar_matches

log = logging.getLogger(__name__)

AHEAD = 64 << 20
"""Most bytes the download runs ahead of its fastest reader (when it has readers)."""
STALL = 10.0
"""Seconds without reader progress after which the download stops waiting for readers."""
RESUME_DELAY_MAX = 8.0
"""Longest wait between two attempts to resume a cut download."""


class State(Enum):
    STARTING = "starting"  # waiting for the upstream's response headers
    RUNNING = "running"  # bytes are arriving
    OK = "ok"  # complete and verified: readers may send everything
    FAILED = "failed"  # readers must cut their connections


class Download:
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
    ) -> None:
        self.key = key
        self.resumes = resumes
        self.resume_delay = resume_delay
        self.info = info
        self.upstream = upstream
        self.temp = temp
        self.metrics = metrics
        expected = expected_raw(info)
        self.expected_digest = expected[0] if expected else None
        self.size: int | None = expected[1] if expected else None
        """Bytes the file will have, if the narinfo says; readers send it as Content-Length."""
        self.written = 0
        self.state = State.STARTING
        self.error: BaseException | None = None
        self.nar_verified = False
        """True when the inline hash already proved NarHash (uncompressed NARs)."""
        self._changed = trio.Event()
        self._fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._readers: dict[object, int] = {}
        """Position of each reader sending the file (see :meth:`reader_at`)."""
        self._progress: trio.Event | None = None
        self._throttle = True

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
        """Fetch, hash and verify; never raises (the outcome is in ``state``/``error``)."""
        self.upstream.acquire()
        try:
            await self._fetch()
        except trio.Cancelled:
            self._fail(UpstreamError(f"download of {self.key} was cancelled"))
            raise
        except Exception as exc:
            self._fail(exc)
        finally:
            self.upstream.release()
            with contextlib.suppress(OSError):
                os.close(self._fd)

    async def _fetch(self) -> None:
        sha = hashlib.sha256()
        size = self.size
        recycler = Recycler(self._fd)
        attempt = 0
        while True:
            try:
                await self._receive(sha, recycler)
                break
            except (IntegrityError, NotFound):
                raise
            except (UpstreamError, AuthError) as exc:
                # Cut mid-body (an upstream restart, a reset): resume from the bytes
                # already received and hashed. Failures before any byte are Nix's to retry.
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
        if size is not None and self.written != size:
            raise IntegrityError(f"{self.key}: upstream sent {self.written} of {size} bytes")
        if self.expected_digest is not None:
            if sha.digest() != self.expected_digest:
                raise IntegrityError(f"{self.key}: file hash does not match the narinfo")
            self.nar_verified = self.info.compression == "none"
        else:
            # No FileHash to check inline: prove NarHash before releasing the last byte.
            if not can_verify(self.info.compression):
                raise IntegrityError(f"{self.key}: cannot verify {self.info.compression} NARs")
            if not await trio.to_thread.run_sync(nar_matches, self.temp, self.info):
                raise IntegrityError(f"{self.key}: NAR does not match the signed NarHash")
            self.nar_verified = True
        self.state = State.OK
        self._notify()

    async def _receive(self, sha: hashlib._Hash, recycler: Recycler) -> None:
        """Append the upstream's bytes from ``written`` on (the whole file the first time)."""
        size = self.size
        fd = self._fd
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
                self._notify()
            async for received in body:
                chunk = received
                if skip:
                    dropped = min(skip, len(chunk))
                    skip -= dropped
                    chunk = chunk[dropped:]
                n = len(chunk)
                if not n:
                    continue
                if size is not None and self.written + n > size:
                    raise IntegrityError(f"{self.key}: upstream sent more than {size} bytes")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                sha.update(chunk)
                self.written += n
                self._notify()
                recycler.written(self.written, self._low_water())
                await self._keep_pace()
            if skip:
                raise UpstreamError(f"{self.key}: upstream resent fewer bytes than it had sent")

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, IntegrityError):
            self.metrics.inc("nixd_proxy_verification_failures_total", stage="file")
            log.warning("upstream %s: %s", self.upstream.name, exc)
        else:
            log.info("download of %s failed: %s", self.key, exc)
        self.error = exc
        self.state = State.FAILED
        with contextlib.suppress(OSError):
            os.unlink(self.temp)
        self._notify()
