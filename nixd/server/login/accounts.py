"""Local user accounts: the people who sign in on the server's web page.

An account belongs to one organization and has a name unique on the server; it proves
the identity ``user:<name>`` with attributes ``org`` and ``user`` (the name again, so a
policy can match ``{ kind = "user", org = "acme" }`` or a single person).

Passwords are chosen by people, so unlike API tokens (:mod:`nixd.server.access.credentials`) they
are low-entropy and must be hashed with a memory-hard KDF: scrypt from :mod:`hashlib`
(OpenSSL), a 16-byte random salt per account, parameters stored with the hash so they can
be raised later without invalidating old hashes::

    scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>

Verification recomputes the hash (in a worker thread: ~50-100 ms of CPU and 32 MiB of
memory) and compares in constant time; an unknown user name costs the same work as a
wrong password, so response time does not reveal which names exist.

Accounts are created by ``nixd-server user add ORG NAME`` (password from a prompt or stdin,
never argv) and live in the ``accounts`` table (schema component ``"accounts"``).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import logging
import secrets
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import trio

from nixd.errors import AuthError, ConfigError
from nixd.server.access.identity import Identity
from nixd.server.errors import ServerError
from nixd.server.storage.db import (
    Connection,
    Migration,
    check_name,
    ensure_schema,
    get_org,
    transaction,
)

log = logging.getLogger(__name__)

KIND = "user"
SCRYPT_LOG2_N = 15  # n = 32768: 32 MiB per hash with r = 8
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
_MAX_LOG2_N = 20  # refuse absurd stored parameters (a tampered row must not eat the memory)

MIGRATIONS: list[Migration] = [
    # 1: accounts of people who sign in on the web page.
    """
    CREATE TABLE accounts (
        id          INTEGER PRIMARY KEY,
        org_id      INTEGER NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
        name        TEXT NOT NULL UNIQUE,
        password    TEXT NOT NULL,
        created     REAL NOT NULL,
        disabled_at REAL
    );
    """,
]


class SignInRejected(ServerError, AuthError):
    """A user name and password did not sign in; the message never says which was wrong.

    ``reason`` (for the audit log only) does: ``unknown_user``, ``wrong_password``,
    ``disabled``.
    """

    status = 401
    code = "invalid_sign_in"

    def __init__(self, reason: str) -> None:
        super().__init__("wrong user name or password")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Account:
    """A stored account, without its password hash."""

    id: int
    org: str
    name: str
    created: float
    disabled_at: float | None

    def identity(self) -> Identity:
        """``user:<name>`` with attributes ``org`` and ``user``."""
        return Identity(KIND, self.name, {"org": self.org, "user": self.name})


def hash_password(password: str, *, log2_n: int = SCRYPT_LOG2_N, salt: bytes | None = None) -> str:
    """The storable scrypt hash of ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = _scrypt(password, salt, log2_n, SCRYPT_R, SCRYPT_P)
    return "$".join(
        [
            "scrypt",
            str(log2_n),
            str(SCRYPT_R),
            str(SCRYPT_P),
            base64.b64encode(salt).decode(),
            base64.b64encode(digest).decode(),
        ]
    )


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the stored hash (constant-time comparison)."""
    try:
        scheme, log2_n, r, p, salt_b64, hash_b64 = stored.split("$")
        if scheme != "scrypt" or not 1 <= int(log2_n) <= _MAX_LOG2_N:
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(hash_b64, validate=True)
        digest = _scrypt(password, salt, int(log2_n), int(r), int(p))
    except ValueError:
        log.error("an account has a malformed password hash")
        return False
    return hmac.compare_digest(digest, expected)


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=2 * 128 * r * n + (1 << 20),
        dklen=HASH_BYTES,
    )


def check_password(password: str) -> str:
    """Return ``password`` if acceptable as a new password, else ConfigError saying why."""
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the password must have at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ConfigError(f"the password must have at most {MAX_PASSWORD} characters")
    if "\n" in password or "\r" in password or "\0" in password:
        raise ConfigError("the password must not contain line breaks or NUL")
    return password


_SELECT = (
    "SELECT a.id, o.name, a.name, a.created, a.disabled_at, a.password "
    "FROM accounts a JOIN orgs o ON o.id = a.org_id"
)
# Hashed once at import: an unknown user name is checked against it, to cost the same time.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def _account(row: tuple[object, ...]) -> Account:
    return Account(
        id=int(row[0]),  # type: ignore[call-overload]
        org=str(row[1]),
        name=str(row[2]),
        created=float(row[3]),  # type: ignore[arg-type]
        disabled_at=None if row[4] is None else float(row[4]),  # type: ignore[arg-type]
    )


class AccountStore:
    """Accounts in the server database (synchronous, short queries; scrypt off-thread)."""

    def __init__(self, conn: Connection, *, clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._clock = clock
        ensure_schema(conn, component="accounts", migrations=MIGRATIONS)

    def create(self, org: str, name: str, password: str) -> Account:
        """Create an account; ConfigError if the org is missing, the name taken or invalid."""
        check_name("user", name)
        check_password(password)
        hashed = hash_password(password)
        now = self._clock()
        try:
            with transaction(self._conn, durable=True):
                found = get_org(self._conn, org)
                if found is None:
                    raise ConfigError(f"organization {org!r} does not exist")
                row = self._conn.execute(
                    "INSERT INTO accounts (org_id, name, password, created) VALUES (?, ?, ?, ?)"
                    " RETURNING id",
                    (found.id, name, hashed, now),
                ).fetchone()
        except sqlite3.IntegrityError as exc:
            raise ConfigError(f"a user named {name!r} already exists") from exc
        log.info("created user %s in %s", name, org)
        return Account(int(row[0]), org, name, now, None)

    def disabled_names(self) -> set[str]:
        """Names of disabled accounts (their unexpired access tokens are refused at once)."""
        rows = self._conn.execute("SELECT name FROM accounts WHERE disabled_at IS NOT NULL")
        return {str(r[0]) for r in rows}

    def get(self, name: str) -> Account | None:
        row = self._conn.execute(f"{_SELECT} WHERE a.name = ?", (name,)).fetchone()
        return _account(row) if row else None

    def by_id(self, account_id: int) -> Account | None:
        row = self._conn.execute(f"{_SELECT} WHERE a.id = ?", (account_id,)).fetchone()
        return _account(row) if row else None

    def disable(self, name: str) -> Account:
        """Stop an account from signing in (its refresh credentials stop working too)."""
        with transaction(self._conn, durable=True):
            self._conn.execute(
                "UPDATE accounts SET disabled_at = ? WHERE name = ? AND disabled_at IS NULL",
                (self._clock(), name),
            )
            account = self.get(name)
        if account is None:
            raise ConfigError(f"no user named {name!r}")
        return account

    async def authenticate(self, name: str, password: str) -> Account:
        """The account if ``password`` is right, else :class:`SignInRejected`."""
        row = self._conn.execute(f"{_SELECT} WHERE a.name = ?", (name,)).fetchone()
        stored = str(row[5]) if row else _DUMMY_HASH
        candidate = password[:MAX_PASSWORD]
        ok = await trio.to_thread.run_sync(verify_password, candidate, stored)
        if row is None:
            raise SignInRejected("unknown_user")
        if not ok:
            raise SignInRejected("wrong_password")
        account = _account(row)
        if account.disabled_at is not None:
            raise SignInRejected("disabled")
        return account


# -- nixd-server user ... ---------------------------------------------------------------


def read_new_password(stdin: IO[str] | None = None) -> str:
    """A new password: prompted twice on a terminal, else the first line of stdin."""
    stream = stdin or sys.stdin
    if stream.isatty():
        first = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != first:
            raise ConfigError("the passwords do not match")
        return check_password(first)
    line = stream.readline()
    return check_password(line.rstrip("\r\n"))
