"""One upstream binary cache: its narinfos, checked, and its NARs, streamed into the store.

An upstream's answer is hostile until checked. Its narinfo body is bounded
(:data:`MAX_NARINFO`) before it is parsed, its References are bounded
(:data:`MAX_REFERENCES`), its NarSize by the server's largest upload, its URL must be a
relative name inside the cache (no scheme, host, ``..`` or query: the server fetches
nothing the upstream's admin points it at elsewhere), and at least one ``Sig`` must
verify against the mirror's keys. The NAR is then fed, as it arrives, through the same
:class:`~nixd.server.storage.store.NarIngest` an upload goes through, with NarSize as the
ingest's ceiling, so a body longer than signed stops at the first byte too many; its
compressed body is bounded too (FileSize if stated, else a margin over NarSize). Only a
whole NAR whose NarHash and NarSize are the signed ones is committed.

Three outcomes besides success, because the callers must tell them apart: the upstream
does not have the path (:class:`Absent`: 404, 403, 410), it has something that failed a
check (:class:`Refused`, with why), or it did not answer properly (:class:`Unavailable`:
a timeout, a refused connection, a cut body, any other status: a 5xx, a redirect, a
401). Pull-through answers 503 if any upstream is Unavailable, else a 404 (nothing
verified to serve).

Limits per upstream: ``max_concurrency`` requests in flight (a semaphore), and
``requests_per_second`` (requests start at most that often, spaced evenly); ``timeout``
is the longest wait for any progress (connect, a chunk), a narinfo must arrive whole
within it, and a NAR must average ``min_rate`` bytes per second after its first
``timeout`` seconds (an upstream that drips a byte per ``timeout`` is Unavailable, not a
fetch held for days).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httpx
import trio

from nixd.errors import FormatError, NixdError
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey
from nixd.server.config import MirrorSection

log = logging.getLogger(__name__)

MAX_NARINFO = 256 << 10
"""Bytes of a narinfo body (a path with 2,000 references is ~130 KiB)."""
MAX_REFERENCES = 4096
"""References of one narinfo: nixpkgs' largest closures' members have a few hundred."""
NAR_SLACK = 1 << 20
"""A compressed NAR may exceed its NarSize by this, plus 1/8 (incompressible data)."""
FEED_BATCH = 1 << 20
_NAR_URL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9][A-Za-z0-9._+-]*)*")
USER_AGENT = "nixd-server-mirror"


class UpstreamError(NixdError):
    """An upstream did not give a verified path; ``reason`` says why, for status."""

    def __init__(self, upstream: str, reason: str) -> None:
        super().__init__(f"{upstream}: {reason}")
        self.upstream = upstream
        self.reason = reason


class Absent(UpstreamError):
    """The upstream does not have the path (404, 403, 410)."""


class Refused(UpstreamError):
    """The upstream's answer failed a check (signature, size, hash, format)."""


class Unavailable(UpstreamError):
    """The upstream did not answer properly (timeout, connection, 5xx, a cut body)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A narinfo an upstream signed, checked; ``url`` is where it came from."""

    info: NarInfo
    url: str
    sigs: tuple[str, ...]
    """The Sig lines that verified against the mirror's keys."""


