"""The cache server's keys: narinfo signing keys and access-token (JWT) signing keys.

On a single box (SQLite metadata) both live in ``STATE_DIR/keys/`` (mode 0700) as one
JSON file per keyring (mode 0600), replaced atomically (temp file, fsync, rename, fsync of
the directory): a crash leaves the old or the new keyring, never a half-written one, and a
rotation is a single rename. Mutations (rotate, prune) run under an ``flock`` on
``keys/.lock`` and re-read the file first, so a ``nixd-server`` admin command and the
running server never lose each other's change; the server picks up a change with
:meth:`Keyring.refresh` (one ``stat``).

With the metadata on PostgreSQL (several instances, several hosts) the same JSON document
is a row of the ``keyrings`` table instead (:class:`KeyTable`), so a rotation on any host
reaches every instance: it commits in the database, every instance notices the commit on
its next request (the NOTIFY every commit sends) and re-reads the row, as it would re-read
a replaced file. Mutations run in one write transaction (the advisory write lock) and
re-read the row first. The first time an instance or command opens the keys of a state
directory whose database has none yet, the files of ``keys/`` are copied into the table
(that is how a single box moves to PostgreSQL, with ``migrate --copy-from``); from then on
the database's copy is the one used, and the files may be removed. Why the database
rather than a shared directory: the hosts already share it, its access is already what
guards the credentials, and a rotation must reach every instance at once (attic keeps
its caches' keypairs as rows too). Whoever can read the database can read the private
keys, as whoever can read ``keys/`` can on a single box.

Each keyring has exactly one *current* key and any number of *retired* ones, each retired
key kept until a deadline (``until``) after which it is ignored and pruned:

``narinfo.json`` — Nix binary-cache keys (``name:base64``, as ``nix key generate-secret``).
    The current key signs narinfos. During the grace period after a rotation a retired
    key is still *published* (``GET /api/v1/cache/keys``) and its secret is kept so the
    server can *co-sign* with it (:meth:`NarinfoKeys.signing_keys`): clients that pinned
    only the old key keep verifying until they re-pin, and narinfos they cached under the
    old key stay verifiable. A rotated key is given a new name (Nix matches signatures to
    trusted keys by name). For a compromised key rotate with ``grace=0``: it is dropped at
    once.

``jwt.json`` — Ed25519 keys for access tokens, each with a ``kid`` (the RFC 7638 JWK
    thumbprint). The current key signs; a retired key's private half is destroyed at
    rotation (nothing old is ever signed again) while its public half stays in the JWKS
    and verifies tokens until ``until``, which must be at least the access-token lifetime
    plus leeway so every token it signed can expire naturally.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from nixd.errors import ConfigError, FormatError
from nixd.nix.signing import PublicKey, SecretKey
from nixd.server.storage.db import Connection, ensure_schema, is_sqlite, transaction

log = logging.getLogger(__name__)

KEYS_DIR = "keys"
NARINFO_KEYS_FILE = "narinfo.json"
JWT_KEYS_FILE = "jwt.json"
FORMAT_VERSION = 1

DEFAULT_NARINFO_GRACE = 30 * 86400.0
"""How long a rotated narinfo key is still published and co-signs: time for clients to re-pin."""

DEFAULT_JWT_RETAIN = 86400.0
"""How long a rotated token key still verifies; must exceed the access-token lifetime."""

_KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

MIGRATIONS = [
    # 1: a keyring's JSON document (the file format), with a version bumped on each write
    """
    CREATE TABLE keyrings (
        name TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        version INTEGER NOT NULL
    );
    """,
]
"""The ``keys`` component's schema; used only when the metadata is on PostgreSQL."""

MAX_KEYRING_BYTES = 1 << 20
"""A keyring document bigger than this is refused (a few keys are a few KiB)."""


