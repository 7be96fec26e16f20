"""Interactive login: the OAuth 2.0 device authorization grant (RFC 8628) and refresh credentials.

The flow::

    nixd login ── POST /api/v1/device/authorize ──► device_code (secret), user_code BCDF-GHJK
       │  prints the URL and the user code              │
       │                                                ▼
       │              a person signs in on /device (nixd.server.login.web), enters the code,
       │              sees what asks for access, approves or denies
       ▼
    POST /api/v1/device/token every `interval` s ──► authorization_pending | slow_down
                                                     | access_denied | expired_token
                                                     | 200 access token + refresh credential

**Device codes.** The ``device_code`` is 32 random bytes the client keeps; only its SHA-256
is stored. The ``user_code`` is 8 letters from a 20-consonant alphabet (no vowels, so no
words; no 0/O or 1/I to confuse; case and dashes ignored when typed), shown as
``XXXX-XXXX``; it is only usable by a signed-in person and only while pending. A code is
decided once and redeemed once. Polls closer together than the code's ``interval`` answer
``slow_down`` and add 5 s to the interval (RFC 8628 §3.5), which the client must honor.

**Refresh credentials** (``nixdr_<id>_<secret>``, stored as a SHA-256) are what the daemon
keeps. Each is single-use: ``POST /api/v1/token/exchange {"kind": "refresh", "token": ...}``
marks it used and answers with an access token and the next refresh credential of the same
*family* (one family per approved login). Presenting an already used credential means two
parties hold it — the legitimate client and a thief — so the whole family is revoked at
once (reuse detection) and both must log in again. Families are revocable by an admin
(:meth:`DeviceService.revoke_user`), and a disabled account's credentials stop working.
A credential unused for ``refresh_ttl`` expires.

**Reuse grace.** An answer lost in transit (the server rotated, the client never heard)
makes the client retry with the credential it still holds. So for ``refresh_reuse_grace``
seconds after its use, a credential may be presented *once* more, provided the successor
it was rotated to is still unused and live: a fresh successor is issued and the earlier
one is retired (marked used, so whoever presents it later triggers reuse detection). A
retry after the grace, a second retry, or one after the successor was used is reuse as
above. No secret is kept to answer the retry: the successor's plaintext is never stored.

**Bounds.** Starting a login needs no credential, so a pending code is anonymous state:
at most ``device.codes_per_source`` per source address (IPv6: per /64) and
``device.max_pending_codes`` in all; past either, ``authorize`` answers 429 with
``Retry-After`` (until the oldest such code expires). Each code counts the wrong codes
entered on the sign-in page while it waits and dies after ``device.code_max_wrong_guesses``
(:meth:`DeviceService.wrong_guess`), so no code can be guessed in more tries than that;
the per-session and per-account guess limits are in :mod:`nixd.server.login.web`. A
malformed body (too big, too deep, wrong types) is a 400 ``invalid_request``.

The identity is the account's (``user:<name>``, attributes ``org`` and ``user``). Every
step — authorize, each poll outcome but ``authorization_pending``, approve, deny, every
refresh, good or bad, every refusal and malformed request — is written to the audit log
with the reason.

All state is in SQLite (schema component ``"device"``), so several server processes share it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from nixd.errors import AuthError, FormatError
from nixd.server.access.audit import AuditWriter
from nixd.server.access.identity import Identity, anonymous
from nixd.server.access.tokens import TokenIssuer
from nixd.server.asgi import Receive, Scope, Send
from nixd.server.bodies import form_fields, json_object, read_body, string_fields
from nixd.server.config import DeviceSection
from nixd.server.errors import BadRequest, ServerError, Throttled
from nixd.server.login.accounts import Account, AccountStore
from nixd.server.login.exchange import ExchangeRejected
from nixd.server.login.throttle import Backoff, Throttle, source_key
from nixd.server.storage.db import Connection, Migration, ensure_schema, transaction

log = logging.getLogger(__name__)


CLIENT_ID = "nixd-cli"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
SLOW_DOWN_STEP = 5
REFRESH_PREFIX = "nixdr_"
MAX_FORM = 16 * 1024
_REFRESH_RE = re.compile(r"nixdr_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_HASH_DOMAIN = b"nixd-refresh-v1\0"
_ACTIONS = {"/api/v1/device/authorize": "device:authorize", "/api/v1/device/token": "device:token"}

MIGRATIONS: list[Migration] = [
    # 1: pending device authorizations and refresh credential families.
    """
    CREATE TABLE device_codes (
        device_hash BLOB PRIMARY KEY,
        user_code   TEXT NOT NULL UNIQUE,
        client_id   TEXT NOT NULL,
        created     REAL NOT NULL,
        expires     REAL NOT NULL,
        interval    INTEGER NOT NULL,
        last_poll   REAL,
        state       TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'approved', 'denied', 'redeemed')),
        account_id  INTEGER REFERENCES accounts(id) ON DELETE CASCADE,
        decided     REAL,
        source      TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX device_codes_expires ON device_codes(expires);
    CREATE TABLE refresh_credentials (
        id          TEXT PRIMARY KEY,
        family      TEXT NOT NULL,
        account_id  INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        secret_hash BLOB NOT NULL,
        created     REAL NOT NULL,
        expires     REAL NOT NULL,
        used_at     REAL,
        revoked_at  REAL
    );
    CREATE INDEX refresh_credentials_family ON refresh_credentials(family);
    CREATE INDEX refresh_credentials_account ON refresh_credentials(account_id);
    """,
    # 2: reuse grace: the credential a rotation issued, and when the retry was spent.
    """
    ALTER TABLE refresh_credentials ADD COLUMN successor TEXT;
    ALTER TABLE refresh_credentials ADD COLUMN grace_used_at REAL;
    """,
    # 3: throttling: wrong codes entered while a code waited; codes counted per source.
    """
    ALTER TABLE device_codes ADD COLUMN guesses INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE device_codes ADD COLUMN source_key TEXT NOT NULL DEFAULT '';
    CREATE INDEX device_codes_source ON device_codes(source_key, expires);
    """,
]


DeviceSettings = DeviceSection
"""``[device]`` in the server config."""


class RefreshRejected(ServerError, AuthError):
    """A refresh credential was refused; ``code`` for the client, ``reason`` for the audit."""

    status = 401
    code = "invalid_grant"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PendingCode:
    """A device authorization as the web page shows it (never the device code)."""

    user_code: str
    client_id: str
    created: float
    expires: float
    state: str
    source: str


@dataclass(frozen=True, slots=True)
class Refreshed:
    """The outcome of a good refresh: who, and the next credential of the family."""

    identity: Identity
    refresh_token: str
    refresh_expires: float
    grace: bool = False
    """True when this was a retry within the reuse grace (audited on its own)."""


def normalize_user_code(text: str) -> str:
    """``bcdf-ghjk`` / ``BCDF GHJK`` → ``BCDFGHJK`` (what is stored)."""
    return "".join(c for c in text.upper() if c.isalnum())


def format_user_code(code: str) -> str:
    """``BCDFGHJK`` → ``BCDF-GHJK`` (what people see)."""
    return f"{code[:4]}-{code[4:]}"


def _sha256(data: str) -> bytes:
    return hashlib.sha256(data.encode()).digest()


def _refresh_hash(credential_id: str, secret: str) -> bytes:
    return hashlib.sha256(_HASH_DOMAIN + credential_id.encode() + b"\0" + secret.encode()).digest()


class DeviceService:
    """The device endpoints, the decisions the web page records, and refresh credentials.

    ``conn`` is the server's database connection (used from the trio thread only, short
    statements); ``clock`` returns Unix seconds (tests pass a fake one).
    """

    def __init__(
        self,
        conn: Connection,
        *,
        issuer: TokenIssuer,
        audit: AuditWriter,
        settings: DeviceSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conn = conn
        self.issuer = issuer
        self.audit = audit
        self.settings = settings or DeviceSettings()
        self.clock = clock
        self.accounts = AccountStore(conn, clock=clock)
        ensure_schema(conn, component="device", migrations=MIGRATIONS)
        self.throttle = Throttle(conn)

    @property
    def signin_backoff(self) -> Backoff:
        """How wrong passwords are slowed down (per account, per source address)."""
        s = self.settings
        return Backoff(s.signin_free_attempts, s.backoff, s.backoff_max, s.failure_window)

    @property
    def guess_backoff(self) -> Backoff:
        """How wrong user codes are slowed down (per session, per account)."""
        s = self.settings
        return Backoff(s.code_free_guesses, s.backoff, s.backoff_max, s.failure_window)

    # -- HTTP: /api/v1/device/* ------------------------------------------------------------

    async def handle_api(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        path: str,
        request_id: str,
        source_ip: str,
    ) -> None:
        """Answer ``POST /api/v1/device/authorize`` and ``POST /api/v1/device/token``."""
        if scope["method"] != "POST":
            await _oauth(send, 405, {"error": "invalid_request", "error_description": "use POST"})
            return
        action = _ACTIONS.get(path)
        if action is None:
            await _oauth(send, 404, {"error": "not_found", "error_description": path})
            return
        try:
            form = await read_form(scope, receive)
            if path == "/api/v1/device/authorize":
                status, body = await self.authorize(
                    form, source_ip=source_ip, base_url=self.base_url(scope), request_id=request_id
                )
            else:
                status, body = await self.token(form, source_ip=source_ip, request_id=request_id)
        except (BadRequest, Throttled) as exc:
            # Both audited: a malformed body here, a throttled one where it was refused.
            if isinstance(exc, BadRequest):
                await self._audit(
                    request_id,
                    anonymous(),
                    action,
                    False,
                    "malformed_request",
                    source_ip,
                    reason=str(exc),
                )
            await _oauth(
                send,
                exc.status,
                {"error": exc.code, "error_description": str(exc)},
                headers=exc.headers(),
            )
            return
        await _oauth(send, status, body)

    def base_url(self, scope: Scope) -> str:
        """Where people reach this server: ``device.public_url``, else from the Host header."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        host = ""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
                break
        if not host or not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", host):
            server = scope.get("server") or ("127.0.0.1", 80)
            host = f"{server[0]}:{server[1]}"
        return f"{scope.get('scheme', 'http')}://{host}"

    async def authorize(
        self, form: Mapping[str, str], *, source_ip: str, base_url: str, request_id: str = ""
    ) -> tuple[int, dict[str, Any]]:
        """RFC 8628 §3.1-3.2: a new device code for ``client_id`` ``nixd-cli``."""
        client_id = form.get("client_id", "")
        if client_id != CLIENT_ID:
            await self._audit(
                request_id, anonymous(), "device:authorize", False, "unknown_client", source_ip
            )
            return 400, {
                "error": "invalid_client",
                "error_description": f"unknown client_id {client_id!r} (expected {CLIENT_ID!r})",
            }
        now = self.clock()
        device_code = secrets.token_urlsafe(32)
        ttl, interval = self.settings.code_ttl, self.settings.interval
        self._expire_old(now)
        source = source_key(source_ip)
        over: tuple[str, int, float] | None = None
        for _ in range(10):
            user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
            try:
                with transaction(self._conn):
                    over = self._over_bounds(source, now)
                    if over is not None:
                        break
                    self._conn.execute(
                        "INSERT INTO device_codes (device_hash, user_code, client_id, created,"
                        " expires, interval, source, source_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            _sha256(device_code),
                            user_code,
                            client_id,
                            now,
                            now + ttl,
                            interval,
                            source_ip,
                            source,
                        ),
                    )
                break
            except sqlite3.IntegrityError:
                continue  # a live code already has these letters: draw again
        else:  # pragma: no cover - 20^8 codes; ten collisions in a row do not happen
            raise FormatError("could not allocate a user code; try again")
        if over is not None:
            rule, limit, wait = over
            await self._audit(
                request_id,
                anonymous(),
                "device:authorize",
                False,
                f"too_many_pending_codes_{rule}",
                source_ip,
                retry_after=str(max(1, math.ceil(wait))),
            )
            where = "from this address" if rule == "source" else "on this server"
            raise Throttled(
                f"too many logins are waiting for approval {where} ({limit}); "
                "approve or let them expire, then try again",
                retry_after=wait,
            )
        shown = format_user_code(user_code)
        await self._audit(
            request_id,
            anonymous(),
            "device:authorize",
            True,
            "device-flow",
            source_ip,
            user_code=shown,
        )
        uri = f"{base_url}/device"
        return 200, {
            "device_code": device_code,
            "user_code": shown,
            "verification_uri": uri,
            "verification_uri_complete": f"{uri}?user_code={quote(shown)}",
            "expires_in": ttl,
            "interval": interval,
        }

    async def token(
        self, form: Mapping[str, str], *, source_ip: str, request_id: str = ""
    ) -> tuple[int, dict[str, Any]]:
        """RFC 8628 §3.4-3.5: one poll of the client."""
        if form.get("grant_type") != GRANT_TYPE:
            return 400, {
                "error": "unsupported_grant_type",
                "error_description": f"grant_type must be {GRANT_TYPE}",
            }
        device_code = form.get("device_code", "")
        client_id = form.get("client_id", "")
        now = self.clock()
        with transaction(self._conn):
            row = self._conn.execute(
                "SELECT user_code, client_id, expires, interval, last_poll, state, account_id,"
                " guesses FROM device_codes WHERE device_hash = ?",
                (_sha256(device_code),),
            ).fetchone()
            if row is not None:
                self._conn.execute(
                    "UPDATE device_codes SET last_poll = ? WHERE device_hash = ?",
                    (now, _sha256(device_code)),
                )
        if row is None or row[1] != client_id:
            await self._audit(
                request_id, anonymous(), "device:token", False, "unknown_device_code", source_ip
            )
            return 400, {"error": "invalid_grant", "error_description": "unknown device code"}
        user_code, _, expires, interval, last_poll, state, account_id, guesses = row
        shown = format_user_code(user_code)

        async def refuse(error: str, description: str) -> tuple[int, dict[str, Any]]:
            await self._audit(
                request_id, anonymous(), "device:token", False, error, source_ip, user_code=shown
            )
            return 400, {"error": error, "error_description": description}

        if state == "redeemed":
            return await refuse("invalid_grant", "this device code was already used")
        if state == "denied":
            return await refuse("access_denied", "the request was denied")
        if now >= expires:
            if state == "pending" and guesses >= self.settings.code_max_wrong_guesses:
                return await refuse(
                    "expired_token",
                    "too many wrong codes were entered on the sign-in page while this one "
                    "waited, so it was withdrawn; run `nixd login` again",
                )
            return await refuse("expired_token", "the code expired before it was approved")
        if last_poll is not None and now - last_poll < interval:
            with transaction(self._conn):
                self._conn.execute(
                    "UPDATE device_codes SET interval = interval + ? WHERE device_hash = ?",
                    (SLOW_DOWN_STEP, _sha256(device_code)),
                )
            return await refuse(
                "slow_down", f"poll at most every {interval + SLOW_DOWN_STEP} seconds"
            )
        if state == "pending":
            return 400, {"error": "authorization_pending"}
        # Approved: redeem exactly once, even if two polls race (two server processes).
        with transaction(self._conn):
            redeemed = self._conn.execute(
                "UPDATE device_codes SET state = 'redeemed' WHERE device_hash = ?"
                " AND state = 'approved'",
                (_sha256(device_code),),
            ).rowcount
        account = self.accounts.by_id(int(account_id)) if account_id is not None else None
        if redeemed != 1 or account is None or account.disabled_at is not None:
            return await refuse("invalid_grant", "this device code cannot be used")
        identity = account.identity()
        _, refresh, _ = self._new_refresh(account, family=secrets.token_hex(8), now=now)
        access, claims = self.issuer.issue(identity)
        await self._audit(
            request_id,
            identity,
            "device:token",
            True,
            "device-approved",
            source_ip,
            user_code=shown,
        )
        return 200, {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(claims["exp"] - claims["iat"]),
            "expires_at": int(claims["exp"]),
            "refresh_token": refresh,
            "identity": identity.render(),
        }

    # -- decisions (the web page) ----------------------------------------------------------

    def lookup(self, user_code: str) -> PendingCode | None:
        """The pending, unexpired authorization with this user code, if any."""
        code = normalize_user_code(user_code)
        if len(code) != USER_CODE_LENGTH:
            return None
        row = self._conn.execute(
            "SELECT user_code, client_id, created, expires, state, source FROM device_codes"
            " WHERE user_code = ? AND state = 'pending' AND expires > ?",
            (code, self.clock()),
        ).fetchone()
        if row is None:
            return None
        return PendingCode(format_user_code(row[0]), row[1], row[2], row[3], row[4], row[5])

    async def decide(
        self,
        user_code: str,
        account: Account,
        *,
        approve: bool,
        source_ip: str,
        request_id: str = "",
    ) -> bool:
        """Approve or deny a pending code as ``account``; False if it is no longer pending."""
        code = normalize_user_code(user_code)
        now = self.clock()
        with transaction(self._conn):
            changed = self._conn.execute(
                "UPDATE device_codes SET state = ?, account_id = ?, decided = ?"
                " WHERE user_code = ? AND state = 'pending' AND expires > ?",
                ("approved" if approve else "denied", account.id, now, code, now),
            ).rowcount
        action = "device:approve" if approve else "device:deny"
        await self._audit(
            request_id,
            account.identity(),
            action,
            changed == 1,
            "signed-in-user" if changed == 1 else "code_not_pending",
            source_ip,
            user_code=format_user_code(code) if len(code) == USER_CODE_LENGTH else "?",
        )
        return changed == 1

    # -- refresh credentials ---------------------------------------------------------------

    def _new_refresh(self, account: Account, *, family: str, now: float) -> tuple[str, str, float]:
        """A new credential of ``family``: its id, the token the client gets, its expiry."""
        credential_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        expires = now + self.settings.refresh_ttl
        self._conn.execute(
            "INSERT INTO refresh_credentials (id, family, account_id, secret_hash, created,"
            " expires) VALUES (?, ?, ?, ?, ?, ?)",
            (credential_id, family, account.id, _refresh_hash(credential_id, secret), now, expires),
        )
        return credential_id, f"{REFRESH_PREFIX}{credential_id}_{secret}", expires

    def redeem(self, token: str) -> Refreshed:
        """Redeem a refresh credential: the identity and the family's next credential.

        Raises :class:`RefreshRejected` (``reason`` for the audit line the exchange writes);
        a replayed credential revokes its whole family before the refusal, unless it is a
        first retry within the reuse grace (see the module docstring).
        """
        match = _REFRESH_RE.fullmatch(token.strip())
        if match is None:
            raise RefreshRejected("not a refresh credential", reason="malformed")
        credential_id, secret = match.groups()
        now = self.clock()
        with transaction(self._conn, durable=True):
            row = self._conn.execute(
                "SELECT family, account_id, secret_hash, expires, used_at, revoked_at,"
                " successor, grace_used_at FROM refresh_credentials WHERE id = ?",
                (credential_id,),
            ).fetchone()
            if row is None or not hmac.compare_digest(
                bytes(row[2]), _refresh_hash(credential_id, secret)
            ):
                raise RefreshRejected(
                    "refresh credential not known; log in again", reason="unknown"
                )
            family, account_id, _, expires, used_at, revoked_at, successor, grace_used_at = row
            if revoked_at is not None:
                raise RefreshRejected(
                    "this login was revoked; run `nixd login` again", reason="revoked"
                )
            retry = (
                used_at is not None
                and grace_used_at is None
                and now - used_at < self.settings.refresh_reuse_grace
                and self._successor_unused(successor, now)
            )
            if used_at is not None and not retry:
                # Reuse: two parties hold this credential. Revoke the family, commit that,
                # and only then refuse (raising inside the block would roll it back).
                self._conn.execute(
                    "UPDATE refresh_credentials SET revoked_at = ? WHERE family = ?"
                    " AND revoked_at IS NULL",
                    (now, family),
                )
                log.warning(
                    "refresh credential %s replayed: family %s revoked", credential_id, family
                )
                outcome: Refreshed | RefreshRejected = RefreshRejected(
                    "this refresh credential was already used (a copy of it is in other hands);"
                    " the login was revoked, run `nixd login` again",
                    reason="replayed_family_revoked",
                )
            elif now >= expires:
                raise RefreshRejected(
                    "the login expired (unused for too long); run `nixd login` again",
                    reason="expired",
                )
            else:
                account = self.accounts.by_id(int(account_id))
                if account is None or account.disabled_at is not None:
                    raise RefreshRejected(
                        "the account is disabled or gone", reason="account_disabled"
                    )
                if retry:
                    # The answer to the first use was lost: retire the successor nobody
                    # presented (a later presentation of it is reuse) and spend the retry.
                    self._conn.execute(
                        "UPDATE refresh_credentials SET used_at = ? WHERE id = ?", (now, successor)
                    )
                    log.info(
                        "refresh credential %s retried within the reuse grace; %s retired",
                        credential_id,
                        successor,
                    )
                new_id, new, new_expires = self._new_refresh(account, family=family, now=now)
                self._conn.execute(
                    "UPDATE refresh_credentials SET used_at = ?, successor = ?,"
                    " grace_used_at = ? WHERE id = ?",
                    (
                        used_at if retry else now,
                        new_id,
                        now if retry else None,
                        credential_id,
                    ),
                )
                outcome = Refreshed(account.identity(), new, new_expires, grace=retry)
        if isinstance(outcome, RefreshRejected):
            raise outcome
        return outcome

    def _successor_unused(self, successor: str | None, now: float) -> bool:
        """Whether the credential a rotation issued is still unused, live and unexpired."""
        if successor is None:
            return False
        row = self._conn.execute(
            "SELECT 1 FROM refresh_credentials WHERE id = ? AND used_at IS NULL"
            " AND revoked_at IS NULL AND expires > ?",
            (successor, now),
        ).fetchone()
        return row is not None

    def revoke_user(self, account: Account) -> int:
        """Revoke every refresh credential of ``account``; how many were live."""
        return revoke_refresh(self._conn, account, now=self.clock())

    # -- bounds and guesses ----------------------------------------------------------------

    def _over_bounds(self, source: str, now: float) -> tuple[str, int, float] | None:
        """``(rule, limit, wait)`` if ``source``, or the server, has too many pending codes.

        Anyone may start a login, so pending codes are anonymous state: bounded per source
        address (IPv6: per /64) and in all. ``wait`` is until the oldest of them expires.
        Called inside the transaction that inserts the code, so workers cannot overshoot.
        """
        per_source = self._conn.execute(
            "SELECT COUNT(*), MIN(expires) FROM device_codes"
            " WHERE state = 'pending' AND expires > ? AND source_key = ?",
            (now, source),
        ).fetchone()
        in_all = self._conn.execute(
            "SELECT COUNT(*), MIN(expires) FROM device_codes"
            " WHERE state = 'pending' AND expires > ?",
            (now,),
        ).fetchone()
        for (count, oldest), limit, rule in (
            (per_source, self.settings.codes_per_source, "source"),
            (in_all, self.settings.max_pending_codes, "server"),
        ):
            if int(count) >= limit:
                return rule, limit, float(oldest) - now
        return None

    async def wrong_guess(self, now: float, request_id: str, source_ip: str) -> None:
        """A wrong user code was entered: every waiting code counts it; too many kill it.

        A code dies (its expiry is set to now) once ``code_max_wrong_guesses`` wrong codes
        were entered while it waited, so no code can be guessed with more than that many
        tries however many sessions or accounts take part. Each death is audited.
        """
        limit = self.settings.code_max_wrong_guesses
        with transaction(self._conn):
            self._conn.execute(
                "UPDATE device_codes SET guesses = guesses + 1"
                " WHERE state = 'pending' AND expires > ?",
                (now,),
            )
            dead = [
                str(row[0])
                for row in self._conn.execute(
                    "SELECT user_code FROM device_codes WHERE state = 'pending' AND expires > ?"
                    " AND guesses >= ?",
                    (now, limit),
                )
            ]
            if dead:
                self._conn.execute(
                    "UPDATE device_codes SET expires = ? WHERE state = 'pending'"
                    " AND expires > ? AND guesses >= ?",
                    (now, now, limit),
                )
        for code in dead:
            log.warning(
                "user code %s withdrawn after %d wrong codes", format_user_code(code), limit
            )
            await self._audit(
                request_id,
                anonymous(),
                "device:withdraw",
                False,
                "too_many_wrong_guesses",
                source_ip,
                user_code=format_user_code(code),
            )

    # -- helpers ---------------------------------------------------------------------------

    def _expire_old(self, now: float) -> None:
        """Forget device codes a day past their expiry (they only matter for polling)."""
        with transaction(self._conn):
            self._conn.execute("DELETE FROM device_codes WHERE expires < ?", (now - 86400,))

    async def _audit(  # noqa: PLR0917 - the fields of one audit line
        self,
        request_id: str,
        identity: Identity,
        action: str,
        allowed: bool,
        rule: str,
        source_ip: str,
        **extra: Any,
    ) -> None:
        await self.audit.arecord(
            {
                "request_id": request_id,
                "identity": identity.render(),
                "action": action,
                "resource": "device",
                "decision": "allow" if allowed else "deny",
                "rule": rule,
                "source": source_ip,
                **extra,
            }
        )


