"""What the proxy sends as ``Authorization`` to an upstream, and to whom.

Model: an upstream's credential belongs to one **origin** — the scheme, host and port
of the upstream's configured URL (RFC 6454). :class:`Credential` is the one object both
request paths ask (the httpx client through :class:`CredentialAuth`, the raw fast path
directly):

- ``await header(url)`` is the ``Authorization`` value for ``url``, or None. It is None
  for every URL whose origin is not the credential's: a narinfo's ``URL`` field is not
  covered by its signature, so an upstream (or whoever sits on a plain ``http://`` path)
  can name any host there, and that host must not learn the token.
- ``await on_401(sent)`` is called when the origin rejected ``sent``; it renews (the
  ``nixd`` token, under one lock shared by the upstreams, so a burst of 401s makes one
  renewal) and returns the header to retry with once, or None when there is nothing
  new to try (netrc and URL credentials cannot be renewed).

Kinds, by the upstream's ``auth``:

- ``nixd``: ``Bearer <access token>`` from the daemon's
  :class:`~nixd.auth.model.TokenSource`. While the token is being renewed and the
  renewal fails or has not ended yet, a request **waits** for a token, at most
  ``token_wait`` seconds, retrying with a short backoff, rather than being answered 503
  at once (every 503 costs Nix a retry with backoff, and after five the path fails).
  Once a wait has ended without a token, later requests try once and do not wait again
  until a token was had: a machine that is simply not logged in answers at once;
- ``netrc``: Basic credentials for the upstream's host from a netrc file, re-read when it
  changes — as curl reads it, but sent to the upstream's origin only;
- ``none``: no header, unless the URL itself carries ``user:password@``; then those are
  sent as Basic credentials (as curl and httpx do), to that origin only.

Credentials inside URLs are taken out of the URL before it is used anywhere
(:func:`strip_userinfo`); what is shown in status, metrics, logs and errors is
:func:`redact_url`.
"""

from __future__ import annotations

import base64
import logging
import math
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import httpx
import trio

from nixd.errors import AuthError, FormatError, LoginFailed
from nixd.nix.netrc import NetrcEntry, lookup, parse_netrc

if TYPE_CHECKING:
    from nixd.auth.model import AccessToken, TokenSource

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}
HOLD_BACKOFF = (0.05, 1.0)
"""First and longest pause between two tries for a token while a request waits for one."""


class Origin(NamedTuple):
    """Scheme, lower-case host and port (the default one when the URL names none)."""

    scheme: str
    host: str
    port: int


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise FormatError(f"malformed URL: {exc}") from None
    return parts


