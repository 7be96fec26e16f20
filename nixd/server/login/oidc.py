"""GitHub Actions and GitLab CI logins: verifying the CI provider's OIDC ID tokens.

A CI job asks its provider for an ID token whose audience is this server and sends it to
``POST /api/v1/token/exchange`` (kind ``github-action`` or ``gitlab-pipeline``). The token
is a JWT the provider signed; the server trusts it only as far as its config says::

    [[github]]                       # one entry per org this server serves
    org = "acme"                     # the identity's `org` attribute
    audience = "https://cache.example"   # required: the `aud` the job must request
    owner_ids = ["1001"]             # repository_owner_id values that belong to acme ("*": any)
    issuer = "https://token.actions.githubusercontent.com"   # the default; GHES differs

    [[gitlab]]
    org = "acme"
    audience = "https://cache.example"
    owner_ids = ["72"]               # namespace_id values (list each subgroup) ("*": any)
    issuer = "https://gitlab.com"    # the default; self-managed GitLab differs

**Verification**, in this order, each refusal with its own code: the header's ``alg`` is on
the allow-list (RS256, ES256 — never ``none``, never an HMAC keyed with a public key); the
unverified ``iss`` names a configured issuer (``wrong_issuer``); the ``kid`` is in the
issuer's JWKS (``unknown_key``); the signature, ``iss`` and ``aud`` verify; ``exp``,
``nbf`` and ``iat`` hold within :data:`LEEWAY` seconds; ``sub`` is present. Then the
token's immutable owner id (``repository_owner_id`` / ``namespace_id``) must belong to a
config entry with that issuer and audience, or the exchange is refused (``unknown_owner``,
403): a token from another org's repository proves an identity, but not one this server
serves, so it gets no token at all rather than a token every policy ignores.

**Keys.** The issuer's JWKS is found through ``ISSUER/.well-known/openid-configuration``
(whose ``issuer`` must equal the configured one) → ``jwks_uri``, cached for
:data:`JWKS_MAX_AGE`, and fetched again when a token names an unknown ``kid`` — at most
once per :data:`JWKS_MIN_REFRESH` per issuer, so a flood of forged ``kid`` values cannot
turn the server into a load generator against the provider. If a refetch fails, the
cached keys stay in use. Issuers must be ``https://`` unless on loopback (tests).

**Identity.** Kind ``github`` or ``gitlab``, subject = ``sub`` (e.g.
``repo:acme/app:ref:refs/heads/main``), attributes = the claims (strings; see
:func:`~nixd.server.login.exchange.claim_attributes`) plus ``org``. Policies should match the
immutable ids (``repository_id``, ``repository_owner_id``, ``project_id``,
``namespace_id``), not names that can be renamed and re-registered.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import trio

from nixd.errors import ConfigError
from nixd.server.access.identity import Identity
from nixd.server.config import DEFAULT_ISSUERS, OidcSection
from nixd.server.login.exchange import ExchangeRejected, claim_attributes

log = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "ES256")
"""Signature algorithms accepted from a CI provider: asymmetric only."""
_KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
LEEWAY = 60.0
JWKS_MIN_REFRESH = 60.0
JWKS_MAX_AGE = 3600.0
HTTP_TIMEOUT = 10.0
MAX_DOCUMENT = 1 << 20
GITHUB_ISSUER = DEFAULT_ISSUERS["github"]
GITLAB_ISSUER = DEFAULT_ISSUERS["gitlab"]


@dataclass(frozen=True, slots=True)
class Provider:
    """What differs between CI providers: names, the exchange kind, the owner claim."""

    kind: str  # identity kind
    exchange_kind: str  # the `kind` of the exchange request
    label: str
    default_issuer: str
    owner_claim: str  # immutable id of the owner (user, org, group)
    owner_name_claim: str


GITHUB = Provider(
    "github", "github-action", "GitHub", GITHUB_ISSUER, "repository_owner_id", "repository_owner"
)
GITLAB = Provider(
    "gitlab", "gitlab-pipeline", "GitLab", GITLAB_ISSUER, "namespace_id", "namespace_path"
)


class IssuerKeys:
    """The signing keys of one issuer, from its JWKS: cached, refetched on unknown ``kid``."""

    def __init__(
        self,
        issuer: str,
        *,
        min_refresh: float = JWKS_MIN_REFRESH,
        max_age: float = JWKS_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.min_refresh = min_refresh
        self.max_age = max_age
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._tried_at: float | None = None  # last attempt, good or bad
        self._lock = trio.Lock()

    async def get(self, kid: str) -> jwt.PyJWK | None:
        """The key ``kid``, fetching the JWKS if it is stale, or once if ``kid`` is new."""
        async with self._lock:
            now = self._clock()
            stale = self._fetched_at is None or now - self._fetched_at >= self.max_age
            unknown = kid not in self._keys
            may_try = self._tried_at is None or now - self._tried_at >= self.min_refresh
            if (stale or unknown) and may_try:
                self._tried_at = now
                try:
                    self._keys = await self._fetch()
                    self._fetched_at = now
                except ExchangeRejected:
                    if not self._keys:
                        raise
                    log.warning("keeping cached keys of %s after a failed refresh", self.issuer)
            return self._keys.get(kid)

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        discovery_url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False) as client:
            config = await self._get_json(client, discovery_url)
            if config.get("issuer") != self.issuer:
                raise self._unavailable(
                    f"{discovery_url} names issuer {config.get('issuer')!r}, not {self.issuer!r}"
                )
            jwks_uri = config.get("jwks_uri")
            if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("https", "http"):
                raise self._unavailable(f"{discovery_url} has no usable jwks_uri")
            if urlsplit(jwks_uri).scheme == "http" and urlsplit(self.issuer).scheme == "https":
                raise self._unavailable(f"{discovery_url} points to a plain-http jwks_uri")
            document = await self._get_json(client, jwks_uri)
        raw_keys = document.get("keys")
        if not isinstance(raw_keys, list):
            raise self._unavailable(f"{jwks_uri} is not a JWKS (no 'keys' list)")
        keys: dict[str, jwt.PyJWK] = {}
        for raw in raw_keys:
            if not isinstance(raw, dict) or not isinstance(raw.get("kid"), str):
                continue
            if raw.get("use", "sig") != "sig" or raw.get("kty") not in ("RSA", "EC"):
                continue
            try:
                keys[raw["kid"]] = jwt.PyJWK(raw)
            except jwt.PyJWTError as exc:
                log.warning("%s: skipping key %r: %s", jwks_uri, raw["kid"], exc)
        log.info("fetched %d signing keys of %s", len(keys), self.issuer)
        return keys

    async def _get_json(self, client: httpx.AsyncClient, url: str) -> dict[str, Any]:
        try:
            response = await client.get(url)
        except httpx.HTTPError as exc:
            raise self._unavailable(f"cannot fetch {url}: {exc!r}") from exc
        if response.status_code != 200:
            raise self._unavailable(f"{url} answered HTTP {response.status_code}")
        if len(response.content) > MAX_DOCUMENT:
            raise self._unavailable(f"{url} sent more than {MAX_DOCUMENT} bytes")
        try:
            data = response.json()
        except ValueError as exc:
            raise self._unavailable(f"{url} did not send JSON") from exc
        if not isinstance(data, dict):
            raise self._unavailable(f"{url} did not send a JSON object")
        return data

    def _unavailable(self, reason: str) -> ExchangeRejected:
        return ExchangeRejected(
            f"the keys of issuer {self.issuer} could not be fetched; try again later",
            code="issuer_unavailable",
            reason=reason,
            status=502,
        )


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ExchangeRejected(f"token claim {name!r} is not a time", code="invalid_token")
    return float(value)


class OidcExchanger:
    """The ``github-action`` or ``gitlab-pipeline`` exchange for the configured trusts."""

    def __init__(
        self,
        provider: Provider,
        trusts: Sequence[OidcSection],
        *,
        leeway: float = LEEWAY,
        min_refresh: float = JWKS_MIN_REFRESH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not trusts:
            raise ConfigError(f"no [[{provider.kind}]] entries: nothing to trust")
        self.provider = provider
        self.kind = provider.exchange_kind
        self.trusts = tuple(trusts)
        self.leeway = leeway
        self._clock = clock
        self.issuers = {
            t.issuer: IssuerKeys(t.issuer, min_refresh=min_refresh, clock=clock) for t in trusts
        }

    def _reject(self, message: str, code: str, reason: str | None = None) -> ExchangeRejected:
        return ExchangeRejected(
            f"{self.provider.label} token refused: {message}", code=code, reason=reason
        )

    async def identify(self, body: Mapping[str, Any], source_ip: str | None) -> Identity:
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ExchangeRejected(
                '"token" must be the ID token (a non-empty string)', code="invalid_request"
            )
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise self._reject("not a well-formed JWT", "invalid_token", str(exc)) from exc
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise self._reject(
                f"algorithm {alg!r} is not accepted (only {', '.join(ALGORITHMS)})",
                "wrong_algorithm",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise self._reject("the header names no key (kid)", "invalid_token")
        iss = unverified.get("iss")
        keys = self.issuers.get(iss) if isinstance(iss, str) else None
        if keys is None or not isinstance(iss, str):
            raise self._reject(
                f"issuer {iss!r} is not trusted by this server", "wrong_issuer", f"iss={iss!r}"
            )
        key = await keys.get(kid)
        if key is None:
            raise self._reject(
                f"signed by key {kid!r}, which issuer {iss} does not publish",
                "unknown_key",
                f"iss={iss} kid={kid!r}",
            )
        if key.key_type != _KEY_TYPES[alg]:
            raise self._reject(
                f"key {kid!r} is not a {_KEY_TYPES[alg]} key for {alg}", "wrong_algorithm"
            )
        audiences = sorted({t.audience for t in self.trusts if t.issuer == iss})
        claims = self._decode(token, key, alg, iss, audiences)
        self._check_times(claims)
        return self._identity(claims, iss)

    def _decode(
        self, token: str, key: jwt.PyJWK, alg: str, iss: str, audiences: list[str]
    ) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=audiences,
                issuer=iss,
                options={
                    "require": ["iss", "aud", "sub", "exp", "iat"],
                    "verify_exp": False,  # checked against our clock below
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError as exc:
            raise self._reject(
                "the signature does not verify", "invalid_token", "signature"
            ) from exc
        except jwt.InvalidAudienceError as exc:
            expected = " or ".join(repr(a) for a in audiences)
            raise self._reject(
                f"its audience is not this server (request audience {expected})",
                "wrong_audience",
                str(exc),
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise self._reject("issuer mismatch", "wrong_issuer", str(exc)) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise self._reject(f"it lacks the {exc.claim!r} claim", "invalid_token") from exc
        except jwt.PyJWTError as exc:
            raise self._reject(f"not a valid token: {exc}", "invalid_token") from exc
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        exp, nbf, iat = (_time_claim(claims, n) for n in ("exp", "nbf", "iat"))
        assert exp is not None and iat is not None  # required by _decode
        if now >= exp + self.leeway:
            raise self._reject(f"it expired {now - exp:.0f} s ago", "token_expired")
        if nbf is not None and nbf > now + self.leeway:
            raise self._reject(
                f"it is not valid for another {nbf - now:.0f} s", "token_not_yet_valid"
            )
        if iat > now + self.leeway:
            raise self._reject(
                f"it was issued {iat - now:.0f} s in the future", "token_not_yet_valid"
            )

    def _identity(self, claims: Mapping[str, Any], iss: str) -> Identity:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise self._reject("its 'sub' claim is empty", "invalid_token")
        aud = claims["aud"]
        token_audiences = {aud} if isinstance(aud, str) else set(aud)
        owner = claims.get(self.provider.owner_claim)
        owner_id = (
            str(owner) if isinstance(owner, str | int) and not isinstance(owner, bool) else ""
        )
        for trust in self.trusts:
            if trust.issuer != iss or trust.audience not in token_audiences:
                continue
            if "*" in trust.owner_ids or (owner_id and owner_id in trust.owner_ids):
                attrs = claim_attributes(claims)
                attrs["org"] = trust.org
                try:
                    return Identity(kind=self.provider.kind, subject=sub, attributes=attrs)
                except ValueError as exc:
                    raise self._reject(str(exc), "invalid_token") from exc
        name = claims.get(self.provider.owner_name_claim)
        raise ExchangeRejected(
            f"{self.provider.label} tokens of {self.provider.owner_name_claim} {name!r} "
            f"({self.provider.owner_claim} {owner_id or 'missing'}) are not accepted here",
            code="unknown_owner",
            reason=f"iss={iss} sub={sub} {self.provider.owner_claim}={owner_id or '-'}",
            status=403,
        )
