"""API credentials: creation shown once, hashed storage, authentication and its refusals."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixd.errors import AuthError, ConfigError
from nixd.server.access.credentials import (
    CredentialNotFound,
    CredentialStore,
    ExpiredCredential,
    MalformedCredential,
    RevokedCredential,
    UnknownCredential,
)
from nixd.server.access.identity import Identity
from nixd.server.storage import db
from nixd.server.storage.sql import WRITE_LOCK


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


BOTH_BACKENDS = True


@pytest.fixture
def conn(database: str | Path) -> Iterator[db.Connection]:
    conn = db.open_db(database)
    db.create_org(conn, "acme")
    db.create_org(conn, "other")
    yield conn
    conn.close()


@pytest.fixture
def store(conn: db.Connection, clock: Clock) -> CredentialStore:
    return CredentialStore(conn, clock=clock)


def test_create_and_authenticate(store: CredentialStore, clock: Clock) -> None:
    record, token = store.create("acme", "ci-bot", attributes={"team": "infra"})
    assert token.startswith(f"nixd_{record.id}_")
    assert len(token) == len("nixd_") + 16 + 1 + 43
    identity = store.authenticate(token)
    assert identity == Identity(
        kind="token",
        subject="acme/ci-bot",
        attributes={"team": "infra", "org": "acme", "name": "ci-bot", "credential": record.id},
    )
    assert identity.render() == "token:acme/ci-bot"
    assert store.authenticate(f"  {token}\n") == identity  # a token file's newline is fine
    listed = store.get(record.id)
    assert listed is not None and listed.last_used == clock.now
    assert listed.state(clock.now) == "active"
    assert listed.redacted == f"nixd_{record.id}_…"
    assert token not in repr(listed)


def test_last_used_is_written_at_most_once_a_minute(store: CredentialStore, clock: Clock) -> None:
    record, token = store.create("acme", "ci-bot")
    assert record.last_used is None
    first = clock.now
    store.authenticate(token)
    clock.now += 30
    store.authenticate(token)
    found = store.get(record.id)
    assert found is not None and found.last_used == first
    clock.now += 31
    store.authenticate(token)
    found = store.get(record.id)
    assert found is not None and found.last_used == clock.now


def test_plaintext_never_reaches_the_database(
    store: CredentialStore, conn: db.Connection, tmp_path: Path
) -> None:
    record, token = store.create("acme", "ci-bot")
    secret = token[len(f"nixd_{record.id}_") :]  # the secret may itself contain "_"
    assert len(secret) == 43
    (stored,) = conn.execute("SELECT secret_hash FROM credentials").fetchone()
    assert len(stored) == 32
    assert stored not in (token.encode(), secret.encode())
    if not isinstance(conn, sqlite3.Connection):
        return  # PostgreSQL's files are its server's; the column holds only the hash
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        assert secret.encode() not in data, path
        assert token.encode() not in data, path
    assert record.id.encode() in (tmp_path / "server.db").read_bytes()  # the id is public


def test_malformed_tokens(store: CredentialStore) -> None:
    _, token = store.create("acme", "ci-bot")
    for bad in ["", "nixd_", "hello", token[:-1], token + "x", token.replace("nixd_", "nixe_")]:
        with pytest.raises(MalformedCredential) as info:
            store.authenticate(bad)
        assert info.value.code == "malformed_credential"
        assert isinstance(info.value, AuthError)
        if len(bad) > 10:
            assert bad not in str(info.value)  # never echo what might be a secret


def test_unknown_id_and_wrong_secret_look_the_same(store: CredentialStore) -> None:
    record, token = store.create("acme", "ci-bot")
    other_id = "0" * 16 if record.id != "0" * 16 else "1" * 16
    with pytest.raises(UnknownCredential) as unknown:
        store.authenticate(token.replace(record.id, other_id))
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(UnknownCredential) as wrong:
        store.authenticate(flipped)
    assert unknown.value.code == wrong.value.code == "unknown_credential"
    assert str(wrong.value) == f"API token nixd_{record.id}_… is not known"
    assert wrong.value.credential_id == record.id
    assert unknown.value.reason != wrong.value.reason  # the audit log can tell them apart
    assert flipped not in str(wrong.value) and flipped not in wrong.value.reason


def test_revoke(store: CredentialStore, clock: Clock) -> None:
    record, token = store.create("acme", "ci-bot")
    revoked = store.revoke(record.id)
    assert revoked.revoked_at == clock.now and revoked.state(clock.now) == "revoked"
    with pytest.raises(RevokedCredential, match="was revoked") as info:
        store.authenticate(token)
    assert info.value.code == "revoked_credential" and info.value.credential_id == record.id
    clock.now += 10
    assert store.revoke(record.id).revoked_at == revoked.revoked_at  # idempotent
    with pytest.raises(CredentialNotFound):
        store.revoke("f" * 16)
    # The name is free again once revoked (rotation: revoke, then create anew).
    new, new_token = store.create("acme", "ci-bot")
    assert store.authenticate(new_token).attributes["credential"] == new.id
    found = store.find("acme", "ci-bot")
    assert found is not None and found.id == new.id and found.last_used is not None


def test_revocation_is_seen_by_another_connection(
    store: CredentialStore, database: str | Path, clock: Clock
) -> None:
    record, token = store.create("acme", "ci-bot")
    server = db.open_db(database)
    try:
        server_store = CredentialStore(server, clock=clock)
        server_store.authenticate(token)
        store.revoke(record.id)
        with pytest.raises(RevokedCredential):
            server_store.authenticate(token)
    finally:
        server.close()


def test_expiry(store: CredentialStore, clock: Clock) -> None:
    record, token = store.create("acme", "short", expires_in=60)
    assert record.expires == clock.now + 60
    clock.now += 59
    store.authenticate(token)
    clock.now += 1
    with pytest.raises(ExpiredCredential, match="has expired") as info:
        store.authenticate(token)
    assert info.value.code == "expired_credential"
    stored = store.get(record.id)
    assert stored is not None and stored.state(clock.now) == "expired"
    with pytest.raises(ConfigError, match="must be in the future"):
        store.create("acme", "never", expires_in=0)


def test_create_validation(store: CredentialStore) -> None:
    store.create("acme", "ci-bot")
    with pytest.raises(ConfigError, match="already has a live credential named 'ci-bot'"):
        store.create("acme", "ci-bot")
    store.create("other", "ci-bot")  # names are per organization
    with pytest.raises(ConfigError, match="organization 'nope' does not exist"):
        store.create("nope", "ci-bot")
    with pytest.raises(ConfigError, match="'org' is set by the server"):
        store.create("acme", "x", attributes={"org": "other"})
    with pytest.raises(ConfigError, match="must be a string or a list of strings"):
        store.create("acme", "x", attributes={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="invalid credential name"):
        store.create("acme", "a b")
    _, token = store.create("acme", "grouped", attributes={"groups": ["a", "b"]})
    assert store.authenticate(token).attributes["groups"] == ["a", "b"]


def test_list(store: CredentialStore, clock: Clock) -> None:
    a, _ = store.create("acme", "a")
    clock.now += 1
    b, _ = store.create("acme", "b")
    clock.now += 1
    c, _ = store.create("other", "c")
    store.revoke(b.id)
    assert [r.id for r in store.list()] == [a.id, b.id, c.id]
    assert [r.id for r in store.list("acme")] == [a.id, b.id]
    assert [r.id for r in store.list("acme", include_revoked=False)] == [a.id]


def test_busy_database_does_not_refuse_a_valid_token(
    store: CredentialStore, conn: db.Connection, database: str | Path
) -> None:
    record, token = store.create("acme", "ci-bot")
    if not isinstance(conn, sqlite3.Connection):
        import psycopg  # noqa: PLC0415

        # Another instance holds the write lock: the last_used update waits for
        # LOCK_TIMEOUT_MS, gives up, and the token is still accepted.
        with psycopg.connect(str(database), autocommit=True) as writer:
            writer.execute(f"SELECT pg_advisory_lock({WRITE_LOCK})")
            assert store.authenticate(token).subject == "acme/ci-bot"
        found = store.get(record.id)
        assert found is not None and found.last_used is None
        return
    conn.execute("PRAGMA busy_timeout = 50")
    writer = db.open_db(database)
    assert isinstance(writer, sqlite3.Connection)
    try:
        writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        assert store.authenticate(token).subject == "acme/ci-bot"
        writer.rollback()
    finally:
        writer.close()
    found = store.get(record.id)
    assert found is not None and found.last_used is None
