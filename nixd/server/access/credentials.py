"""Long-lived API credentials: created by an admin, shown once, stored hashed, revocable.

An API token looks like ``nixd_<id>_<secret>``: ``id`` is 16 public hex digits naming the
row (lookup is one primary-key read, and the id can be logged and shown in listings);
``secret`` is 32 random bytes, URL-safe base64. The database keeps only
``sha256("nixd-credential-v1" NUL id NUL secret)``, compared in constant time.

No password KDF (bcrypt, scrypt, argon2) is needed: a KDF slows down guessing of
low-entropy, human-chosen passwords, but a 256-bit uniformly random secret cannot be
guessed at any rate, so a stolen hash is as useless as a stolen preimage-resistant digest
can be. A deliberately slow hash would only give anyone able to send requests a cheap way
to burn the server's CPU.

A credential is never used on requests directly for long: ``POST /api/v1/token/exchange``
turns it into a short-lived access token (:mod:`nixd.server.access.tokens`), so revoking a
credential stops its next exchange, and access tokens already issued die within their
lifetime. :meth:`CredentialStore.authenticate` says precisely why a credential was refused
(``code`` on the exception, for the JSON error and the audit log); a wrong secret for a
known id is reported to the client like an unknown id, and revocation or expiry is only
revealed to a caller that proved it holds the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from nixd.errors import AuthError, ConfigError
from nixd.server.access.deploy import ATTRIBUTE as DEPLOY_ATTRIBUTE
from nixd.server.access.deploy import check_grants
from nixd.server.access.identity import AttributeValue, Identity
from nixd.server.errors import ServerError
from nixd.server.storage.db import Connection, check_name, get_org, transaction

log = logging.getLogger(__name__)

TOKEN_PREFIX = "nixd_"  # noqa: S105 (a prefix, not a secret)
KIND = "token"
RESERVED_ATTRIBUTES = frozenset({"org", "credential"})
"""Attributes every token identity carries, set by the server, never by the creator."""

LAST_USED_GRANULARITY = 60.0
"""``last_used`` is written at most once a minute per credential, so a busy client does not
turn every authentication into a database write."""

_TOKEN_RE = re.compile(r"nixd_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_HASH_DOMAIN = b"nixd-credential-v1\0"
_ATTRIBUTE_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class CredentialRejected(ServerError, AuthError):
    """An API credential was refused.

    ``code`` is a stable slug for the JSON error body and the audit log; ``str(exc)`` is
    safe to show the client; ``reason`` may say more and is for the server's log only.
    """

    status = 401
    code = "invalid_credential"

    def __init__(
        self, message: str, *, credential_id: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.credential_id = credential_id
        self.reason = reason or message


class MalformedCredential(CredentialRejected):
    code = "malformed_credential"


class UnknownCredential(CredentialRejected):
    code = "unknown_credential"


class RevokedCredential(CredentialRejected):
    code = "revoked_credential"


class ExpiredCredential(CredentialRejected):
    code = "expired_credential"


class CredentialNotFound(ServerError, LookupError):
    """An admin operation named a credential that does not exist."""

    status = 404
    code = "credential_not_found"


@dataclass(frozen=True, slots=True)
class Credential:
    """A stored credential, as listings show it; it never carries the secret or its hash."""

    id: str
    org: str
    name: str
    kind: str
    attributes: Mapping[str, AttributeValue]
    created: float
    expires: float | None
    revoked_at: float | None
    last_used: float | None

    def state(self, now: float) -> str:
        """``"active"``, ``"revoked"`` or ``"expired"`` at time ``now``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    @property
    def redacted(self) -> str:
        """The token with its secret elided, for listings and logs."""
        return f"{TOKEN_PREFIX}{self.id}_…"


def _hash_secret(credential_id: str, secret: str) -> bytes:
    return hashlib.sha256(_HASH_DOMAIN + credential_id.encode() + b"\0" + secret.encode()).digest()


