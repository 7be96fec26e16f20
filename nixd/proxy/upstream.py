"""The proxy's client side: one :class:`Upstream` per configured cache.

Each upstream has its own ``httpx.AsyncClient`` (keep-alive pool, timeouts) and one
:class:`~nixd.proxy.credential.Credential` (chosen by ``auth``, see that module), which
both request paths below ask for the ``Authorization`` of each URL: it is sent only to
the upstream's own origin, and a 401 from there renews it once and retries.

Small bodies (narinfos, NARs of a few KiB) from ``http://`` upstreams are fetched by
:meth:`Upstream.get_small` over a pool of kept-alive raw HTTP/1.1 connections: a closure of
hundreds of paths makes two such requests per path, and httpx's per-request machinery
would cost more than everything else the proxy does for them. Anything unusual (redirect,
no ``Content-Length``, a content coding, https) falls back to httpx. The raw path reads
response heads with :mod:`nixd.http`'s :class:`~nixd.http.ResponseReader` only, the one
strict response parser of the code base (h11 is its test oracle; every number through
:mod:`nixd.bounds`), and keeps connections alive only to the upstream's own host.

What an upstream may make us do is bounded before it happens:

- **Sizes.** Every body is read against a limit known before the first byte: a narinfo
  against :data:`MAX_NARINFO`, a NAR file against the size its narinfo promised
  (``FileSize``; without one, :func:`file_limit`). A ``Content-Length`` over the limit is
  refused before anything is read, and a body that runs past it is cut at the limit, so
  a 400 MiB "narinfo" or a 400 MiB answer for a 128-byte NAR never grows memory.
- **Where requests go.** Redirects are followed only to the same origin (scheme, host,
  port) as the URL that answered, at most :data:`MAX_REDIRECTS` times: a cache that moves
  a path on its own server keeps working, and a 3xx can neither carry the credential
  elsewhere nor make the daemon (root) request another service, a loopback one included.
  A narinfo ``URL`` that is absolute and on another origin is refused too. An upstream
  configured with ``foreign_urls = "anonymous"`` (a cache that hands NARs to a CDN or to
  presigned object-store URLs) has both fetched, without credentials: the credential is
  bound to its origin whatever the URL
  (:attr:`~nixd.proxy.config.UpstreamConfig.foreign_urls`).
- **What is shown.** Errors, logs, metrics and status name the upstream by
  :attr:`~nixd.proxy.config.UpstreamConfig.display_url`, and requested URLs never hold
  credentials.

**Unreachable upstreams.** When an upstream cannot be reached (connection refused, a
host name that does not resolve, no answer in time), waiting for it on every request
would make each of Nix's lookups cost a full connect timeout and then fail. So each
:class:`Upstream` counts consecutive failed attempts (connects that fail, requests that
time out); after ``offline_after`` of them it is *offline*: requests that need a new
connection to it fail at once with :class:`~nixd.proxy.errors.UpstreamUnreachable`, and
every ``offline_probe`` seconds one request is let through to try again. Any answer
from the upstream (whatever its status) ends the offline state. What Nix is answered
then, and why, is in :func:`nixd.proxy.errors.status_for`.

httpx errors are translated here, at the boundary, into :mod:`nixd.errors` classes; the
HTTP status an upstream gives is turned into ``None`` (absent) or an error by
:meth:`Upstream.check_status`. What Nix then sees is decided in :mod:`nixd.proxy.errors`;
a malformed or oversized answer is an :class:`~nixd.errors.UpstreamError` (503, transient),
a body that contradicts its narinfo an :class:`~nixd.errors.IntegrityError` (502).
"""

from __future__ import annotations

import bz2
import contextlib
import logging
import lzma
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import TYPE_CHECKING, Protocol, cast
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx
import trio

from nixd.bounds import parse_uint
from nixd.errors import AuthError, FormatError, IntegrityError, UpstreamError, UpstreamTimeout
from nixd.http import BadResponse, BodyTooLarge, ResponseHead, ResponseReader
from nixd.http.response import MAX_CONTENT_LENGTH
from nixd.nix.narinfo import NarInfo
from nixd.proxy.config import UpstreamConfig
from nixd.proxy.credential import (
    BasicCredential,
    Credential,
    CredentialAuth,
    NetrcCredential,
    TokenCredential,
    origin_of,
    strip_userinfo,
    userinfo_of,
)
from nixd.proxy.errors import NotFound, UpstreamUnreachable
from nixd.proxy.metrics import Metrics
from nixd.proxy.verify import check_narinfo

if TYPE_CHECKING:
    from nixd.auth.model import TokenSource

