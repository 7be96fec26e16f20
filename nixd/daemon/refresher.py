"""The daemon's :class:`~nixd.auth.model.TokenSource`: one access token, kept fresh.

After a login the refresher holds a *renew* function (the credential exchange, bound to the
server and the credential) and the current access token. A background task renews the
token at about two thirds of its life; a failed renewal is retried with jittered
exponential backoff. Upstream clients call :meth:`Refresher.get` for the token and
:meth:`Refresher.refresh` when an upstream rejected it; concurrent refreshes for the same
stale token share one exchange, and a renewal that just failed is not repeated by every
waiter. :meth:`get` never returns a token that is (about to be) expired: it renews first.

A login may say until when it can be renewed (``renewable_until``: a GitLab job's ID
token expires). Past that moment retrying cannot help, so the refresher exchanges no more:
the loop stops and records why in :attr:`Refresher.last_error`, and :meth:`get` raises
:class:`~nixd.errors.AuthError` with that message once the access token has run out. A
new :meth:`Refresher.set_login` starts afresh.

Time is wall-clock (tokens carry Unix expiry times); the background loop sleeps in bounded
steps so a machine resuming from suspend notices a due renewal within a minute. Tests pass
a ``clock`` tied to trio's (autojump) clock. Whatever the wall clock (or the server's) says,
two renewals started by the loop are at least :data:`MIN_ATTEMPT_GAP` seconds of trio's
monotonic time apart, slept for in a real blocking sleep: a loop path that renewed again
without time passing would hammer the server (and, on an autojump clock, never let
virtual time advance).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

import trio

from nixd.auth.model import AccessToken
from nixd.errors import AuthError, LoginFailed, NixdError

log = logging.getLogger(__name__)

Renew = Callable[[], Awaitable[AccessToken]]
OnToken = Callable[[AccessToken], Awaitable[None]]

#: renew when this fraction of the token's life has passed
RENEW_AT = 2 / 3
#: first retry delay after a failed renewal, and the cap of the exponential backoff
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
#: longest single sleep, so a wall-clock jump (suspend/resume) is noticed
MAX_SLEEP = 60.0
#: never renew more often than this, even if the server's tokens look expired on arrival
#: (clock skew): a loop of instant renewals would hammer the server
MIN_RENEW_INTERVAL = 10.0
#: the loop never starts two renewals closer than this in monotonic time, whatever the
#: wall clock does (a wall clock leaping ahead, tokens expired on arrival)
MIN_ATTEMPT_GAP = BACKOFF_BASE / 2
#: an exchange taking longer than this counts as failed
EXCHANGE_TIMEOUT = 30.0


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, jittered.

    "Equal jitter": half the nominal delay fixed, half random, so retries spread out but
    never hammer the server.
    """
    # the exponent is bounded: 2.0 ** 1024 overflows, and a server down for a day reaches it
    nominal = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(max(attempt - 1, 0), 32))
    delay: float = nominal / 2 + rng.uniform(0, nominal / 2)
    return delay


