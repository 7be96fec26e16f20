"""Private flakes for local users: ``/f/...`` and ``/api/v1/flakes...`` without the secret.

Model. A flake tarball (``https://HOST/f/acme/tool/0.*.tar.gz``) is fetched by the user's
*own* ``nix`` process, not by ``nix-daemon``; the token that could fetch it directly sits
in the root-only managed netrc. So the proxy answers exactly two kinds of request to
every local user, without the local secret (:attr:`~nixd.proxy.config.ProxyConfig.flakes`):

- ``GET``/``HEAD /f/<org>/<name>/<version-or-constraint>.tar.gz`` (tarballs, and the
  server's redirects from a constraint to the exact release), and
- ``GET``/``HEAD /api/v1/flakes``, ``/api/v1/flakes/...`` (``nixd flake list/show``),

forwarded with the daemon's access token to the server it is logged in to — and to no
other origin (:class:`~nixd.proxy.credential.TokenCredential`), never following a
redirect itself. Everything else keeps requiring the secret. What a local user gets is
therefore what *this machine* may read, only from this machine, and only as bytes: the
token never leaves root, and nothing the user receives works against the server from
anywhere else. That is no more than any local user already has through the
world-readable ``/nix/store`` and ``nix-daemon``'s substitution. A per-user short-lived
credential was rejected for that reason: it would be usable off the machine.

What is forwarded is checked first. The ``Host`` must be the loopback (``127.0.0.1``,
``[::1]``, ``localhost``): a web page a local user opens cannot read the answers across
origins (no CORS headers), nor through DNS rebinding, which sends the page's own host
name. The path is one of the two kinds above, made of plain
segments (no ``.``/``..``, no empty segment, no percent-encoded ``.``, ``/`` or ``\\``,
only characters a request line carries as they are), so no spelling of a path reaches
another route of the server with the machine's token. Only ``Accept`` and
``If-None-Match`` of the request go upstream (never its ``Authorization``).

What comes back:

- 200 (and 304): streamed, at most ``max_bytes`` (a larger ``Content-Length`` is a 502
  before any byte; a body that runs past it is cut), with its ``Content-Type``,
  ``ETag``, ``Cache-Control``, ``Last-Modified`` and ``Link``;
- redirects: passed on, never followed; ``Location`` and ``Link`` URLs under the
  server's URL are rewritten to the proxy's (``http://127.0.0.1:PORT``), so Nix's next
  request comes here again;
- 404/410 and other 4xx (a malformed constraint): passed on with their (bounded) body;
- 401/403 after one renewal — the server rejected the machine's token — and a machine
  that is not logged in: **503** with a text that says so. Never 401/403/404, which Nix
  would remember as an answer: its tarball cache keeps what it got for ``tarball-ttl``;
- the server unreachable, timing out or failing (5xx): 503.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import httpx
import trio

from nixd.errors import AuthError
from nixd.proxy.config import FlakesConfig
from nixd.proxy.credential import CredentialAuth, TokenCredential, origin_of, strip_userinfo
from nixd.proxy.front import Request, Responder
from nixd.proxy.upstream import _discard, _raw_chunks, content_length

if TYPE_CHECKING:
    from nixd.auth.model import TokenSource

log = logging.getLogger(__name__)

API_PREFIX = b"/api/v1/flakes"
TARBALL_PREFIX = b"/f/"
MAX_ERROR_BODY = 64 << 10
"""Most bytes of a non-200 answer's body passed on (error JSON is far smaller)."""
MAX_TARGET = 4096
PASSED_HEADERS = ("content-type", "etag", "cache-control", "last-modified", "content-encoding")
FORWARDED_HEADERS = (b"accept", b"if-none-match")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# RFC 3986 pchar (unreserved, pct-encoded, sub-delims, ":" "@") plus "/" and the "^" of
# caret constraints; "?" only between path and query.
_PATH_CHARS = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:@/^"
)
_QUERY_CHARS = _PATH_CHARS | frozenset(b"?")
_SNEAKY = (b"%2e", b"%2f", b"%5c", b"%00")

