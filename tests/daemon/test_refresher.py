"""The refresher against a fake exchange, on trio's autojump clock (time is virtual)."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from nixd.auth.model import AccessToken
from nixd.daemon import refresher as refresher_mod
from nixd.daemon.refresher import Refresher, backoff_delay
from nixd.errors import AuthError, LoginFailed, UpstreamError

EPOCH = 1_700_000_000.0
LIFE = 300.0


def wall() -> float:
    return EPOCH + trio.current_time()


class FakeExchange:
    """Issues tokens of LIFE seconds; fails while ``failures`` > 0."""

    def __init__(
        self, *, failures: int = 0, delay: float = 0.0, reject: bool = False, clock=wall
    ) -> None:
        self.clock = clock
        self.failures = failures
        self.delay = delay
        self.reject = reject
        self.calls: list[float] = []
        self.n = 0

    async def __call__(self) -> AccessToken:
        self.calls.append(self.clock())
        await trio.sleep(self.delay)
        if self.reject:
            raise LoginFailed("credential revoked")
        if self.failures > 0:
            self.failures -= 1
            raise UpstreamError("server down")
        self.n += 1
        now = self.clock()
        return AccessToken(f"tok-{self.n}", now + LIFE, "token:ci", issued_at=now)


def fresh(value: str = "tok-0", life: float = LIFE) -> AccessToken:
    now = wall()
    return AccessToken(value, now + life, "token:ci", issued_at=now)


async def test_renews_at_two_thirds_of_life(autojump_clock: trio.testing.MockClock) -> None:
    exchange = FakeExchange()
    saved: list[AccessToken] = []

    async def on_token(token: AccessToken) -> None:
        saved.append(token)

    r = Refresher(clock=wall, on_token=on_token)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        start = wall()
        r.set_login(exchange, fresh())
        await trio.sleep(LIFE * 2.5)
        nursery.cancel_scope.cancel()
    # renewed at 200 s, 400 s, 600 s after login: two thirds of each token's life
    assert [round(t - start, 3) for t in exchange.calls] == [200.0, 400.0, 600.0]
    assert [t.value for t in saved] == ["tok-1", "tok-2", "tok-3"]
    assert r.last_error is None
    assert r.last_refresh == pytest.approx(start + 600)


async def test_backoff_is_exponential_and_jittered(autojump_clock: trio.testing.MockClock) -> None:
    exchange = FakeExchange(failures=5)
    r = Refresher(clock=wall, rng=random.Random(7))
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        r.set_login(exchange, None)  # no token yet: renew at once
        await trio.sleep(100)  # virtual time; the five backoffs add up to at most 31 s
        nursery.cancel_scope.cancel()
    assert len(exchange.calls) == 6
    gaps = [b - a for a, b in zip(exchange.calls, exchange.calls[1:], strict=False)]
    for attempt, gap in enumerate(gaps, start=1):
        nominal = min(refresher_mod.BACKOFF_CAP, refresher_mod.BACKOFF_BASE * 2 ** (attempt - 1))
        assert nominal / 2 <= gap <= nominal + 1e-6, (attempt, gap)
    # the same seed gives the same delays: the jitter comes from the rng
    rng = random.Random(7)
    expected = [backoff_delay(a, rng) for a in range(1, 6)]
    assert gaps == pytest.approx(expected)
    assert len(set(round(g / 2**i, 6) for i, g in enumerate(gaps))) > 1  # not plain doubling
    assert r.last_error is None and r.token is not None


def test_backoff_is_capped() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, rng) for a in range(1, 30)]
    assert max(delays) <= refresher_mod.BACKOFF_CAP
    assert min(delays[10:]) >= refresher_mod.BACKOFF_CAP / 2


async def test_concurrent_refreshes_share_one_exchange(
    autojump_clock: trio.testing.MockClock,
) -> None:
    exchange = FakeExchange(delay=2.0)
    r = Refresher(clock=wall)
    stale = fresh("stale")
    r.set_login(exchange, stale)
    got: list[AccessToken] = []

    async def ask() -> None:
        got.append(await r.refresh(stale))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(ask)
    assert len(exchange.calls) == 1
    assert {t.value for t in got} == {"tok-1"}
    # a refresh for an older stale token gets the current one without a new exchange
    assert (await r.refresh(stale)).value == "tok-1"
    assert len(exchange.calls) == 1


async def test_tokens_expired_on_arrival_do_not_cause_a_renewal_storm(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server clock far behind ours issues tokens that look expired: renew, but slowly."""

    def server_clock() -> float:
        return wall() - 2 * LIFE

    exchange = FakeExchange(clock=server_clock)
    r = Refresher(clock=wall)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        r.set_login(exchange, None)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert 5 <= len(exchange.calls) <= 100 / refresher_mod.MIN_RENEW_INTERVAL + 1


async def test_failed_renewal_is_not_repeated_by_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    exchange = FakeExchange(failures=100, delay=1.0)
    r = Refresher(clock=wall)
    stale = fresh("stale")
    r.set_login(exchange, stale)
    errors: list[Exception] = []

    async def ask() -> None:
        try:
            await r.refresh(stale)
        except AuthError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(ask)
    assert len(errors) == 10
    assert len(exchange.calls) == 1
    assert "server down" in str(errors[0])
    assert r.last_error == "server down"