log = logging.getLogger(__name__)

MAX_NARINFO = 1 << 20
"""Largest narinfo accepted from an upstream (real ones are well under 4 KiB)."""
MAX_HEAD = 64 << 10
"""Largest response head (status line and headers) accepted from an upstream."""
MAX_HEADERS = 100
"""Most header lines in one response head."""
MAX_ERROR_BODY = 64 << 10
"""Largest body of a non-200 answer read to keep its connection; larger ones close it."""
MAX_REDIRECTS = 5
"""Redirects followed for one request."""
BATCH = 1 << 20
"""Most bytes handed on per chunk of a raw NAR body."""
CHUNK_MIN = 256 << 10
"""A raw chunk is handed on once it has at least this much (fewer wake-ups downstream)."""
MAX_IDLE = 48
"""Idle kept-alive raw connections per upstream host: room for Nix's 25 connections' worth
of requests and the prefetch workers' (:mod:`nixd.proxy.prefetch`) at once."""
MAX_NAR_OFFSET = 1 << 50
"""Largest file offset a ``Content-Range`` may name (far past any NAR)."""


def file_limit(info: NarInfo) -> int:
    """Most bytes the NAR file of ``info`` may have.

    ``FileSize`` when the narinfo gives one (the download must then match it exactly);
    otherwise ``NarSize`` for an uncompressed NAR, and for a compressed one ``NarSize``
    plus what a compressor adds at worst to incompressible input (zstd, xz and bzip2 all
    stay well within 1/64 plus a few KiB).
    """
    if info.file_size:
        return info.file_size
    if info.compression == "none":
        return info.nar_size
    return info.nar_size + info.nar_size // 64 + (64 << 10)


def content_length(headers: httpx.Headers, what: str) -> int | None:
    """The ``Content-Length`` of an httpx response, bounded like the raw path's."""
    values = {v.strip() for raw in headers.get_list("content-length") for v in raw.split(",")}
    if not values:
        return None
    if len(values) > 1:
        raise UpstreamError(f"{what}: conflicting Content-Length headers")
    try:
        return parse_uint(values.pop(), limit=MAX_CONTENT_LENGTH, what="Content-Length")
    except FormatError as exc:
        raise UpstreamError(f"{what}: {exc}") from None


async def _receive_head(stream: trio.SocketStream, what: str) -> tuple[ResponseHead, bytes] | None:
    """``(head, the body bytes that came with it)`` from ``stream``; None if it closed
    before sending a byte (a kept-alive connection the upstream dropped meanwhile).

    Refusals of the parser (:class:`~nixd.http.BadResponse`, an :class:`UpstreamError`)
    keep their class and gain the upstream's name. The ``Content-Length`` is bounded by
    the parser to what a file can have; the caller compares it with what it expects once
    it knows the status (a 404 is not held to the narinfo's size).
    """
    reader = ResponseReader(max_head_bytes=MAX_HEAD, max_header_count=MAX_HEADERS)
    received = False
    try:
        while (head := reader.next_head()) is None:
            data = await stream.receive_some(65536)
            if not data:
                if not received:
                    return None
                raise UpstreamError(f"{what}: connection closed in the response head")
            received = True
            reader.feed(data)
    except BadResponse as exc:
        raise type(exc)(f"{what}: {exc}") from None
    return head, reader.take_buffered()


def _sendable(url: str) -> bool:
    """Only visible ASCII: what a request line and a Host header can carry as they are."""
    return url.isascii() and url.isprintable() and " " not in url


def _request_target(parts: SplitResult, what: str) -> str:
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not _sendable(target):
        raise UpstreamError(f"{what}: URL has characters that cannot be sent")
    return target