NOT_LOGGED_IN = b"this machine is not logged in (nixd login): private flakes cannot be fetched\n"
WRONG_HOST = b"flakes are served only to requests for this machine's loopback address\n"
REJECTED = (
    b"the nixd server rejected this machine's login (nixd status shows it; log in again "
    b"with nixd login); not an answer about the flake\n"
)

NO_TOKEN = (
    b"this machine has no usable access token right now (being renewed, or the login was "
    b"rejected: nixd status shows which); retry later\n"
)


class Refused(Exception):
    """A request the proxy will not forward (the message says why)."""


def is_flake_request(method: bytes, path: bytes) -> bool:
    """True for the requests :mod:`nixd.proxy.flakes` answers (before the secret check)."""
    if method not in (b"GET", b"HEAD"):
        return False
    return (
        path.startswith(TARBALL_PREFIX) or path == API_PREFIX or path.startswith(API_PREFIX + b"/")
    )


def check_target(path: bytes, query: bytes) -> str:
    """The request target to forward, or :class:`Refused` (see the module docstring)."""
    if len(path) + len(query) > MAX_TARGET:
        raise Refused("request target too long")
    if not set(path) <= _PATH_CHARS or not set(query) <= _QUERY_CHARS:
        raise Refused("characters outside a plain URL path")
    lowered = (path + b"?" + query).lower()
    if any(s in lowered for s in _SNEAKY):
        raise Refused("percent-encoded '.', '/', '\\' or NUL")
    segments = path.split(b"/")[1:]
    if path != API_PREFIX and any(s in (b"", b".", b"..") for s in segments):
        raise Refused("empty, '.' or '..' path segment")
    return (path + (b"?" + query if query else b"")).decode("ascii")


def loopback_host(host: bytes | None) -> bool:
    """True when ``Host`` names this machine's loopback (``127.0.0.1``, ``[::1]``,
    ``localhost``, any port): what Nix sends for the proxy's URL. A page in a local user's
    browser that reaches the proxy through DNS rebinding sends its own host name."""
    if host is None:
        return False
    name = host.strip().lower()
    bracket = name.startswith(b"[")
    name = name[: name.find(b"]") + 1] if bracket else name.partition(b":")[0]
    return name in (b"localhost", b"[::1]") or (
        name.startswith(b"127.") and name.count(b".") == 3 and name.replace(b".", b"").isdigit()
    )


def rewrite_links(value: str, server: str, proxy: str) -> str:
    """``value`` with every URL under ``server`` (its base URL) moved under ``proxy``."""
    return value.replace(server + "/", proxy + "/")


