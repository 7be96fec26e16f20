"""Nix signing keys: Ed25519 key pairs with a name, and detached signatures.

Nix writes a public key as ``name:base64(32-byte Ed25519 public key)`` and a secret key
as ``name:base64(64 bytes)``, libsodium's layout of the 32-byte seed followed by the
public key (``libstore/crypto.cc``). A signature is ``name:base64(64-byte signature)``;
the name tells a verifier which of its trusted keys to try, so a signature by an
unknown name is simply not a valid one. Ed25519 is deterministic, so the signatures made
here are byte-identical to those of ``nix store sign``.

Secret material never appears in an exception message or a ``repr``: errors about a
secret key name at most the key's name.
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from nixd.errors import FormatError

PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
SECRET_KEY_BYTES = SEED_BYTES + PUBLIC_KEY_BYTES
SIGNATURE_BYTES = 64

# Nix only requires a non-empty name before the first colon; we also refuse whitespace
# and control characters, which would break `trusted-public-keys` (a space-separated list).
_NAME = re.compile(r"[^\s:\x00-\x1f\x7f]+")


def _check_name(name: str, what: str) -> None:
    if not name:
        raise FormatError(f"{what} has no name (expected 'name:base64')")
    if not _NAME.fullmatch(name):
        raise FormatError(f"{what} name {name!r} contains whitespace, a colon or a control byte")


def _split(text: str, what: str) -> tuple[str, str]:
    """Split ``name:data`` without ever echoing ``data``."""
    name, colon, data = text.strip().partition(":")
    if not colon:
        raise FormatError(f"{what} is not in the form 'name:base64' (no colon)")
    _check_name(name, what)
    if not data:
        raise FormatError(f"{what} {name!r} has no key data after the colon")
    return name, data


def _b64decode(data: str) -> bytes | None:
    try:
        return base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class PublicKey:
    """A named Ed25519 public key that checks Nix signatures."""

    __slots__ = ("_key", "key_bytes", "name")

    name: str
    key_bytes: bytes
    _key: Ed25519PublicKey

    def __init__(self, name: str, key_bytes: bytes) -> None:
        _check_name(name, "public key")
        if len(key_bytes) != PUBLIC_KEY_BYTES:
            raise FormatError(
                f"public key {name!r} is {len(key_bytes)} bytes, expected {PUBLIC_KEY_BYTES}"
            )
        self.name = name
        self.key_bytes = bytes(key_bytes)
        self._key = Ed25519PublicKey.from_public_bytes(self.key_bytes)

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Parse ``name:base64(32 bytes)``, as in ``trusted-public-keys``."""
        name, data = _split(text, "public key")
        raw = _b64decode(data)
        if raw is None:
            raise FormatError(f"public key {name!r}: key data is not valid base64")
        return cls(name, raw)

    def render(self) -> str:
        """The ``name:base64`` form that ``nix key convert-secret-to-public`` prints."""
        return f"{self.name}:{_b64(self.key_bytes)}"

    def verify(self, data: bytes, sig: str) -> bool:
        """Whether ``sig`` (``name:base64``) is this key's signature of ``data``.

        A signature by another key name or one that is malformed is not valid: the caller
        asks a set of trusted keys and any of them may be the signer.
        """
        name, colon, body = sig.partition(":")
        if not colon or name != self.name:
            return False
        raw = _b64decode(body)
        if raw is None or len(raw) != SIGNATURE_BYTES:
            return False
        try:
            self._key.verify(raw, data)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return (self.name, self.key_bytes) == (other.name, other.key_bytes)

    def __hash__(self) -> int:
        return hash((self.name, self.key_bytes))

    def __repr__(self) -> str:
        return f"PublicKey({self.render()!r})"

    def __str__(self) -> str:
        return self.render()


class SecretKey:
    """A named Ed25519 secret key that signs as ``nix store sign`` does."""

    __slots__ = ("_key", "_public", "name")

    name: str
    _key: Ed25519PrivateKey
    _public: PublicKey

    def __init__(self, name: str, seed: bytes) -> None:
        _check_name(name, "secret key")
        if len(seed) != SEED_BYTES:
            raise FormatError(f"secret key {name!r}: seed must be {SEED_BYTES} bytes")
        self.name = name
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._public = PublicKey(name, _public_bytes(self._key.public_key()))

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        """A fresh random key pair (the seed comes from the OS's CSPRNG)."""
        _check_name(name, "secret key")
        key = Ed25519PrivateKey.generate()
        seed = key.private_bytes_raw()
        return cls(name, seed)

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        """Parse ``name:base64(seed + public)``; surrounding whitespace is ignored.

        Unlike Nix, the public half must match the seed: a mismatch means the file was
        corrupted or stitched together, and signatures made with it would not verify.
        """
        name, data = _split(text, "secret key")
        raw = _b64decode(data)
        if raw is None:
            raise FormatError(f"secret key {name!r}: key data is not valid base64")
        if len(raw) != SECRET_KEY_BYTES:
            raise FormatError(
                f"secret key {name!r} is {len(raw)} bytes, expected {SECRET_KEY_BYTES}"
                " (seed and public key)"
            )
        key = cls(name, raw[:SEED_BYTES])
        if key._public.key_bytes != raw[SEED_BYTES:]:
            raise FormatError(f"secret key {name!r}: its public half does not match its seed")
        return key

    def render(self) -> str:
        """The ``name:base64`` form of ``nix key generate-secret`` (secret: handle with care)."""
        seed = self._key.private_bytes_raw()
        return f"{self.name}:{_b64(seed + self._public.key_bytes)}"

    def public(self) -> PublicKey:
        """The matching public key."""
        return self._public

    def sign(self, data: bytes) -> str:
        """A detached signature ``name:base64(sig)`` of ``data``."""
        return f"{self.name}:{_b64(self._key.sign(data))}"

    def __repr__(self) -> str:
        return f"SecretKey(name={self.name!r}, public={self._public.render()!r})"

    def __str__(self) -> str:
        return repr(self)