def _check_attributes(attributes: Mapping[str, AttributeValue]) -> dict[str, AttributeValue]:
    checked: dict[str, AttributeValue] = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not _ATTRIBUTE_KEY_RE.fullmatch(key):
            raise ConfigError(f"invalid credential attribute name {key!r}")
        if key in RESERVED_ATTRIBUTES:
            raise ConfigError(f"credential attribute {key!r} is set by the server")
        if isinstance(value, str):
            checked[key] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            checked[key] = list(value)
        else:
            raise ConfigError(
                f"credential attribute {key!r} must be a string or a list of strings, not {value!r}"
            )
    return checked


_SELECT = (
    "SELECT c.id, o.name, c.name, c.kind, c.attributes, c.created, c.expires, "
    "c.revoked_at, c.last_used FROM credentials c JOIN orgs o ON o.id = c.org_id"
)


def _row(row: tuple[object, ...]) -> Credential:
    attributes = json.loads(str(row[4]))
    return Credential(
        id=str(row[0]),
        org=str(row[1]),
        name=str(row[2]),
        kind=str(row[3]),
        attributes=MappingProxyType(dict(attributes)),
        created=float(row[5]),  # type: ignore[arg-type]
        expires=None if row[6] is None else float(row[6]),  # type: ignore[arg-type]
        revoked_at=None if row[7] is None else float(row[7]),  # type: ignore[arg-type]
        last_used=None if row[8] is None else float(row[8]),  # type: ignore[arg-type]
    )


