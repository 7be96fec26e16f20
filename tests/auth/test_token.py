"""The token login method: reading the API token, and the exchange's error mapping."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest

from nixd.auth.token import Credential, exchange, fetch_cache_keys, read_api_token
from nixd.errors import LoginFailed, UpstreamError

SERVER = "http://cache.test"


def test_read_api_token_from_file_and_stdin(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("  nixd_abc_def\n")
    assert read_api_token(str(f)) == "nixd_abc_def"
    assert read_api_token(None, io.StringIO("nixd_x\n")) == "nixd_x"
    assert read_api_token("-", io.StringIO("nixd_y")) == "nixd_y"
    with pytest.raises(LoginFailed, match="no API token in stdin"):
        read_api_token(None, io.StringIO("\n"))
    with pytest.raises(LoginFailed, match="whitespace"):
        read_api_token(None, io.StringIO("two words"))
    with pytest.raises(LoginFailed, match="cannot read"):
        read_api_token(str(tmp_path / "absent"))


def test_credential_repr_hides_the_secret() -> None:
    assert "s3cret" not in repr(Credential("token", "s3cret"))


def client(handler: httpx.MockTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=handler)


async def test_exchange_success_sends_the_contract_body() -> None:
    seen: list[dict[str, str]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/token/exchange"
        seen.append(json.loads(request.content))
        return httpx.Response(
            200,
            json={
                "access_token": "jwt",
                "token_type": "Bearer",
                "expires_in": 600,
                "expires_at": 2000.0,
                "identity": "token:ci",
            },
        )

    async with client(httpx.MockTransport(handle)) as c:
        token = await exchange(c, SERVER + "/", Credential("token", "nixd_1"))
    assert seen == [{"kind": "token", "token": "nixd_1"}]
    assert (token.value, token.expires_at, token.identity, token.issued_at) == (
        "jwt",
        2000.0,
        "token:ci",
        1400.0,
    )


@pytest.mark.parametrize(
    ("status", "body", "error", "match"),
    [
        (401, {"error": "invalid_token", "message": "revoked"}, LoginFailed, "revoked"),
        (403, {"error": "forbidden", "message": "no"}, LoginFailed, "rejected"),
        (500, {"error": "internal", "message": "boom"}, UpstreamError, "boom"),
        (200, {"access_token": ""}, UpstreamError, "malformed"),
        (200, {"nope": 1}, UpstreamError, "malformed"),
    ],
)
async def test_exchange_errors(
    status: int, body: dict[str, object], error: type[Exception], match: str
) -> None:
    transport = httpx.MockTransport(lambda _r: httpx.Response(status, json=body))
    async with client(transport) as c:
        with pytest.raises(error, match=match) as info:
            await exchange(c, SERVER, Credential("token", "nixd_secret"))
    assert "nixd_secret" not in str(info.value)


async def test_exchange_connection_error_is_upstream_error() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with client(httpx.MockTransport(handle)) as c:
        with pytest.raises(UpstreamError, match="ConnectError"):
            await exchange(c, SERVER, Credential("token", "t"))


async def test_fetch_cache_keys() -> None:
    key = "cache-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
    transport = httpx.MockTransport(
        lambda _r: httpx.Response(200, json={"keys": [key], "current": key})
    )
    async with client(transport) as c:
        assert await fetch_cache_keys(c, SERVER) == (key,)
    bad = httpx.MockTransport(lambda _r: httpx.Response(200, json={"keys": "x"}))
    async with client(bad) as c:
        with pytest.raises(ValueError, match="name:key"):
            await fetch_cache_keys(c, SERVER)