class Refresher:
    """Holds the machine's access token; implements ``TokenSource``."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        on_token: OnToken | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._on_token = on_token
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._renew: Renew | None = None
        self._renewable_until: float | None = None
        self._expired_message: str | None = None
        self._token: AccessToken | None = None
        self._lock = trio.Lock()
        self._wake = trio.Event()
        self._attempts = 0
        self._last_failed = False
        self._failures = 0
        #: trio.current_time() when the loop last started a renewal (monotonic)
        self._loop_attempt: float | None = None
        self.last_refresh: float | None = None
        self.last_error: str | None = None
        self.next_refresh: float | None = None
        #: renewals of the current login that succeeded (shown by ``nixd status``)
        self.renewals = 0

    # -- state changes from login/logout ---------------------------------------------------

    def set_login(
        self,
        renew: Renew,
        token: AccessToken | None,
        *,
        renewable_until: float | None = None,
        expired_message: str | None = None,
    ) -> None:
        """Start keeping a new login fresh (``token`` may be None: renew right away).

        ``renewable_until`` (wall-clock) is when the login's credential stops working; from
        then on renewals are not attempted and ``expired_message`` says why.
        """
        self._renew = renew
        self._renewable_until = renewable_until
        self._expired_message = expired_message
        self._token = token
        self._failures = 0
        self.renewals = 0
        self._last_failed = False
        self.last_error = None
        if token is not None:
            self.last_refresh = self._clock()
        self._poke()

    def clear(self) -> None:
        """Forget the login (logout)."""
        self._renew = None
        self._renewable_until = None
        self._token = None
        self.next_refresh = None
        self.last_error = None
        self._poke()

    @property
    def logged_in(self) -> bool:
        return self._renew is not None

    @property
    def token(self) -> AccessToken | None:
        """The current token, possibly expired; for status display only."""
        return self._token

    def _renewal_over(self) -> str | None:
        """Why the login can no longer be renewed (its credential expired), or None."""
        until = self._renewable_until
        if until is None or self._clock() < until:
            return None
        if self._expired_message:
            return self._expired_message
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(until))
        return f"the login's credential expired at {stamp}; log in again with a new one"

    def _poke(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    # -- TokenSource -----------------------------------------------------------------------

    def _usable(self, token: AccessToken | None) -> bool:
        if token is None:
            return False
        life = max(0.0, token.expires_at - (token.issued_at or token.expires_at))
        leeway = min(5.0, life * 0.05)
        return not token.expired(self._clock(), leeway=leeway)

    async def get(self) -> AccessToken:
        token = self._token
        if self._usable(token):
            assert token is not None
            return token
        return await self.refresh(token)

    async def refresh(self, stale: AccessToken | None) -> AccessToken:
        if self._renew is None:
            raise AuthError("not logged in: run `nixd login`")
        attempts_seen = self._attempts
        async with self._lock:
            current = self._token
            fresh = current is not None and (stale is None or current.value != stale.value)
            if fresh and self._usable(current):
                assert current is not None
                return current
            if self._attempts != attempts_seen and self._last_failed:
                # someone tried for us while we waited for the lock, and it failed
                raise AuthError(f"token renewal failed: {self.last_error}")
            return await self._renew_locked()

    async def _renew_locked(self) -> AccessToken:
        renew = self._renew
        if renew is None:
            raise AuthError("not logged in: run `nixd login`")
        if (over := self._renewal_over()) is not None:
            self.last_error = over  # no exchange: it cannot succeed any more
            raise AuthError(f"the access token cannot be renewed: {over}")
        self._attempts += 1
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT):
                token = await renew()
        except (NixdError, trio.TooSlowError) as exc:
            self._last_failed = True
            self._failures += 1
            message = str(exc) if isinstance(exc, NixdError) else "the server did not answer"
            self.last_error = message
            log.warning("token renewal failed (attempt %d): %s", self._failures, message)
            if isinstance(exc, LoginFailed):
                raise
            raise AuthError(f"token renewal failed: {message}") from exc
        if renew is not self._renew:  # logged out or in again meanwhile: drop the result
            raise AuthError("login changed during token renewal")
        self._last_failed = False
        self._failures = 0
        self._token = token
        self.last_refresh = self._clock()
        self.last_error = None
        self.renewals += 1
        log.info("access token renewed for %s", token.identity)
        if self._on_token is not None:
            try:
                await self._on_token(token)
            except (NixdError, OSError):
                log.exception("could not record the renewed token")
        self._poke()
        return token

    # -- background renewal ----------------------------------------------------------------

    def _due(self, token: AccessToken) -> float:
        issued = token.issued_at or self.last_refresh or self._clock()
        return issued + RENEW_AT * max(0.0, token.expires_at - issued)

    async def _sleep_until(self, deadline: float, wake: trio.Event) -> None:
        """Sleep until wall-clock ``deadline`` or until poked."""
        while not wake.is_set():
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            with trio.move_on_after(min(remaining, MAX_SLEEP)):
                await wake.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew in the background until cancelled."""
        task_status.started()
        while True:
            wake = self._wake
            if self._renew is None:
                self.next_refresh = None
                await wake.wait()
                continue
            if (over := self._renewal_over()) is not None:
                log.warning("stopped renewing the access token: %s", over)
                self.last_error = over
                self.next_refresh = None
                await wake.wait()  # until a new login (or logout)
                continue
            token = self._token
            if self._failures:
                due = self._clock() + backoff_delay(self._failures, self._rng)
            elif token is None:
                due = self._clock()
            else:
                due = self._due(token)
                if self.last_refresh is not None:
                    due = max(due, self.last_refresh + MIN_RENEW_INTERVAL)
            until = self._renewable_until
            self.next_refresh = due if until is None or due < until else None
            # wake at the credential's expiry at the latest, to stop and say so
            await self._sleep_until(due if until is None else min(due, until), wake)
            if wake.is_set():
                continue  # login changed or someone renewed: recompute
            if self._loop_attempt is not None:
                gap = self._loop_attempt + MIN_ATTEMPT_GAP - trio.current_time()
                if gap > 0:
                    with trio.move_on_after(gap):
                        await wake.wait()
                    if wake.is_set():
                        continue
            async with self._lock:
                if self._renew is None or self._token is not token or self._renewal_over():
                    continue
                self._loop_attempt = trio.current_time()
                with contextlib.suppress(AuthError):  # recorded; backoff on the next round
                    await self._renew_locked()
