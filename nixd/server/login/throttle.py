"""Throttling of what a client may try before it has proved anything.

The model
    A *key* names what is being slowed down: an account name someone signs in as, a
    source address, a browser session guessing user codes, a signed-in account guessing
    them. Each key counts its failures. The first ``free`` failures cost nothing (people
    mistype); from then on each failure blocks the key for ``base * 2**(n - free)``
    seconds, at most ``max``. A key that has been quiet (no failure, no block) for
    ``window`` seconds is forgotten. While a key is blocked, an attempt is refused before
    any work is done (no scrypt, no lookup) with :class:`~nixd.server.errors.Throttled`: a
    429 with ``Retry-After``, which the caller audits. Refused attempts are not counted,
    so the wait is what the last real failure earned, never more.

    Attempts on one key run one at a time (:meth:`Throttle.checking`): a password check
    takes ~100 ms in a worker thread, and without this a burst of concurrent attempts
    would all pass the check before the first failure is counted. A second attempt while
    one is being checked is refused the same way (429, ``Retry-After: 1``). Across worker
    processes the counts are shared, so the most a burst gains is one attempt per worker.

    A success does not wipe every key it touched: signing in resets the account's key (its
    owner got in) but never the address's, and a right user code resets nothing — an
    attacker holding one valid code (their own) could otherwise clear their slate between
    guesses.

Addresses
    An IPv4 address is its own key; an IPv6 address is keyed by its /64, the block one
    host or one customer usually holds, so rotating through it gains nothing. Behind a
    reverse proxy every client has the proxy's address: the per-address limits then apply
    to everyone at once, and the per-account ones still hold.

Storage
    Keys live in SQLite (table ``throttle``, schema component ``"throttle"``), so every
    worker process sees the same counts: N workers do not give an attacker N times the
    tries. Keys are stored as SHA-256 (a user-name field sometimes holds a password typed
    into the wrong box). Rows of forgotten keys are deleted as failures are recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from nixd.server.errors import Throttled
from nixd.server.storage.db import Connection, Migration, ensure_schema, transaction

MIGRATIONS: list[Migration] = [
    # 1: failure counts per throttled key.
    """
    CREATE TABLE throttle (
        key           BLOB PRIMARY KEY,
        failures      INTEGER NOT NULL,
        last_failure  REAL NOT NULL,
        blocked_until REAL NOT NULL
    );
    CREATE INDEX throttle_last_failure ON throttle(last_failure);
    """,
]


@dataclass(frozen=True, slots=True)
class Backoff:
    """How a key is slowed down: ``free`` failures, then ``base`` seconds doubling to ``max``."""

    free: int
    base: float
    max: float
    window: float

    def block_for(self, failures: int) -> float:
        """Seconds the ``failures``-th failure blocks its key (0 while still free)."""
        if failures < self.free:
            return 0.0
        doublings = failures - self.free
        if doublings >= 64:  # 2**64 * base is past any max; do not build the number
            return self.max
        return float(min(self.max, self.base * 2**doublings))


def source_key(address: str) -> str:
    """The part of a source address that is throttled: IPv4 whole, IPv6 its /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _digest(key: str) -> bytes:
    return hashlib.sha256(b"nixd-throttle-v1\0" + key.encode("utf-8", "replace")).digest()


class Throttle:
    """Failure counts in the server database (synchronous, short statements)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._busy: set[str] = set()
        ensure_schema(conn, component="throttle", migrations=MIGRATIONS)

    @contextlib.contextmanager
    def checking(self, keys: Sequence[str], now: float, message: str) -> Iterator[None]:
        """Run one attempt for ``keys``: Throttled if one is blocked or already being tried.

        Inside the block the attempt is checked and its failure recorded (:meth:`failure`);
        no other attempt on any of ``keys`` starts in this process meanwhile.
        """
        if any(key in self._busy for key in keys):
            raise Throttled(f"{message} (another attempt is being checked)", retry_after=1.0)
        wait = self.retry_after(keys, now)
        if wait > 0:
            raise Throttled(message, retry_after=wait)
        self._busy.update(keys)
        try:
            yield
        finally:
            self._busy.difference_update(keys)

    def retry_after(self, keys: Iterable[str], now: float) -> float:
        """Seconds until every key in ``keys`` may try again (0 if none is blocked)."""
        wait = 0.0
        for key in keys:
            row = self._conn.execute(
                "SELECT blocked_until FROM throttle WHERE key = ?", (_digest(key),)
            ).fetchone()
            if row is not None:
                wait = max(wait, float(row[0]) - now)
        return wait

    def failure(self, keys: Sequence[str], now: float, backoff: Backoff) -> float:
        """Count one failure for each key; the longest block that earned (0 if none)."""
        longest = 0.0
        with transaction(self._conn):
            self._conn.execute(
                "DELETE FROM throttle WHERE last_failure < ? AND blocked_until < ?",
                (now - backoff.window, now),
            )
            for key in keys:
                digest = _digest(key)
                row = self._conn.execute(
                    "SELECT failures FROM throttle WHERE key = ?", (digest,)
                ).fetchone()
                failures = (int(row[0]) if row is not None else 0) + 1
                block = backoff.block_for(failures)
                longest = max(longest, block)
                self._conn.execute(
                    "INSERT INTO throttle (key, failures, last_failure, blocked_until)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
                    " failures = excluded.failures, last_failure = excluded.last_failure,"
                    " blocked_until = excluded.blocked_until",
                    (digest, failures, now, now + block),
                )
        return longest

    def forget(self, keys: Iterable[str]) -> None:
        """Reset ``keys`` (a success that proves their owner is the one trying)."""
        with transaction(self._conn):
            self._conn.executemany(
                "DELETE FROM throttle WHERE key = ?", [(_digest(k),) for k in keys]
            )

    def failures(self, key: str) -> int:
        """The failures counted for ``key`` (for status pages and tests)."""
        row = self._conn.execute(
            "SELECT failures FROM throttle WHERE key = ?", (_digest(key),)
        ).fetchone()
        return int(row[0]) if row is not None else 0
