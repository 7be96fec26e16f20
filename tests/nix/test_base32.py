"""Nix base32, checked against the real `nix hash to-base32` and by round trips."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.nix import base32
from tests.realnix import RealNix

DIGEST_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def test_encode_equals_nix_on_random_digests(real_nix: RealNix) -> None:
    for algo, size in DIGEST_SIZES.items():
        digests = [os.urandom(size) for _ in range(40)]
        # Edge patterns: all zero bits, all one bits, a single bit at each end.
        digests += [
            bytes(size),
            b"\xff" * size,
            b"\x01" + bytes(size - 1),
            bytes(size - 1) + b"\x80",
        ]
        out = real_nix.run(
            ["nix", "hash", "to-base32", "--type", algo, *(d.hex() for d in digests)], store=None
        )
        theirs = out.stdout.decode().split()
        assert [base32.encode(d) for d in digests] == theirs
        assert [base32.decode(t) for t in theirs] == digests


def test_lengths() -> None:
    assert [base32.encoded_length(n) for n in (0, 1, 16, 20, 32, 64)] == [0, 2, 26, 32, 52, 103]
    for n in (1, 16, 20, 32, 64):
        assert base32.decoded_length(base32.encoded_length(n)) == n


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("e" + "0" * 51, "character"),  # e, o, u, t are not in the alphabet
        ("0" * 51 + "u", "character"),
        ("0" * 51 + "A", "character"),
        ("0" * 54, "length"),  # 53 chars encode 33 bytes; 54 encode nothing
        ("z" + "0" * 51, "padding"),  # 260 bits for 256: the top bits must be zero
    ],
)
def test_decode_rejects(text: str, why: str) -> None:
    with pytest.raises(FormatError, match=why):
        base32.decode(text)


@given(st.binary(max_size=80))
def test_round_trip(data: bytes) -> None:
    text = base32.encode(data)
    assert len(text) == base32.encoded_length(len(data))
    assert set(text) <= set(base32.ALPHABET)
    assert base32.decode(text) == data


@given(st.text(max_size=120))
def test_decode_raises_only_format_error(text: str) -> None:
    try:
        data = base32.decode(text)
    except FormatError:
        return
    assert base32.encode(data) == text


def test_nix_rejects_what_we_reject(real_nix: RealNix) -> None:
    for text in ("e" + "0" * 51, "0" * 51 + "u", "z" + "0" * 51, "2" + "0" * 51):
        with pytest.raises(FormatError):
            base32.decode(text)
        proc = real_nix.run(["nix", "hash", "to-base16", f"sha256:{text}"], store=None, check=False)
        assert proc.returncode != 0, text
    # All 256 bits set (the top digit carries only one of them) is fine for both.
    top = "1" + "z" * 51
    nix = real_nix.run(["nix", "hash", "to-base16", f"sha256:{top}"], store=None)
    assert base32.decode(top).hex() == nix.stdout.decode().strip()
