"""Hashes as Nix writes them: ``algo:base16``, ``algo:base32``, ``algo:base64`` and SRI.

Nix tells the encodings apart by length (see ``Hash::Hash`` in ``libutil/hash.cc``);
narinfos use ``sha256:<base32>``, NIX-PROTOCOL.md has the rest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Literal

from nixd.errors import FormatError
from nixd.nix import base32

Algo = Literal["md5", "sha1", "sha256", "sha512"]
DIGEST_SIZES: dict[str, int] = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}
Encoding = Literal["base16", "base32", "base64", "sri"]


@dataclass(frozen=True, slots=True)
class Hash:
    """A digest with its algorithm."""

    algo: Algo
    digest: bytes

    def __post_init__(self) -> None:
        if DIGEST_SIZES.get(self.algo) != len(self.digest):
            raise FormatError(f"{self.algo} digest must be {DIGEST_SIZES.get(self.algo)} bytes")

    @classmethod
    def parse(cls, text: str, *, algo: Algo | None = None) -> Hash:
        """Parse ``algo:digest`` (base16/32/64 by length), SRI ``algo-b64``, or a bare digest.

        A bare digest needs ``algo``; a prefixed one must agree with it when given.
        """
        if ":" in text:
            prefix, _, rest = text.partition(":")
            sri = False
        elif "-" in text and text.split("-", 1)[0] in DIGEST_SIZES:
            prefix, _, rest = text.partition("-")
            sri = True
        else:
            if algo is None:
                raise FormatError(f"hash {text!r} does not say its algorithm")
            prefix, rest, sri = algo, text, False
        if prefix not in DIGEST_SIZES:
            raise FormatError(f"unknown hash algorithm {prefix!r} in {text!r}")
        if algo is not None and prefix != algo:
            raise FormatError(f"hash {text!r} is not {algo}")
        a: Algo = prefix  # type: ignore[assignment]
        size = DIGEST_SIZES[a]
        if sri:
            return cls(a, _b64(rest, size, text))
        if len(rest) == size * 2:
            try:
                return cls(a, bytes.fromhex(rest))
            except ValueError:
                raise FormatError(f"invalid base16 hash {text!r}") from None
        if len(rest) == base32.encoded_length(size):
            try:
                return cls(a, base32.decode(rest))
            except FormatError as exc:
                raise FormatError(f"invalid base32 hash {text!r}: {exc}") from None
        if len(rest) == len(base64.b64encode(bytes(size))):
            return cls(a, _b64(rest, size, text))
        raise FormatError(f"hash {text!r} has the wrong length for {a}")

    def encode(self, encoding: Encoding = "base32", *, prefix: bool = True) -> str:
        """Render as Nix does; ``sri`` always carries its prefix."""
        if encoding == "sri":
            return f"{self.algo}-{base64.b64encode(self.digest).decode()}"
        if encoding == "base16":
            body = self.digest.hex()
        elif encoding == "base32":
            body = base32.encode(self.digest)
        else:
            body = base64.b64encode(self.digest).decode()
        return f"{self.algo}:{body}" if prefix else body

    def __str__(self) -> str:
        return self.encode("base32")


def _b64(text: str, size: int, whole: str) -> bytes:
    try:
        digest = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"invalid base64 hash {whole!r}") from None
    if len(digest) != size:
        raise FormatError(f"hash {whole!r} has the wrong length")
    return digest


def sha256(data: bytes) -> Hash:
    """The sha256 of ``data`` as a :class:`Hash`."""
    return Hash("sha256", hashlib.sha256(data).digest())
