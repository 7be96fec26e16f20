"""``github-action``: a new ID token from the job's request endpoint for every exchange."""

from __future__ import annotations

import httpx
import jwt
import pytest

from nixd.auth.github_action import GitHubActionLogin
from nixd.errors import LoginFailed
from tests.oidc_issuer import run_issuer


async def test_each_exchange_body_carries_a_new_id_token_for_the_audience() -> None:
    with run_issuer("github") as gh:
        method = GitHubActionLogin.from_params(
            {"request_url": gh.id_token_request_url, "request_token": gh.request_token},
            "https://cache.example.com/",
        )
        async with httpx.AsyncClient() as client:
            first = await method.exchange_body(client)
            second = await method.exchange_body(client)
        assert gh.id_token_requests == 2
        jwks = jwt.PyJWKSet.from_dict(gh.jwks())
        assert first["kind"] == "github-action" and first["token"] != second["token"]
        for body in (first, second):
            kid = jwt.get_unverified_header(body["token"])["kid"]
            claims = jwt.decode(
                body["token"],
                jwks[kid].key,
                algorithms=["RS256"],
                audience="https://cache.example.com",
                issuer=gh.url,
            )
            assert claims["repository"] == "acme/app"


async def test_explicit_audience_is_url_encoded() -> None:
    with run_issuer("github") as gh:
        method = GitHubActionLogin(gh.id_token_request_url, gh.request_token, "nixd cache&x=1")
        assert method.id_token_url().endswith("&audience=nixd%20cache%26x%3D1")
        async with httpx.AsyncClient() as client:
            body = await method.exchange_body(client)
        assert jwt.decode(body["token"], options={"verify_signature": False})["aud"] == (
            "nixd cache&x=1"
        )


async def test_a_refused_request_token_ends_the_login_clearly() -> None:
    with run_issuer("github") as gh:
        method = GitHubActionLogin(gh.id_token_request_url, "wrong", "aud")
        async with httpx.AsyncClient() as client:
            with pytest.raises(LoginFailed, match="job has ended or lacks `permissions"):
                await method.exchange_body(client)
        assert "wrong" not in method.describe()
