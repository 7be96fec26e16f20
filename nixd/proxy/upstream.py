"""The proxy's client side: one :class:`Upstream` per configured cache.

Each upstream has its own ``httpx.AsyncClient`` (keep-alive pool, timeouts) and an
``httpx.Auth`` chosen by ``auth``:

- ``nixd``: :class:`TokenAuth` adds ``Authorization: Bearer <access token>`` from the
  daemon's :class:`~nixd.auth.model.TokenSource`; on a 401 it asks the source for a fresh
  token once (under a lock shared by all requests, so a burst of 401s makes one renewal)
  and retries. A second 401 surfaces as :class:`~nixd.errors.AuthError`.
- ``netrc``: :class:`NetrcAuth` sends Basic credentials for the upstream host from a netrc
  file (re-read when it changes), as curl would.
- ``none``: no credentials (public caches).

Small bodies (narinfos, NARs of a few KiB) from ``http://`` upstreams are fetched by
:meth:`Upstream.get_small` over a pool of kept-alive raw HTTP/1.1 connections: a closure of
hundreds of paths makes two such requests per path, and httpx's per-request machinery
would cost more than everything else the proxy does for them. Anything unusual (redirect,
no ``Content-Length``, too large, https) falls back to httpx.

httpx errors are translated here, at the boundary, into :mod:`nixd.errors` classes; the
HTTP status an upstream gives is turned into ``None`` (absent) or an error by
:meth:`Upstream.check_status`. What Nix then sees is decided in :mod:`nixd.proxy.errors`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import TYPE_CHECKING, Protocol
from urllib.parse import SplitResult, urlsplit

import httpx
import trio

from nixd.bounds import parse_uint
from nixd.errors import AuthError, FormatError, UpstreamError, UpstreamTimeout
from nixd.nix.narinfo import NarInfo
from nixd.nix.netrc import NetrcEntry, lookup, parse_netrc
from nixd.proxy.config import UpstreamConfig
from nixd.proxy.errors import NotFound
from nixd.proxy.metrics import Metrics
from nixd.proxy.verify import check_narinfo

if TYPE_CHECKING:
    from nixd.auth.model import AccessToken, TokenSource

log = logging.getLogger(__name__)

MAX_NARINFO = 1 << 20
"""Largest narinfo accepted from an upstream."""
BATCH = 1 << 20
"""Most bytes handed on per chunk of a raw NAR body."""
CHUNK_MIN = 256 << 10
"""A raw chunk is handed on once it has at least this much (fewer wake-ups downstream)."""
MAX_IDLE = 32
"""Idle kept-alive raw connections per upstream host."""
MAX_NAR_OFFSET = 1 << 50
"""Largest file offset a ``Content-Range`` may name (far past any NAR)."""


class TokenAuth(httpx.Auth):
    """Bearer auth from a TokenSource; refresh once on 401 and retry (see module doc)."""

    requires_request_body = False
    requires_response_body = False

    def __init__(self, tokens: TokenSource, lock: trio.Lock) -> None:
        self.tokens = tokens
        self.lock = lock

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self.tokens.get()
        request.headers["Authorization"] = f"Bearer {token.value}"
        response = yield request
        if response.status_code != 401:
            return
        fresh = await self._renew(token)
        request.headers["Authorization"] = f"Bearer {fresh.value}"
        yield request

    async def _renew(self, stale: AccessToken) -> AccessToken:
        async with self.lock:
            current = await self.tokens.get()
            if current.value != stale.value:
                return current  # someone else renewed while we waited for the lock
            log.info("upstream rejected the access token; renewing it")
            return await self.tokens.refresh(stale)


class NetrcAuth(httpx.Auth):
    """Basic auth for the request's host from a netrc file, re-read when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime: float | None = None
        self._entries: list[NetrcEntry] = []

    def _load(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime == self._mtime:
                return
            with open(self.path, "rb") as f:
                self._entries = parse_netrc(f.read(), source=self.path)
        except OSError as exc:
            raise AuthError(f"cannot read netrc file {self.path}: {exc.strerror}") from exc
        except FormatError as exc:
            raise AuthError(f"netrc file {self.path} is malformed: {exc}") from exc
        self._mtime = mtime

    def header_for(self, host: str) -> str | None:
        self._load()
        entry = lookup(self._entries, host)
        if entry is None:
            return None
        return "Basic " + base64.b64encode(f"{entry.login}:{entry.password}".encode()).decode()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._load()
        entry = lookup(self._entries, request.url.host)
        if entry is not None:
            creds = base64.b64encode(f"{entry.login}:{entry.password}".encode()).decode()
            request.headers["Authorization"] = f"Basic {creds}"
        yield request


@contextlib.contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """httpx exceptions → :mod:`nixd.errors`, naming the upstream URL (never credentials)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"{url}: timed out ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{url}: {type(exc).__name__}: {exc}") from exc


class NarBody(Protocol):
    """A NAR file body being received: where it starts, its announced length, its chunks.

    ``start`` is the file offset of the first chunk: the ``offset`` asked for when the
    upstream answered 206 with that range, 0 when it ignored ``Range`` and sent the file.
    """

    start: int
    length: int | None

    def __aiter__(self) -> AsyncIterator[bytes | memoryview]: ...


class _HttpxBody:
    def __init__(self, response: httpx.Response, name: str, start: int = 0) -> None:
        self._response = response
        self._name = name
        self.start = start
        text = response.headers.get("content-length")
        self.length = int(text) if text and text.isdigit() else None

    async def __aiter__(self) -> AsyncIterator[bytes | memoryview]:
        with translate_errors(self._name):
            async for chunk in self._response.aiter_raw():
                yield chunk


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
        self.name = config.base_url
        auth: httpx.Auth | None = None
        if config.auth == "nixd":
            if tokens is None:
                raise AuthError(f"upstream {config.url} uses nixd auth but no token source")
            auth = TokenAuth(tokens, token_lock)
        elif config.auth == "netrc":
            assert config.netrc_file is not None
            auth = NetrcAuth(config.netrc_file)
        self.client = httpx.AsyncClient(
            auth=auth,
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            follow_redirects=True,
            headers={"User-Agent": "nixd-proxy"},
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

    def url_for(self, relative: str) -> str:
        if "://" in relative:
            return relative
        return f"{self.config.base_url}/{relative.lstrip('/')}"

    def check_status(self, status: int, url: str) -> None:
        """Raise for an upstream status that is not success (see nixd.proxy.errors)."""
        if status in (200, 206):
            return
        if status in (404, 410):
            raise NotFound(f"{url}: {status}")
        if status in (401, 403):
            raise AuthError(f"{url}: upstream refused our credentials ({status})")
        raise UpstreamError(f"{url}: upstream answered {status}")

    def _outcome(self, outcome: str, error: BaseException | None = None) -> None:
        self.metrics.inc("nixd_proxy_upstream_requests_total", upstream=self.name, outcome=outcome)
        if error is None:
            self.last_ok = time.time()
        elif not isinstance(error, NotFound):
            self.last_error = str(error)
            self.last_error_at = time.time()

    async def fetch_narinfo(self, hash_part: str) -> NarInfo | None:
        """The verified narinfo for ``hash_part``, or None if this upstream does not have it.

        Raises :class:`~nixd.proxy.verify.UntrustedNarInfo` for a narinfo without a
        trusted signature, :class:`UpstreamError`/:class:`AuthError` for failures.
        """
        url = self.url_for(f"{hash_part}.narinfo")
        start = time.monotonic()
        try:
            got = await self.get_small(url, MAX_NARINFO)
            if got is None:
                with translate_errors(self.name):
                    response = await self.client.get(url)
                got = response.status_code, response.content
            status, content = got
            self.metrics.observe_latency(self.name, time.monotonic() - start)
            self.check_status(status, url)
            if len(content) > MAX_NARINFO:
                raise UpstreamError(f"{url}: narinfo larger than {MAX_NARINFO} bytes")
            info = NarInfo.parse(content)
            check_narinfo(info, hash_part, self.keys)
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

    async def fetch_small_nar(self, info: NarInfo, limit: int) -> bytes:
        """The whole NAR file ``info.url`` (at most ``limit`` bytes), unverified."""
        url = self.url_for(info.url)
        start = time.monotonic()
        try:
            got = await self.get_small(url, limit)
            if got is None:
                with translate_errors(self.name):
                    response = await self.client.get(url)
                got = response.status_code, response.content
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

    async def _authorization(self, url: str) -> tuple[str | None, AccessToken | None]:
        auth = self._auth_for_raw()
        if isinstance(auth, TokenAuth):
            token = await auth.tokens.get()
            return f"Bearer {token.value}", token
        if isinstance(auth, NetrcAuth):
            return auth.header_for(urlsplit(url).hostname or ""), None
        return None, None

    async def get_small(self, url: str, limit: int) -> tuple[int, bytes] | None:
        """``(status, body)`` of a GET over a kept-alive raw connection.

        None when the raw path does not apply (not ``http://``, a redirect, no
        ``Content-Length``, a body over ``limit``): the caller then asks httpx. A 401 with
        nixd auth renews the token once, as :class:`TokenAuth` does.
        """
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            return None
        header, token = await self._authorization(url)
        got = await self._raw_small(parts, header, limit)
        if got is not None and got[0] == 401 and token is not None:
            auth = self._auth_for_raw()
            assert isinstance(auth, TokenAuth)
            fresh = await auth._renew(token)
            got = await self._raw_small(parts, f"Bearer {fresh.value}", limit)
        return got

    async def _raw_small(
        self, parts: SplitResult, authorization: str | None, limit: int
    ) -> tuple[int, bytes] | None:
        host = parts.hostname or ""
        port = parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc.rsplit('@', 1)[-1]}\r\n"
            "User-Agent: nixd-proxy\r\nAccept-Encoding: identity\r\n"
            + (f"Authorization: {authorization}\r\n" if authorization else "")
            + "\r\n"
        ).encode("latin-1")
        idle = self._idle.setdefault((host, port), [])
        try:
            with trio.fail_after(self.config.timeout):
                while idle:  # a kept-alive connection the upstream may have closed since
                    stream = idle.pop()
                    try:
                        return await self._exchange(stream, request, limit, idle)
                    except _Stale:
                        continue
                stream = await trio.open_tcp_stream(host, port)
                try:
                    return await self._exchange(stream, request, limit, idle)
                except _Stale as exc:
                    raise UpstreamError(f"{self.name}: connection closed before headers") from exc
        except trio.TooSlowError as exc:
            raise UpstreamTimeout(f"{self.name}: timed out") from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamError(f"{self.name}: {exc}") from exc

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
                head = b""
                while (end := head.find(b"\r\n\r\n")) < 0:
                    data = await stream.receive_some(65536)
                    if not data:
                        if not head:
                            raise _Stale
                        raise UpstreamError(f"{self.name}: connection closed in the headers")
                    head += data
                    if len(head) > 65536:
                        raise UpstreamError(f"{self.name}: response headers too large")
            except trio.BrokenResourceError as exc:
                raise _Stale from exc
            status_line, *header_lines = head[:end].decode("latin-1").split("\r\n")
            try:
                version, status_text = status_line.split(" ", 2)[:2]
                status = int(status_text)
            except ValueError:
                raise UpstreamError(f"{self.name}: malformed status line") from None
            headers: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length_text = headers.get("content-length", "")
            if (
                not length_text.isdigit()
                or int(length_text) > limit
                or "transfer-encoding" in headers
                or headers.get("content-encoding", "identity").lower() != "identity"
                or 300 <= status < 400
            ):
                return None
            length = int(length_text)
            body = head[end + 4 :]
            while len(body) < length:
                data = await stream.receive_some(max(65536, length - len(body)))
                if not data:
                    raise UpstreamError(f"{self.name}: connection closed in a body")
                body += data
            if len(body) > length:
                raise UpstreamError(f"{self.name}: bytes after the response body")
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            return status, body
        finally:
            if keep and len(idle) < MAX_IDLE:
                idle.append(stream)
            else:
                await stream.aclose()

    def _auth_for_raw(self) -> httpx.Auth | None:
        auth = self.client.auth if self.client.auth is not None else None
        return auth if isinstance(auth, TokenAuth | NetrcAuth) else None

    @contextlib.asynccontextmanager
    async def nar_body(self, info: NarInfo, offset: int = 0) -> AsyncIterator[NarBody]:
        """The NAR file's body as :class:`NarBody` (length + chunks of up to 1 MiB).

        For ``http://`` upstreams the body is read straight from the socket into one
        reused buffer (httpx's per-chunk overhead would bound a cold NAR at ~150 MiB/s);
        otherwise, and when the upstream does not send a Content-Length, through httpx.
        ``offset`` > 0 asks for the rest of the file from there (``Range``, see
        :func:`resumed_start`), to resume a download the upstream cut.
        """
        url = self.url_for(info.url)
        parts = urlsplit(url)
        if parts.scheme == "http" and parts.hostname:
            raw = await self._open_raw(url, offset)
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
            yield _HttpxBody(response, self.name, start)

    async def _open_raw(self, url: str, offset: int = 0) -> _RawBody | None:
        auth = self._auth_for_raw()
        token: AccessToken | None = None
        header: str | None = None
        if isinstance(auth, TokenAuth):
            token = await auth.tokens.get()
            header = f"Bearer {token.value}"
        elif isinstance(auth, NetrcAuth):
            header = auth.header_for(urlsplit(url).hostname or "")
        body = await self._raw_get(url, header, offset)
        if body.status == 401 and isinstance(auth, TokenAuth) and token is not None:
            await body.aclose()
            fresh = await auth._renew(token)
            body = await self._raw_get(url, f"Bearer {fresh.value}", offset)
        if body.status != 200 and not (offset and body.status == 206):
            await body.aclose()
            self.check_status(body.status, url)
            raise UpstreamError(f"{url}: unexpected {body.status}")
        try:
            body.start = resumed_start(body.status, body.content_range, offset, url)
        except UpstreamError:
            await body.aclose()
            raise
        if body.length is None:
            await body.aclose()
            return None
        self._outcome("nar")
        return body

    async def _raw_get(self, url: str, authorization: str | None, offset: int = 0) -> _RawBody:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"GET {target} HTTP/1.1",
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
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(host, port)
            try:
                with trio.fail_after(timeout):
                    await stream.send_all(request)
                    head = b""
                    while b"\r\n\r\n" not in head:
                        data = await stream.receive_some(65536)
                        if not data:
                            raise UpstreamError(f"{self.name}: connection closed before headers")
                        head += data
                        if len(head) > 65536:
                            raise UpstreamError(f"{self.name}: response headers too large")
            except BaseException:
                await stream.aclose()
                raise
        except trio.TooSlowError as exc:
            self._outcome("error", UpstreamTimeout(f"{self.name}: timed out"))
            raise UpstreamTimeout(f"{self.name}: timed out") from exc
        except (OSError, trio.BrokenResourceError) as exc:  # refused, reset
            self._outcome("error", exc)
            raise UpstreamError(f"{self.name}: {exc}") from exc
        self.metrics.observe_latency(self.name, time.monotonic() - start)
        header_bytes, _, rest = head.partition(b"\r\n\r\n")
        status_line, *header_lines = header_bytes.decode("latin-1").split("\r\n")
        try:
            status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            await stream.aclose()
            raise UpstreamError(f"{self.name}: malformed status line") from None
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length_text = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        encoded = headers.get("content-encoding", "identity").lower() != "identity"
        length = int(length_text) if length_text and length_text.isdigit() else None
        if chunked or encoded:
            length = None
        body = _RawBody(stream, status, length, rest, timeout=timeout, name=self.name)
        body.content_range = headers.get("content-range")
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
            with translate_errors(self.name):
                async with self.client.stream("GET", url, headers=headers) as response:
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
            "url": self.config.url,
            "priority": self.config.priority,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "healthy": self.last_error_at is None
            or (self.last_ok is not None and self.last_ok > self.last_error_at),
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
