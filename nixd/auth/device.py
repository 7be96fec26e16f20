"""Interactive login (``nixd login``): the OAuth 2.0 device authorization grant, client side.

The terminal cannot show a sign-in form, so the server gives it a short *user code* and a
URL; the person opens the URL in any browser (a phone, via the QR code), signs in, and
approves the code. Meanwhile :func:`poll` asks the server every ``interval`` seconds
whether the code was decided, backing off by 5 s whenever the server says ``slow_down``
(RFC 8628 §3.5), until it answers with tokens or with ``access_denied`` /
``expired_token``, or the code's lifetime runs out — each a clear :class:`LoginFailed`.

The result is an access token and a *refresh credential*. The daemon keeps only the
latter, in the :class:`DeviceLogin` login method: each renewal sends it as
``{"kind": "refresh", "token": ...}`` and stores the rotated one from the answer's
``refresh_token`` (the old one is dead after a single use; the server revokes the whole
login if an old one is ever presented again).
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import httpx
import segno
import trio

from nixd.auth.methods import SimpleMethod, param, register
from nixd.auth.model import AccessToken
from nixd.errors import LoginFailed, UpstreamError

log = logging.getLogger(__name__)

CLIENT_ID = "nixd-cli"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
AUTHORIZE_PATH = "/api/v1/device/authorize"
TOKEN_PATH = "/api/v1/device/token"  # noqa: S105 - a URL path
SLOW_DOWN_STEP = 5.0
MAX_TRANSIENT_WAIT = 60.0


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """The server's answer to the authorization request; ``repr`` hides the device code."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: float
    interval: float


@dataclass(frozen=True, slots=True)
class DeviceGrant:
    """What an approved login yields; ``repr`` hides the refresh credential."""

    access: AccessToken
    refresh_token: str = field(repr=False)


def _description(body: Mapping[str, Any]) -> str:
    text = body.get("error_description") or body.get("message") or ""
    return str(text)


