"""A binary cache written by our code, read by the real Nix.

We build two input-addressed paths (``b`` references ``a``; input-addressed, so Nix
insists on a signature), then write ``nix-cache-info``, uncompressed NARs and narinfos
signed with our key into a directory, and let ``nix copy --from file://...`` substitute
from it into a fresh chroot store. Nix must accept the cache when it trusts our key and
refuse it when it does not, or when a signature covers other data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.nix import base32
from nixd.nix.cacheinfo import CacheInfo
from nixd.nix.hashes import Hash, sha256
from nixd.nix.nar import dump
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey, SecretKey
from nixd.nix.storepath import StorePath
from tests.realnix import RealNix

EXPR = """
let a = derivation {{ name = "a-{salt}"; system = builtins.currentSystem; builder = "/bin/sh";
                     args = [ "-c" "echo {salt} > $out" ]; }};
in derivation {{ name = "b-{salt}"; system = builtins.currentSystem; builder = "/bin/sh";
                PATH = "/usr/bin:/bin";
                args = [ "-c" "mkdir $out; echo ${{a}} > $out/ref; ln -s ref $out/link" ]; }}
"""


def configure(real_nix: RealNix) -> None:
    """No substituters (nothing leaves loopback) and a /bin/sh inside the build chroot.

    A chroot store always builds in a chroot; Debian's Nix has no built-in sandbox shell.
    """
    shared = " ".join(p for p in ("/bin", "/usr", "/lib", "/lib64") if os.path.exists(p))
    conf = real_nix.root / "etc" / "nix.conf"
    with conf.open("a") as f:
        f.write(f"substituters =\nsandbox-paths = {shared}\n")


def build_pair(real_nix: RealNix) -> tuple[str, str]:
    """Build ``a`` and ``b`` (``b`` refers to ``a``); return their logical store paths."""
    configure(real_nix)
    salt = os.urandom(6).hex()
    b = real_nix.build(EXPR.format(salt=salt))
    info = path_info(real_nix, b)
    (a,) = info[b]["references"]
    return a, b


def path_info(real_nix: RealNix, path: str, store: Path | None = None) -> dict[str, dict]:  # type: ignore[type-arg]
    out = real_nix.run(["nix", "path-info", "--json", "--sigs", "-r", path], store=store or True)
    return {i["path"]: i for i in json.loads(out.stdout)}


def make_narinfo(real_nix: RealNix, path: str, nar: bytes) -> NarInfo:
    """A narinfo for ``path`` from our NAR and what Nix knows of the path."""
    info = path_info(real_nix, path)[path]
    file_hash = sha256(nar)
    narinfo = NarInfo(
        store_path=StorePath.parse(path),
        url=f"nar/{base32.encode(file_hash.digest)}.nar",
        compression="none",
        file_hash=file_hash,
        file_size=len(nar),
        nar_hash=sha256(nar),
        nar_size=len(nar),
        references=tuple(StorePath.parse(r) for r in info["references"]),
        deriver=StorePath.parse(info["deriver"]),
        system=None,
        sigs=(),
        ca=None,
    )
    # Our NAR serialisation must be the one Nix registered for the path.
    assert narinfo.nar_hash == Hash.parse(info["narHash"])
    assert narinfo.nar_size == info["narSize"]
    return narinfo


def write_cache(
    real_nix: RealNix, dest: Path, paths: list[str], key: SecretKey
) -> dict[str, NarInfo]:
    """Write a binary cache of ``paths`` into ``dest``; return the narinfos written."""
    (dest / "nar").mkdir(parents=True)
    (dest / "nix-cache-info").write_text(CacheInfo().render())
    infos = {}
    for path in paths:
        nar = b"".join(dump(real_nix.real_path(path)))
        info = make_narinfo(real_nix, path, nar).signed(key)
        (dest / info.url).write_bytes(nar)
        write_narinfo(dest, info)
        infos[path] = info
    return infos


def write_narinfo(dest: Path, info: NarInfo) -> None:
    (dest / f"{info.store_path.hash_part}.narinfo").write_text(info.render())


def copy_from(
    real_nix: RealNix, cache: Path, path: str, trusted: str, *, check: bool = True
) -> tuple[Path, str]:
    """``nix copy --from file://cache`` into a fresh store with its own narinfo cache."""
    store = Path(str(cache) + "-store")
    proc = real_nix.run(
        [
            "nix",
            "copy",
            "--from",
            f"file://{cache}",
            path,
            "--option",
            "trusted-public-keys",
            trusted,
        ],
        store=store,
        check=check,
        env={"XDG_CACHE_HOME": str(cache) + "-xdg"},
    )
    return store, proc.stderr.decode(errors="replace")


def is_valid(real_nix: RealNix, store: Path, path: str) -> bool:
    proc = real_nix.run(["nix-store", "--check-validity", path], store=store, check=False)
    return proc.returncode == 0


@pytest.fixture
def pair(real_nix: RealNix) -> tuple[str, str]:
    return build_pair(real_nix)


def test_nix_substitutes_from_our_cache(
    real_nix: RealNix, tmp_path: Path, pair: tuple[str, str]
) -> None:
    a, b = pair
    key = SecretKey.generate("nixd-test-1")
    infos = write_cache(real_nix, tmp_path / "cache", [a, b], key)
    assert infos[b].verify([key.public()]) == ["nixd-test-1"]

    store, _ = copy_from(real_nix, tmp_path / "cache", b, key.public().render())
    assert is_valid(real_nix, store, a) and is_valid(real_nix, store, b)
    copied = real_nix.real_path(b, store)
    assert (copied / "ref").read_text() == a + "\n"
    assert os.readlink(copied / "link") == "ref"
    # Nix kept our signature and checks it again on its own.
    got = path_info(real_nix, b, store)
    assert got[b]["signatures"] == list(infos[b].sigs)
    real_nix.run(
        [
            "nix",
            "store",
            "verify",
            "--sigs-needed",
            "1",
            "-r",
            b,
            "--option",
            "trusted-public-keys",
            key.public().render(),
        ],
        store=store,
    )