class FlakeForwarder:
    """Forwards flake requests to the logged-in server; one per proxy (module docstring)."""

    def __init__(self, config: FlakesConfig, tokens: TokenSource | None, lock: trio.Lock) -> None:
        self.tokens = tokens
        self.lock = lock
        self.proxy_url = ""
        """The proxy's own base URL, set once it listens (what Location is rewritten to)."""
        self.config = config
        self.client: httpx.AsyncClient | None = None
        self._old: list[httpx.AsyncClient] = []
        self._build()

    def _build(self) -> None:
        server = self.config.server_url
        if self.client is not None:
            self._old.append(self.client)
        self.client = None
        self.server = "" if server is None else strip_userinfo(server).rstrip("/")
        if not self.server or self.tokens is None:
            return
        credential = TokenCredential(
            origin_of(self.server), self.tokens, self.lock, self.config.token_wait
        )
        self.client = httpx.AsyncClient(
            auth=CredentialAuth(credential),
            timeout=httpx.Timeout(self.config.timeout),
            follow_redirects=False,
            headers={"User-Agent": "nixd-proxy", "Accept-Encoding": "identity"},
        )

    def update(self, config: FlakesConfig) -> None:
        """A new login (or logout): requests from now on go to the new server."""
        if config == self.config:
            return
        self.config = config
        self._build()

    async def aclose(self) -> None:
        clients = [*self._old, *([self.client] if self.client else [])]
        self._old, self.client = [], None
        for client in clients:
            await client.aclose()

    async def handle(self, request: Request, resp: Responder) -> None:
        """Answer one flake request (never raises for what the server or the path does)."""
        head = request.method == b"HEAD"
        if not loopback_host(request.headers.get(b"host")):
            await resp.simple(403, WRONG_HOST, _TEXT, head=head)
            return
        try:
            target = check_target(request.path, request.query)
        except Refused as exc:
            await resp.simple(400, f"bad request: {exc}\n".encode(), _TEXT, head=head)
            return
        client = self.client
        if client is None:
            await resp.simple(503, NOT_LOGGED_IN, _TEXT, head=head)
            return
        headers = {
            name.decode(): value.decode("latin-1")
            for name in FORWARDED_HEADERS
            if (value := request.headers.get(name)) is not None
        }
        url = self.server + target
        try:
            await self._forward(
                client, request.method.decode(), url, headers=headers, resp=resp, head=head
            )
        except AuthError as exc:
            log.warning("flake request %s: no usable access token: %s", target, exc)
            await self._fail(resp, 503, NO_TOKEN)
        except httpx.TimeoutException:
            await self._fail(resp, 503, b"the nixd server did not answer in time\n")
        except (httpx.HTTPError, OSError) as exc:
            log.warning("flake request %s: %s: %s", target, type(exc).__name__, exc)
            await self._fail(resp, 503, b"the nixd server cannot be reached\n")

    async def _fail(self, resp: Responder, status: int, body: bytes) -> None:
        if resp.started:
            resp.abort(body.decode().strip())
        await resp.simple(status, body, _TEXT)

    async def _forward(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        resp: Responder,
        head: bool,
    ) -> None:
        request = client.build_request(method, url, headers=headers)
        response = await client.send(request, stream=True)
        try:
            await self._answer(response, resp, head)
        finally:
            await response.aclose()

    def _rewritten(self, value: str) -> str:
        return rewrite_links(value, self.server, self.proxy_url) if self.proxy_url else value

    async def _answer(self, response: httpx.Response, resp: Responder, head: bool) -> None:
        status = response.status_code
        if status in (401, 403):
            log.warning("the nixd server refused the machine's token for a flake (%d)", status)
            await resp.simple(503, REJECTED, _TEXT, head=head)
            return
        if status >= 500:
            await resp.simple(
                503, f"the nixd server answered HTTP {status}\n".encode(), _TEXT, head=head
            )
            return
        out: list[tuple[bytes, bytes]] = []
        for name in PASSED_HEADERS:
            if (value := response.headers.get(name)) is not None:
                out.append((name.encode(), value.encode("latin-1")))
        for link in response.headers.get_list("link"):
            out.append((b"link", self._rewritten(link).encode("latin-1")))
        if status in _REDIRECTS:
            location = response.headers.get("location")
            if location is not None:
                out.append((b"location", self._rewritten(location).encode("latin-1")))
            await resp.simple(status, b"", out, head=head)
            return
        try:
            length = content_length(response.headers, "the nixd server")
        except Exception as exc:
            log.warning("flake answer: %s", exc)
            await resp.simple(502, b"malformed answer from the nixd server\n", _TEXT, head=head)
            return
        limit = self.config.max_bytes if status in (200, 304) else MAX_ERROR_BODY
        if length is not None and length > limit:
            await resp.simple(
                502, f"the answer is larger than {limit} bytes\n".encode(), _TEXT, head=head
            )
            return
        if status != 200 or head:
            body = b"" if head else await _read_bounded(response, limit)
            if head and length is not None:
                out.append((b"content-length", str(length).encode()))
                await resp.start(status, out)
                await resp.end()
                return
            await resp.simple(status, body, out, head=head)
            return
        if length is not None:
            out.append((b"content-length", str(length).encode()))
        await resp.start(200, out)
        sent = 0
        chunks = _raw_chunks(response)
        async for chunk in chunks:
            sent += len(chunk)
            if sent > limit or (length is not None and sent > length):
                await _discard(response, chunks)
                resp.abort(f"flake body past {min(limit, length or limit)} bytes")
            await resp.send(chunk)
        if length is not None and sent < length:
            resp.abort("the nixd server ended the body early")
        await resp.end()


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limit:
            break
    return bytes(body[:limit])


_TEXT = ((b"content-type", b"text/plain; charset=utf-8"),)