@contextlib.contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """httpx exceptions → :mod:`nixd.errors`, naming the upstream URL (never credentials)."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise UpstreamUnreachable(f"{url}: cannot connect ({type(exc).__name__}: {exc})") from exc
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"{url}: timed out ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{url}: {type(exc).__name__}: {exc}") from exc
    except httpx.InvalidURL as exc:
        raise UpstreamError(f"{url}: invalid URL: {exc}") from exc


class NarBody(Protocol):
    """A NAR file body being received: where it starts, its announced length, its chunks.

    ``start`` is the file offset of the first chunk: the ``offset`` asked for when the
    upstream answered 206 with that range, 0 when it ignored ``Range`` and sent the file.
    """

    start: int
    length: int | None

    def __aiter__(self) -> AsyncIterator[bytes | memoryview]: ...


def _raw_chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """``response.aiter_raw()`` as what it is, an async generator (so it can be closed)."""
    return cast("AsyncGenerator[bytes, None]", response.aiter_raw())


async def _discard(response: httpx.Response, chunks: AsyncGenerator[bytes, None]) -> None:
    """Stop reading ``response`` mid-body, leaving nothing to the garbage collector.

    httpx reads bodies through a chain of async generators; closing only the outer one
    abandons the inner ones mid-iteration (encode/httpx#3686), which trio reports when
    they are collected. So the connection is closed under them first, and the chain is
    run into that: it ends at once with an error raised from the innermost one.
    """
    await response.aclose()
    with contextlib.suppress(Exception):
        async for _ in chunks:
            pass


class _HttpxBody:
    """A NAR body through httpx, cut with IntegrityError once it passes ``limit``.

    An iterator object rather than an async generator, closed by :meth:`aclose`: a reader
    that stops early (a verification failure) leaves nothing for the garbage collector.
    """

    def __init__(self, response: httpx.Response, name: str, limit: int, start: int = 0) -> None:
        self._response = response
        self.start = start
        self._name = name
        self._limit = limit
        self._received = 0
        self.length = content_length(response.headers, name)
        if self.length is not None and self.length > limit:
            raise IntegrityError(f"{name}: upstream announces {self.length} bytes, at most {limit}")
        self._chunks = _raw_chunks(response)

    def __aiter__(self) -> _HttpxBody:
        return self

    async def __anext__(self) -> bytes:
        with translate_errors(self._name):
            chunk = await self._chunks.__anext__()
        self._received += len(chunk)
        if self._received > self._limit:
            raise IntegrityError(f"{self._name}: upstream sent more than {self._limit} bytes")
        return chunk

    async def aclose(self) -> None:
        await _discard(self._response, self._chunks)


class _BoundedDecoder:
    """Undoes a content coding without ever producing more than it is asked for.

    Some stores send a coding whatever the request says (an S3 object uploaded with
    ``Content-Encoding``); the decoders of the standard library take a ``max_length``,
    so a compressed bomb cannot expand past the limit. Other codings are refused.
    """

    def __init__(self, coding: str, what: str) -> None:
        coding = coding.strip().lower()
        self._stream: zlib._Decompress | lzma.LZMADecompressor | bz2.BZ2Decompressor | None
        if coding in ("", "identity"):
            self._stream = None
        elif coding in ("gzip", "x-gzip"):
            self._stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._stream = zlib.decompressobj()
        elif coding == "xz":
            self._stream = lzma.LZMADecompressor()
        elif coding in ("bzip2", "x-bzip2"):
            self._stream = bz2.BZ2Decompressor()
        else:
            raise UpstreamError(f"{what}: unsupported Content-Encoding {coding[:40]!r}")
        self._what = what

    def decode(self, data: bytes, room: int) -> bytes:
        """At most ``room`` bytes decoded from ``data`` (more input is not looked at)."""
        if self._stream is None:
            return data
        try:
            if isinstance(self._stream, lzma.LZMADecompressor | bz2.BZ2Decompressor):
                return self._stream.decompress(data, max_length=room)
            return self._stream.decompress(data, room)  # zlib: max_length is positional
        except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
            raise UpstreamError(f"{self._what}: body does not decode: {exc}") from None


class _RawBody:
    """A Content-Length body read with ``receive_some`` into 1 MiB batches."""

    def __init__(
        self,
        stream: trio.SocketStream,
        status: int,
        length: int | None,
        first: bytes,
        *,
        timeout: float,
        name: str,
        start: int = 0,
    ) -> None:
        self.stream = stream
        self.status = status
        self.start = start
        self.length = length
        self.content_range: str | None = None
        self._first = first
        self._timeout = timeout
        self._name = name

    async def __aiter__(self) -> AsyncIterator[bytes | memoryview]:
        assert self.length is not None
        remaining = self.length - len(self._first)
        if self._first:
            yield self._first[: self.length]
        buffer = bytearray(BATCH)
        view = memoryview(buffer)
        sock = self.stream.socket
        while remaining > 0:
            filled = 0
            want = min(BATCH, remaining)
            while filled < want:
                try:
                    with trio.fail_after(self._timeout):
                        n = await sock.recv_into(view[filled:want])
                except trio.TooSlowError as exc:
                    raise UpstreamTimeout(f"{self._name}: body timed out") from exc
                except OSError as exc:
                    raise UpstreamError(f"{self._name}: {exc}") from exc
                if n == 0:
                    raise UpstreamError(
                        f"{self._name}: connection closed {remaining - filled} bytes early"
                    )
                filled += n
                if filled >= CHUNK_MIN:
                    break
            remaining -= filled
            yield view[:filled]

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Stale(Exception):
    """A kept-alive connection the upstream closed before answering: try another."""


def _credential(
    config: UpstreamConfig, tokens: TokenSource | None, token_lock: trio.Lock
) -> Credential:
    origin = origin_of(config.url)
    if config.auth == "nixd":
        if tokens is None:
            raise AuthError(f"upstream {config.display_url} uses nixd auth but no token source")
        return TokenCredential(origin, tokens, token_lock, config.token_wait)
    if config.auth == "netrc":
        assert config.netrc_file is not None
        return NetrcCredential(origin, config.netrc_file)
    userinfo = userinfo_of(config.url)
    if userinfo is not None:
        return BasicCredential(origin, *userinfo)
    return Credential(origin)


class Upstream:
    """A configured cache with its client; ``users`` counts downloads still using it."""

    def __init__(
        self,
        config: UpstreamConfig,
        index: int,
        tokens: TokenSource | None,
        token_lock: trio.Lock,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.index = index
        self.keys = config.public_keys()
        self.metrics = metrics
        self.name = config.display_url
        """How the upstream is named in logs, errors, metrics and status: no credentials."""
        self.base_url = config.base_url
        self.origin = origin_of(config.url)
        self.credential = _credential(config, tokens, token_lock)
        self._no_renewal = CredentialAuth(self.credential, renew=False)
        self.client = httpx.AsyncClient(
            auth=CredentialAuth(self.credential),
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            follow_redirects=False,  # followed by _stream, each hop checked
            # NAR files are hashed as stored: no coding on top (and see _BoundedDecoder).
            headers={"User-Agent": "nixd-proxy", "Accept-Encoding": "identity"},
        )
        self.users = 0
        self.retired = False
        self.unused = trio.Event()
        """Set once retired and no download uses it any more: then it can be closed."""
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._idle: dict[tuple[str, int], list[trio.SocketStream]] = {}
        """Kept-alive raw connections by (host, port), most recently used last."""
        self._failures = 0
        """Consecutive failed attempts (see "Unreachable upstreams" in the module doc)."""
        self._offline_until = 0.0
        """While offline: the monotonic time before which no new attempt is made."""
        self._offline_reason = ""
        """The last failed attempt, as offline answers name it."""

    # -- reachability ------------------------------------------------------------------

    @property
    def offline(self) -> bool:
        """True after ``offline_after`` consecutive failed attempts, until one succeeds."""
        return self._failures >= self.config.offline_after

    def _gate(self) -> None:
        """Refuse at once to try an offline upstream, except for one probe per interval."""
        if not self.offline:
            return
        now = time.monotonic()
        if now < self._offline_until:
            raise UpstreamUnreachable(
                f"{self._offline_reason}; trying again in {self._offline_until - now:.1f} s"
            )
        self._offline_until = now + self.config.offline_probe  # this request probes

    def _attempt_failed(self, exc: BaseException) -> None:
        """A connect failed or a request timed out: one more towards being offline."""
        was = self.offline
        self._failures += 1
        self._offline_reason = str(exc)
        self.last_error = str(exc)
        self.last_error_at = time.time()
        if self.offline:
            self._offline_until = time.monotonic() + self.config.offline_probe
            if not was:
                log.warning(
                    "upstream %s is unreachable (%s); answering without it, trying it "
                    "again every %g s",
                    self.name,
                    exc,
                    self.config.offline_probe,
                )

    def _answered(self) -> None:
        """The upstream sent a response head: it is reachable."""
        if self.offline:
            log.warning("upstream %s is reachable again", self.name)
        self._failures = 0

    async def _connect(self, host: str, port: int) -> trio.SocketStream:
        """A new TCP connection, through the offline gate; failures count towards it."""
        self._gate()
        with trio.move_on_after(self.config.timeout) as scope:
            try:
                return await trio.open_tcp_stream(host, port)
            except OSError as exc:  # refused, unreachable, a name that does not resolve
                error = UpstreamUnreachable(f"{self.name}: cannot connect: {exc}")
                self._attempt_failed(error)
                raise error from exc
        assert scope.cancelled_caught
        error = UpstreamUnreachable(f"{self.name}: connect timed out after {self.config.timeout} s")
        self._attempt_failed(error)
        raise error

    def url_for(self, relative: str) -> str:
        """The URL to request for a narinfo's ``URL`` field (or a file name).

        Relative names are under the upstream's URL. An absolute one on another origin
        is refused unless ``foreign_urls = "anonymous"`` (then the credential, bound to
        its origin, is not sent). Credentials inside it are dropped; characters a request
        line cannot carry are refused.
        """
        scheme, sep, _ = relative.partition("://")
        if not sep or "/" in scheme:  # relative, as Nix reads it
            url = f"{self.base_url}/{relative.lstrip('/')}"
        else:
            try:
                origin = origin_of(relative)
                url = strip_userinfo(relative)
            except FormatError as exc:
                raise UpstreamError(f"{self.name}: narinfo URL is unusable: {exc}") from None
            if origin != self.origin and self.config.foreign_urls != "anonymous":
                raise UpstreamError(
                    f"{self.name}: narinfo URL on another origin ({origin.scheme}://"
                    f'{origin.host}:{origin.port}) refused (foreign_urls = "refuse")'
                )
        if not _sendable(url):
            raise UpstreamError(f"{self.name}: narinfo URL has characters that cannot be sent")
        return url

    def check_status(self, status: int, url: str) -> None:
        """Raise for an upstream status that is not success (see nixd.proxy.errors)."""
        if status in (200, 206):
            return
        if status in (404, 410):
            raise NotFound(f"{url}: {status}")
        if status in (401, 403):
            raise AuthError(f"{url}: upstream refused our credentials ({status})")
        if 300 <= status < 400:
            raise UpstreamError(f"{url}: upstream redirected ({status}) where we do not follow")
        raise UpstreamError(f"{url}: upstream answered {status}")

    def _outcome(self, outcome: str, error: BaseException | None = None) -> None:
        if isinstance(error, UpstreamUnreachable):
            outcome = "unreachable"
        self.metrics.inc("nixd_proxy_upstream_requests_total", upstream=self.name, outcome=outcome)
        if error is None:
            self.last_ok = time.time()
        elif not isinstance(error, NotFound):
            self.last_error = str(error)
            self.last_error_at = time.time()

    async def fetch_narinfo(self, hash_part: str, *, renew: bool = True) -> NarInfo | None:
        """The verified narinfo for ``hash_part``, or None if this upstream does not have it.

        ``renew=False``: a 401 is not answered by renewing the credential (prefetches).

        Raises :class:`~nixd.proxy.verify.UntrustedNarInfo` for a narinfo without a
        trusted signature, :class:`UpstreamError` for one that does not parse, is too large
        or names a URL that is refused, :class:`UpstreamError`/:class:`AuthError` for
        failures.
        """
        url = self.url_for(f"{hash_part}.narinfo")
        start = time.monotonic()
        try:
            got = await self.get_small(url, MAX_NARINFO, renew=renew)
            if got is None:
                got = await self._get_bounded(url, MAX_NARINFO, renew=renew)
            status, content = got
            self.metrics.observe_latency(self.name, time.monotonic() - start)
            self.check_status(status, url)
            try:
                info = NarInfo.parse(content)
            except FormatError as exc:
                self.metrics.inc("nixd_proxy_verification_failures_total", stage="narinfo")
                log.warning("upstream %s: malformed narinfo for %s: %s", self.name, hash_part, exc)
                raise UpstreamError(f"{url}: malformed narinfo: {exc}") from exc
            check_narinfo(info, hash_part, self.keys)
            try:
                self.url_for(info.url)  # refuse now what could not be fetched later
            except UpstreamError as exc:
                log.warning("upstream %s: narinfo for %s: %s", self.name, hash_part, exc)
                raise
        except NotFound as exc:
            self._outcome("miss", exc)
            return None
        except FormatError as exc:
            self._outcome("untrusted", exc)
            self.metrics.inc("nixd_proxy_verification_failures_total", stage="narinfo")
            log.warning("upstream %s: rejected narinfo for %s: %s", self.name, hash_part, exc)
            raise
        except Exception as exc:
            self._outcome("error", exc)
            raise
        self._outcome("hit")
        return info

    async def fetch_small_nar(self, info: NarInfo, limit: int, *, renew: bool = True) -> bytes:
        """The whole NAR file ``info.url``, unverified, of at most the size its narinfo
        promised and at most ``limit`` bytes (:class:`IntegrityError` past that).
        ``renew`` as for :meth:`fetch_narinfo`."""
        url = self.url_for(info.url)
        bound = min(limit, file_limit(info))
        start = time.monotonic()
        try:
            try:
                got = await self.get_small(url, bound, renew=renew)
                if got is None:
                    got = await self._get_bounded(url, bound, renew=renew)
            except BodyTooLarge as exc:
                raise IntegrityError(f"{exc} (the narinfo promised {bound})") from exc
            status, content = got
            self.metrics.observe_latency(self.name, time.monotonic() - start)
            self.check_status(status, url)
            if status != 200:
                raise UpstreamError(f"{url}: unexpected {status}")
        except Exception as exc:
            self._outcome("error", exc)
            raise
        self._outcome("nar")
        self.metrics.inc("nixd_proxy_upstream_bytes_total", len(content))
        return content

    @contextlib.asynccontextmanager
    async def _stream(
        self, url: str, headers: dict[str, str] | None = None, *, renew: bool = True
    ) -> AsyncIterator[httpx.Response]:
        """A streaming GET of ``url`` through httpx, following redirects :meth:`_redirect_target`
        allows (same origin; any http(s) origin with ``foreign_urls = "anonymous"``)."""
        for _ in range(MAX_REDIRECTS + 1):
            self._gate()
            try:
                with translate_errors(self.name):
                    request = self.client.build_request("GET", url, headers=headers)
                    if renew:
                        response = await self.client.send(request, stream=True)
                    else:
                        response = await self.client.send(
                            request, stream=True, auth=self._no_renewal
                        )
            except (UpstreamUnreachable, UpstreamTimeout) as exc:
                self._attempt_failed(exc)
                raise
            self._answered()
            try:
                if response.is_redirect:
                    url = self._redirect_target(url, response.headers.get("location", ""))
                    continue
                with translate_errors(self.name):
                    yield response
                return
            finally:
                await response.aclose()
        raise UpstreamError(f"{url}: more than {MAX_REDIRECTS} redirects")

    def _redirect_target(self, url: str, location: str) -> str:
        """Where a redirect from ``url`` leads, if it may be followed (see the module doc)."""
        try:
            target = strip_userinfo(urljoin(url, location))
            same = origin_of(target) == origin_of(url)
        except (FormatError, ValueError):
            raise UpstreamError(f"{url}: redirect to a malformed location") from None
        if not same and self.config.foreign_urls != "anonymous":
            raise UpstreamError(
                f'{url}: redirect to another origin refused (foreign_urls = "refuse")'
            )
        if not _sendable(target):
            raise UpstreamError(f"{url}: redirect location has characters that cannot be sent")
        return target

    async def _get_bounded(self, url: str, limit: int, *, renew: bool = True) -> tuple[int, bytes]:
        """``(status, body)`` through httpx, the body at most ``limit`` bytes.

        Only a 200's body is read; others are answered by their status alone.
        """
        async with self._stream(url, renew=renew) as response:
            if response.status_code != 200:
                return response.status_code, b""
            length = content_length(response.headers, url)
            if length is not None and length > limit:
                raise BodyTooLarge(f"{url}: upstream announces {length} bytes, at most {limit}")
            decoder = _BoundedDecoder(response.headers.get("content-encoding", ""), url)
            body = bytearray()
            async with contextlib.aclosing(_raw_chunks(response)) as chunks:
                async for chunk in chunks:
                    body += decoder.decode(chunk, limit - len(body) + 1)
                    if len(body) > limit:
                        await _discard(response, chunks)
                        raise BodyTooLarge(f"{url}: upstream sent more than {limit} bytes")
            return 200, bytes(body)

    async def get_small(
        self, url: str, limit: int, *, renew: bool = True
    ) -> tuple[int, bytes] | None:
        """``(status, body)`` of a GET over a kept-alive raw connection.

        None when the raw path does not apply (not ``http://``, a redirect, no
        ``Content-Length``, a content coding): the caller then asks httpx.
        :class:`BodyTooLarge` for a 200 announcing more than ``limit``. A 401 renews the
        credential once (:meth:`Credential.on_401`), unless ``renew`` is False.
        """
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            return None
        header = await self.credential.header(url)
        got = await self._raw_small(parts, header, limit)
        if renew and got is not None and got[0] == 401 and header is not None:
            fresh = await self.credential.on_401(header)
            if fresh is not None:
                got = await self._raw_small(parts, fresh, limit)
        return got

    async def _raw_small(
        self, parts: SplitResult, authorization: str | None, limit: int
    ) -> tuple[int, bytes] | None:
        host = parts.hostname or ""
        port = parts.port or 80
        target = _request_target(parts, self.name)
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc.rsplit('@', 1)[-1]}\r\n"
            "User-Agent: nixd-proxy\r\nAccept-Encoding: identity\r\n"
            + (f"Authorization: {authorization}\r\n" if authorization else "")
            + "\r\n"
        ).encode("latin-1")
        own = (host, port) == (self.origin.host, self.origin.port)
        # Connections are kept only to the upstream's own host: hosts named by narinfo URLs
        # (foreign_urls = "anonymous") could otherwise hold any number of idle sockets.
        idle = self._idle.setdefault((host, port), []) if own else []
        try:
            with trio.fail_after(self.config.timeout):
                while idle:  # a kept-alive connection the upstream may have closed since
                    stream = idle.pop()
                    try:
                        return await self._exchange(stream, request, limit, idle)
                    except _Stale:
                        continue
                stream = await self._connect(host, port)
                try:
                    return await self._exchange(stream, request, limit, idle)
                except _Stale as exc:
                    raise UpstreamError(f"{self.name}: connection closed before headers") from exc
        except trio.TooSlowError as exc:
            error = UpstreamTimeout(f"{self.name}: timed out")
            self._attempt_failed(error)
            raise error from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamError(f"{self.name}: {exc}") from exc
        finally:
            if not own:
                for stream in idle:
                    stream.socket.close()  # never used again; no need to wait for it

    async def _exchange(
        self,
        stream: trio.SocketStream,
        request: bytes,
        limit: int,
        idle: list[trio.SocketStream],
    ) -> tuple[int, bytes] | None:
        """One request on ``stream``; the stream goes back to ``idle`` or is closed."""
        keep = False
        try:
            try:
                await stream.send_all(request)
                got = await _receive_head(stream, self.name)
            except trio.BrokenResourceError as exc:
                raise _Stale from exc
            if got is None:
                raise _Stale
            head, body = got
            self._answered()
            length = head.content_length
            if head.chunked or not head.identity or 300 <= head.status < 400 or length is None:
                return None
            if head.status != 200:
                if length > MAX_ERROR_BODY:
                    return head.status, b""  # not worth reading to keep the connection
            elif length > limit:
                raise BodyTooLarge(
                    f"{self.name}: upstream announces {length} bytes, at most {limit}"
                )
            while len(body) < length:
                data = await stream.receive_some(max(65536, length - len(body)))
                if not data:
                    raise UpstreamError(f"{self.name}: connection closed in a body")
                body += data
            if len(body) > length:
                raise UpstreamError(f"{self.name}: bytes after the response body")
            keep = head.keep_alive
            return head.status, body if head.status == 200 else b""
        finally:
            if keep and len(idle) < MAX_IDLE:
                idle.append(stream)
            else:
                await stream.aclose()

    @contextlib.asynccontextmanager
    async def nar_body(self, info: NarInfo, offset: int = 0) -> AsyncIterator[NarBody]:
        """The NAR file's body as :class:`NarBody` (length + chunks of up to 1 MiB).

        For ``http://`` upstreams the body is read straight from the socket into one
        reused buffer (httpx's per-chunk overhead would bound a cold NAR at ~150 MiB/s);
        otherwise, and when the upstream does not send a Content-Length (or redirects),
        through httpx. Either way no more than :func:`file_limit` bytes are accepted.
        ``offset`` > 0 asks for the rest of the file from there (``Range``, see
        :func:`resumed_start`), to resume a download the upstream cut.
        """
        url = self.url_for(info.url)
        limit = file_limit(info)
        parts = urlsplit(url)
        if parts.scheme == "http" and parts.hostname:
            raw = await self._open_raw(url, limit, offset)
            if raw is not None:
                try:
                    yield raw
                finally:
                    await raw.aclose()
                return
        async with self.open_nar(info, offset) as response:
            start = resumed_start(
                response.status_code, response.headers.get("content-range"), offset, url
            )
            body = _HttpxBody(response, self.name, max(0, limit - start), start)
            try:
                yield body
            finally:
                await body.aclose()

    async def _open_raw(self, url: str, limit: int, offset: int = 0) -> _RawBody | None:
        header = await self.credential.header(url)
        body = await self._raw_get(url, header, offset)
        if body.status == 401 and header is not None:
            await body.aclose()
            fresh = await self.credential.on_401(header)
            if fresh is not None:
                body = await self._raw_get(url, fresh, offset)
        answered = body.status == 200 or (offset and body.status == 206)
        if 300 <= body.status < 400 or (answered and body.length is None):
            await body.aclose()
            return None  # httpx follows same-origin redirects and reads unframed bodies
        if not answered:
            await body.aclose()
            self.check_status(body.status, url)
            raise UpstreamError(f"{url}: unexpected {body.status}")
        try:
            body.start = resumed_start(body.status, body.content_range, offset, url)
        except UpstreamError:
            await body.aclose()
            raise
        assert body.length is not None
        if body.length > limit - body.start:
            await body.aclose()
            raise IntegrityError(
                f"{url}: upstream announces {body.start + body.length} bytes, at most {limit}"
            )
        self._outcome("nar")
        return body

    async def _raw_get(self, url: str, authorization: str | None, offset: int = 0) -> _RawBody:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or 80
        lines = [
            f"GET {_request_target(parts, self.name)} HTTP/1.1",
            f"Host: {parts.netloc.rsplit('@', 1)[-1]}",
            "User-Agent: nixd-proxy",
            "Accept-Encoding: identity",
            "Connection: close",
        ]
        if authorization:
            lines.append(f"Authorization: {authorization}")
        if offset:
            lines.append(f"Range: bytes={offset}-")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        start = time.monotonic()
        timeout = self.config.timeout
        try:
            stream = await self._connect(host, port)
            try:
                with trio.fail_after(timeout):
                    await stream.send_all(request)
                    got = await _receive_head(stream, self.name)
                if got is None:
                    raise UpstreamError(f"{self.name}: connection closed before headers")
                head, first = got
            except BaseException:
                await stream.aclose()
                raise
        except trio.TooSlowError as exc:
            error = UpstreamTimeout(f"{self.name}: timed out")
            self._attempt_failed(error)
            self._outcome("error", error)
            raise error from exc
        except (OSError, trio.BrokenResourceError) as exc:  # refused, reset
            self._outcome("error", exc)
            raise UpstreamError(f"{self.name}: {exc}") from exc
        except UpstreamError as exc:
            self._outcome("error", exc)
            raise
        self._answered()
        self.metrics.observe_latency(self.name, time.monotonic() - start)
        length = head.content_length if not head.chunked and head.identity else None
        body = _RawBody(stream, head.status, length, first, timeout=timeout, name=self.name)
        content_range = head.header(b"content-range")
        body.content_range = None if content_range is None else content_range.decode("latin-1")
        return body

    @contextlib.asynccontextmanager
    async def open_nar(self, info: NarInfo, offset: int = 0) -> AsyncIterator[httpx.Response]:
        """A streaming GET of the NAR file ``info.url``; raises unless it answered 200.

        With ``offset`` it asks for the rest from there, and a 206 is an answer too.
        """
        url = self.url_for(info.url)
        start = time.monotonic()
        headers = {"Range": f"bytes={offset}-"} if offset else None
        try:
            async with self._stream(url, headers) as response:
                self.metrics.observe_latency(self.name, time.monotonic() - start)
                if response.status_code != 200 and not (offset and response.status_code == 206):
                    self.check_status(response.status_code, url)
                    raise UpstreamError(f"{url}: unexpected {response.status_code}")
                self._outcome("nar")
                yield response
        except Exception as exc:
            self._outcome("error", exc)
            raise

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.retired and not self.users:
            self.unused.set()

    def retire(self) -> None:
        self.retired = True
        if not self.users:
            self.unused.set()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                await idle.pop().aclose()
        await self.client.aclose()

    def status(self) -> dict[str, object]:
        return {
            "url": self.name,
            "priority": self.config.priority,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "healthy": not self.offline
            and (
                self.last_error_at is None
                or (self.last_ok is not None and self.last_ok > self.last_error_at)
            ),
            "offline": self.offline,
        }


# -- resuming a cut NAR download -------------------------------------------------------------


def resumed_start(status: int, content_range: str | None, offset: int, url: str) -> int:
    """The file offset a NAR answer starts at, for a request that asked from ``offset``.

    200 is the whole file (an upstream may ignore ``Range``): 0. A 206 must be the one
    range asked for, ``bytes <offset>-<last>/<size>``; anything else (another start, a
    multipart answer, a 206 nobody asked for) is refused rather than guessed at, since the
    bytes are appended to what was already received and hashed.
    """
    if status != 206:
        return 0
    if not offset or content_range is None:
        raise UpstreamError(f"{url}: a 206 answer that was not asked for")
    unit, _, spec = content_range.strip().partition(" ")
    first, dash, rest = spec.strip().partition("-")
    if unit.lower() != "bytes" or not dash or "/" not in rest:
        raise UpstreamError(f"{url}: malformed Content-Range {content_range[:80]!r}")
    try:
        start = parse_uint(first, limit=MAX_NAR_OFFSET, what="Content-Range start")
    except FormatError as exc:
        raise UpstreamError(f"{url}: {exc}") from exc
    if start != offset:
        raise UpstreamError(f"{url}: asked for bytes from {offset}, got them from {start}")
    return start