class CredentialStore:
    """API credentials in the server database.

    Methods are synchronous and short; the async server calls them through
    ``trio.to_thread.run_sync`` with the connection's lock held (see :mod:`nixd.server.storage.db`).
    ``clock`` returns Unix seconds; tests pass a fake one.
    """

    def __init__(self, conn: Connection, *, clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._clock = clock

    def create(
        self,
        org: str,
        name: str,
        *,
        attributes: Mapping[str, AttributeValue] | None = None,
        expires_in: float | None = None,
    ) -> tuple[Credential, str]:
        """Create a credential; return its record and the plaintext token (shown once).

        ``expires_in`` is seconds from now (``None``: never expires). ConfigError if the
        org does not exist, the name is invalid or already held by a live credential of
        the org, or an attribute is reserved.
        """
        check_name("credential", name)
        attrs = _check_attributes(attributes or {})
        if DEPLOY_ATTRIBUTE in attrs:
            # A deploy-only token (nixd.server.access.deploy): its grants are checked and
            # normalized here, however they were given (--deploy or --attr deploy=...).
            attrs[DEPLOY_ATTRIBUTE] = check_grants(attrs[DEPLOY_ATTRIBUTE], org)
        if expires_in is not None and expires_in <= 0:
            raise ConfigError(f"credential expiry must be in the future, got {expires_in} s")
        now = self._clock()
        expires = None if expires_in is None else now + expires_in
        credential_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        try:
            with transaction(self._conn, durable=True):
                found = get_org(self._conn, org)
                if found is None:
                    raise ConfigError(f"organization {org!r} does not exist")
                self._conn.execute(
                    "INSERT INTO credentials (id, org_id, name, kind, secret_hash, attributes,"
                    " created, expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        credential_id,
                        found.id,
                        name,
                        KIND,
                        _hash_secret(credential_id, secret),
                        json.dumps(attrs, sort_keys=True),
                        now,
                        expires,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise ConfigError(
                f"organization {org!r} already has a live credential named {name!r}; "
                "revoke it first"
            ) from exc
        log.info("created credential %s (%s/%s)", credential_id, org, name)
        record = Credential(
            credential_id, org, name, KIND, MappingProxyType(attrs), now, expires, None, None
        )
        return record, f"{TOKEN_PREFIX}{credential_id}_{secret}"

    def get(self, credential_id: str) -> Credential | None:
        row = self._conn.execute(f"{_SELECT} WHERE c.id = ?", (credential_id,)).fetchone()
        return _row(row) if row else None

    def find(self, org: str, name: str) -> Credential | None:
        """The live (unrevoked) credential of ``org`` called ``name``."""
        row = self._conn.execute(
            f"{_SELECT} WHERE o.name = ? AND c.name = ? AND c.revoked_at IS NULL", (org, name)
        ).fetchone()
        return _row(row) if row else None

    def list(self, org: str | None = None, *, include_revoked: bool = True) -> list[Credential]:
        """Credentials, oldest first, optionally of one org and without revoked ones."""
        where: list[str] = []
        args: list[object] = []
        if org is not None:
            where.append("o.name = ?")
            args.append(org)
        if not include_revoked:
            where.append("c.revoked_at IS NULL")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._conn.execute(f"{_SELECT}{clause} ORDER BY c.created, c.id", args)
        return [_row(r) for r in rows.fetchall()]

    def revoke(self, credential_id: str) -> Credential:
        """Revoke a credential (idempotent: an earlier revocation time is kept).

        Written durably (WAL fsynced) before returning: an acknowledged revocation
        survives a power cut.
        """
        with transaction(self._conn, durable=True):
            self._conn.execute(
                "UPDATE credentials SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self._clock(), credential_id),
            )
            record = self.get(credential_id)
        if record is None:
            raise CredentialNotFound(f"no credential with id {credential_id!r}")
        log.info("revoked credential %s (%s/%s)", record.id, record.org, record.name)
        return record

    def authenticate(self, token: str) -> Identity:
        """The identity of an API token, or a :class:`CredentialRejected` saying why not.

        The identity is ``token:<name>`` with attributes ``org``, ``credential`` (the id)
        and the ones given at creation.
        """
        match = _TOKEN_RE.fullmatch(token.strip())
        if match is None:
            raise MalformedCredential(
                "not an API token (expected nixd_<id>_<secret>)",
                reason="token does not have the nixd_<16 hex>_<43 base64url> form",
            )
        credential_id, secret = match.group(1), match.group(2)
        row = self._conn.execute(
            f"{_SELECT.replace('SELECT ', 'SELECT c.secret_hash, ', 1)} WHERE c.id = ?",
            (credential_id,),
        ).fetchone()
        unknown = f"API token {TOKEN_PREFIX}{credential_id}_… is not known"
        if row is None:
            raise UnknownCredential(
                unknown, credential_id=credential_id, reason="no credential with this id"
            )
        if not hmac.compare_digest(bytes(row[0]), _hash_secret(credential_id, secret)):
            raise UnknownCredential(
                unknown,
                credential_id=credential_id,
                reason="secret does not match the credential with this id",
            )
        record = _row(row[1:])
        now = self._clock()
        if record.revoked_at is not None:
            raise RevokedCredential(
                f"API token {record.redacted} ({record.org}/{record.name}) was revoked",
                credential_id=credential_id,
            )
        if record.expires is not None and now >= record.expires:
            raise ExpiredCredential(
                f"API token {record.redacted} ({record.org}/{record.name}) has expired",
                credential_id=credential_id,
            )
        if record.last_used is None or now - record.last_used >= LAST_USED_GRANULARITY:
            # Bookkeeping only: a database busy past its timeout must not refuse the caller.
            try:
                with transaction(self._conn):
                    self._conn.execute(
                        "UPDATE credentials SET last_used = ? WHERE id = ?", (now, credential_id)
                    )
            except sqlite3.OperationalError as exc:
                log.warning("could not record last use of credential %s: %s", credential_id, exc)
        attributes = {
            **record.attributes,
            "org": record.org,
            "name": record.name,
            "credential": record.id,
        }
        # Scoped to the org: acme's token "ci" and another org's "ci" are different callers.
        return Identity(
            kind=record.kind, subject=f"{record.org}/{record.name}", attributes=attributes
        )

    def revoked_ids(self) -> set[str]:
        """Ids of every revoked credential (tokens derived from them are refused at once)."""
        rows = self._conn.execute("SELECT id FROM credentials WHERE revoked_at IS NOT NULL")
        return {str(r[0]) for r in rows}