async def request_code(client: httpx.AsyncClient, server_url: str) -> DeviceAuthorization:
    """Start a login: a new device code and user code from the server."""
    url = server_url.rstrip("/") + AUTHORIZE_PATH
    try:
        response = await client.post(url, data={"client_id": CLIENT_ID})
    except httpx.HTTPError as exc:
        raise UpstreamError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
    try:
        body = response.json()
    except ValueError as exc:
        raise UpstreamError(f"{url}: HTTP {response.status_code}, not JSON") from exc
    if response.status_code != 200:
        raise LoginFailed(
            f"{server_url} refused to start a login: {body.get('error')}: {_description(body)}"
        )
    try:
        return DeviceAuthorization(
            device_code=str(body["device_code"]),
            user_code=str(body["user_code"]),
            verification_uri=str(body["verification_uri"]),
            verification_uri_complete=str(
                body.get("verification_uri_complete") or body["verification_uri"]
            ),
            expires_in=float(body["expires_in"]),
            interval=float(body.get("interval", 5)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(f"{url}: malformed answer (missing {exc})") from exc


async def poll(
    client: httpx.AsyncClient,
    server_url: str,
    auth: DeviceAuthorization,
    *,
    sleep: Callable[[float], Awaitable[None]] = trio.sleep,
    on_wait: Callable[[float], None] | None = None,
) -> DeviceGrant:
    """Wait for the person to decide; the tokens, or :class:`LoginFailed` saying why not.

    Waits ``interval`` before each request (the server's, raised by 5 s on ``slow_down``);
    a network failure is retried at the same pace. Gives up when the code has expired.
    """
    url = server_url.rstrip("/") + TOKEN_PATH
    interval = max(1.0, auth.interval)
    deadline = trio.current_time() + auth.expires_in
    form = {"grant_type": GRANT_TYPE, "device_code": auth.device_code, "client_id": CLIENT_ID}
    while True:
        if trio.current_time() > deadline + interval:  # the server says expired_token first
            raise LoginFailed(
                f"timed out: code {auth.user_code} was not approved within "
                f"{auth.expires_in:.0f} s; run `nixd login` again"
            )
        if on_wait is not None:
            on_wait(interval)
        await sleep(interval)
        try:
            response = await client.post(url, data=form)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("polling %s failed (%s); retrying", url, type(exc).__name__)
            interval = min(interval * 2, MAX_TRANSIENT_WAIT)
            continue
        if response.status_code == 200:
            return _grant(body, url)
        error = body.get("error") if isinstance(body, dict) else None
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += SLOW_DOWN_STEP
            log.info("server asked to slow down; polling every %.0f s", interval)
            continue
        if error == "access_denied":
            raise LoginFailed(f"the login with code {auth.user_code} was denied in the browser")
        if error == "expired_token":
            raise LoginFailed(
                f"code {auth.user_code} expired before it was approved; run `nixd login` again"
            )
        if response.status_code >= 500:
            interval = min(interval * 2, MAX_TRANSIENT_WAIT)
            continue
        detail = _description(body) if isinstance(body, dict) else ""
        raise LoginFailed(f"the server refused the login: {error or response.status_code} {detail}")


def _grant(body: Any, url: str) -> DeviceGrant:
    try:
        expires_at = float(body["expires_at"])
        access = AccessToken(
            value=str(body["access_token"]),
            expires_at=expires_at,
            identity=str(body.get("identity", "user:?")),
            issued_at=expires_at - float(body["expires_in"]),
        )
        refresh = str(body["refresh_token"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(f"{url}: malformed token answer") from exc
    if not access.value or not refresh:
        raise UpstreamError(f"{url}: empty token in the answer")
    return DeviceGrant(access, refresh)


def render_qr(text: str, *, width: int) -> str | None:
    """A QR code of ``text`` in Unicode half blocks, or None if it is wider than ``width``."""
    qr = segno.make(text, error="l")
    matrix = [list(row) for row in qr.matrix]
    border = 2
    size = len(matrix) + 2 * border
    if size > width:
        return None

    def dark(y: int, x: int) -> bool:
        y, x = y - border, x - border
        return 0 <= y < len(matrix) and 0 <= x < len(matrix) and bool(matrix[y][x])

    lines = []
    for y in range(0, size, 2):
        row = []
        for x in range(size):
            top, bottom = dark(y, x), dark(y + 1, x)
            # Light modules are drawn (dark terminal backgrounds are the common case).
            row.append(
                {(False, False): "█", (True, False): "▄", (False, True): "▀"}.get(
                    (top, bottom), " "
                )
            )
        lines.append("".join(row))
    return "\n".join(lines)


def show(auth: DeviceAuthorization, out: IO[str] | None = None) -> None:
    """Tell the person where to go: URL, code, and a QR code on a wide enough terminal."""
    out = out or sys.stdout
    out.write(f"To log in, open {auth.verification_uri}\nand enter the code:  {auth.user_code}\n")
    if out.isatty():
        columns = shutil.get_terminal_size((80, 24)).columns
        qr = render_qr(auth.verification_uri_complete, width=columns)
        if qr is not None:
            out.write(f"\nor scan this with a phone:\n{qr}\n")
    minutes = auth.expires_in / 60
    out.write(f"\nWaiting for approval (the code expires in {minutes:.0f} min)...\n")
    out.flush()


async def login(
    client: httpx.AsyncClient, server_url: str, out: IO[str] | None = None
) -> DeviceGrant:
    """The whole interactive login: request a code, show it, wait for the decision."""
    auth = await request_code(client, server_url)
    show(auth, out)
    return await poll(client, server_url, auth)


def interactive_login(server_url: str, out: IO[str] | None = None) -> str:
    """Run :func:`login` to completion (Ctrl-C stops it); the refresh credential.

    The CLI hands the credential to the daemon, which keeps it and renews with it; the
    access token of the grant is not kept (the daemon exchanges the credential at once).
    """

    async def main() -> str:
        async with httpx.AsyncClient(timeout=30) as client:
            return (await login(client, server_url, out)).refresh_token

    return trio.run(main)


@register
class DeviceLogin(SimpleMethod):
    """``device``: renews with the rotating refresh credential of an interactive login."""

    name = "device"

    def __init__(self, refresh_token: str) -> None:
        self._refresh = refresh_token

    def describe(self) -> str:
        return "renews with a refresh credential from `nixd login` (rotated at each use)"

    async def exchange_body(self, client: httpx.AsyncClient) -> dict[str, Any]:
        return {"kind": "refresh", "token": self._refresh}

    def accept(self, answer: Mapping[str, Any]) -> bool:
        """Keep the rotated refresh credential: the one just sent is now spent."""
        rotated = answer.get("refresh_token")
        if not isinstance(rotated, str) or not rotated or rotated == self._refresh:
            log.warning("the server's refresh answer carries no new refresh credential")
            return False
        self._refresh = rotated
        return True

    def to_state(self) -> dict[str, Any]:
        return {"refresh_token": self._refresh}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], server_url: str) -> DeviceLogin:
        return cls(param(params, "refresh_token") or "")

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> DeviceLogin:
        return cls(str(data["refresh_token"]))
