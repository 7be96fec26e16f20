"""Credential exchange: how a proof of identity becomes an access token.

``POST /api/v1/token/exchange`` names a ``kind``; the app looks it up in
``Services.exchangers`` (``"token"``, API tokens, is handled by the app itself). An
:class:`Exchanger` turns the request body into an
:class:`~nixd.server.access.identity.Identity` — verifying a CI provider's OIDC token
(:mod:`nixd.server.login.oidc`) or an AWS STS request (:mod:`nixd.server.login.aws`) — or raises
:class:`ExchangeRejected` saying why. The app then issues the server's own access token
for the identity, with the configured lifetime, and audits the exchange either way.

Exchangers establish *who*, never *what*: the identity's attributes (including ``org``,
from the server config entry that trusts the issuer) go to the policy like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from nixd.errors import AuthError
from nixd.server.access.identity import Identity


class ExchangeRejected(AuthError):
    """A credential was refused.

    ``code`` is a stable slug for the JSON error body and the audit log (e.g.
    ``wrong_audience``); ``str(exc)`` is the message shown to the client; ``reason`` may
    say more and is for the audit log only; ``status`` is the HTTP status (401, or 403
    for a valid proof of an identity this server does not accept, 502 when the issuer or
    STS could not be reached).
    """

    def __init__(
        self, message: str, *, code: str, reason: str | None = None, status: int = 401
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason or message
        self.status = status


class Exchanger(Protocol):
    """One exchange ``kind``; ``identify`` proves the identity or raises ExchangeRejected."""

    kind: str

    async def identify(self, body: Mapping[str, Any], source_ip: str | None) -> Identity: ...


def claim_attributes(claims: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """Identity attributes from token claims: strings kept, numbers and booleans as strings.

    Identity attributes are strings (or lists of them) so that policy globs apply; nested
    objects are dropped, and so are the per-token claims (``aud``, times, ``jti``) that
    say nothing about who the caller is.
    """
    attrs: dict[str, str | list[str]] = {}
    for name, value in claims.items():
        if name in ("aud", "exp", "iat", "nbf", "jti"):
            continue
        if isinstance(value, bool):
            attrs[name] = "true" if value else "false"
        elif isinstance(value, str):
            attrs[name] = value
        elif isinstance(value, int):
            attrs[name] = str(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            attrs[name] = list(value)
    return attrs