class KeyTable:
    """One keyring kept as a row of ``keyrings`` in the metadata database (PostgreSQL)."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.where = f"the database's {name} keyring"

    def read(self) -> bytes | None:
        row = self.conn.execute("SELECT body FROM keyrings WHERE name = ?", (self.name,)).fetchone()
        return None if row is None else str(row[0]).encode()

    def version(self) -> int | None:
        row = self.conn.execute(
            "SELECT version FROM keyrings WHERE name = ?", (self.name,)
        ).fetchone()
        return None if row is None else int(row[0])

    def write(self, data: bytes, *, create: bool = False) -> None:
        """Store ``data``; inside :meth:`locked`. ``create``: refuse if the row exists."""
        if create:
            if self.version() is not None:
                raise ConfigError(f"{self.where} exists already; rotate instead of re-creating")
            self.conn.execute(
                "INSERT INTO keyrings (name, body, version) VALUES (?, ?, 1)",
                (self.name, data.decode()),
            )
            return
        self.conn.execute(
            "UPDATE keyrings SET body = ?, version = version + 1 WHERE name = ?",
            (data.decode(), self.name),
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One durable write transaction: the change is kept, or none of it."""
        with transaction(self.conn, durable=True):
            yield


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: old or new content survives any crash, never a mix.

    The temp file is created with ``mode`` from the start (never briefly world-readable).
    The server must not import ``nixd.daemon``, hence this small copy (the keyrings and
    ``policy apply`` use it).
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _stat_key(path: Path | str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# --- entries ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NarinfoKeyEntry:
    """One narinfo key; ``secret`` is ``None`` once it is no longer needed."""

    secret: SecretKey | None
    public: PublicKey
    created: float
    retired: float | None = None
    until: float | None = None

    @property
    def name(self) -> str:
        return self.public.name

    def live(self, now: float) -> bool:
        return self.until is None or now < self.until

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "secret": None if self.secret is None else self.secret.render(),
            "public": self.public.render(),
            "created": self.created,
            "retired": self.retired,
            "until": self.until,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Self:
        secret = None if raw.get("secret") is None else SecretKey.parse(raw["secret"])
        public = PublicKey.parse(raw["public"])
        if secret is not None and secret.public().render() != public.render():
            raise FormatError(f"secret and public key of {public.name!r} do not match")
        return cls(secret, public, float(raw["created"]), _opt(raw, "retired"), _opt(raw, "until"))


@dataclass(frozen=True, slots=True)
class JwtKey:
    """One token-signing key; ``private`` is ``None`` once retired."""

    kid: str
    public: Ed25519PublicKey
    private: Ed25519PrivateKey | None
    created: float
    retired: float | None = None
    until: float | None = None

    @classmethod
    def generate(cls, now: float) -> Self:
        private = Ed25519PrivateKey.generate()
        public = private.public_key()
        return cls(jwk_thumbprint(public), public, private, now)

    def live(self, now: float) -> bool:
        return self.until is None or now < self.until

    def jwk(self) -> dict[str, str]:
        """The public JWK (RFC 8037 OKP) of this key."""
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _b64url(self.public.public_bytes(Encoding.Raw, PublicFormat.Raw)),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        }

    def to_json(self) -> dict[str, Any]:
        private = None
        if self.private is not None:
            private = _b64url(
                self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            )
        return {
            "kid": self.kid,
            "public": _b64url(self.public.public_bytes(Encoding.Raw, PublicFormat.Raw)),
            "private": private,
            "created": self.created,
            "retired": self.retired,
            "until": self.until,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Self:
        public = Ed25519PublicKey.from_public_bytes(_unb64url(raw["public"]))
        private = None
        if raw.get("private") is not None:
            private = Ed25519PrivateKey.from_private_bytes(_unb64url(raw["private"]))
            if private.public_key() != public:
                raise FormatError(f"private and public key of kid {raw['kid']!r} do not match")
        kid = str(raw["kid"])
        if kid != jwk_thumbprint(public):
            raise FormatError(f"kid {kid!r} is not the thumbprint of its key")
        return cls(
            kid, public, private, float(raw["created"]), _opt(raw, "retired"), _opt(raw, "until")
        )


def _opt(raw: dict[str, Any], key: str) -> float | None:
    value = raw.get(key)
    return None if value is None else float(value)


def jwk_thumbprint(public: Ed25519PublicKey) -> str:
    """The RFC 7638 thumbprint of an Ed25519 public key: a stable, content-derived ``kid``."""
    x = _b64url(public.public_bytes(Encoding.Raw, PublicFormat.Raw))
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode()).digest())


