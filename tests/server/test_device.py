"""Interactive login on the server, in-process: device endpoints, web pages, refresh credentials.

The app runs on a state directory made by the real ``nixd-server init`` and the real
store, token issuer and audit log; the device service's clock is a fake one so expiry and
polling pace are exact. The real browser against the real server process is in
tests/test_device_browser.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from nixd.errors import ConfigError
from nixd.server.config import ServerConfig, render_default
from nixd.server.http.app import CacheApp, Services
from nixd.server.http.serve import open_services
from nixd.server.login.accounts import hash_password, verify_password
from nixd.server.login.device import GRANT_TYPE, USER_CODE_ALPHABET, DeviceService
from tests.server.conftest import ServerState, audit_text

BOTH_BACKENDS = True  # metadata on SQLite and on PostgreSQL (tests/server/conftest.py)

PASSWORD = "correct horse battery"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    state: ServerState
    services: Services
    app: CacheApp
    clock: FakeClock

    @property
    def device(self) -> DeviceService:
        assert self.services.device is not None
        return self.services.device

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=("127.0.0.1", 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://cache.test")

    def audit_lines(self) -> list[dict[str, object]]:
        text = audit_text(self.state.path)
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def env(server_state: ServerState) -> Iterator[Env]:
    with open_services(ServerConfig.load(server_state.path)) as services:
        clock = FakeClock()
        assert services.device is not None
        services.device.clock = clock
        services.device.accounts.create("acme", "alice", PASSWORD)
        yield Env(server_state, services, CacheApp(services), clock)


async def authorize(c: httpx.AsyncClient) -> dict[str, object]:
    r = await c.post("/api/v1/device/authorize", data={"client_id": "nixd-cli"})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    return dict(r.json())


async def poll(c: httpx.AsyncClient, device_code: object) -> httpx.Response:
    return await c.post(
        "/api/v1/device/token",
        data={"grant_type": GRANT_TYPE, "device_code": device_code, "client_id": "nixd-cli"},
    )


async def approved_tokens(env: Env, c: httpx.AsyncClient) -> dict[str, object]:
    auth = await authorize(c)
    alice = env.device.accounts.get("alice")
    assert alice is not None
    assert await env.device.decide(str(auth["user_code"]), alice, approve=True, source_ip="x")
    r = await poll(c, auth["device_code"])
    assert r.status_code == 200, r.text
    return dict(r.json())


# -- device endpoints --------------------------------------------------------------------


async def test_authorize_answer(env: Env) -> None:
    async with env.client() as c:
        body = await authorize(c)
        bad = await c.post("/api/v1/device/authorize", data={"client_id": "someone-else"})
    code = str(body["user_code"])
    assert re.fullmatch(rf"[{USER_CODE_ALPHABET}]{{4}}-[{USER_CODE_ALPHABET}]{{4}}", code)
    assert body["verification_uri"] == "http://cache.test/device"
    assert body["verification_uri_complete"] == f"http://cache.test/device?user_code={code}"
    assert body["expires_in"] == 600 and body["interval"] == 5
    assert len(str(body["device_code"])) >= 40
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_client"


async def test_pending_then_slow_down_when_polled_too_fast(env: Env) -> None:
    async with env.client() as c:
        auth = await authorize(c)
        first = await poll(c, auth["device_code"])
        env.clock.now += 2  # faster than the 5 s interval
        second = await poll(c, auth["device_code"])
        env.clock.now += 6  # the interval is now 10 s: still too fast
        third = await poll(c, auth["device_code"])
        env.clock.now += 15
        fourth = await poll(c, auth["device_code"])
    assert (first.status_code, first.json()["error"]) == (400, "authorization_pending")
    assert second.json()["error"] == "slow_down"
    assert third.json()["error"] == "slow_down"
    assert fourth.json()["error"] == "authorization_pending"


async def test_expired_code(env: Env) -> None:
    async with env.client() as c:
        auth = await authorize(c)
        env.clock.now += 601
        r = await poll(c, auth["device_code"])
    assert (r.status_code, r.json()["error"]) == (400, "expired_token")
    assert env.device.lookup(str(auth["user_code"])) is None  # the page no longer offers it


async def test_denied_code(env: Env) -> None:
    alice = env.device.accounts.get("alice")
    assert alice is not None
    async with env.client() as c:
        auth = await authorize(c)
        assert await env.device.decide(str(auth["user_code"]), alice, approve=False, source_ip="")
        r = await poll(c, auth["device_code"])
        # A decided code cannot be decided again.
        again = await env.device.decide(str(auth["user_code"]), alice, approve=True, source_ip="")
    assert (r.status_code, r.json()["error"]) == (400, "access_denied")
    assert again is False


async def test_approved_code_gives_tokens_once(env: Env) -> None:
    async with env.client() as c:
        auth = await authorize(c)
        alice = env.device.accounts.get("alice")
        assert alice is not None
        # Typed in lower case with a space: still the same code.
        typed = str(auth["user_code"]).lower().replace("-", " ")
        assert await env.device.decide(typed, alice, approve=True, source_ip="")
        r = await poll(c, auth["device_code"])
        env.clock.now += 10
        replay = await poll(c, auth["device_code"])
        unknown = await poll(c, "not-a-device-code")
        body = r.json()
        status = await c.get(
            "/api/v1/token/status", headers={"authorization": f"Bearer {body['access_token']}"}
        )
    assert r.status_code == 200, r.text
    assert body["token_type"] == "Bearer" and body["expires_in"] > 0
    assert str(body["refresh_token"]).startswith("nixdr_")
    assert status.json()["identity"] == "user:alice"
    assert status.json()["attributes"] == {"org": "acme", "user": "alice"}
    assert replay.json()["error"] == "invalid_grant"
    assert unknown.json()["error"] == "invalid_grant"
    actions = [(e["action"], e["decision"]) for e in env.audit_lines()]
    assert ("device:authorize", "allow") in actions
    assert ("device:approve", "allow") in actions
    assert ("device:token", "allow") in actions


async def test_wrong_grant_type(env: Env) -> None:
    async with env.client() as c:
        r = await c.post("/api/v1/device/token", data={"grant_type": "password"})
    assert r.json()["error"] == "unsupported_grant_type"


# -- refresh credentials -------------------------------------------------------------------


async def exchange(c: httpx.AsyncClient, refresh: object) -> httpx.Response:
    return await c.post("/api/v1/token/exchange", json={"kind": "refresh", "token": refresh})


async def test_refresh_rotates(env: Env) -> None:
    async with env.client() as c:
        tokens = await approved_tokens(env, c)
        first = await exchange(c, tokens["refresh_token"])
        second = await exchange(c, first.json()["refresh_token"])
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    r1, r2 = first.json()["refresh_token"], second.json()["refresh_token"]
    assert len({tokens["refresh_token"], r1, r2}) == 3
    assert second.json()["identity"] == "user:alice"
    assert second.json()["access_token"] != first.json()["access_token"]


async def test_replayed_refresh_revokes_the_family(env: Env) -> None:
    async with env.client() as c:
        tokens = await approved_tokens(env, c)
        other = await approved_tokens(env, c)  # another login of alice: its own family
        good = await exchange(c, tokens["refresh_token"])
        env.clock.now += env.device.settings.refresh_reuse_grace  # the grace is over
        replay = await exchange(c, tokens["refresh_token"])
        newest = await exchange(c, good.json()["refresh_token"])
        unrelated = await exchange(c, other["refresh_token"])
    assert good.status_code == 200
    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_grant"
    assert "already used" in replay.json()["message"]
    assert newest.status_code == 401 and "revoked" in newest.json()["message"]
    assert unrelated.status_code == 200
    reasons = [e.get("reason") for e in env.audit_lines() if e["action"] == "token:exchange"]
    assert "replayed_family_revoked" in reasons and "revoked" in reasons
    assert all("nixdr_" not in json.dumps(e) for e in env.audit_lines())


async def test_retry_within_the_reuse_grace_retires_the_first_successor(env: Env) -> None:
    async with env.client() as c:
        tokens = await approved_tokens(env, c)
        lost = await exchange(c, tokens["refresh_token"])  # the client never sees this answer
        env.clock.now += env.device.settings.refresh_reuse_grace - 1
        retry = await exchange(c, tokens["refresh_token"])
        onward = await exchange(c, retry.json()["refresh_token"])
        # The successor of the lost answer is dead; presenting it is reuse.
        stale = await exchange(c, lost.json()["refresh_token"])
        after = await exchange(c, onward.json()["refresh_token"])
    assert lost.status_code == 200 and retry.status_code == 200, retry.text
    assert retry.json()["identity"] == "user:alice"
    assert retry.json()["refresh_token"] != lost.json()["refresh_token"]
    assert onward.status_code == 200, onward.text
    assert stale.status_code == 401 and "already used" in stale.json()["message"]
    assert after.status_code == 401 and "revoked" in after.json()["message"]
    grace = [e for e in env.audit_lines() if e["action"] == "device:refresh"]
    assert [(e["decision"], e["rule"], e["identity"]) for e in grace] == [
        ("allow", "refresh_reuse_grace", "user:alice")
    ]
    assert all("nixdr_" not in json.dumps(e) for e in env.audit_lines())


async def test_second_retry_within_the_grace_revokes_the_family(env: Env) -> None:
    async with env.client() as c:
        tokens = await approved_tokens(env, c)
        await exchange(c, tokens["refresh_token"])
        retry = await exchange(c, tokens["refresh_token"])
        again = await exchange(c, tokens["refresh_token"])
        newest = await exchange(c, retry.json()["refresh_token"])
    assert retry.status_code == 200, retry.text
    assert again.status_code == 401 and "already used" in again.json()["message"]
    assert newest.status_code == 401 and "revoked" in newest.json()["message"]


async def test_retry_after_the_grace_revokes_the_family(env: Env) -> None:
    async with env.client() as c:
        tokens = await approved_tokens(env, c)
        first = await exchange(c, tokens["refresh_token"])
        env.clock.now += env.device.settings.refresh_reuse_grace
        late = await exchange(c, tokens["refresh_token"])
        successor = await exchange(c, first.json()["refresh_token"])
    assert first.status_code == 200
    assert late.status_code == 401 and "already used" in late.json()["message"]
    assert successor.status_code == 401 and "revoked" in successor.json()["message"]
    reasons = [e.get("reason") for e in env.audit_lines() if e["action"] == "token:exchange"]
    assert "replayed_family_revoked" in reasons
    assert not any(e["action"] == "device:refresh" for e in env.audit_lines())


async def test_retry_after_the_successor_was_used_revokes_the_family(env: Env) -> None:
    async with env.client() as c:
        tokens = await approved_tokens(env, c)
        first = await exchange(c, tokens["refresh_token"])
        second = await exchange(c, first.json()["refresh_token"])
        env.clock.now += 1  # well within the grace
        replay = await exchange(c, tokens["refresh_token"])
        newest = await exchange(c, second.json()["refresh_token"])
    assert second.status_code == 200
    assert replay.status_code == 401 and "already used" in replay.json()["message"]
    assert newest.status_code == 401 and "revoked" in newest.json()["message"]


async def test_zero_grace_disables_the_retry(env: Env) -> None:
    env.device.settings = replace(env.device.settings, refresh_reuse_grace=0)
    async with env.client() as c:
        tokens = await approved_tokens(env, c)
        first = await exchange(c, tokens["refresh_token"])
        replay = await exchange(c, tokens["refresh_token"])
        successor = await exchange(c, first.json()["refresh_token"])
    assert replay.status_code == 401 and "already used" in replay.json()["message"]
    assert successor.status_code == 401 and "revoked" in successor.json()["message"]


def test_reuse_grace_config(tmp_path: Path) -> None:
    assert ServerConfig(state_dir=tmp_path).device.refresh_reuse_grace == 30
    # the written config documents the default, commented out, so a [device] section
    # of one's own can still be appended
    assert "\n# refresh_reuse_grace = 30\n" in render_default()
    appended = render_default() + "\n[device]\nrefresh_reuse_grace = 5\n"
    assert ServerConfig.from_toml(appended, state_dir=tmp_path).device.refresh_reuse_grace == 5
    loaded = ServerConfig.from_toml("[device]\nrefresh_reuse_grace = 0\n", state_dir=tmp_path)
    assert loaded.device.refresh_reuse_grace == 0
    with pytest.raises(ConfigError, match=r"device\.refresh_reuse_grace: must not be negative"):
        ServerConfig.from_toml("[device]\nrefresh_reuse_grace = -1\n", state_dir=tmp_path)


async def test_refresh_revoked_expired_disabled_malformed(env: Env) -> None:
    async with env.client() as c:
        a = await approved_tokens(env, c)
        b = await approved_tokens(env, c)
        alice = env.device.accounts.get("alice")
        assert alice is not None
        assert env.device.revoke_user(alice) == 2
        revoked = await exchange(c, a["refresh_token"])
        malformed = await exchange(c, "nixdr_nonsense")
        c2 = await approved_tokens(env, c)
        env.clock.now += env.device.settings.refresh_ttl + 1
        expired = await exchange(c, c2["refresh_token"])
        env.clock.now -= env.device.settings.refresh_ttl + 1
        d = await approved_tokens(env, c)
        env.device.accounts.disable("alice")
        disabled = await exchange(c, d["refresh_token"])
    assert b["refresh_token"] != a["refresh_token"]
    assert revoked.status_code == 401 and "revoked" in revoked.json()["message"]
    assert malformed.status_code == 401
    assert expired.status_code == 401 and "expired" in expired.json()["message"]
    assert disabled.status_code == 401 and "disabled" in disabled.json()["message"]


# -- web pages -------------------------------------------------------------------------------


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


async def sign_in(c: httpx.AsyncClient, code: str = "") -> httpx.Response:
    page = await c.get("/device", params={"user_code": code} if code else None)
    assert page.status_code == 200
    if c.cookies.get("nixd_session") is None or "set-cookie" in page.headers:
        cookie = page.headers["set-cookie"]
        assert cookie.startswith("nixd_session=")
        assert all(a in cookie for a in ("HttpOnly", "SameSite=Strict", "Path=/device"))
    return await c.post(
        "/device/signin",
        data={
            "csrf": csrf_of(page.text),
            "username": "alice",
            "password": PASSWORD,
            "user_code": code,
        },
    )


async def test_web_sign_in_approve(env: Env) -> None:
    async with env.client() as c:
        auth = await authorize(c)
        code = str(auth["user_code"])
        signed = await sign_in(c, code)
        assert signed.status_code == 303, signed.text
        assert signed.headers["location"] == f"/device?user_code={code}"
        page = await c.get(signed.headers["location"])
        assert page.status_code == 200
        assert code in page.text and "Approve as alice" in page.text
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        done = await c.post(
            "/device/decide",
            data={"csrf": csrf_of(page.text), "user_code": code, "decision": "approve"},
        )
        tokens = await poll(c, auth["device_code"])
    assert done.status_code == 200 and "Approved" in done.text
    assert tokens.status_code == 200
    assert tokens.json()["identity"] == "user:alice"


async def test_web_enter_code_and_deny(env: Env) -> None:
    async with env.client() as c:
        auth = await authorize(c)
        signed = await sign_in(c)
        page = await c.get(signed.headers["location"])
        assert "Enter the code" in page.text
        wrong = await c.post(
            "/device/code", data={"csrf": csrf_of(page.text), "user_code": "BBBB-BBBB"}
        )
        shown = await c.post(
            "/device/code",
            data={"csrf": csrf_of(page.text), "user_code": str(auth["user_code"]).lower()},
        )
        denied = await c.post(
            "/device/decide",
            data={"csrf": csrf_of(shown.text), "user_code": auth["user_code"], "decision": "deny"},
        )
        r = await poll(c, auth["device_code"])
    assert wrong.status_code == 404 and "unknown, already used or expired" in wrong.text
    assert shown.status_code == 200 and str(auth["user_code"]) in shown.text
    assert "Denied" in denied.text
    assert r.json()["error"] == "access_denied"


async def test_web_csrf_missing_or_wrong(env: Env) -> None:
    async with env.client() as c:
        auth = await authorize(c)
        page = await c.get("/device")
        missing = await c.post("/device/signin", data={"username": "alice", "password": PASSWORD})
        wrong = await c.post(
            "/device/signin", data={"csrf": "x" * 43, "username": "alice", "password": PASSWORD}
        )
        signed = await sign_in(c)
        assert signed.status_code == 303
        # Signed in: a decision without the session's token is refused and changes nothing.
        forged = await c.post(
            "/device/decide",
            data={
                "csrf": csrf_of(page.text),
                "user_code": auth["user_code"],
                "decision": "approve",
            },
        )
        pending = await poll(c, auth["device_code"])
    async with env.client() as stranger:  # no session cookie at all
        no_session = await stranger.post(
            "/device/decide",
            data={
                "csrf": csrf_of(page.text),
                "user_code": auth["user_code"],
                "decision": "approve",
            },
        )
    assert missing.status_code == 403 and wrong.status_code == 403
    assert forged.status_code == 403 and no_session.status_code == 403
    assert pending.json()["error"] == "authorization_pending"
    assert any(e["action"] == "web:csrf" for e in env.audit_lines())


async def test_web_wrong_password(env: Env) -> None:
    async with env.client() as c:
        page = await c.get("/device")
        bad = await c.post(
            "/device/signin",
            data={"csrf": csrf_of(page.text), "username": "alice", "password": "nope-nope"},
        )
        nobody = await c.post(
            "/device/signin",
            data={"csrf": csrf_of(page.text), "username": "mallory", "password": PASSWORD},
        )
        after = await c.get("/device")
    assert bad.status_code == 401 and "wrong user name or password" in bad.text
    assert nobody.status_code == 401 and "wrong user name or password" in nobody.text
    assert "Sign in to nixd" in after.text  # still not signed in
    reasons = [e["rule"] for e in env.audit_lines() if e["action"] == "web:signin"]
    assert reasons == ["wrong_password", "unknown_user"]


async def test_session_is_replaced_at_sign_in(env: Env) -> None:
    async with env.client() as c:
        await c.get("/device")
        before = c.cookies.get("nixd_session")
        await sign_in(c)
        after = c.cookies.get("nixd_session")
    assert before and after and before != after
    stored = env.device._conn.execute("SELECT id_hash FROM web_sessions").fetchall()
    assert all(bytes(row[0]) != after.encode() for row in stored)


# -- accounts ---------------------------------------------------------------------------------


def test_scrypt_hash() -> None:
    one, two = hash_password(PASSWORD), hash_password(PASSWORD)
    assert PASSWORD not in one and one != two  # salted
    assert one.startswith("scrypt$15$8$1$")
    assert verify_password(PASSWORD, one) and verify_password(PASSWORD, two)
    assert not verify_password(PASSWORD + "x", one)
    assert not verify_password(PASSWORD, "scrypt$40$8$1$AAAA$AAAA")  # absurd parameters


def test_user_add_reads_password_from_stdin(server_state: ServerState) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nixd.server.cli",
            "user",
            "add",
            str(server_state.path),
            "acme",
            "bob",
        ],
        input="a long enough password\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "created user bob in acme" in proc.stdout
    short = subprocess.run(
        [
            sys.executable,
            "-m",
            "nixd.server.cli",
            "user",
            "add",
            str(server_state.path),
            "acme",
            "carol",
        ],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert short.returncode == 1 and "at least 8 characters" in short.stderr
    with open_services(ServerConfig.load(server_state.path)) as services:
        assert services.device is not None
        row = services.device._conn.execute(
            "SELECT password FROM accounts WHERE name = 'bob'"
        ).fetchone()
        assert row[0] != "a long enough password"
        assert verify_password("a long enough password", row[0])
    assert "admin:user.add" in audit_text(server_state.path)