def origin_of(url: str) -> Origin:
    """The origin of an ``http(s)://`` URL; :class:`FormatError` for anything else."""
    parts = _split(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise FormatError("not an http:// or https:// URL")
    return Origin(scheme, parts.hostname.lower(), parts.port or DEFAULT_PORTS[scheme])


def strip_userinfo(url: str) -> str:
    """``url`` without ``user:password@``: the form that is requested and logged."""
    parts = _split(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redact_url(url: str) -> str:
    """``url`` safe to show anyone: credentials inside it become ``***``.

    Never raises: a URL that cannot even be split is shown without anything between
    ``//`` and the last ``@``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority_end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if i >= 0:
            authority_end = min(authority_end, i)
    authority = rest[:authority_end]
    if "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}{rest[authority_end:]}"


def userinfo_of(url: str) -> tuple[str, str] | None:
    """``(user, password)`` percent-decoded from the URL, or None when it has none."""
    parts = _split(url)
    if parts.username is None and parts.password is None:
        return None
    return unquote(parts.username or ""), unquote(parts.password or "")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Credential:
    """No credential; the base of the kinds below (see the module docstring)."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin

    def applies_to(self, url: str) -> bool:
        """True when ``url`` is on this credential's origin (the only one it goes to)."""
        try:
            return origin_of(url) == self.origin
        except FormatError:
            return False

    async def header(self, url: str) -> str | None:
        return None

    async def on_401(self, sent: str) -> str | None:
        return None


class BasicCredential(Credential):
    """Fixed Basic credentials (from the URL's ``user:password@``)."""

    def __init__(self, origin: Origin, user: str, password: str) -> None:
        super().__init__(origin)
        self._header = _basic(user, password)

    def __repr__(self) -> str:
        return f"BasicCredential({self.origin.host!r})"

    async def header(self, url: str) -> str | None:
        return self._header if self.applies_to(url) else None


class NetrcCredential(Credential):
    """Basic credentials for the origin's host from a netrc file, re-read when it changes."""

    def __init__(self, origin: Origin, path: str) -> None:
        super().__init__(origin)
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

    async def header(self, url: str) -> str | None:
        if not self.applies_to(url):
            return None
        self._load()
        entry = lookup(self._entries, self.origin.host)
        if entry is None or entry.login is None or entry.password is None:
            return None
        return _basic(entry.login, entry.password)


class TokenCredential(Credential):
    """``Bearer`` with the daemon's access token; renewed once on a 401."""

    def __init__(
        self, origin: Origin, tokens: TokenSource, lock: trio.Lock, wait: float = 5.0
    ) -> None:
        super().__init__(origin)
        self.tokens = tokens
        self.lock = lock
        self.wait = wait
        """Most seconds one request waits for a token (``token_wait``)."""
        self._waited_in_vain = False
        """The last wait ended without a token, and none was had since."""

    async def _hold(self, fetch: Callable[[], Awaitable[AccessToken]]) -> AccessToken:
        """A token from ``fetch``, tried again until :attr:`wait` (see the module doc).

        :class:`AuthError` when none came in time; at once for :class:`LoginFailed` (the
        credential was refused: waiting cannot help), and after a wait in vain when the
        one try fails (a try that hangs is still cut at :attr:`wait`).
        """
        wait = self.wait
        retry = not self._waited_in_vain
        deadline = trio.current_time() + wait
        pause = HOLD_BACKOFF[0]
        waited = False
        while True:
            try:
                left = max(deadline - trio.current_time(), 0.0) if wait else math.inf
                with trio.fail_after(left):
                    token = await fetch()
            except trio.TooSlowError:
                if retry:
                    log.warning("no access token after waiting %g s (renewal hangs)", wait)
                self._waited_in_vain = True
                raise AuthError(f"no access token within {wait:g} s (still renewing)") from None
            except LoginFailed:
                raise
            except AuthError as exc:
                if not retry or trio.current_time() + pause >= deadline:
                    if wait and retry:
                        self._waited_in_vain = True
                        log.warning("no access token after waiting %g s: %s", wait, exc)
                    raise
                waited = True
                await trio.sleep(pause)
                pause = min(pause * 2, HOLD_BACKOFF[1])
                continue
            if waited or self._waited_in_vain:
                log.info("access token available again; requests go on")
            self._waited_in_vain = False
            return token

    async def header(self, url: str) -> str | None:
        if not self.applies_to(url):
            return None
        return f"Bearer {(await self._hold(self.tokens.get)).value}"

    async def on_401(self, sent: str) -> str | None:
        async with self.lock:
            current = await self._hold(self.tokens.get)
            if f"Bearer {current.value}" != sent:
                return f"Bearer {current.value}"  # renewed by someone else meanwhile
            log.info("upstream rejected the access token; renewing it")
            fresh = await self._hold(lambda: self.tokens.refresh(current))
            return f"Bearer {fresh.value}"


class CredentialAuth(httpx.Auth):
    """The httpx side of a :class:`Credential`: header per request URL, one retry on 401.

    Redirects are not followed by the client (the upstream follows them itself, each
    hop's URL checked), so every request httpx sends passes through here with its own URL.
    """

    requires_request_body = False
    requires_response_body = False

    def __init__(self, credential: Credential, *, renew: bool = True) -> None:
        self.credential = credential
        self.renew = renew
        """False: a 401 is the answer (no renewal, no retry), for prefetches."""

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        url = str(request.url)
        header = await self.credential.header(url)
        if header is not None:
            request.headers["Authorization"] = header
        response = yield request
        if response.status_code != 401 or header is None or not self.renew:
            return
        fresh = await self.credential.on_401(header)
        if fresh is None:
            return
        request.headers["Authorization"] = fresh
        yield request