# --- keyrings ---------------------------------------------------------------------------


E = TypeVar("E", NarinfoKeyEntry, JwtKey)


class Keyring(ABC, Generic[E]):
    """A file of keys with one current key; the shared load/save/lock/refresh machinery."""

    what = "keys"

    def __init__(
        self,
        path: Path,
        entries: list[E],
        *,
        clock: Callable[[], float] = time.time,
        table: KeyTable | None = None,
    ) -> None:
        self.path = path
        self.table = table
        self.where = table.where if table is not None else str(path)
        self._entries: list[E] = entries
        self._clock = clock
        self._stat: object = self._stamp()
        self._check()

    def _stamp(self) -> object:
        """What changes when the keyring is replaced: the file's stat, the row's version."""
        return self.table.version() if self.table is not None else _stat_key(self.path)

    # subclass hooks
    @classmethod
    @abstractmethod
    def _entry_from_json(cls, raw: dict[str, Any]) -> E:
        """Build one entry from its JSON form (each keyring knows its own)."""

    @staticmethod
    def _entry_to_json(entry: E) -> dict[str, Any]:
        return entry.to_json()

    def _check(self) -> None:
        current = [e for e in self._entries if e.retired is None]
        if len(current) != 1:
            raise ConfigError(f"{self.where}: {len(current)} current {self.what}, expected 1")

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> Self:
        """Read a keyring file; ConfigError (saying which file and why) if it is unusable."""
        where = Path(path)
        return cls(where, cls._read(where), clock=clock)

    @classmethod
    def _new(
        cls,
        path: Path,
        entries: list[E],
        *,
        clock: Callable[[], float],
        table: KeyTable | None,
    ) -> Self:
        if table is not None:
            keyring = cls(Path(table.name), entries, clock=clock, table=table)
            with table.locked():
                keyring._write(create=True)
            return keyring
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            raise ConfigError(f"{path}: already exists; rotate instead of re-creating")
        keyring = cls(path, entries, clock=clock)
        keyring._write()
        return keyring

    @classmethod
    def from_table(cls, table: KeyTable, *, clock: Callable[[], float] = time.time) -> Self:
        """The keyring kept in the database; ConfigError if it is missing or unusable."""
        data = table.read()
        if data is None:
            raise ConfigError(f"{table.where}: no {cls.what} (run `nixd-server init`)")
        return cls(Path(table.name), cls._parse(data, table.where), clock=clock, table=table)

    @classmethod
    def _read(cls, path: Path) -> list[E]:
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no {cls.what} file (run `nixd-server init`)") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read {cls.what}: {exc}") from exc
        return cls._parse(data, str(path))

    @classmethod
    def _parse(cls, data: bytes, where: str) -> list[E]:
        if len(data) > MAX_KEYRING_BYTES:
            raise ConfigError(f"{where}: {len(data)} bytes is too big for {cls.what}")
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{where}: cannot read {cls.what}: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{where}: not a version {FORMAT_VERSION} {cls.what} file")
        entries: list[E] = []
        for index, item in enumerate(raw.get("keys", [])):
            try:
                entries.append(cls._entry_from_json(item))
            except (FormatError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{where}: keys[{index}]: {exc}") from exc
        return entries

    def _document(self) -> bytes:
        data = {"version": FORMAT_VERSION, "keys": [self._entry_to_json(e) for e in self._entries]}
        return (json.dumps(data, indent=2) + "\n").encode()

    def _write(self, *, create: bool = False) -> None:
        if self.table is not None:
            self.table.write(self._document(), create=create)
        else:
            write_atomically(self.path, self._document())
        self._stat = self._stamp()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the keyring's lock and work on its latest content."""
        if self.table is not None:
            with self.table.locked():
                data = self.table.read()
                if data is not None:
                    self._entries = self._parse(data, self.table.where)
                yield
                self._stat = self._stamp()
            return
        lock_path = self.path.parent / ".lock"
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.path.exists():
                self._entries = self._read(self.path)
            yield
        finally:
            os.close(fd)

    def refresh(self) -> bool:
        """Reload if the file (the row) was replaced since we read it; True if it was."""
        stat = self._stamp()
        if stat == self._stat:
            return False
        old = self._entries
        if self.table is not None:
            data = self.table.read()
            if data is None:
                raise ConfigError(f"{self.where}: the {self.what} are gone from the database")
            self._entries = self._parse(data, self.where)
        else:
            self._entries = self._read(self.path)
        try:
            self._check()
        except ConfigError:
            self._entries = old  # keep serving with the keys we had
            raise
        self._stat = stat
        log.info("reloaded %s from %s", self.what, self.where)
        return True

    @property
    def entries(self) -> list[E]:
        """All entries, current first, then retired ones newest first (pruned or not)."""
        order = sorted(
            enumerate(self._entries),
            key=lambda ie: (ie[1].retired is not None, -(ie[1].retired or ie[1].created), -ie[0]),
        )
        return [entry for _, entry in order]

    def live_entries(self) -> list[E]:
        now = self._clock()
        return [e for e in self.entries if e.live(now)]

    def _current_entry(self) -> E:
        return next(e for e in self._entries if e.retired is None)

    def _retire_current(self, now: float, keep_for: float) -> None:
        if keep_for < 0:
            raise ConfigError(f"{self.what}: grace period must not be negative, got {keep_for}")
        self._entries = [
            self._retired(e, now, now + keep_for) if e.retired is None else e for e in self._entries
        ]

    def _retired(self, entry: E, now: float, until: float) -> E:
        return replace(entry, retired=now, until=until)

    def prune(self) -> list[E]:
        """Drop retired keys past their deadline from the file; return what was dropped."""
        with self._locked():
            now = self._clock()
            dropped = [e for e in self._entries if not e.live(now)]
            if dropped:
                self._entries = [e for e in self._entries if e.live(now)]
                self._write()
        return dropped


class NarinfoKeys(Keyring[NarinfoKeyEntry]):
    """The narinfo signing keys: one current, retired ones co-signing during their grace."""

    what = "narinfo signing keys"

    @classmethod
    def _entry_from_json(cls, raw: dict[str, Any]) -> NarinfoKeyEntry:
        return NarinfoKeyEntry.from_json(raw)

    def _check(self) -> None:
        super()._check()
        names = [e.name for e in self._entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.where}: two narinfo keys share a name")
        if self._current_entry().secret is None:
            raise ConfigError(f"{self.where}: the current narinfo key has no secret")

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        key: str | SecretKey,
        *,
        clock: Callable[[], float] = time.time,
        table: KeyTable | None = None,
    ) -> Self:
        """Write a new keyring whose current key is ``key`` (a name to generate one under,
        or an existing Nix secret key), in ``table`` if given, else in the file ``path``.
        Refuses to overwrite an existing one."""
        secret = _secret_key(key)
        entries = [NarinfoKeyEntry(secret, secret.public(), clock())]
        return cls._new(Path(path), entries, clock=clock, table=table)

    @property
    def current(self) -> SecretKey:
        secret = self._current_entry().secret
        assert secret is not None  # checked on load
        return secret

    def signing_keys(self) -> list[SecretKey]:
        """Keys to sign a narinfo with: the current one first, then retired ones in grace."""
        return [e.secret for e in self.live_entries() if e.secret is not None]

    def public_keys(self) -> list[PublicKey]:
        """Published public keys: the current one first, then retired ones in grace."""
        return [e.public for e in self.live_entries()]

    def published(self) -> dict[str, Any]:
        """The body of ``GET /api/v1/cache/keys``."""
        return {
            "keys": [k.render() for k in self.public_keys()],
            "current": self.current.public().render(),
        }

    def rotate(
        self, key: str | SecretKey | None = None, *, grace: float = DEFAULT_NARINFO_GRACE
    ) -> SecretKey:
        """Make a new current key; the old one co-signs and is published for ``grace`` s.

        ``key`` is a name for a generated key, an existing secret key, or ``None`` to
        generate one named after the current key with its numeric suffix bumped
        (``cache-1`` → ``cache-2``). ``grace=0`` retires the old key at once (compromise).
        """
        with self._locked():
            now = self._clock()
            names = {e.name for e in self._entries}
            secret = _secret_key(key if key is not None else _next_name(self.current.name, names))
            if secret.public().name in names:
                raise ConfigError(
                    f"a narinfo key named {secret.public().name!r} exists already; "
                    "Nix matches signatures by key name, so pick a new one"
                )
            old = self.current.public().name
            self._retire_current(now, grace)
            self._entries.append(NarinfoKeyEntry(secret, secret.public(), now))
            self._check()
            self._write()
        log.info("rotated narinfo key %s -> %s (grace %.0f s)", old, secret.public().name, grace)
        return secret

    def _retired(self, entry: NarinfoKeyEntry, now: float, until: float) -> NarinfoKeyEntry:
        # With no grace the secret is useless from now on: do not keep it on disk.
        secret = entry.secret if until > now else None
        return replace(entry, secret=secret, retired=now, until=until)


