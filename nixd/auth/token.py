"""The ``token`` login method, and the exchange every login method ends in.

An API token (issued by ``nixd-server``) is the credential: the CLI reads it from a file or
stdin — never from the command line, where ``ps`` would show it — and hands it to the
daemon, which exchanges it at ``POST /api/v1/token/exchange`` for a short-lived access
token and pins the server's narinfo signing keys from ``GET /api/v1/cache/keys``.
The credential itself is kept only by the daemon, for later renewals.

:func:`exchange_json` is the exchange every login method ends in: it posts a method's
body and turns the answer into an :class:`~nixd.auth.model.AccessToken`;
:func:`fetch_token_status` asks the server who the token says we are (for ``nixd status``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import httpx

from nixd.auth.methods import SimpleMethod, param, register
from nixd.auth.model import AccessToken
from nixd.errors import AuthError, FormatError, LoginFailed, UpstreamError

EXCHANGE_PATH = "/api/v1/token/exchange"
KEYS_PATH = "/api/v1/cache/keys"
STATUS_PATH = "/api/v1/token/status"


@dataclass(frozen=True, slots=True)
class Credential:
    """What a login produced; ``repr`` never shows the secret."""

    kind: str
    secret: str

    def __repr__(self) -> str:
        return f"Credential(kind={self.kind!r})"

    def exchange_body(self) -> dict[str, str]:
        return {"kind": self.kind, "token": self.secret}


@register
class TokenMethod(SimpleMethod):
    """``token``: the same API token is exchanged again at each renewal."""

    name = "token"

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def describe(self) -> str:
        return "exchanges the API token again before the access token expires"

    async def exchange_body(self, client: httpx.AsyncClient) -> dict[str, Any]:
        return {"kind": "token", "token": self._secret}

    def to_state(self) -> dict[str, Any]:
        return {"token": self._secret}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], server_url: str) -> TokenMethod:
        secret = (param(params, "token") or "").strip()
        if not secret or any(c.isspace() for c in secret):
            raise LoginFailed("the API token is empty or contains whitespace")
        return cls(secret)

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> TokenMethod:
        return cls(str(data["token"]))


def read_api_token(file: str | None, stdin: IO[str] | None = None) -> str:
    """Read an API token from ``file`` (``-`` or None: stdin), stripped of whitespace."""
    try:
        if file in (None, "-"):
            text = (stdin or sys.stdin).read()
        else:
            with open(file, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise LoginFailed(f"cannot read the API token from {file}: {exc.strerror}") from exc
    token = text.strip()
    if not token:
        raise LoginFailed(f"no API token in {file or 'stdin'}")
    if any(c.isspace() for c in token):
        raise LoginFailed(f"the API token in {file or 'stdin'} contains whitespace")
    return token


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('error', 'error')}: {body.get('message', '')}".rstrip(": ")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return f"HTTP {response.status_code}"


async def exchange(
    client: httpx.AsyncClient, server_url: str, credential: Credential
) -> AccessToken:
    """Trade ``credential`` for an access token at the server (see :func:`exchange_json`)."""
    token, _answer = await exchange_json(client, server_url, credential.exchange_body())
    return token


async def exchange_json(
    client: httpx.AsyncClient, server_url: str, request: Mapping[str, Any]
) -> tuple[AccessToken, dict[str, Any]]:
    """Post an exchange body; the access token and the whole answer.

    A 401/403 means the credential is rejected: :class:`LoginFailed` (retrying won't help).
    Anything else that goes wrong is an :class:`UpstreamError` (worth retrying).
    """
    url = server_url.rstrip("/") + EXCHANGE_PATH
    try:
        response = await client.post(url, json=dict(request))
    except httpx.TimeoutException as exc:
        raise UpstreamError(f"token exchange at {url} timed out") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"token exchange at {url} failed: {type(exc).__name__}") from exc
    if response.status_code in (401, 403):
        raise LoginFailed(f"{server_url} rejected the credential: {_error_message(response)}")
    if response.status_code != 200:
        raise UpstreamError(f"token exchange at {url}: {_error_message(response)}")
    try:
        body: Any = response.json()
        if not isinstance(body, dict):
            raise TypeError("answer")
        value = body["access_token"]
        expires_at = float(body["expires_at"])
        identity = str(body["identity"])
        if not isinstance(value, str) or not value:
            raise TypeError("access_token")
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamError(f"token exchange at {url}: malformed answer") from exc
    issued_at = time.time()
    if "expires_in" in body:
        with contextlib.suppress(TypeError, ValueError):
            issued_at = expires_at - float(body["expires_in"])
    token = AccessToken(value=value, expires_at=expires_at, identity=identity, issued_at=issued_at)
    return token, body


async def fetch_token_status(
    client: httpx.AsyncClient, server_url: str, token: AccessToken
) -> dict[str, Any]:
    """``GET /api/v1/token/status`` with ``token``: kind, subject and attributes."""
    url = server_url.rstrip("/") + STATUS_PATH
    try:
        response = await client.get(url, headers={"Authorization": f"Bearer {token.value}"})
        response.raise_for_status()
        body = response.json()
    except httpx.HTTPError as exc:
        raise UpstreamError(f"cannot fetch the token status from {url}: {exc}") from exc
    except ValueError as exc:
        raise UpstreamError(f"{url}: malformed answer") from exc
    if not isinstance(body, dict):
        raise UpstreamError(f"{url}: malformed answer")
    return body


async def fetch_cache_keys(client: httpx.AsyncClient, server_url: str) -> tuple[str, ...]:
    """The public keys the server signs narinfos with, to pin at login."""
    url = server_url.rstrip("/") + KEYS_PATH
    try:
        response = await client.get(url)
        response.raise_for_status()
        keys = response.json()["keys"]
    except httpx.HTTPError as exc:
        raise UpstreamError(f"cannot fetch the cache keys from {url}: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamError(f"{url}: malformed answer") from exc
    if not isinstance(keys, list) or not all(isinstance(k, str) and ":" in k for k in keys):
        raise FormatError("expected a list of name:key strings", where=url)
    if not keys:
        raise AuthError(f"{url} announced no signing keys")
    return tuple(keys)