_ROTATED: ContextVar[Refreshed | None] = ContextVar("nixd_refresh_rotated", default=None)


class RefreshExchanger:
    """Exchange kind ``refresh``: ``{"kind": "refresh", "token": <refresh credential>}``.

    :meth:`identify` redeems the credential; the next one of its family must reach the
    client in the same answer, which the exchange asks for with :meth:`answer_fields`
    right after issuing the access token. The rotated credential is handed over through a
    context variable, which belongs to the request's own task, so concurrent exchanges
    never see each other's.
    """

    kind = "refresh"

    def __init__(self, device: DeviceService) -> None:
        self.device = device

    async def identify(self, body: Mapping[str, Any], source_ip: str | None) -> Identity:
        _ROTATED.set(None)
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ExchangeRejected(
                '"token" must be a non-empty string', code="invalid_request", status=400
            )
        try:
            result = self.device.redeem(token)
        except RefreshRejected as exc:
            raise ExchangeRejected(str(exc), code=exc.code, reason=exc.reason) from exc
        if result.grace:
            # The exchange audits the success as usual; this line says it was a retry.
            await self.device._audit(
                "",
                result.identity,
                "device:refresh",
                True,
                "refresh_reuse_grace",
                source_ip or "",
                reason="retry_within_reuse_grace",
            )
        _ROTATED.set(result)
        return result.identity

    def answer_fields(self) -> dict[str, Any]:
        """``refresh_token`` (and its expiry) for the answer of this task's exchange."""
        result = _ROTATED.get()
        _ROTATED.set(None)
        if result is None:
            return {}
        return {
            "refresh_token": result.refresh_token,
            "refresh_expires_at": int(result.refresh_expires),
        }