class JwtKeys(Keyring[JwtKey]):
    """The access-token signing keys, published as a JWKS."""

    what = "token signing keys"

    @classmethod
    def _entry_from_json(cls, raw: dict[str, Any]) -> JwtKey:
        return JwtKey.from_json(raw)

    def _check(self) -> None:
        super()._check()
        if self._current_entry().private is None:
            raise ConfigError(f"{self.where}: the current token key has no private key")

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        table: KeyTable | None = None,
    ) -> Self:
        """Write a new keyring with one generated key (in ``table`` if given, else the
        file ``path``). Refuses to overwrite an existing one."""
        return cls._new(Path(path), [JwtKey.generate(clock())], clock=clock, table=table)

    @property
    def current(self) -> JwtKey:
        """The key new tokens are signed with (its ``private`` is set)."""
        return self._current_entry()

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        """The key to verify a token of ``kid``; None if unknown or retired past its deadline."""
        now = self._clock()
        for entry in self._entries:
            if entry.kid == kid and entry.live(now):
                return entry.public
        return None

    def jwks(self) -> dict[str, Any]:
        """The body of ``/.well-known/jwks.json``: current key first, then retired ones."""
        return {"keys": [e.jwk() for e in self.live_entries()]}

    def rotate(self, *, retain_for: float = DEFAULT_JWT_RETAIN) -> JwtKey:
        """Sign with a new key from now on; the old one verifies for ``retain_for`` more s.

        ``retain_for`` must be at least the access-token lifetime plus leeway, or tokens
        issued just before the rotation are rejected early; 0 invalidates them at once.
        """
        with self._locked():
            now = self._clock()
            old = self.current.kid
            self._retire_current(now, retain_for)
            new = JwtKey.generate(now)
            self._entries.append(new)
            self._check()
            self._write()
        log.info("rotated token key %s -> %s (retained %.0f s)", old, new.kid, retain_for)
        return new

    def _retired(self, entry: JwtKey, now: float, until: float) -> JwtKey:
        # A retired key never signs again: destroy its private half now.
        return replace(entry, private=None, retired=now, until=until)


