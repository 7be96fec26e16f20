"""Access tokens: short-lived JWTs the server issues in exchange for a credential.

An access token says *who* the caller is, never what they may do: its claims are the
standard ``iss``, ``aud``, ``sub`` (the identity rendered ``kind:subject``), ``iat``,
``nbf``, ``exp`` and ``jti``, plus ``kind`` and ``attrs`` (the identity's attributes, such
as ``org``). Every request is decided by the policy as it is *now*, so a policy change
takes effect at once, without waiting for tokens to expire.

Tokens are signed with Ed25519 (JWS ``alg: EdDSA``) by the current key of
:class:`nixd.server.access.keys.JwtKeys`; the header names it by ``kid`` and the public keys are
published as a JWKS (``/.well-known/jwks.json``). Verification is strict and
allow-listed: only ``EdDSA``, only a ``kid`` we hold (current, or retired and still within
its retention), our issuer and audience, every claim present and well-typed, and
``nbf``/``iat``/``exp`` against the injected clock with :data:`LEEWAY` seconds for clock
skew. Every refusal names its ``reason`` (for the audit log); expiry is a
:class:`nixd.errors.TokenExpired` so a client knows to exchange its credential again.

Revocation: access tokens are not individually revocable; they are short-lived instead
(``lifetime``, one hour by default). Revoking the credential stops its next exchange, so
a revoked caller keeps access for at most one token lifetime. Rotating the signing key
with ``retain_for=0`` invalidates every outstanding token at once, for emergencies.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jwt

from nixd.errors import AuthError, ConfigError, TokenExpired
from nixd.server.access.identity import Identity
from nixd.server.access.keys import JwtKeys

ALGORITHMS = ("EdDSA",)
"""The only signature algorithm accepted; anything else (``none``, ``HS256``…) is refused
before a key is even looked up."""

LEEWAY = 30.0
DEFAULT_LIFETIME = 3600.0
REQUIRED_CLAIMS = ("iss", "aud", "sub", "iat", "nbf", "exp", "jti", "kind", "attrs")


class InvalidAccessToken(AuthError):
    """An access token was refused; ``reason`` is a slug for the audit log.

    Reasons: ``malformed``, ``algorithm``, ``unknown_key``, ``signature``, ``issuer``,
    ``audience``, ``claims``, ``not_yet_valid``.
    """

    code: ClassVar[str] = "invalid_token"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class AccessTokenExpired(TokenExpired):
    """The access token's ``exp`` (plus leeway) has passed: exchange the credential again."""

    code: ClassVar[str] = "token_expired"
    reason = "expired"