def test_nix_accepts_our_signature_with_its_own_key(
    real_nix: RealNix, tmp_path: Path, pair: tuple[str, str]
) -> None:
    a, b = pair
    secret = real_nix.run(["nix", "key", "generate-secret", "--key-name", "nix-made-1"], store=None)
    public = real_nix.run(
        ["nix", "key", "convert-secret-to-public"], input=secret.stdout, store=None
    ).stdout.decode()
    key = SecretKey.parse(secret.stdout.decode())
    assert key.render() == secret.stdout.decode()
    assert key.public() == PublicKey.parse(public)
    write_cache(real_nix, tmp_path / "cache", [a, b], key)
    store, _ = copy_from(real_nix, tmp_path / "cache", b, public)
    assert is_valid(real_nix, store, b)


def test_nix_refuses_an_untrusted_key(
    real_nix: RealNix, tmp_path: Path, pair: tuple[str, str]
) -> None:
    a, b = pair
    key = SecretKey.generate("nixd-test-1")
    write_cache(real_nix, tmp_path / "cache", [a, b], key)
    # Same name, other key: the name alone earns no trust.
    impostor = SecretKey.generate("nixd-test-1").public().render()
    store, err = copy_from(real_nix, tmp_path / "cache", b, impostor, check=False)
    assert "lacks a valid signature" in err
    assert not is_valid(real_nix, store, b) and not is_valid(real_nix, store, a)


@pytest.mark.parametrize("forgery", ["signature-of-other-path", "references-changed"])
def test_nix_refuses_a_signature_of_other_data(
    real_nix: RealNix, tmp_path: Path, pair: tuple[str, str], forgery: str
) -> None:
    a, b = pair
    key = SecretKey.generate("nixd-test-1")
    infos = write_cache(real_nix, tmp_path / "cache", [a, b], key)
    if forgery == "signature-of-other-path":
        forged = dataclasses.replace(infos[b], sigs=infos[a].sigs)
    else:
        # Signed without the reference to `a`, served with it.
        unsigned = dataclasses.replace(infos[b], sigs=())
        other = dataclasses.replace(unsigned, references=()).signed(key)
        forged = dataclasses.replace(unsigned, sigs=other.sigs)
    assert forged.verify([key.public()]) == []
    write_narinfo(tmp_path / "cache", forged)
    store, err = copy_from(real_nix, tmp_path / "cache", b, key.public().render(), check=False)
    assert "lacks a valid signature" in err
    assert not is_valid(real_nix, store, b)


def test_nix_reads_our_nix_cache_info(real_nix: RealNix, tmp_path: Path) -> None:
    a, _ = build_pair(real_nix)
    key = SecretKey.generate("nixd-test-1")
    write_cache(real_nix, tmp_path / "cache", [a], key)
    (tmp_path / "cache" / "nix-cache-info").write_text(CacheInfo(store_dir="/gnu/store").render())
    store, err = copy_from(real_nix, tmp_path / "cache", a, key.public().render(), check=False)
    assert "is for Nix stores with prefix '/gnu/store'" in err
    assert not is_valid(real_nix, store, a)


def test_nix_written_nix_cache_info(real_nix: RealNix, tmp_path: Path) -> None:
    a, _ = build_pair(real_nix)
    real_nix.run(["nix", "copy", "--to", f"file://{tmp_path / 'c'}", a])
    text = (tmp_path / "c" / "nix-cache-info").read_text()
    info = CacheInfo.parse(text)
    assert info == CacheInfo(store_dir="/nix/store", want_mass_query=False, priority=None)
    assert info.render() == text


def test_cache_info_parse_and_render() -> None:
    ours = CacheInfo()
    assert ours.render() == "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
    assert CacheInfo.parse(ours.render()) == ours
    # Nix trims values, ignores unknown keys and lines without a colon, and reads only
    # "1" as true.
    text = "StoreDir:  /nix/store \r\nno colon here\nWantMassQuery: yes\nOther: 1\nPriority: -3\n"
    assert CacheInfo.parse(text) == CacheInfo("/nix/store", False, -3)
    assert CacheInfo.parse(b"") == CacheInfo("/nix/store", False, None)


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        ("Priority: 12abc\n", "not an integer", "line 1"),
        ("Priority: 99999999999\n", "not an integer", "line 1"),
        ("StoreDir: /nix/store\nStoreDir: /nix/store\n", "duplicate StoreDir", "line 2"),
        ("StoreDir: relative\n", "not absolute", "line 1"),
        (b"StoreDir: /nix/store\n\xff: x\n", "UTF-8", "line 2"),
    ],
)
def test_cache_info_errors(text: str | bytes, message: str, where: str) -> None:
    with pytest.raises(FormatError, match=message) as exc:
        CacheInfo.parse(text)
    assert exc.value.where == where


@given(st.text(max_size=200))
def test_cache_info_parse_raises_only_format_error(text: str) -> None:
    try:
        info = CacheInfo.parse(text)
    except FormatError:
        return
    assert CacheInfo.parse(info.render()) == info
