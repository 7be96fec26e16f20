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
from typing import TYPE_CHECKING

import httpx
import trio

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
            with translate_errors(self.name):
                response = await self.client.get(url)
            self.metrics.observe_latency(self.name, time.monotonic() - start)
            self.check_status(response.status_code, url)
            if len(response.content) > MAX_NARINFO:
                raise UpstreamError(f"{url}: narinfo larger than {MAX_NARINFO} bytes")
            info = NarInfo.parse(response.content)
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

    @contextlib.asynccontextmanager
    async def open_nar(self, info: NarInfo) -> AsyncIterator[httpx.Response]:
        """A streaming GET of the NAR file ``info.url``; raises unless it answered 200."""
        url = self.url_for(info.url)
        start = time.monotonic()
        try:
            with translate_errors(self.name):
                async with self.client.stream("GET", url) as response:
                    self.metrics.observe_latency(self.name, time.monotonic() - start)
                    if response.status_code != 200:
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