class Upstream:
    """The client of one ``[[mirror]]``; ``requests`` counts what it sent (tests, status)."""

    def __init__(
        self, section: MirrorSection, *, max_nar_size: int, client: httpx.AsyncClient
    ) -> None:
        self.section = section
        self.name = section.name
        self.keys = [PublicKey.parse(k) for k in section.public_keys]
        self.max_nar_size = max_nar_size
        self._client = client
        self._sem = trio.Semaphore(section.max_concurrency)
        self._next_start = 0.0
        self.requests = 0

    async def _slot(self) -> None:
        """Wait for this upstream's rate limit (requests start evenly spaced)."""
        rps = self.section.requests_per_second
        if rps <= 0:
            return
        now = trio.current_time()
        start = max(now, self._next_start)
        self._next_start = start + 1.0 / rps
        await trio.sleep(start - now)

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.section.timeout)

    async def narinfo(self, hash_part: str) -> Fetched:
        """The checked narinfo of ``hash_part``; Absent, Refused or Unavailable otherwise."""
        url = f"{self.section.url}/{hash_part}.narinfo"
        async with self._sem:
            await self._slot()
            self.requests += 1
            try:
                with trio.fail_after(self.section.timeout):
                    body = await self._get_small(url)
            except trio.TooSlowError:
                raise Unavailable(self.name, f"no narinfo within {self.section.timeout}s") from None
        try:
            info = NarInfo.parse(body)
        except FormatError as exc:
            raise Refused(self.name, f"malformed narinfo: {exc}") from exc
        if info.store_path.hash_part != hash_part:
            raise Refused(self.name, f"the narinfo of {hash_part} describes {info.store_path}")
        if len(info.references) > MAX_REFERENCES:
            raise Refused(
                self.name,
                f"{len(info.references)} references (more than {MAX_REFERENCES} accepted)",
            )
        if info.nar_size > self.max_nar_size:
            raise Refused(
                self.name,
                f"NarSize {info.nar_size} is larger than this server accepts "
                f"({self.max_nar_size} bytes)",
            )
        if not _NAR_URL.fullmatch(info.url) or ".." in info.url.split("/"):
            raise Refused(self.name, f"NAR URL {info.url[:100]!r} is not a name inside the cache")
        fingerprint = info.fingerprint()
        sigs = tuple(s for s in info.sigs if any(k.verify(fingerprint, s) for k in self.keys))
        if not sigs:
            trusted = ", ".join(k.name for k in self.keys)
            raise Refused(self.name, f"no signature by a trusted key ({trusted})")
        return Fetched(info, url, sigs)

    async def _get_small(self, url: str) -> bytes:
        try:
            async with self._client.stream(
                "GET", url, timeout=self._timeout(), headers={"user-agent": USER_AGENT}
            ) as resp:
                _status(self.name, resp.status_code, url)
                length = resp.headers.get("content-length", "")
                if length.isdigit() and int(length) > MAX_NARINFO:
                    raise Refused(self.name, f"narinfo of {length} bytes (at most {MAX_NARINFO})")
                parts: list[bytes] = []
                size = 0
                async with contextlib.aclosing(_raw_chunks(resp)) as chunks:
                    try:
                        async for chunk in chunks:
                            size += len(chunk)
                            if size > MAX_NARINFO:
                                raise Refused(self.name, f"narinfo larger than {MAX_NARINFO} bytes")
                            parts.append(chunk)
                    except BaseException:
                        with trio.CancelScope(shield=True):
                            await _discard(resp, chunks)
                        raise
                return b"".join(parts)
        except httpx.HTTPError as exc:
            raise Unavailable(self.name, f"{type(exc).__name__}: {exc}") from exc

    async def nar(
        self,
        fetched: Fetched,
        feed: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Stream the NAR of ``fetched`` (compressed, as served) into ``feed``.

        The body is bounded by FileSize (exact when stated) or NarSize plus a margin; the
        caller's ingest checks the decompressed bytes against NarSize/NarHash.
        """
        info = fetched.info
        url = f"{self.section.url}/{info.url}"
        limit = info.nar_size + info.nar_size // 8 + NAR_SLACK
        if info.file_size is not None:
            if info.file_size > limit:
                raise Refused(self.name, f"FileSize {info.file_size} exceeds its NarSize's bound")
            limit = info.file_size
        async with self._sem:
            await self._slot()
            self.requests += 1
            try:
                async with self._client.stream(
                    "GET", url, timeout=self._timeout(), headers={"user-agent": USER_AGENT}
                ) as resp:
                    _status(self.name, resp.status_code, url, what="NAR")
                    length = resp.headers.get("content-length", "")
                    if length.isdigit() and int(length) > limit:
                        raise Refused(self.name, f"NAR body of {length} bytes (at most {limit})")
                    size = 0
                    pending: list[bytes] = []
                    held = 0
                    start = trio.current_time()
                    async with contextlib.aclosing(_raw_chunks(resp)) as chunks:
                        try:
                            async for chunk in chunks:
                                size += len(chunk)
                                if size > limit:
                                    raise Refused(self.name, f"NAR body larger than {limit} bytes")
                                self._check_rate(size, trio.current_time() - start)
                                pending.append(chunk)
                                held += len(chunk)
                                if held >= FEED_BATCH:
                                    await feed(b"".join(pending))
                                    pending.clear()
                                    held = 0
                        except BaseException:
                            with trio.CancelScope(shield=True):
                                await _discard(resp, chunks)
                            raise
                    if pending:
                        await feed(b"".join(pending))
                    if info.file_size is not None and size != info.file_size:
                        raise Refused(
                            self.name, f"NAR body is {size} bytes, FileSize says {info.file_size}"
                        )
            except httpx.HTTPError as exc:
                raise Unavailable(self.name, f"NAR download: {type(exc).__name__}: {exc}") from exc

    def _check_rate(self, size: int, elapsed: float) -> None:
        """Unavailable if ``size`` bytes in ``elapsed`` seconds is below ``min_rate``."""
        rate, grace = self.section.min_rate, self.section.timeout
        if rate and elapsed > grace and size < rate * (elapsed - grace):
            raise Unavailable(
                self.name,
                f"NAR download too slow: {size} bytes in {elapsed:.0f}s (at least {rate} "
                f"bytes/s after the first {grace:g}s)",
            )


def _raw_chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """``response.aiter_raw()`` as what it is, an async generator (so it can be closed)."""
    return cast("AsyncGenerator[bytes, None]", response.aiter_raw())


async def _discard(response: httpx.Response, chunks: AsyncGenerator[bytes, None]) -> None:
    """Stop reading ``response`` mid-body, leaving nothing to the garbage collector.

    httpx reads bodies through a chain of async generators; closing only the outer one
    abandons the inner ones mid-iteration (encode/httpx#3686), which trio reports when
    they are collected. So the connection is closed under them first and the chain run
    into that (the proxy's upstream client does the same).
    """
    await response.aclose()
    with contextlib.suppress(Exception):
        async for _ in chunks:
            pass


def _status(upstream: str, status: int, url: str, *, what: str = "narinfo") -> None:
    if status == 200:
        return
    if status in (403, 404, 410):
        if what == "NAR":
            raise Refused(upstream, f"its narinfo names a NAR it does not serve ({status})")
        raise Absent(upstream, f"{what} not there (HTTP {status})")
    # Any other status (a 5xx, a redirect the mirror does not follow, an authentication it
    # wants) is a failure to answer, not "not here": retried, and never a reader's 404.
    raise Unavailable(upstream, f"HTTP {status} for the {what}")
