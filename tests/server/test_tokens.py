"""Access tokens: issue/verify, every refusal with its reason, JWKS, key rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from nixd.errors import AuthError, TokenExpired
from nixd.server.access.identity import Identity, anonymous
from nixd.server.access.keys import JwtKeys
from nixd.server.access.tokens import LEEWAY, AccessTokenExpired, InvalidAccessToken, TokenIssuer

ISSUER = "https://cache.example.org"
AUDIENCE = "nixd"
LIFETIME = 900.0
IDENTITY = Identity(
    kind="token", subject="ci-bot", attributes={"org": "acme", "credential": "0123456789abcdef"}
)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys(tmp_path: Path, clock: Clock) -> JwtKeys:
    return JwtKeys.create(tmp_path / "keys" / "jwt.json", clock=clock)


@pytest.fixture
def issuer(keys: JwtKeys, clock: Clock) -> TokenIssuer:
    return TokenIssuer(keys, ISSUER, AUDIENCE, LIFETIME, clock=clock)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"


def _refused(issuer: TokenIssuer, token: str, reason: str) -> InvalidAccessToken:
    with pytest.raises(InvalidAccessToken) as info:
        issuer.verify(token)
    assert info.value.reason == reason, str(info.value)
    assert info.value.code == "invalid_token"
    assert isinstance(info.value, AuthError)
    return info.value


def test_issue_verify_roundtrip(issuer: TokenIssuer, keys: JwtKeys, clock: Clock) -> None:
    token, claims = issuer.issue(IDENTITY)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": keys.current.kid, "typ": "JWT"}
    now = int(clock.now)
    assert claims["iss"] == ISSUER and claims["aud"] == AUDIENCE
    assert claims["sub"] == "token:ci-bot" and claims["kind"] == "token"
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (now, now, now + int(LIFETIME))
    assert claims["attrs"] == {"org": "acme", "credential": "0123456789abcdef"}
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert set(claims) == {"iss", "aud", "sub", "iat", "nbf", "exp", "jti", "kind", "attrs"}
    identity, verified = issuer.verify(token)
    assert identity == IDENTITY
    assert verified == claims
    assert issuer.issue(IDENTITY)[1]["jti"] != claims["jti"]


def test_list_attributes_survive_the_roundtrip(issuer: TokenIssuer) -> None:
    who = Identity(kind="user", subject="alice", attributes={"groups": ["dev", "ops"]})
    token, _ = issuer.issue(who)
    assert issuer.verify(token)[0] == who


def test_expiry_with_leeway(issuer: TokenIssuer, clock: Clock) -> None:
    token, claims = issuer.issue(IDENTITY)
    clock.now = claims["exp"] + LEEWAY - 1
    issuer.verify(token)
    clock.now = claims["exp"] + LEEWAY
    with pytest.raises(AccessTokenExpired, match="expired 30 s ago") as info:
        issuer.verify(token)
    assert isinstance(info.value, TokenExpired)
    assert info.value.code == "token_expired"


def test_not_yet_valid(issuer: TokenIssuer, clock: Clock) -> None:
    clock.now += 300
    token, _ = issuer.issue(IDENTITY)
    clock.now -= 300
    err = _refused(issuer, token, "not_yet_valid")
    assert "not valid for another 300 s" in str(err)
    clock.now += 300 - LEEWAY  # within the leeway for clock skew
    issuer.verify(token)


def test_wrong_audience_and_issuer(keys: JwtKeys, clock: Clock, issuer: TokenIssuer) -> None:
    other_aud = TokenIssuer(keys, ISSUER, "someone-else", LIFETIME, clock=clock)
    other_iss = TokenIssuer(keys, "https://evil.example", AUDIENCE, LIFETIME, clock=clock)
    assert "audience 'nixd' expected" in str(
        _refused(issuer, other_aud.issue(IDENTITY)[0], "audience")
    )
    assert ISSUER in str(_refused(issuer, other_iss.issue(IDENTITY)[0], "issuer"))


def test_alg_none_is_refused(issuer: TokenIssuer, keys: JwtKeys) -> None:
    _, claims = issuer.issue(IDENTITY)
    token = _segments({"alg": "none", "kid": keys.current.kid, "typ": "JWT"}, claims) + "."
    assert "'none' is not accepted" in str(_refused(issuer, token, "algorithm"))


def test_hs256_with_the_public_key_as_secret_is_refused(issuer: TokenIssuer, keys: JwtKeys) -> None:
    """The classic key-confusion attack: HMAC keyed with the (public) verification key."""
    _, claims = issuer.issue(IDENTITY)
    public = keys.current.public
    for secret in (
        public.public_bytes(Encoding.Raw, PublicFormat.Raw),
        public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
    ):
        signing_input = _segments({"alg": "HS256", "kid": keys.current.kid}, claims)
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        _refused(issuer, f"{signing_input}.{_b64(mac)}", "algorithm")


def test_unknown_kid_and_foreign_key(
    issuer: TokenIssuer, keys: JwtKeys, tmp_path: Path, clock: Clock
) -> None:
    stranger = JwtKeys.create(tmp_path / "stranger.json", clock=clock)
    forged = TokenIssuer(stranger, ISSUER, AUDIENCE, LIFETIME, clock=clock)
    token, claims = forged.issue(IDENTITY)
    assert "unknown or retired key" in str(_refused(issuer, token, "unknown_key"))
    # The stranger's key claiming to be ours: the signature does not verify.
    assert stranger.current.private is not None
    spoofed = jwt.encode(
        claims, stranger.current.private, algorithm="EdDSA", headers={"kid": keys.current.kid}
    )
    _refused(issuer, spoofed, "signature")
    no_kid = jwt.encode(claims, stranger.current.private, algorithm="EdDSA")
    _refused(issuer, no_kid, "malformed")


def test_tampered_payload_is_refused(issuer: TokenIssuer) -> None:
    token, claims = issuer.issue(IDENTITY)
    header, _, signature = token.split(".")
    for change in ({"sub": "token:admin"}, {"attrs": {"org": "other"}}, {"exp": claims["exp"] + 1}):
        payload = _b64(json.dumps({**claims, **change}).encode())
        _refused(issuer, f"{header}.{payload}.{signature}", "signature")
    _refused(issuer, f"{header}.{token.split('.')[1]}.{signature[:-4]}AAAA", "signature")


def test_malformed_tokens(issuer: TokenIssuer) -> None:
    for bad in ["", "abc", "a.b.c", "x" * 40]:
        _refused(issuer, bad, "malformed")


def _signed(keys: JwtKeys, claims: dict[str, Any]) -> str:
    assert keys.current.private is not None
    return jwt.encode(
        claims, keys.current.private, algorithm="EdDSA", headers={"kid": keys.current.kid}
    )


def test_missing_and_bad_claims(issuer: TokenIssuer, keys: JwtKeys) -> None:
    _, claims = issuer.issue(IDENTITY)
    for name in ("jti", "kind", "attrs", "nbf", "sub"):
        partial = {k: v for k, v in claims.items() if k != name}
        assert repr(name) in str(_refused(issuer, _signed(keys, partial), "claims"))
    for change in (
        {"sub": "user:ci-bot"},  # sub does not match kind
        {"sub": "token:"},
        {"kind": "wizard", "sub": "wizard:x"},  # not a known identity kind
        {"attrs": ["org"]},
        {"attrs": {"org": 5}},
        {"exp": "tomorrow"},
        {"jti": ""},
    ):
        _refused(issuer, _signed(keys, {**claims, **change}), "claims")


def test_jwks_verifies_tokens_with_pyjwt(issuer: TokenIssuer) -> None:
    token, claims = issuer.issue(IDENTITY)
    jwks = json.loads(json.dumps(issuer.jwks()))  # as a client receives it
    kid = jwt.get_unverified_header(token)["kid"]
    (entry,) = [k for k in jwks["keys"] if k["kid"] == kid]
    key = jwt.PyJWK(entry)
    decoded = jwt.decode(
        token,
        key.key,
        algorithms=["EdDSA"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert decoded == claims


def test_rotation_keeps_old_tokens_valid_until_they_expire(
    issuer: TokenIssuer, keys: JwtKeys, clock: Clock
) -> None:
    old_token, old_claims = issuer.issue(IDENTITY)
    old_kid = keys.current.kid
    clock.now += 100
    keys.rotate(retain_for=LIFETIME + LEEWAY)
    new_token, _ = issuer.issue(IDENTITY)
    assert jwt.get_unverified_header(new_token)["kid"] == keys.current.kid != old_kid
    assert {k["kid"] for k in issuer.jwks()["keys"]} == {old_kid, keys.current.kid}
    assert issuer.verify(old_token)[0] == IDENTITY
    assert issuer.verify(new_token)[0] == IDENTITY
    clock.now = old_claims["exp"] + LEEWAY  # the old token dies of old age ...
    with pytest.raises(AccessTokenExpired):
        issuer.verify(old_token)
    issuer.verify(new_token)
    clock.now += 100  # ... and then its key leaves the JWKS
    assert [k["kid"] for k in issuer.jwks()["keys"]] == [keys.current.kid]
    _refused(issuer, old_token, "unknown_key")


def test_emergency_rotation_invalidates_outstanding_tokens(
    issuer: TokenIssuer, keys: JwtKeys
) -> None:
    token, _ = issuer.issue(IDENTITY)
    keys.rotate(retain_for=0)
    _refused(issuer, token, "unknown_key")


def test_rotation_by_another_process_is_seen_after_refresh(
    issuer: TokenIssuer, keys: JwtKeys, clock: Clock
) -> None:
    admin = JwtKeys.load(keys.path, clock=clock)
    new = admin.rotate(retain_for=LIFETIME + LEEWAY)
    assert keys.refresh()
    token, _ = issuer.issue(IDENTITY)
    assert jwt.get_unverified_header(token)["kid"] == new.kid
    issuer.verify(token)


def test_not_after_caps_the_lifetime(issuer: TokenIssuer, clock: Clock) -> None:
    _, claims = issuer.issue(IDENTITY, not_after=clock.now + 60)
    assert claims["exp"] == int(clock.now) + 60
    with pytest.raises(AuthError, match="expires before"):
        issuer.issue(IDENTITY, not_after=clock.now)


def test_anonymous_gets_no_token(issuer: TokenIssuer) -> None:
    with pytest.raises(AuthError, match="anonymous"):
        issuer.issue(anonymous())
