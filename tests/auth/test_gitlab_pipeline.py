"""``gitlab-pipeline``: the same ID token until its ``exp``, then a clear refusal."""

from __future__ import annotations

import time

import httpx
import pytest

from nixd.auth.gitlab_pipeline import GitLabPipelineLogin
from nixd.errors import LoginFailed
from tests.oidc_issuer import run_issuer


async def test_exchanges_the_same_token_until_it_expires() -> None:
    with run_issuer("gitlab") as gl:
        token = gl.gitlab_token(audience="https://cache.example.com", lifetime=600)
    method = GitLabPipelineLogin.from_params({"id_token": f" {token}\n"}, "https://c")
    assert method.renewable_until == pytest.approx(time.time() + 600, abs=5)
    async with httpx.AsyncClient() as client:
        assert await method.exchange_body(client) == {"kind": "gitlab-pipeline", "token": token}
        assert await method.exchange_body(client) == {"kind": "gitlab-pipeline", "token": token}
        method.expires_at = time.time() - 1  # as if time had passed
        with pytest.raises(LoginFailed, match=r"expired at .* cannot be renewed"):
            await method.exchange_body(client)
    assert "until it expires" in method.describe()