async def test_get_never_returns_an_expired_token(autojump_clock: trio.testing.MockClock) -> None:
    exchange = FakeExchange()
    r = Refresher(clock=wall)
    old = fresh("old", life=60)
    r.set_login(exchange, old)
    assert (await r.get()).value == "old"
    await trio.sleep(59.5)  # inside the leeway: about to expire, so renewed first
    token = await r.get()
    assert token.value == "tok-1"
    assert not token.expired(wall())

    # when renewal fails, an expired token is not handed out: the caller gets an error
    exchange.failures = 1
    await trio.sleep(LIFE + 1)
    with pytest.raises(AuthError):
        await r.get()
    assert (await r.get()).value == "tok-2"  # server back: renewed on demand


async def test_rejected_credential_is_login_failed(autojump_clock: trio.testing.MockClock) -> None:
    r = Refresher(clock=wall)
    r.set_login(FakeExchange(reject=True), None)
    with pytest.raises(LoginFailed, match="revoked"):
        await r.get()
    assert r.last_error == "credential revoked"


async def test_not_logged_in() -> None:
    r = Refresher(clock=wall)
    with pytest.raises(AuthError, match="not logged in"):
        await r.get()


async def test_logout_stops_renewal(autojump_clock: trio.testing.MockClock) -> None:
    exchange = FakeExchange()
    r = Refresher(clock=wall)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        r.set_login(exchange, fresh())
        await trio.sleep(LIFE / 2)
        r.clear()
        await trio.sleep(LIFE * 3)
        nursery.cancel_scope.cancel()
    assert exchange.calls == []
    assert r.token is None and r.next_refresh is None


async def test_wall_clock_jump_is_noticed(autojump_clock: trio.testing.MockClock) -> None:
    """After a suspend the wall clock leaps; the next bounded sleep sees the due renewal."""
    offset = [0.0]

    def clock() -> float:
        return wall() + offset[0]

    exchange = FakeExchange(clock=clock)
    r = Refresher(clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        r.set_login(exchange, fresh())
        await trio.sleep(10)
        offset[0] = LIFE  # resumed from a long suspend: token already expired
        await trio.sleep(refresher_mod.MAX_SLEEP + 1)
        nursery.cancel_scope.cancel()
    assert len(exchange.calls) == 1
    # noticed within one bounded sleep of the jump (10 s of real time after login)
    assert exchange.calls[0] - (EPOCH + LIFE) <= 10 + refresher_mod.MAX_SLEEP


async def test_renewals_take_monotonic_time_whatever_the_wall_clock_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A wall clock that leaps ahead on every reading makes each renewal look due at once.

    The loop must still sleep between renewals (in trio's monotonic time): before the fix it
    renewed in a tight loop without a blocking checkpoint, so the autojump clock never
    advanced and the test hung (in production: an exchange storm against the server).
    """
    leaps = [0]

    def leaping() -> float:
        leaps[0] += 1
        return wall() + LIFE * leaps[0]

    exchange = FakeExchange(clock=leaping)
    storm = 1000

    async def renew() -> AccessToken:
        if len(exchange.calls) >= storm:
            raise AssertionError("renewal storm: no time passes between renewals")
        return await exchange()

    r = Refresher(clock=leaping)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        r.set_login(renew, None)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert 1 < len(exchange.calls) <= 10 / refresher_mod.MIN_ATTEMPT_GAP + 1


def test_backoff_survives_a_day_of_failures() -> None:
    """Attempt 1025+ used to overflow (2 ** 1024 as a float) and crash the refresher."""
    rng = random.Random(3)
    for attempt in (1025, 5000, 10**6):
        delay = backoff_delay(attempt, rng)
        assert refresher_mod.BACKOFF_CAP / 2 <= delay <= refresher_mod.BACKOFF_CAP


async def test_no_renewals_once_the_credential_expired(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Past ``renewable_until`` the loop stops, says why, and ``get`` refuses; a login resumes."""
    exchange = FakeExchange()
    r = Refresher(clock=wall)
    expired = "the GitLab ID token expired; run `nixd login gitlab-pipeline` again"
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        start = wall()
        r.set_login(exchange, fresh(), renewable_until=start + 250, expired_message=expired)
        await trio.sleep(100)
        assert r.next_refresh == pytest.approx(start + 200)
        await trio.sleep(149)  # renewed at 200 s; the next one (400 s) would be too late
        assert r.last_error is None and r.next_refresh is None
        await trio.sleep(2)  # the credential expired: the loop stops at once and says so
        assert r.last_error == expired and r.next_refresh is None
        assert (await r.get()).value == "tok-1"  # renewed at 200 s, valid until 500 s
        await trio.sleep(LIFE * 10)
        assert [round(t - start, 3) for t in exchange.calls] == [200.0]
        with pytest.raises(AuthError, match="cannot be renewed: the GitLab ID token expired"):
            await r.get()  # never the expired token, and no exchange either
        with pytest.raises(AuthError, match="GitLab ID token expired"):
            await r.refresh(r.token)
        assert len(exchange.calls) == 1 and r.last_error == expired

        r.set_login(exchange, None, renewable_until=wall() + 1000, expired_message=expired)
        await trio.sleep(1)
        assert len(exchange.calls) == 2 and r.last_error is None
        assert (await r.get()).value == "tok-2"
        nursery.cancel_scope.cancel()


async def test_backoff_stops_when_the_credential_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Failing renewals are retried until ``renewable_until``, never after it."""
    exchange = FakeExchange(failures=10**6)
    r = Refresher(clock=wall, rng=random.Random(5))
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        until = wall() + 100
        r.set_login(exchange, None, renewable_until=until)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert exchange.calls and max(exchange.calls) < until
    assert r.last_error is not None and r.last_error.startswith("the login's credential expired")
    assert r.next_refresh is None
