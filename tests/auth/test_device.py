"""The interactive login's client: polling pace, outcomes, display, and the login method.

The server is an ``httpx.MockTransport`` handler that plays RFC 8628 answers; time is trio's
``autojump_clock``, so the polling pace is measured exactly and the tests take no time.
The real server and a real browser are in tests/test_device_browser.py.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import pytest
import trio

from nixd.auth import device
from nixd.auth.methods import LoginMethod, from_params, from_state
from nixd.errors import LoginFailed

SERVER = "http://cache.test"


def auth(expires_in: float = 600, interval: float = 5) -> device.DeviceAuthorization:
    return device.DeviceAuthorization(
        device_code="dev-secret",
        user_code="BCDF-GHJK",
        verification_uri=f"{SERVER}/device",
        verification_uri_complete=f"{SERVER}/device?user_code=BCDF-GHJK",
        expires_in=expires_in,
        interval=interval,
    )


def tokens() -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "access_token": "eyJ.access",
            "token_type": "Bearer",
            "expires_in": 3600,
            "expires_at": 1_900_000_000,
            "refresh_token": "nixdr_0123456789abcdef_" + "r" * 43,
            "identity": "user:alice",
        },
    )


def scripted(answers: list[Callable[[], httpx.Response]], times: list[float]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        form = parse_qs(request.content.decode())
        assert form["grant_type"] == [device.GRANT_TYPE]
        assert form["device_code"] == ["dev-secret"] and form["client_id"] == ["nixd-cli"]
        return answers.pop(0)()

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def error(code: str) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(400, json={"error": code})


async def test_polls_at_the_interval_and_slows_down(autojump_clock: trio.abc.Clock) -> None:
    times: list[float] = []
    answers = [
        error("authorization_pending"),
        error("slow_down"),
        error("authorization_pending"),
        tokens,
    ]
    start = trio.current_time()
    async with scripted(answers, times) as client:
        grant = await device.poll(client, SERVER, auth())
    gaps = [round(b - a, 3) for a, b in zip([start, *times], times, strict=False)]
    assert gaps == [5, 5, 10, 10]  # +5 s after slow_down, kept afterwards
    assert grant.access.identity == "user:alice"
    assert grant.refresh_token.startswith("nixdr_")
    assert "nixdr_" not in repr(grant)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("access_denied", "the login with code BCDF-GHJK was denied in the browser"),
        ("expired_token", "code BCDF-GHJK expired before it was approved; run `nixd login` again"),
        ("invalid_grant", "the server refused the login: invalid_grant"),
    ],
)
async def test_outcomes(autojump_clock: trio.abc.Clock, code: str, message: str) -> None:
    async with scripted([error("authorization_pending"), error(code)], []) as client:
        with pytest.raises(LoginFailed) as info:
            await device.poll(client, SERVER, auth())
    assert str(info.value).strip() == message


async def test_times_out_when_the_server_never_decides(autojump_clock: trio.abc.Clock) -> None:
    times: list[float] = []
    answers = [error("authorization_pending")] * 100
    start = trio.current_time()
    async with scripted(answers, times) as client:
        with pytest.raises(LoginFailed, match=r"timed out: code BCDF-GHJK was not approved"):
            await device.poll(client, SERVER, auth(expires_in=30, interval=5))
    assert trio.current_time() - start <= 30 + 10


async def test_network_errors_are_retried(autojump_clock: trio.abc.Clock) -> None:
    def broken() -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    times: list[float] = []
    async with scripted([broken, broken, tokens], times) as client:
        grant = await device.poll(client, SERVER, auth())
    assert grant.access.value == "eyJ.access"
    assert len(times) == 3


async def test_request_code() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/device/authorize"
        assert parse_qs(request.content.decode()) == {"client_id": ["nixd-cli"]}
        return httpx.Response(
            200,
            json={
                "device_code": "dev-secret",
                "user_code": "BCDF-GHJK",
                "verification_uri": f"{SERVER}/device",
                "verification_uri_complete": f"{SERVER}/device?user_code=BCDF-GHJK",
                "expires_in": 600,
                "interval": 5,
            },
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        got = await device.request_code(client, SERVER)
    assert got == auth()
    assert "dev-secret" not in repr(got)

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "invalid_client", "error_description": "who?"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(LoginFailed, match="invalid_client: who"):
            await device.request_code(client, SERVER)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_show_prints_url_code_and_qr_on_a_wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    wide = Terminal()
    device.show(auth(), wide)
    assert f"open {SERVER}/device" in wide.getvalue()
    assert "BCDF-GHJK" in wide.getvalue()
    assert "scan this" in wide.getvalue() and "█" in wide.getvalue()
    monkeypatch.setenv("COLUMNS", "20")
    narrow = Terminal()
    device.show(auth(), narrow)
    assert "BCDF-GHJK" in narrow.getvalue() and "scan this" not in narrow.getvalue()
    piped = io.StringIO()
    device.show(auth(), piped)
    assert "scan this" not in piped.getvalue()


def test_qr_shape() -> None:
    qr = device.render_qr(auth().verification_uri_complete, width=200)
    assert qr is not None
    lines = qr.splitlines()
    assert len({len(line) for line in lines}) == 1  # square, two modules per line
    assert abs(len(lines) * 2 - len(lines[0])) <= 1
    assert device.render_qr("x" * 40, width=10) is None


async def test_login_method_rotates_the_refresh_credential() -> None:
    first = "nixdr_0123456789abcdef_" + "a" * 43
    method = from_params("device", {"refresh_token": first}, SERVER)
    assert isinstance(method, LoginMethod) and method.name == "device"
    async with httpx.AsyncClient() as client:
        assert await method.exchange_body(client) == {"kind": "refresh", "token": first}
        assert method.accept({"access_token": "x"}) is False
        second = "nixdr_0123456789abcdef_" + "b" * 43
        assert method.accept({"refresh_token": second}) is True
        assert await method.exchange_body(client) == {"kind": "refresh", "token": second}
    restored = from_state("device", json.loads(json.dumps(method.to_state())))
    async with httpx.AsyncClient() as client:
        assert (await restored.exchange_body(client))["token"] == second
    assert first not in repr(method) and second not in repr(method)
    assert "refresh credential" in method.describe()
    with pytest.raises(LoginFailed, match="refresh_token"):
        from_params("device", {}, SERVER)