def _secret_key(key: str | SecretKey) -> SecretKey:
    if isinstance(key, SecretKey):
        return key
    if not _KEY_NAME_RE.fullmatch(key):
        raise ConfigError(
            f"invalid narinfo key name {key!r}: use letters, digits, '.', '_' or '-' "
            "(conventionally the cache's host name and a number, e.g. cache.example.org-1)"
        )
    return SecretKey.generate(key)


def _next_name(name: str, taken: set[str]) -> str:
    match = re.fullmatch(r"(.*)-(\d+)", name)
    stem, number = (match.group(1), int(match.group(2))) if match else (name, 1)
    while True:
        number += 1
        candidate = f"{stem}-{number}"
        if candidate not in taken:
            return candidate


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """Both keyrings of a server: files of a state directory, or rows of its database.

    ``conn`` is the metadata database: on PostgreSQL the keyrings are rows (see the
    module docstring), on SQLite (or without one) the files of ``STATE_DIR/keys/``.
    """

    narinfo: NarinfoKeys
    jwt: JwtKeys

    @classmethod
    def init(
        cls,
        state_dir: str | os.PathLike[str],
        narinfo_key: str | SecretKey,
        *,
        clock: Callable[[], float] = time.time,
        conn: Connection | None = None,
    ) -> Self:
        """Create both keyrings: a narinfo key (generated under a name, or given) and a
        token key. ConfigError if either exists (all or nothing)."""
        if conn is not None and not is_sqlite(conn):
            narinfo_table, jwt_table = _tables(conn)
            with transaction(conn, durable=True):
                return cls(
                    NarinfoKeys.create(
                        NARINFO_KEYS_FILE, narinfo_key, clock=clock, table=narinfo_table
                    ),
                    JwtKeys.create(JWT_KEYS_FILE, clock=clock, table=jwt_table),
                )
        directory = Path(state_dir) / KEYS_DIR
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        for name in (NARINFO_KEYS_FILE, JWT_KEYS_FILE):  # all or nothing
            if (directory / name).exists():
                raise ConfigError(f"{directory / name}: already exists; rotate instead")
        narinfo = NarinfoKeys.create(directory / NARINFO_KEYS_FILE, narinfo_key, clock=clock)
        jwt = JwtKeys.create(directory / JWT_KEYS_FILE, clock=clock)
        return cls(narinfo, jwt)

    @classmethod
    def load(
        cls,
        state_dir: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        conn: Connection | None = None,
    ) -> Self:
        directory = Path(state_dir) / KEYS_DIR
        if conn is not None and not is_sqlite(conn):
            narinfo_table, jwt_table = _tables(conn)
            _import_files(
                conn,
                ((narinfo_table, directory / NARINFO_KEYS_FILE, NarinfoKeys),
                 (jwt_table, directory / JWT_KEYS_FILE, JwtKeys)),
            )  # fmt: skip
            return cls(
                NarinfoKeys.from_table(narinfo_table, clock=clock),
                JwtKeys.from_table(jwt_table, clock=clock),
            )
        return cls(
            NarinfoKeys.load(directory / NARINFO_KEYS_FILE, clock=clock),
            JwtKeys.load(directory / JWT_KEYS_FILE, clock=clock),
        )

    def refresh(self) -> bool:
        """Reload whichever keyring changed (file or row); True if any did.

        In the database both versions come from one query: the server asks after every
        commit any instance announces, uploads included.
        """
        table = self.narinfo.table
        if table is not None:
            rows = table.conn.execute("SELECT name, version FROM keyrings").fetchall()
            versions = {str(name): int(version) for name, version in rows}
            if all(
                versions.get(ring.table.name) == ring._stat
                for ring in (self.narinfo, self.jwt)
                if ring.table is not None
            ):
                return False
        narinfo = self.narinfo.refresh()
        jwt = self.jwt.refresh()
        return narinfo or jwt


def _tables(conn: Connection) -> tuple[KeyTable, KeyTable]:
    """The narinfo and token keyrings' rows, the schema made first."""
    ensure_schema(conn, component="keys", migrations=MIGRATIONS)
    return KeyTable(conn, "narinfo"), KeyTable(conn, "jwt")


def _import_files(
    conn: Connection, rings: tuple[tuple[KeyTable, Path, type[Keyring[Any]]], ...]
) -> None:
    """Copy each keyring file into its row, for the rows the database does not have yet.

    Each file is checked as a keyring first (an unusable one is refused with its path,
    and nothing is copied). In one transaction: two instances starting at once on a
    fresh database copy each file once.
    """
    if all(table.version() is not None for table, _, _ in rings):
        return  # the common case: nothing to import, no write lock taken
    with transaction(conn, durable=True):
        for table, path, kind in rings:
            if table.version() is not None or not path.exists():
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read {kind.what}: {exc}") from exc
            kind(path, kind._parse(data, str(path)))  # refuses an unusable file, saying why
            table.write(data, create=True)
            log.warning(
                "copied %s into the database, which holds these keys from now on: "
                "the file is no longer read",
                path,
            )
