"""narinfo parsing, rendering and signatures: literal fixtures from Nix 2.8, the real
``nix copy --to file://``, and hypothesis."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.nix import base32
from nixd.nix.hashes import Hash
from nixd.nix.nar import hash_path
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey, SecretKey
from nixd.nix.storepath import StorePath
from tests.nix.test_binary_cache import build_pair
from tests.realnix import RealNix

# Written by `nix copy --to 'file://...?secret-key=sk&compression=zstd'` (Nix 2.8.0).
NIX_WRITTEN = """\
StorePath: /nix/store/zil1z8fyrc7mlj7dd23lwp4mnywijbwh-b
URL: nar/16sbr1dd2f34l0m3dskvhz3a81j15nvys6qwr0jsx0crzy00d9lf.nar.zst
Compression: zstd
FileHash: sha256:16sbr1dd2f34l0m3dskvhz3a81j15nvys6qwr0jsx0crzy00d9lf
FileSize: 127
NarHash: sha256:0vg7nyq6hchc2sfbx1gnjkrdfw8m399fi721yn8zxk6mvjr1lrb7
NarSize: 160
References: wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a
Deriver: lpjpdd3n3m4aqnkgnl86a9d3dz3rh2pv-b.drv
Sig: k1:804+1o9ZSnXl1Jv6b/3jfAo1fxisnLZwzAz8WhwGQt2NIhknoVJMpbazrWklnlMgYMrw/+wkKLA60OgaitO2DA==
"""
NIX_WRITTEN_FINGERPRINT = (
    b"1;/nix/store/zil1z8fyrc7mlj7dd23lwp4mnywijbwh-b;"
    b"sha256:0vg7nyq6hchc2sfbx1gnjkrdfw8m399fi721yn8zxk6mvjr1lrb7;160;"
    b"/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a"
)
NIX_WRITTEN_KEY = "k1:c302RssbOpN9QVaqxNOLNOFEC290WK9hVstYGDXArnc="  # its signer
H1 = "wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm"
H2 = "zil1z8fyrc7mlj7dd23lwp4mnywijbwh"
NARHASH = "sha256:0vg7nyq6hchc2sfbx1gnjkrdfw8m399fi721yn8zxk6mvjr1lrb7"
MINIMAL = f"StorePath: /nix/store/{H2}-b\nURL: nar/x.nar\nNarHash: {NARHASH}\nNarSize: 160\n"


def test_nix_written_narinfo_round_trips() -> None:
    info = NarInfo.parse(NIX_WRITTEN)
    assert info.store_path == StorePath(H2, "b")
    assert info.compression == "zstd"
    assert info.file_size == 127
    assert info.nar_size == 160
    assert info.references == (StorePath(H1, "a"),)
    assert info.deriver == StorePath("lpjpdd3n3m4aqnkgnl86a9d3dz3rh2pv", "b.drv")
    assert info.system is None and info.ca is None
    assert info.render() == NIX_WRITTEN
    assert NarInfo.parse(NIX_WRITTEN.encode()) == info
    assert info.fingerprint() == NIX_WRITTEN_FINGERPRINT


def test_nix_written_signature_verifies() -> None:
    info = NarInfo.parse(NIX_WRITTEN)
    key = PublicKey.parse(NIX_WRITTEN_KEY)
    assert info.verify([key]) == ["k1"]
    other = SecretKey.generate("k1").public()
    assert info.verify([other]) == []
    assert info.verify([other, key, key]) == ["k1"]
    # The signature covers NarHash, NarSize, the path and its references ...
    for change in (
        {"nar_size": 161},
        {"references": ()},
        {"store_path": StorePath(H2, "c")},
        {"store_dir": "/other/store"},
    ):
        assert dataclasses.replace(info, **change).verify([key]) == [], change  # type: ignore[arg-type]
    # ... but not how the NAR is stored.
    recompressed = dataclasses.replace(info, url="nar/y.nar", compression="none", file_size=1)
    assert recompressed.verify([key]) == ["k1"]


def test_minimal_narinfo_defaults() -> None:
    info = NarInfo.parse(MINIMAL)
    assert info.compression == "bzip2"
    assert (info.file_hash, info.file_size, info.deriver, info.system, info.ca) == (None,) * 5
    assert info.references == () and info.sigs == ()
    # Nix renders what it knows; an empty reference list keeps its trailing space.
    assert info.render() == (
        f"StorePath: /nix/store/{H2}-b\nURL: nar/x.nar\nCompression: bzip2\n"
        f"NarHash: {NARHASH}\nNarSize: 160\nReferences: \n"
    )
    assert info.fingerprint().endswith(b";160;")


def test_values_are_normalised_as_nix_keeps_them() -> None:
    digest = base32.decode(NARHASH.removeprefix("sha256:"))
    text = (
        f"StorePath: /nix/store/{H2}-b\n"
        "Unknown: ignored, as Nix does\n"
        f"NarHash: sha256:{digest.hex()}\n"  # base16, as some tools write it
        "NarSize: 160\n"
        f"References: {H2}-b  {H1}-a {H1}-a\n"  # unsorted, doubled space, duplicate
        "Deriver: unknown-deriver\n"
        "System: x86_64-linux\n"
        "Sig: z:2\nSig: a:1\nSig: z:2\n"
        f"CA: fixed:r:sha256:{digest.hex()}\n"
        "URL: nar/x.nar\n"
    )
    info = NarInfo.parse(text)
    assert info.nar_hash == Hash("sha256", digest)
    assert info.references == (StorePath(H1, "a"), StorePath(H2, "b"))
    assert info.deriver is None
    assert info.sigs == ("a:1", "z:2")
    assert info.ca == f"fixed:r:{NARHASH}"
    assert info.render() == (
        f"StorePath: /nix/store/{H2}-b\nURL: nar/x.nar\nCompression: bzip2\n"
        f"NarHash: {NARHASH}\nNarSize: 160\nReferences: {H1}-a {H2}-b\n"
        f"System: x86_64-linux\nSig: a:1\nSig: z:2\nCA: fixed:r:{NARHASH}\n"
    )
    assert info.fingerprint() == (
        f"1;/nix/store/{H2}-b;{NARHASH};160;/nix/store/{H1}-a,/nix/store/{H2}-b".encode()
    )


def test_custom_store_dir() -> None:
    text = MINIMAL.replace("/nix/store", "/opt/store")
    with pytest.raises(FormatError, match="not in the Nix store"):
        NarInfo.parse(text)
    info = NarInfo.parse(text, store_dir="/opt/store")
    assert info.render().startswith(f"StorePath: /opt/store/{H2}-b\n")
    assert info.fingerprint().startswith(f"1;/opt/store/{H2}-b;".encode())


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        (MINIMAL.replace("\n", "\r\n"), "carriage return", "line 1"),
        (MINIMAL[:-1], "newline", "line 4"),
        (MINIMAL.replace("NarSize: 160", "NarSize: 0"), "zero", "line 4"),
        (MINIMAL.replace("NarSize: 160", "NarSize: -1"), "NarSize", "line 4"),
        (MINIMAL.replace("NarSize: 160", "NarSize: 1e3"), "NarSize", "line 4"),
        (MINIMAL.replace("NarSize: 160", f"NarSize: {2**64}"), "NarSize", "line 4"),
        # Past 4,300 digits int() itself raises ValueError; non-ASCII digits pass isdigit().
        (MINIMAL.replace("NarSize: 160", "NarSize: " + "9" * 5000), "NarSize", "line 4"),
        (MINIMAL.replace("NarSize: 160", "NarSize: \u00b2"), "NarSize", "line 4"),
        (MINIMAL.replace("NarSize: 160", "NarSize: \u0663"), "NarSize", "line 4"),
        (MINIMAL.replace("NarSize: 160", "NarSize: 1_60"), "NarSize", "line 4"),
        (MINIMAL + "FileSize: " + "1" * 5000 + "\n", "FileSize", "line 5"),
        (MINIMAL.replace("URL: nar/x.nar", "URL: "), "URL is empty", "line 2"),
        (MINIMAL.replace("URL: nar/x.nar", "URL:nar/x.nar"), "Key: value", "line 2"),
        (MINIMAL + "\n", "Key: value", "line 5"),
        (MINIMAL + "NarSize: 160\n", "duplicate NarSize .first on line 4", "line 5"),
        (MINIMAL + "References: \nReferences: \n", "duplicate References", "line 6"),
        (MINIMAL.replace(NARHASH, NARHASH.removeprefix("sha256:")), "NarHash", "line 3"),
        (MINIMAL.replace(NARHASH, "sha1:" + "0" * 32), "must be a sha256", "line 3"),
        (MINIMAL.replace(NARHASH, NARHASH[:-1] + "e"), "NarHash", "line 3"),
        (MINIMAL + "References: a\n", "References", "line 5"),
        (MINIMAL + "Deriver: \n", "Deriver", "line 5"),
        (MINIMAL + "FileHash: 00\n", "FileHash", "line 5"),
        (MINIMAL + "FileSize: x\n", "FileSize", "line 5"),
        (MINIMAL + "CA: fixed:sha256:zz\n", "CA", "line 5"),
        (MINIMAL + "CA: text:sha1:" + "0" * 40 + "\n", "sha256", "line 5"),
        (MINIMAL + "CA: nar:sha256:" + "0" * 64 + "\n", "CA", "line 5"),
        (MINIMAL.encode() + b"System: \xff\n", "UTF-8", "line 5"),
    ],
)
def test_malformed_narinfos_say_where(text: str | bytes, message: str, where: str) -> None:
    with pytest.raises(FormatError, match=message) as exc:
        NarInfo.parse(text)
    assert exc.value.where == where


@pytest.mark.parametrize("missing", ["StorePath", "URL", "NarHash", "NarSize"])
def test_required_fields(missing: str) -> None:
    text = "".join(line + "\n" for line in MINIMAL.splitlines() if not line.startswith(missing))
    with pytest.raises(FormatError, match=f"no {missing}"):
        NarInfo.parse(text)


def test_construction_refuses_what_would_not_render() -> None:
    info = NarInfo.parse(MINIMAL)
    for change in (
        {"url": "a\nStorePath: x"},
        {"sigs": ("k:1\nNarSize: 2",)},
        {"url": ""},
        {"nar_size": 0},
        {"nar_hash": Hash("sha1", bytes(20))},
        {"ca": "bogus"},
    ):
        with pytest.raises(FormatError):
            dataclasses.replace(info, **change)  # type: ignore[arg-type]


def test_signed_replaces_the_keys_own_signature() -> None:
    info = NarInfo.parse(MINIMAL)
    key = SecretKey.generate("cache-1")
    other = SecretKey.generate("cache-2")
    once = info.signed(key).signed(other)
    assert once.verify([key.public(), other.public()]) == ["cache-1", "cache-2"]
    # Re-signing a changed info by the same key replaces, not accumulates.
    changed = dataclasses.replace(once, references=(StorePath(H1, "a"),)).signed(key)
    assert len(changed.sigs) == 2
    assert changed.verify([key.public(), other.public()]) == ["cache-1"]
    assert NarInfo.parse(changed.render()) == changed


@pytest.mark.parametrize("compression", ["none", "xz", "zstd"])
def test_narinfos_written_by_nix(real_nix: RealNix, tmp_path: Path, compression: str) -> None:
    a, b = build_pair(real_nix)
    src = tmp_path / "file.txt"
    src.write_text("content-addressed\n")
    ca_path = real_nix.run(["nix-store", "--add", str(src)]).stdout.decode().strip()
    sk = tmp_path / "sk"
    sk.write_bytes(
        real_nix.run(["nix", "key", "generate-secret", "--key-name", "nix-1"], store=None).stdout
    )
    public = real_nix.run(
        ["nix", "key", "convert-secret-to-public"], input=sk.read_bytes(), store=None
    ).stdout.decode()
    cache = tmp_path / "cache"
    real_nix.run(
        [
            "nix",
            "copy",
            "--to",
            f"file://{cache}?secret-key={sk}&compression={compression}",
            b,
            ca_path,
        ]
    )
    ours = SecretKey.parse(sk.read_text())
    narinfos = sorted(cache.glob("*.narinfo"))
    assert len(narinfos) == 3
    for file in narinfos:
        text = file.read_bytes()
        info = NarInfo.parse(text)
        assert info.render().encode() == text
        assert file.name == f"{info.store_path.hash_part}.narinfo"
        assert info.compression == compression
        assert info.verify([PublicKey.parse(public)]) == ["nix-1"]
        # Ed25519 is deterministic: our signature is byte for byte the one Nix made.
        assert info.signed(ours).sigs == info.sigs
        nar_file = (cache / info.url).read_bytes()
        assert info.file_hash == Hash("sha256", hashlib.sha256(nar_file).digest())
        assert info.file_size == len(nar_file)
        path = info.store_path.path()
        assert hash_path(real_nix.real_path(path)) == (info.nar_hash, info.nar_size)
        assert (info.ca is not None) == (path == ca_path)
    by_path = {
        NarInfo.parse(f.read_text()).store_path.path(): NarInfo.parse(f.read_text())
        for f in narinfos
    }
    assert by_path[b].references == (StorePath.parse(a),)
    # `nix-store --add` ingests recursively: the CA hash is the NAR hash.
    assert by_path[ca_path].ca == f"fixed:r:{by_path[ca_path].nar_hash}"


# --------------------------------------------------------------------------- hypothesis

KEYS = [
    "StorePath",
    "URL",
    "Compression",
    "FileHash",
    "FileSize",
    "NarHash",
    "NarSize",
    "References",
    "Deriver",
    "System",
    "Sig",
    "CA",
    "Other",
    "",
]
VALUES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            f"/nix/store/{H2}-b",
            f"{H1}-a",
            NARHASH,
            "160",
            "0",
            "unknown-deriver",
            f"fixed:r:{NARHASH}",
            f"text:{NARHASH}",
            f"{H1}-a {H2}-b",
            "none",
        ]
    ),
)
LINES = st.lists(
    st.tuples(st.sampled_from(KEYS), st.sampled_from([": ", ":", " : ", ": \r"]), VALUES),
    max_size=14,
)


@given(LINES, st.booleans())
def test_parse_raises_only_format_error(lines: list[tuple[str, str, str]], newline: bool) -> None:
    text = "\n".join(k + sep + v for k, sep, v in lines) + ("\n" if newline else "")
    try:
        info = NarInfo.parse(text)
    except FormatError:
        return
    # Anything we accept renders to something we read back the same.
    assert NarInfo.parse(info.render()) == info


REQUIRED_LINES = [
    line
    for line in NIX_WRITTEN.splitlines()
    if line.split(":")[0] in ("StorePath", "URL", "NarHash", "NarSize")
]
OPTIONAL_LINES = [
    *(line for line in NIX_WRITTEN.splitlines() if line not in REQUIRED_LINES),
    "System: x86_64-linux",
    f"CA: fixed:r:{NARHASH}",
    "Sig: other:c2ln",
    "Deriver: unknown-deriver",
    "Compression: none",
    "Unknown: kept out",
]


@given(st.data())
def test_shuffled_and_corrupted_narinfos(data: st.DataObject) -> None:
    drop = data.draw(st.sets(st.sampled_from(REQUIRED_LINES), max_size=1))
    extra = data.draw(st.lists(st.sampled_from(OPTIONAL_LINES), unique=True))
    lines = data.draw(st.permutations([*(r for r in REQUIRED_LINES if r not in drop), *extra]))
    text = "".join(line + "\n" for line in lines)
    corrupt = data.draw(st.one_of(st.none(), st.tuples(st.integers(0, 2000), st.characters())))
    if corrupt is not None:
        i = corrupt[0] % len(text)
        text = text[:i] + corrupt[1] + text[i + 1 :]
    try:
        info = NarInfo.parse(text)
    except FormatError:
        return
    again = NarInfo.parse(info.render())
    assert again == info
    assert again.render() == info.render()
    if corrupt is None:
        sigs = {line[5:] for line in lines if line.startswith("Sig: ")}
        assert set(info.sigs) == sigs


@given(st.binary(max_size=400))
def test_parse_bytes_raises_only_format_error(data: bytes) -> None:
    try:
        NarInfo.parse(data)
    except FormatError:
        pass
    else:
        raise AssertionError("random bytes made a narinfo")


@given(
    st.lists(st.sampled_from([StorePath(H1, "a"), StorePath(H2, "b"), StorePath(H1, "z")])),
    st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=20)),
    st.integers(min_value=1, max_value=2**64 - 1),
    st.one_of(st.none(), st.text(min_size=1, alphabet="abc-_0")),
)
def test_render_parse_round_trip(
    refs: list[StorePath], sigs: list[str], size: int, system: str | None
) -> None:
    info = dataclasses.replace(
        NarInfo.parse(MINIMAL),
        references=tuple(refs),
        sigs=tuple(sigs),
        nar_size=size,
        system=system,
    )
    assert NarInfo.parse(info.render()) == info
