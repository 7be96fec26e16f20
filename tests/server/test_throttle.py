"""Throttling of sign-in, user-code guesses and anonymous state, in-process with a fake clock.

The app, store, audit log and database are the real ones (``nixd-server init`` made the
state directory); the device service's clock is fake, so back-off and expiry are exact and
nothing sleeps. Each refusal must be a 429 with ``Retry-After`` and an audit line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from nixd.errors import ConfigError
from nixd.server.config import DeviceSection, ServerConfig, render_default
from nixd.server.http.app import CacheApp
from nixd.server.http.serve import open_services
from nixd.server.login.throttle import Backoff, source_key
from tests.server.conftest import ServerState
from tests.server.test_device import PASSWORD, Env, FakeClock, authorize, csrf_of, poll, sign_in

BOTH_BACKENDS = True  # metadata on SQLite and on PostgreSQL (tests/server/conftest.py)


@pytest.fixture
def env(server_state: ServerState) -> Iterator[Env]:
    with open_services(ServerConfig.load(server_state.path)) as services:
        clock = FakeClock()
        assert services.device is not None
        services.device.clock = clock
        services.device.accounts.create("acme", "alice", PASSWORD)
        yield Env(server_state, services, CacheApp(services), clock)


def client(env: Env, ip: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=env.app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://cache.test")


async def try_password(c: httpx.AsyncClient, name: str, password: str) -> httpx.Response:
    page = await c.get("/device")
    return await c.post(
        "/device/signin",
        data={"csrf": csrf_of(page.text), "username": name, "password": password},
    )


def refusals(env: Env, action: str) -> list[dict[str, object]]:
    return [
        e
        for e in env.audit_lines()
        if e["action"] == action and e["decision"] == "deny" and e["rule"] == "throttled"
    ]


def settings(env: Env, **changes: object) -> None:
    env.device.settings = replace(env.device.settings, **changes)  # type: ignore[arg-type]


# -- the back-off itself ---------------------------------------------------------------------


def test_backoff_doubles_to_its_cap() -> None:
    b = Backoff(free=5, base=2.0, max=900.0, window=3600.0)
    assert [b.block_for(n) for n in range(1, 10)] == [0, 0, 0, 0, 2, 4, 8, 16, 32]
    assert b.block_for(14) == 900 and b.block_for(10**6) == 900


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_source_key(address: str, key: str) -> None:
    assert source_key(address) == key


# -- sign-in ---------------------------------------------------------------------------------


async def test_wrong_passwords_per_account_back_off_exponentially(env: Env) -> None:
    statuses = []
    # Every attempt from a different address: the account's own count still applies.
    for n in range(5):
        async with client(env, f"192.0.2.{n + 1}") as c:
            statuses.append((await try_password(c, "alice", "wrong-wrong")).status_code)
    assert statuses == [401] * 5
    waits = []
    for n in range(4):
        async with client(env, f"198.51.100.{n + 1}") as c:
            # Blocked: even the right password is refused, without hashing it.
            blocked = await try_password(c, "alice", PASSWORD)
            assert blocked.status_code == 429, blocked.text
            assert "Too many failed sign-ins" in blocked.text
            waits.append(int(blocked.headers["retry-after"]))
            env.clock.now += waits[-1]
            assert (await try_password(c, "alice", "wrong-wrong")).status_code == 401
    assert waits == [2, 4, 8, 16]
    lines = refusals(env, "web:signin")
    assert len(lines) == 4 and all(e["user"] == "alice" for e in lines)
    assert [e["retry_after"] for e in lines] == ["2", "4", "8", "16"]
    # The wait over, the owner gets in, and the account's count starts again.
    env.clock.now += 32
    async with client(env, "203.0.113.9") as c:
        assert (await try_password(c, "alice", PASSWORD)).status_code == 303
    assert env.device.throttle.failures("signin-account:alice") == 0


async def test_wrong_passwords_per_address(env: Env) -> None:
    async with client(env, "192.0.2.50") as c:
        # Five different (unknown) names: each is new, the address is not.
        for n in range(5):
            assert (await try_password(c, f"user{n}", "wrong-wrong")).status_code == 401
        blocked = await try_password(c, "someone-new", "whatever-it-is")
        right = await try_password(c, "alice", PASSWORD)
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "2"
    assert right.status_code == 429  # the address is blocked for everyone it holds
    async with client(env, "192.0.2.51") as other:
        assert (await try_password(other, "someone-new", "whatever-it-is")).status_code == 401
        assert (await try_password(other, "alice", PASSWORD)).status_code == 303
    # An IPv6 host does not escape by using another address of its /64.
    for n in range(5):
        async with client(env, f"2001:db8:5:6::{n + 1:x}") as c6:
            await try_password(c6, f"v6user{n}", "wrong-wrong")
    async with client(env, "2001:db8:5:6:ffff::1") as c6:
        assert (await try_password(c6, "alice", PASSWORD)).status_code == 429
    assert len(refusals(env, "web:signin")) == 3


async def test_failures_are_forgotten_after_the_window(env: Env) -> None:
    async with client(env) as c:
        for _ in range(4):
            assert (await try_password(c, "alice", "wrong-wrong")).status_code == 401
        env.clock.now += env.device.settings.failure_window + 1
        for _ in range(4):
            assert (await try_password(c, "alice", "wrong-wrong")).status_code == 401
        assert (await try_password(c, "alice", PASSWORD)).status_code == 303


async def test_backoff_max_caps_the_wait(env: Env) -> None:
    settings(env, backoff_max=10.0)
    async with client(env) as c:
        waits = []
        for _ in range(9):
            await try_password(c, "alice", "wrong-wrong")
            r = await try_password(c, "alice", "wrong-wrong")
            if r.status_code == 429:
                waits.append(int(r.headers["retry-after"]))
                env.clock.now += waits[-1]
    assert waits[-3:] == [10, 10, 10]


# -- user-code guesses ------------------------------------------------------------------------


async def enter(c: httpx.AsyncClient, code: str) -> httpx.Response:
    page = await c.get("/device")
    return await c.post("/device/code", data={"csrf": csrf_of(page.text), "user_code": code})


async def test_wrong_codes_per_session_and_account(env: Env) -> None:
    async with client(env) as c:
        auth = await authorize(c)
        assert (await sign_in(c)).status_code == 303
        wrong = [(await enter(c, f"BBBB-BBB{x}")).status_code for x in "CDFGH"]
        blocked = await enter(c, str(auth["user_code"]))  # even the right one, now
        direct = await c.post(
            "/device/decide",
            data={
                "csrf": csrf_of((await c.get("/device")).text),
                "user_code": auth["user_code"],
                "decision": "approve",
            },
        )
        env.clock.now += int(blocked.headers["retry-after"])
        shown = await enter(c, str(auth["user_code"]))
    assert wrong == [404] * 5
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "2"
    assert "Too many wrong codes" in blocked.text
    assert direct.status_code == 429 and "retry-after" in direct.headers
    assert shown.status_code == 200 and "Approve as alice" in shown.text
    assert len(refusals(env, "web:code")) == 1 and len(refusals(env, "web:decide")) == 1
    assert all(e["identity"] == "user:alice" for e in refusals(env, "web:code"))
    # A new sign-in (a new session) of the same account does not start afresh.
    env.clock.now += 1
    async with client(env) as again:
        assert (await sign_in(again)).status_code == 303
        assert (await enter(again, "BBBB-BBBB")).status_code == 404
        assert (await enter(again, "BBBB-BBBB")).status_code == 429
    # Another account is not affected.
    env.device.accounts.create("acme", "bob", PASSWORD)
    async with client(env) as bob:
        page = await bob.get("/device")
        await bob.post(
            "/device/signin",
            data={"csrf": csrf_of(page.text), "username": "bob", "password": PASSWORD},
        )
        assert (await enter(bob, "BBBB-BBBB")).status_code == 404


async def test_wrong_decisions_count_as_guesses(env: Env) -> None:
    async with client(env) as c:
        assert (await sign_in(c)).status_code == 303
        for _ in range(5):
            page = await c.get("/device")
            r = await c.post(
                "/device/decide",
                data={"csrf": csrf_of(page.text), "user_code": "CCCC-CCCC", "decision": "approve"},
            )
            assert r.status_code == 409
        page = await c.get("/device")
        r = await c.post(
            "/device/decide",
            data={"csrf": csrf_of(page.text), "user_code": "CCCC-CCCC", "decision": "approve"},
        )
    assert r.status_code == 429 and r.headers["retry-after"] == "2"


async def test_a_code_dies_after_n_wrong_guesses_anywhere(env: Env) -> None:
    settings(env, code_max_wrong_guesses=3, code_free_guesses=100)
    env.device.accounts.create("acme", "bob", PASSWORD)
    async with client(env, "192.0.2.1") as victim:
        auth = await authorize(victim)
    async with client(env) as c:
        assert (await sign_in(c)).status_code == 303
        assert (await enter(c, "BBBB-BBBB")).status_code == 404
        assert (await enter(c, "BBBB-BBBC")).status_code == 404
        assert env.device.lookup(str(auth["user_code"])) is not None
        assert (await enter(c, "BBBB-BBBD")).status_code == 404
        gone = await enter(c, str(auth["user_code"]))
        later = await authorize(c)  # a code started afterwards has its own budget
        assert (await enter(c, str(later["user_code"]))).status_code == 200
    assert gone.status_code == 404
    assert env.device.lookup(str(auth["user_code"])) is None
    async with client(env, "192.0.2.1") as victim:
        r = await poll(victim, auth["device_code"])
    assert r.json()["error"] == "expired_token"
    assert "too many wrong codes" in r.json()["error_description"]
    withdrawn = [e for e in env.audit_lines() if e["action"] == "device:withdraw"]
    assert [(e["rule"], e["user_code"]) for e in withdrawn] == [
        ("too_many_wrong_guesses", auth["user_code"])
    ]


# -- anonymous state ------------------------------------------------------------------------


def rows(env: Env, table: str) -> int:
    return int(env.device._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


async def test_anonymous_pages_create_no_rows(env: Env) -> None:
    for n in range(50):
        async with client(env, f"192.0.2.{n + 1}") as c:
            page = await c.get("/device")
            assert page.status_code == 200 and "set-cookie" in page.headers
    assert rows(env, "web_sessions") == 0
    # The signed cookie still carries the sign-in form (its CSRF token is bound to it).
    async with client(env) as c:
        assert (await sign_in(c)).status_code == 303
    assert rows(env, "web_sessions") == 1


async def test_anonymous_cookie_cannot_be_forged_or_outlive_its_expiry(env: Env) -> None:
    async with client(env) as c:
        page = await c.get("/device")
        cookie = c.cookies["nixd_session"]
        _, nonce, expires, mac = cookie.split(".")
        forged = f"a.{nonce}.{int(expires) + 10**6}.{mac}"
        c.cookies.set("nixd_session", forged, domain="cache.test", path="/device")
        refused = await c.post(
            "/device/signin",
            data={"csrf": csrf_of(page.text), "username": "alice", "password": PASSWORD},
        )
        c.cookies.set("nixd_session", cookie, domain="cache.test", path="/device")
        env.clock.now += 31 * 60  # anonymous sessions live 30 minutes
        expired = await c.post(
            "/device/signin",
            data={"csrf": csrf_of(page.text), "username": "alice", "password": PASSWORD},
        )
    assert refused.status_code == 403 and expired.status_code == 403
    assert rows(env, "web_sessions") == 0


async def test_signed_in_sessions_per_account_are_bounded(env: Env) -> None:
    settings(env, sessions_per_account=3)
    for _ in range(6):
        async with client(env) as c:
            assert (await sign_in(c)).status_code == 303
        env.clock.now += 1
    assert rows(env, "web_sessions") == 3


async def test_pending_codes_per_source(env: Env) -> None:
    async with client(env, "192.0.2.10") as c:
        for _ in range(10):
            await authorize(c)
        env.clock.now += 100
        refused = await c.post("/api/v1/device/authorize", data={"client_id": "nixd-cli"})
        async with client(env, "192.0.2.11") as other:
            elsewhere = await other.post("/api/v1/device/authorize", data={"client_id": "nixd-cli"})
        env.clock.now += int(refused.headers["retry-after"])  # the oldest code expired
        again = await c.post("/api/v1/device/authorize", data={"client_id": "nixd-cli"})
    assert refused.status_code == 429
    assert refused.json()["error"] == "too_many_requests"
    assert "from this address" in refused.json()["error_description"]
    assert refused.headers["retry-after"] == "500"  # 600 s life, 100 s gone
    assert elsewhere.status_code == 200 and again.status_code == 200
    lines = [
        e
        for e in env.audit_lines()
        if e["action"] == "device:authorize" and e["decision"] == "deny"
    ]
    assert [(e["rule"], e["retry_after"]) for e in lines] == [
        ("too_many_pending_codes_source", "500")
    ]


async def test_pending_codes_in_all(env: Env) -> None:
    settings(env, max_pending_codes=3)
    for n in range(3):
        async with client(env, f"2001:db8:{n}::1") as c:
            await authorize(c)
    async with client(env, "2001:db8:99::1") as c:
        refused = await c.post("/api/v1/device/authorize", data={"client_id": "nixd-cli"})
    assert refused.status_code == 429 and refused.headers["retry-after"] == "600"
    assert "on this server" in refused.json()["error_description"]
    assert rows(env, "device_codes") == 3


# -- configuration --------------------------------------------------------------------------


def test_limits_are_configurable_and_documented_in_init(tmp_path: Path) -> None:
    text = render_default()
    block = text.split("# [device]")[1].split("# Trust")[0]
    keys = "\n".join(ln[2:] for ln in block.splitlines() if re.match(r"# \w+ = ", ln))
    # Every [device] key is in the commented block, with its default.
    loaded = ServerConfig.from_toml(f"[device]\n{keys}\n", state_dir=tmp_path).device
    assert loaded == DeviceSection()
    custom = ServerConfig.from_toml(
        "[device]\nsignin_free_attempts = 3\nbackoff = 0.5\ncodes_per_source = 2\n",
        state_dir=tmp_path,
    ).device
    assert (custom.signin_free_attempts, custom.backoff, custom.codes_per_source) == (3, 0.5, 2)
    with pytest.raises(ConfigError, match=r"device\.codes_per_source: must be positive"):
        ServerConfig.from_toml("[device]\ncodes_per_source = 0\n", state_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"device\.backoff_max"):
        ServerConfig.from_toml("[device]\nbackoff = 10.0\nbackoff_max = 5.0\n", state_dir=tmp_path)


async def test_a_burst_of_concurrent_attempts_is_checked_one_at_a_time(env: Env) -> None:
    """Password checks take a while in a thread: a burst must not all pass the check first."""
    clients = [client(env, f"192.0.2.{n + 1}") for n in range(8)]
    pages = [await c.get("/device") for c in clients]
    statuses: list[int] = []

    async def attempt(c: httpx.AsyncClient, page: httpx.Response) -> None:
        r = await c.post(
            "/device/signin",
            data={"csrf": csrf_of(page.text), "username": "alice", "password": "wrong-wrong"},
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"

    async with trio.open_nursery() as nursery:
        for c, page in zip(clients, pages, strict=True):
            nursery.start_soon(attempt, c, page)
    for c in clients:
        await c.aclose()
    assert sorted(set(statuses)) == [401, 429]
    # Every attempt that was checked was counted; the others never reached the check.
    assert env.device.throttle.failures("signin-account:alice") == statuses.count(401)
    assert len(refusals(env, "web:signin")) == statuses.count(429)