def _numeric(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidAccessToken(f"access token claim {name!r} is not a time", reason="claims")
    return float(value)


class TokenIssuer:
    """Issues and verifies the server's access tokens.

    ``lifetime`` is seconds a token lives; ``clock`` returns Unix seconds (tests pass a
    fake one, the key retention deadlines use the keyring's own clock).
    """

    def __init__(
        self,
        keys: JwtKeys,
        issuer: str,
        audience: str,
        lifetime: float = DEFAULT_LIFETIME,
        *,
        leeway: float = LEEWAY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lifetime <= 0:
            raise ConfigError(f"access token lifetime must be positive, got {lifetime}")
        if not issuer or not audience:
            raise ConfigError("access tokens need a non-empty issuer and audience")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self.leeway = leeway
        self._clock = clock

    def issue(
        self, identity: Identity, *, not_after: float | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Sign a token for ``identity``; return it and its claims.

        ``not_after`` caps ``exp`` (e.g. at the credential's own expiry) so a token never
        outlives what it was exchanged for.
        """
        if identity.kind == "anonymous":
            raise AuthError("an anonymous caller cannot be issued an access token")
        now = int(self._clock())
        exp = now + int(self.lifetime)
        if not_after is not None:
            exp = min(exp, int(not_after))
        if exp <= now:
            raise AuthError("the credential expires before an access token could be used")
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": identity.render(),
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": secrets.token_urlsafe(16),
            "kind": identity.kind,
            "attrs": identity.to_json()["attributes"],
        }
        key = self.keys.current
        assert key.private is not None  # the keyring guarantees the current key has one
        token = jwt.encode(
            claims, key.private, algorithm="EdDSA", headers={"kid": key.kid, "typ": "JWT"}
        )
        return token, claims

    def verify(self, token: str) -> tuple[Identity, dict[str, Any]]:
        """The identity a token was issued to, and its claims; or why it is refused.

        Raises :class:`AccessTokenExpired` (a ``TokenExpired``) or
        :class:`InvalidAccessToken` with a ``reason``.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise InvalidAccessToken(
                f"not a well-formed access token: {exc}", reason="malformed"
            ) from exc
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise InvalidAccessToken(
                f"access token algorithm {alg!r} is not accepted (only {', '.join(ALGORITHMS)})",
                reason="algorithm",
            )
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidAccessToken("access token header has no key id (kid)", reason="malformed")
        public = self.keys.public_key(kid)
        if public is None:
            raise InvalidAccessToken(
                f"access token signed by unknown or retired key {kid!r}", reason="unknown_key"
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                public,
                algorithms=list(ALGORITHMS),
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "verify_exp": False,  # checked below against our clock
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError as exc:
            raise InvalidAccessToken(
                "access token signature does not verify", reason="signature"
            ) from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidAccessToken(
                f"access token is not for this server (audience {self.audience!r} expected)",
                reason="audience",
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidAccessToken(
                f"access token was not issued by {self.issuer!r}", reason="issuer"
            ) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidAccessToken(
                f"access token lacks the {exc.claim!r} claim", reason="claims"
            ) from exc
        except jwt.InvalidAlgorithmError as exc:
            raise InvalidAccessToken(
                f"access token algorithm is not accepted: {exc}", reason="algorithm"
            ) from exc
        except jwt.InvalidTokenError as exc:
            raise InvalidAccessToken(
                f"not a valid access token: {exc}", reason="malformed"
            ) from exc
        self._check_times(claims)
        return self._identity(claims), claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        exp, nbf, iat = (_numeric(claims, n) for n in ("exp", "nbf", "iat"))
        if now >= exp + self.leeway:
            raise AccessTokenExpired(f"access token expired {now - exp:.0f} s ago")
        if nbf > now + self.leeway:
            raise InvalidAccessToken(
                f"access token is not valid for another {nbf - now:.0f} s",
                reason="not_yet_valid",
            )
        if iat > now + self.leeway:
            raise InvalidAccessToken(
                f"access token was issued {iat - now:.0f} s in the future",
                reason="not_yet_valid",
            )

    @staticmethod
    def _identity(claims: Mapping[str, Any]) -> Identity:
        kind, sub, attrs, jti = claims["kind"], claims["sub"], claims["attrs"], claims["jti"]
        if not isinstance(kind, str) or not kind or ":" in kind:
            raise InvalidAccessToken("access token has an invalid 'kind' claim", reason="claims")
        if not isinstance(sub, str) or not sub.startswith(f"{kind}:") or sub == f"{kind}:":
            raise InvalidAccessToken(
                "access token 'sub' does not match its 'kind'", reason="claims"
            )
        if not isinstance(jti, str) or not jti:
            raise InvalidAccessToken("access token has an invalid 'jti' claim", reason="claims")
        if not isinstance(attrs, dict):
            raise InvalidAccessToken("access token 'attrs' is not a map", reason="claims")
        try:
            return Identity(kind=kind, subject=sub[len(kind) + 1 :], attributes=attrs)
        except ValueError as exc:
            raise InvalidAccessToken(
                f"access token names an invalid identity: {exc}", reason="claims"
            ) from exc

    def jwks(self) -> dict[str, Any]:
        """The body of ``/.well-known/jwks.json``."""
        return self.keys.jwks()
