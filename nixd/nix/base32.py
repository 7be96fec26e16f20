"""Nix's own base32: a different alphabet and bit order from RFC 4648.

Nix emits the most significant 5-bit group first, reading bits from the end of the
byte string, so the encoding of a hash is not the RFC 4648 one reversed or rotated; see
``printHash32`` in Nix's ``libutil/hash.cc``.
"""

from __future__ import annotations

from nixd.errors import FormatError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}


def encoded_length(n: int) -> int:
    """Length of the base32 form of ``n`` bytes."""
    return (8 * n - 1) // 5 + 1 if n else 0


def decoded_length(n: int) -> int:
    """Number of bytes that a base32 string of length ``n`` encodes."""
    return n * 5 // 8


def encode(data: bytes) -> str:
    """Encode bytes as Nix base32."""
    n = len(data)
    out = []
    for k in range(encoded_length(n) - 1, -1, -1):
        b = k * 5
        i, j = divmod(b, 8)
        c = data[i] >> j
        if i + 1 < n:
            c |= data[i + 1] << (8 - j)
        out.append(ALPHABET[c & 31])
    return "".join(out)


def decode(text: str) -> bytes:
    """Decode Nix base32; reject bad characters and non-zero padding bits."""
    n = decoded_length(len(text))
    if encoded_length(n) != len(text):
        raise FormatError(f"invalid base32 length {len(text)}")
    out = bytearray(n)
    for pos, ch in enumerate(text):
        digit = _VALUE.get(ch)
        if digit is None:
            raise FormatError(f"invalid base32 character {ch!r} at position {pos}")
        b = (len(text) - pos - 1) * 5
        i, j = divmod(b, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i + 1 < n:
            out[i + 1] |= carry
        elif carry:
            raise FormatError(f"invalid base32 string {text!r}: non-zero padding bits")
    return bytes(out)
