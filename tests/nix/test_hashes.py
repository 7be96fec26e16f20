"""Hash parsing and rendering, checked against the real `nix hash`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.nix.hashes import DIGEST_SIZES, Hash, sha256
from tests.realnix import RealNix

CONVERSIONS = {"to-base16": "base16", "to-base32": "base32", "to-base64": "base64", "to-sri": "sri"}


def test_encodings_equal_nix(real_nix: RealNix) -> None:
    for algo, size in DIGEST_SIZES.items():
        hashes = [Hash(algo, os.urandom(size)) for _ in range(20)]  # type: ignore[arg-type]
        for command, encoding in CONVERSIONS.items():
            # Feed Nix the SRI form, so that its parser is exercised too.
            out = real_nix.run(
                ["nix", "hash", command, *(h.encode("sri") for h in hashes)], store=None
            )
            theirs = out.stdout.decode().split()
            ours = [h.encode(encoding, prefix=False) for h in hashes]  # type: ignore[arg-type]
            assert ours == theirs, (algo, command)
            assert [Hash.parse(t, algo=algo) for t in theirs] == hashes  # type: ignore[arg-type]


def test_prefixed_forms_parse_back(real_nix: RealNix) -> None:
    h = Hash("sha512", os.urandom(64))
    for encoding in ("base16", "base32", "base64", "sri"):
        text = h.encode(encoding)  # type: ignore[arg-type]
        assert Hash.parse(text) == h
        # Nix reads our prefixed form and gives back the same digest.
        out = real_nix.run(["nix", "hash", "to-base16", text], store=None)
        assert out.stdout.decode().strip() == h.digest.hex()


def test_file_hashes_equal_nix(real_nix: RealNix, tmp_path: Path) -> None:
    files = []
    for i, size in enumerate((0, 1, 1000, 70_000)):
        f = tmp_path / f"f{i}"
        f.write_bytes(os.urandom(size))
        files.append(f)
    for algo in DIGEST_SIZES:
        for flag, encoding in (("--base32", "base32"), ("--base16", "base16"), ("--sri", "sri")):
            out = real_nix.run(
                ["nix", "hash", "file", "--type", algo, flag, *map(str, files)], store=None
            )
            theirs = out.stdout.decode().split()
            ours = [
                Hash(algo, hashlib.new(algo, f.read_bytes()).digest()).encode(  # type: ignore[arg-type]
                    encoding,  # type: ignore[arg-type]
                    prefix=False,
                )
                for f in files
            ]
            assert ours == theirs, (algo, flag)
    assert (
        str(sha256(files[2].read_bytes()))
        == "sha256:"
        + real_nix.run(["nix", "hash", "file", "--base32", str(files[2])], store=None)
        .stdout.decode()
        .strip()
    )


@pytest.mark.parametrize(
    "text",
    [
        "sha256:",
        "sha256:" + "0" * 63,  # one short of base16
        "sha256:" + "g" * 64,  # base16 length, not hex
        "sha256:" + "e" * 52,  # base32 length, not base32
        "sha256-" + "A" * 43 + "!",
        "sha257:" + "0" * 64,
        "0" * 64,  # no algorithm
        "md5-" + "A" * 44,  # base64 of the wrong size
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(FormatError):
        Hash.parse(text)


def test_algorithm_must_agree() -> None:
    h = sha256(b"x")
    assert Hash.parse(h.encode("base32", prefix=False), algo="sha256") == h
    with pytest.raises(FormatError, match="not sha1"):
        Hash.parse(str(h), algo="sha1")
    with pytest.raises(FormatError):
        Hash("sha256", b"short")


@given(st.text(max_size=150))
def test_parse_raises_only_format_error(text: str) -> None:
    try:
        h = Hash.parse(text)
    except FormatError:
        return
    assert Hash.parse(h.encode("base16")) == h


@given(st.sampled_from(sorted(DIGEST_SIZES)), st.text(max_size=150))
def test_parse_bare_raises_only_format_error(algo: str, text: str) -> None:
    try:
        h = Hash.parse(text, algo=algo)  # type: ignore[arg-type]
    except FormatError:
        return
    assert h.algo == algo


@given(st.sampled_from(sorted(DIGEST_SIZES)), st.data())
def test_round_trip_all_encodings(algo: str, data: st.DataObject) -> None:
    digest = data.draw(st.binary(min_size=DIGEST_SIZES[algo], max_size=DIGEST_SIZES[algo]))
    h = Hash(algo, digest)  # type: ignore[arg-type]
    for encoding in ("base16", "base32", "base64", "sri"):
        assert Hash.parse(h.encode(encoding)) == h  # type: ignore[arg-type]
