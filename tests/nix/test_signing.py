"""Signing keys in Nix's format, checked against `nix key` and `nix store sign`."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey, SecretKey
from tests.nix.test_binary_cache import build_pair, path_info
from tests.realnix import RealNix


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_generate_parse_render() -> None:
    key = SecretKey.generate("cache.example.org-1")
    again = SecretKey.parse(key.render())
    assert again.render() == key.render()
    assert again.public() == key.public()
    pub = PublicKey.parse(key.public().render())
    assert pub == key.public() and hash(pub) == hash(key.public())
    assert pub.name == "cache.example.org-1" and len(pub.key_bytes) == 32
    sig = key.sign(b"data")
    assert sig.startswith("cache.example.org-1:")
    assert pub.verify(b"data", sig)
    assert not pub.verify(b"other data", sig)
    # Surrounding whitespace, e.g. a key file's final newline, is fine.
    assert SecretKey.parse(key.render() + "\n").render() == key.render()
    assert PublicKey.parse(f"  {pub.render()}\n") == pub


def test_verify_is_false_for_anything_but_a_good_signature() -> None:
    key = SecretKey.generate("k")
    pub = key.public()
    sig = key.sign(b"x")
    body = sig.split(":", 1)[1]
    for bad in (
        f"other:{body}",  # another key's name
        body,  # no name
        "k:not base64!",
        f"k:{b64(bytes(63))}",  # wrong length
        f"k:{b64(bytes(64))}",  # right length, wrong signature
        "",
    ):
        assert not pub.verify(b"x", bad), bad
    assert not SecretKey.generate("k").public().verify(b"x", sig)  # same name, other key


def test_secret_material_never_shows() -> None:
    key = SecretKey.generate("k")
    secret_b64 = key.render().split(":", 1)[1]
    seed_b64 = b64(base64.b64decode(secret_b64)[:32])
    for text in (repr(key), str(key)):
        assert secret_b64 not in text and seed_b64[:20] not in text
    broken = [
        secret_b64,  # no name
        ":" + secret_b64,
        "k:" + secret_b64[:-4],  # wrong length
        "k:" + secret_b64 + "!",
        "k:" + b64(base64.b64decode(secret_b64)[:32] + bytes(32)),  # public half mismatch
    ]
    for text in broken:
        with pytest.raises(FormatError) as exc:
            SecretKey.parse(text)
        message = str(exc.value)
        assert secret_b64[:16] not in message and seed_b64[:16] not in message, message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nocolon", "no colon"),
        (":" + b64(bytes(32)), "no name"),
        ("k:", "no key data"),
        ("k:%%%", "not valid base64"),
        ("k:" + b64(bytes(31)), "31 bytes, expected 32"),
        ("k:" + b64(bytes(64)), "64 bytes, expected 32"),
        ("a b:" + b64(bytes(32)), "whitespace"),
    ],
)
def test_public_key_errors(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        PublicKey.parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nocolon", "no colon"),
        (":" + b64(bytes(64)), "no name"),
        ("k:%%%", "not valid base64"),
        ("k:" + b64(bytes(32)), "32 bytes, expected 64"),
        ("k:" + b64(bytes(64)), "does not match its seed"),
    ],
)
def test_secret_key_errors(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        SecretKey.parse(text)


def test_generate_refuses_bad_names() -> None:
    for name in ("", "a b", "a:b", "tab\t"):
        with pytest.raises(FormatError):
            SecretKey.generate(name)


def test_nix_keys_interoperate(real_nix: RealNix) -> None:
    secret = real_nix.run(["nix", "key", "generate-secret", "--key-name", "nix-1"], store=None)
    public = real_nix.run(
        ["nix", "key", "convert-secret-to-public"], input=secret.stdout, store=None
    ).stdout.decode()
    key = SecretKey.parse(secret.stdout.decode())
    assert key.render() == secret.stdout.decode()
    assert key.public().render() == public
    # And the other way: Nix derives the same public key from a secret key we made.
    ours = SecretKey.generate("ours-1")
    theirs = real_nix.run(
        ["nix", "key", "convert-secret-to-public"], input=ours.render().encode(), store=None
    )
    assert theirs.stdout.decode() == ours.public().render()


def test_nix_store_sign_with_our_key_verifies_with_ours(real_nix: RealNix, tmp_path: Path) -> None:
    _, b = build_pair(real_nix)
    key = SecretKey.generate("ours-1")
    sk = tmp_path / "sk"
    sk.write_text(key.render())
    real_nix.run(["nix", "store", "sign", "-k", str(sk), "-r", b])
    for path, info in path_info(real_nix, b).items():
        (sig,) = info["signatures"]
        narinfo = NarInfo.parse(
            f"StorePath: {path}\nURL: x\nNarHash: {info['narHash']}\n"
            f"NarSize: {info['narSize']}\n"
            f"References: {' '.join(r.rsplit('/', 1)[1] for r in info['references'])}\n"
            f"Sig: {sig}\n"
        )
        assert narinfo.verify([key.public()]) == ["ours-1"]
        assert narinfo.signed(key).sigs == (sig,)  # deterministic: the very same bytes


@given(st.text(max_size=120))
def test_parsers_raise_only_format_error(text: str) -> None:
    try:
        pub = PublicKey.parse(text)
    except FormatError:
        pass
    else:
        assert PublicKey.parse(pub.render()) == pub
    try:
        key = SecretKey.parse(text)
    except FormatError:
        return
    assert SecretKey.parse(key.render()).public() == key.public()


@given(st.binary(min_size=64, max_size=64), st.sampled_from(["k", "cache-1", "a.b"]))
def test_secret_key_blobs(blob: bytes, name: str) -> None:
    text = f"{name}:{b64(blob)}"
    try:
        key = SecretKey.parse(text)
    except FormatError as exc:
        assert "does not match its seed" in str(exc)
        return
    assert key.render() == text