def revoke_refresh(conn: Connection, account: Account, *, now: float | None = None) -> int:
    """Revoke every live refresh credential of ``account`` (``nixd-server user logout``)."""
    ensure_schema(conn, component="device", migrations=MIGRATIONS)
    with transaction(conn, durable=True):
        count = conn.execute(
            "UPDATE refresh_credentials SET revoked_at = ? WHERE revoked_at IS NULL"
            " AND account_id = ?",
            (time.time() if now is None else now, account.id),
        ).rowcount
    return int(count)


async def read_form(scope: Scope, receive: Receive) -> dict[str, str]:
    """A small request body as a flat dict of strings: form-encoded (RFC 6749) or JSON.

    Bounded by :mod:`nixd.server.bodies`; anything else (too big, too deep, not an object,
    a value that is not a string) is a BadRequest, which :meth:`DeviceService.handle_api`
    audits and answers 400 ``invalid_request``.
    """
    body = await read_body(receive, limit=MAX_FORM)
    content_type = b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.split(b";")[0].strip().lower()
    if content_type == b"application/json":
        return string_fields(json_object(body, max_bytes=MAX_FORM)) if body.strip() else {}
    return form_fields(body, what="the request body")


async def _oauth(
    send: Send, status: int, payload: Mapping[str, Any], *, headers: Mapping[str, str] | None = None
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"cache-control", b"no-store"),
                (b"pragma", b"no-cache"),
                (b"content-length", str(len(body)).encode()),
                *((k.encode(), v.encode()) for k, v in (headers or {}).items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
