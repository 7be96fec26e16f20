"""Flake tarballs: canonical form, agreement with the real Nix 2.8, and hostile archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.nix import nar
from nixd.nix.flaketarball import Source, TarballError, TarballLimits, normalize, pack_tree
from nixd.nix.hashes import Hash
from nixd.nix.storepath import fixed_output_path
from tests.realnix import RealNix

T0 = 1_700_000_000


@dataclass
class M:
    """One member of a test archive."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    link: str = ""
    mtime: float = T0
    uid: int = 1000
    size: int | None = None  # a declared size other than len(data)


def tar_bytes(members: list[M], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.mode, info.mtime, info.linkname = m.kind, m.mode, m.mtime, m.link
            info.uid = info.gid = m.uid
            info.uname = info.gname = "someone"
            if m.kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    data = out.getvalue()
    return data


def tgz(members: list[M], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    return gzip.compress(tar_bytes(members, fmt), mtime=123)


BASIC = [
    M("proj/", tarfile.DIRTYPE, mode=0o700),
    M("proj/flake.nix", data=b"{ outputs = _: { }; }\n", mode=0o664),
    M("proj/bin/", tarfile.DIRTYPE),
    M("proj/bin/run", data=b"#!/bin/sh\necho hi\n", mode=0o700),
    M("proj/bin/link", tarfile.SYMTYPE, link="run", mode=0o777),
    M("proj/a.b", data=b"dot"),
    M("proj/a/", tarfile.DIRTYPE),
    M("proj/a/x", data=b"x" * 3000),
    M("proj/empty/", tarfile.DIRTYPE),
    M("proj/up", tarfile.SYMTYPE, link="a/../bin/./run"),
]


def listing(source: Source) -> list[tuple[str, int, int, int, str, str, str, int]]:
    with tarfile.open(fileobj=io.BytesIO(source.tarball), mode="r:gz") as tar:
        return [
            (m.name, m.mode, m.uid, m.gid, m.uname, m.gname, m.linkname, int(m.mtime))
            for m in tar.getmembers()
        ]


def test_canonical_form() -> None:
    s = normalize(tgz(BASIC))
    assert listing(s) == [
        ("source", 0o755, 0, 0, "", "", "", T0),
        ("source/a", 0o755, 0, 0, "", "", "", T0),
        ("source/a/x", 0o644, 0, 0, "", "", "", T0),
        ("source/a.b", 0o644, 0, 0, "", "", "", T0),
        ("source/bin", 0o755, 0, 0, "", "", "", T0),
        ("source/bin/link", 0o777, 0, 0, "", "", "run", T0),
        ("source/bin/run", 0o755, 0, 0, "", "", "", T0),
        ("source/empty", 0o755, 0, 0, "", "", "", T0),
        ("source/flake.nix", 0o644, 0, 0, "", "", "", T0),
        ("source/up", 0o777, 0, 0, "", "", "a/../bin/./run", T0),
    ]
    assert s.tarball[:2] == b"\x1f\x8b"
    assert s.tarball[3] == 0  # no FNAME or other flags
    assert s.tarball[4:8] == bytes(4)  # gzip mtime 0
    assert s.last_modified == T0
    assert s.tarball_size == len(s.tarball)
    assert s.tarball_sha256 == hashlib.sha256(s.tarball).hexdigest()
    assert s.store_path == fixed_output_path(s.nar_hash, "source")
    assert nar.validate([s.nar_bytes()]) == (s.nar_hash, s.nar_size)
    assert b"".join(s.nar_chunks()) == s.nar_bytes()


def test_same_tree_same_bytes() -> None:
    a = normalize(tgz(BASIC))
    shuffled = [BASIC[0], *reversed(BASIC[1:])]
    other = [
        M(
            m.name.replace("proj/", "other/", 1),
            m.kind,
            m.data,
            (m.mode | 0o055) if m.mode & 0o100 else 0o600,
            m.link,
            mtime=T0 if m.kind == tarfile.DIRTYPE and m.name == "proj/" else 5,
            uid=0,
        )
        for m in shuffled
    ]
    b = normalize(tgz(other, fmt=tarfile.GNU_FORMAT))
    assert b.tarball == a.tarball
    assert (b.nar_hash, b.store_path, b.last_modified) == (a.nar_hash, a.store_path, T0)
    again = normalize(a.tarball)
    assert again.tarball == a.tarball and again.nar_hash == a.nar_hash
    # ./-prefixed names and missing directory entries are the same tree too.
    implicit = [M("./", tarfile.DIRTYPE)] + [
        M("./" + m.name, m.kind, m.data, m.mode, m.link)
        for m in BASIC
        if m.kind != tarfile.DIRTYPE or m.name in ("proj/", "proj/empty/")
    ]
    assert normalize(tgz(implicit)).tarball == a.tarball


def test_top_dir_mtime_is_last_modified() -> None:
    members = [M("p/", tarfile.DIRTYPE, mtime=T0 + 7), M("p/f", mtime=T0 + 99)]
    assert normalize(tgz(members)).last_modified == T0 + 7
    # Without an entry for the top directory, the newest entry's time stands in.
    assert normalize(tgz(members[1:])).last_modified == T0 + 99


def test_readable_from_a_file_object(tmp_path: Path) -> None:
    path = tmp_path / "x.tar.gz"
    path.write_bytes(tgz(BASIC))
    with path.open("rb") as f:
        assert normalize(f).tarball == normalize(tgz(BASIC)).tarball


def _tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "flake.nix").write_text("{ outputs = _: { }; }\n")
    (root / "bin" / "run").write_text("#!/bin/sh\n")
    (root / "bin" / "run").chmod(0o755)
    (root / "bin" / "link").symlink_to("run")
    (root / "empty").mkdir()
    (root / "big").write_bytes(os.urandom(3 << 20))
    (root / "é ü.txt").write_text("unicode")
    (root / "a.b").write_text("")
    (root / "a-b").mkdir()
    (root / "a-b" / "deep").write_text("d")
    (root / "dangling").symlink_to("a-b/missing")
    os.utime(root, (T0, T0))
    return root


def test_pack_tree_equals_gnu_tar_of_the_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path / "work-tree")
    packed = pack_tree(root, T0)
    assert packed.nar_bytes() == b"".join(nar.dump(root))
    assert (packed.nar_hash, packed.nar_size) == nar.hash_path(root)
    for args in (["--sort=name"], ["--owner=7", "--group=8", "--mode=go+w"], []):
        archive = tmp_path / "a.tar.gz"
        subprocess.run(
            ["tar", "czf", str(archive), *args, "-C", str(tmp_path), "work-tree"], check=True
        )
        assert normalize(archive.read_bytes()).tarball == packed.tarball


def test_agrees_with_real_nix(real_nix: RealNix, tmp_path: Path) -> None:
    """fetchTree, a flake input, nix-prefetch-url and nix hash path all see our tree."""
    root = _tree(tmp_path / "tree")
    upload = tmp_path / "upload.tar.gz"
    subprocess.run(["tar", "czf", str(upload), "-C", str(tmp_path), "tree"], check=True)
    s = normalize(upload.read_bytes())
    canonical = tmp_path / "canonical.tar.gz"
    canonical.write_bytes(s.tarball)
    for archive in (upload, canonical):
        expr = (
            'let t = builtins.fetchTree { type = "tarball"; url = "file://'
            + str(archive)
            + '"; }; '
            "in { inherit (t) narHash; path = t.outPath; }"
        )
        out = real_nix.run(
            ["nix", "eval", "--extra-experimental-features", "flakes", "--impure", "--json",
             "--expr", expr]
        )  # fmt: skip
        got = json.loads(out.stdout)
        assert Hash.parse(got["narHash"]) == s.nar_hash
        assert got["path"] == s.store_path.path()
    info = real_nix.run(["nix", "path-info", "--json", s.store_path.path()])
    (path_info,) = json.loads(info.stdout)
    assert path_info["ca"] == s.content_address
    assert path_info["narSize"] == s.nar_size
    assert path_info["references"] == []
    # What a consumer flake's flake.lock records for such an input (Nix 2.8: no lastModified).
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    (consumer / "flake.nix").write_text(
        '{ inputs.tool = { url = "file://' + str(canonical) + '"; flake = false; };\n'
        '  outputs = { self, tool }: { p = "${tool}"; }; }\n'
    )
    nix_flakes = ["nix", "--extra-experimental-features", "flakes"]
    path = real_nix.run([*nix_flakes, "eval", "--raw", f"path:{consumer}#p"]).stdout.decode()
    assert path == s.store_path.path()
    lock = json.loads((consumer / "flake.lock").read_text())
    assert lock["nodes"]["tool"]["locked"] == {
        "narHash": s.nar_hash.encode("sri"),
        "type": "tarball",
        "url": f"file://{canonical}",
    }
    out = real_nix.run(
        ["nix-prefetch-url", "--unpack", "--print-path", "--name", "source", f"file://{canonical}"]
    )
    nix_hash, nix_path = out.stdout.decode().split()
    assert Hash.parse(nix_hash, algo="sha256") == s.nar_hash
    assert nix_path == s.store_path.path()
    # An extracted copy of the canonical tarball hashes the same, executable bit and all.
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "xzf", str(canonical), "-C", str(unpacked)], check=True)
    sri = real_nix.run(["nix", "hash", "path", str(unpacked / "source")], store=None)
    assert Hash.parse(sri.stdout.decode().strip()) == s.nar_hash == nar.hash_path(root)[0]
    assert os.stat(unpacked / "source" / "bin" / "run").st_mode & 0o777 == 0o755
    assert os.stat(unpacked / "source" / "flake.nix").st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------ hostile input

D = tarfile.DIRTYPE
TOP = M("source/", D)
HOSTILE: dict[str, tuple[list[M], str, str]] = {
    # id: (members, message part, entry named)
    "dotdot": ([TOP, M("../x")], "'..' component", "../x"),
    "absolute": ([M("/abs/", D), M("/abs/x")], "absolute path", "/abs"),
    "dotdot-inside": ([TOP, M("source/../../x")], "'..' component", "source/../../x"),
    "dotdot-dir": ([TOP, M("source/a/../", D)], "'..' component", "source/a/.."),
    "symlink-absolute": (
        [TOP, M("source/l", tarfile.SYMTYPE, link="/etc/passwd")],
        "is absolute",
        "source/l",
    ),
    "symlink-climbs": (
        [TOP, M("source/d/", D), M("source/d/l", tarfile.SYMTYPE, link="../../x")],
        "leads outside the tree",
        "source/d/l",
    ),
    "symlink-climbs-late": (
        [TOP, M("source/l", tarfile.SYMTYPE, link="d/../../etc"), M("source/d/", D)],
        "leads outside the tree",
        "source/l",
    ),
    "symlink-chain": (
        [
            TOP,
            M("source/z/", D),
            M("source/x/y/b", tarfile.SYMTYPE, link="../../z"),
            M("source/x/y/c", tarfile.SYMTYPE, link="b/../.."),
        ],
        "leads outside the tree",
        "source/x/y/c",
    ),
    "symlink-empty": ([TOP, M("source/l", tarfile.SYMTYPE, link="")], "empty target", "source/l"),
    "hard-link": (
        [TOP, M("source/f", data=b"x"), M("source/h", tarfile.LNKTYPE, link="source/f")],
        "hard link",
        "source/h",
    ),
    "char-device": ([TOP, M("source/tty", tarfile.CHRTYPE)], "character device", "source/tty"),
    "block-device": ([TOP, M("source/sda", tarfile.BLKTYPE)], "block device", "source/sda"),
    "fifo": ([TOP, M("source/p", tarfile.FIFOTYPE)], "fifo", "source/p"),
    "unknown-type": ([TOP, M("source/q", b"Z")], "entry of type", "source/q"),
    "duplicate-file": (
        [TOP, M("source/a", data=b"1"), M("source/a", data=b"2")],
        "duplicate entry",
        "source/a",
    ),
    "duplicate-dir": ([TOP, M("source/d/", D), M("source/d/", D)], "duplicate entry", "source/d"),
    "file-then-dir": (
        [TOP, M("source/d"), M("source/d/", D)],
        "duplicate entry",
        "source/d",
    ),
    "inside-a-file": (
        [TOP, M("source/f"), M("source/f/x")],
        "inside 'source/f', which is a regular",
        "source/f/x",
    ),
    "through-a-symlink": (
        [TOP, M("source/l", tarfile.SYMTYPE, link="."), M("source/l/x")],
        "which is a symlink",
        "source/l/x",
    ),
    "two-top-dirs": ([TOP, M("other/", D)], "more than one top-level entry", "other"),
    "top-dir-and-file": ([TOP, M("README")], "more than one top-level entry", "README"),
    "top-file-and-dir": ([M("README"), TOP], "top-level entry is not a directory", "README"),
    "top-is-a-file": ([M("README", data=b"hi")], "top-level entry is not a directory", "README"),
    "top-is-a-symlink": (
        [M("source", tarfile.SYMTYPE, link="x")],
        "top-level entry is not a directory",
        "source",
    ),
    "too-deep": (
        [TOP, M("source/" + "d/" * 64 + "f")],
        "deeper than 64 directories",
        "source/d/d/d",
    ),
    "long-path": ([TOP, M("source/" + "n/" * 2100 + "f")], "longer than 4096 bytes", "source/n/n"),
    "long-name": ([TOP, M("source/" + "n" * 256)], "longer than 255 bytes", "source/nnn"),
    "mtime-negative": ([M("source/", D, mtime=-5)], "out of range", "source"),
    "mtime-huge": ([M("source/", D, mtime=8**12)], "out of range", "source"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives(case: str) -> None:
    members, message, entry = HOSTILE[case]
    with pytest.raises(TarballError, match=message.replace("(", r"\(")) as info:
        normalize(tgz(members))
    assert entry in str(info.value)


SMALL = TarballLimits(compressed=1 << 20, unpacked=1 << 20, entries=10, path=4096, depth=64)


def test_many_entries() -> None:
    members = [TOP, *(M(f"source/f{i}") for i in range(10))]
    with pytest.raises(TarballError, match="more than 10 entries") as info:
        normalize(tgz(members), SMALL)
    assert "source/f9" in str(info.value)
    normalize(tgz(members[:10]), SMALL)  # the limit itself is fine


def test_over_the_unpacked_limit() -> None:
    members = [TOP, M("source/a", data=bytes(600_000)), M("source/b", data=bytes(600_000))]
    with pytest.raises(TarballError, match="unpacked size over the limit") as info:
        normalize(tgz(members), SMALL)
    assert "source/b" in str(info.value)


def test_huge_declared_size_is_refused_before_reading() -> None:
    header = tarfile.TarInfo("source/huge")
    header.size = 1 << 40  # a terabyte, with no data behind it
    data = tar_bytes([TOP])[:512] + header.tobuf(tarfile.GNU_FORMAT) + bytes(1024)
    with pytest.raises(TarballError, match="unpacked size over the limit") as info:
        normalize(gzip.compress(data))
    assert "source/huge" in str(info.value)


def test_gzip_bomb_of_padding() -> None:
    # 64 MiB of zeros after the archive compress to about 64 KiB.
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = z.compress(tar_bytes([TOP]))
    for _ in range(64):
        bomb += z.compress(bytes(1 << 20))
    bomb += z.flush()
    assert len(bomb) < 1 << 20
    with pytest.raises(TarballError, match="gzip bomb"):
        normalize(bomb, SMALL)


def test_compressed_limit() -> None:
    data = tgz([TOP, M("source/r", data=os.urandom(2 << 20))])
    with pytest.raises(TarballError, match="compressed tarball is larger than"):
        normalize(data, TarballLimits(compressed=1 << 20))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"PK\x03\x04 a zip file", "not a gzip file"),
        (tar_bytes([TOP]), "not a gzip file"),
        (gzip.compress(b"just some text, " * 100), "not a tar archive"),
        (gzip.compress(b""), "not a tar archive"),
        (gzip.compress(tar_bytes([])), "archive is empty"),
        (gzip.compress(bytes(10240)), "archive is empty"),
        (tgz(BASIC)[:-20], "truncated gzip"),
        (tgz(BASIC)[: len(tgz(BASIC)) // 2], "truncated gzip"),
        (tgz(BASIC)[:10], "truncated gzip"),
        (tgz(BASIC) + b"junk", "data after the end of the gzip stream"),
        (tgz(BASIC) + tgz(BASIC), "data after the end of the gzip stream"),
        (b"\x1f\x8b\x08\x00" + os.urandom(200), "corrupt gzip data"),
        (gzip.compress(tar_bytes(BASIC)[:9216]), "no end-of-archive marker"),
        (gzip.compress(tar_bytes(BASIC)[:9216] + bytes(100)), "no end-of-archive marker"),
        (gzip.compress(tar_bytes(BASIC) + b"trailing"), "data after the end of the tar archive"),
        (gzip.compress(tar_bytes(BASIC)[:2048] + b"x" * 512), "invalid tar header"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_broken_archives(data: bytes, message: str) -> None:
    with pytest.raises(TarballError, match=message):
        normalize(data)


def test_truncated_file_data() -> None:
    whole = tar_bytes([TOP, M("source/f", data=b"x" * 5000)])
    with pytest.raises(TarballError, match=r"unexpected end of data|truncated"):
        normalize(gzip.compress(whole[: 512 * 3 + 1000]))


def test_symlink_loops_are_kept() -> None:
    """A loop cannot lead out of the tree: like the kernel, it resolves to nothing."""
    members = [
        TOP,
        M("source/a", tarfile.SYMTYPE, link="b"),
        M("source/b", tarfile.SYMTYPE, link="a/../.."),
        M("source/self", tarfile.SYMTYPE, link="self/x"),
    ]
    s = normalize(tgz(members))
    entries = {e.path: e.target for e in nar.list_entries([s.nar_bytes()])}
    assert entries == {"": b"", "a": b"b", "b": b"a/../..", "self": b"self/x"}


def test_pack_tree_refuses(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "l").symlink_to("../outside")
    with pytest.raises(TarballError, match="leads outside the tree") as info:
        pack_tree(root, T0)
    assert "source/l" in str(info.value)
    (root / "l").unlink()
    os.mkfifo(root / "p")
    with pytest.raises(TarballError, match="not a file, directory or symlink"):
        pack_tree(root, T0)


# ---------------------------------------------------------------------------- properties

_names = st.text("ab.-_é", min_size=1, max_size=4).filter(lambda n: n not in (".", ".."))


@st.composite
def trees(draw: st.DrawFn) -> dict[tuple[str, ...], tuple[str, bytes, bool]]:
    """path -> (kind, contents or target, executable), parents before children."""
    out: dict[tuple[str, ...], tuple[str, bytes, bool]] = {}
    dirs: list[tuple[str, ...]] = [()]
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.sampled_from(dirs))
        path = (*parent, draw(_names))
        if path in out:
            continue
        kind = draw(st.sampled_from(["regular", "directory", "symlink"]))
        if kind == "directory" and len(path) < 4:
            dirs.append(path)
            out[path] = ("directory", b"", False)
        elif kind == "symlink":
            out[path] = ("symlink", draw(_names).encode(), False)
        else:
            out[path] = ("regular", draw(st.binary(max_size=64)), draw(st.booleans()))
    return out


def _write(root: Path, tree: dict[tuple[str, ...], tuple[str, bytes, bool]]) -> None:
    root.mkdir()
    for path, (kind, data, executable) in tree.items():
        p = root.joinpath(*path)
        if kind == "directory":
            p.mkdir()
        elif kind == "symlink":
            p.symlink_to(data.decode())
        else:
            p.write_bytes(data)
            p.chmod(0o755 if executable else 0o644)
    os.utime(root, (T0, T0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(), st.integers(0, 8**11 - 1))
def test_normalize_is_idempotent_and_matches_pack_tree(
    tree: dict[tuple[str, ...], tuple[str, bytes, bool]], mtime: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "top"
        _write(root, tree)
        os.utime(root, (mtime, mtime))
        packed = pack_tree(root, mtime)
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            tar.add(root, arcname="some-name")  # symlinks are archived, not followed
        s = normalize(out.getvalue())
        assert s.tarball == packed.tarball
        assert (s.nar_hash, s.nar_size) == nar.hash_path(root)
        assert s.nar_bytes() == b"".join(nar.dump(root))
        again = normalize(s.tarball)
        assert again == s
        assert again.nar_bytes() == s.nar_bytes()


def test_pax_header_bomb() -> None:
    """A pax record of 30 MiB (tarfile reads records whole) stops at the decompressed bound."""
    info = tarfile.TarInfo("source/f")
    info.pax_headers = {"comment": "x" * (30 << 20)}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir("source"))
        tar.addfile(info, io.BytesIO())
    with pytest.raises(TarballError, match="gzip bomb"):
        normalize(gzip.compress(out.getvalue()), SMALL)


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_gnu_long_names_and_bytearray_input() -> None:
    long_name = "source/" + "d" * 200 + "/" + "f" * 200
    members = [TOP, M("source/" + "d" * 200 + "/", D), M(long_name, data=b"deep")]
    s = normalize(bytearray(tgz(members, fmt=tarfile.GNU_FORMAT)))
    assert [m[0] for m in listing(s)] == ["source", "source/" + "d" * 200, long_name]
    too_long = [TOP, M("source/" + ("d" * 200 + "/") * 21 + "f")]
    with pytest.raises(TarballError, match="longer than 4096 bytes"):
        normalize(tgz(too_long, fmt=tarfile.GNU_FORMAT))


def test_names_that_are_not_utf8_survive() -> None:
    members = [TOP, M("source/caf\udce9", data=b"latin-1 name")]  # the byte 0xe9 alone
    s = normalize(tgz(members))
    assert normalize(s.tarball) == s
    names = [e.path for e in nar.list_entries([s.nar_bytes()])]
    assert [os.fsencode(n) for n in names] == [b"", b"caf\xe9"]


def test_errors_are_format_errors() -> None:
    with pytest.raises(FormatError):
        normalize(b"nope")
    with pytest.raises(ValueError):
        normalize(b"nope")


def test_symlink_checking_work_is_bounded() -> None:
    """Chains of symlinks with long targets cost at most a fixed amount of checking."""
    padding = "./" * 2000
    members = [TOP] + [
        M(f"source/s{i:02}", tarfile.SYMTYPE, link=f"{padding}s{i + 1:02}") for i in range(60)
    ]
    with pytest.raises(TarballError, match="too many or too complex to check"):
        normalize(tgz(members))


_VALID_TAR = tar_bytes(BASIC)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID_TAR) - 1), st.integers(0, 255)), max_size=8))
def test_corrupted_archives_fail_cleanly(edits: list[tuple[int, int]]) -> None:
    """Any byte edits of a valid archive give a Source or a TarballError, nothing else."""
    data = bytearray(_VALID_TAR)
    for offset, value in edits:
        data[offset] = value
    try:
        s = normalize(gzip.compress(bytes(data)))
    except TarballError:
        return
    assert normalize(s.tarball) == s


@settings(max_examples=200, deadline=None)
@given(st.integers(1, len(tgz(BASIC)) - 1), st.binary(max_size=16))
def test_cut_or_spliced_gzip_fails_cleanly(cut: int, junk: bytes) -> None:
    whole = tgz(BASIC)
    data = whole[:cut] + junk
    assume(data != whole)  # the junk may restore the cut bytes
    with pytest.raises(TarballError):
        normalize(data)


class _Trickle(io.RawIOBase):
    """A stream that hands out one byte first, then at most 7 per read, as a slow socket."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._data.read(min(len(b), 1 if self._data.tell() == 0 else 7))
        memoryview(b)[: len(chunk)] = chunk
        return len(chunk)


def test_short_reads() -> None:
    data = tgz(BASIC)
    assert normalize(_Trickle(data)) == normalize(data)  # type: ignore[arg-type]
    with pytest.raises(TarballError, match="not a gzip file"):
        normalize(_Trickle(b"\x1f" + b"x" * 100))  # type: ignore[arg-type]


def test_pax_names_agree_with_real_nix(real_nix: RealNix, tmp_path: Path) -> None:
    """Long, non-ASCII and non-UTF-8 names and long targets go through pax headers; Nix's
    libarchive must read our canonical tarball as the same tree."""
    long_dir = "source/" + "d" * 150
    members = [
        TOP,
        M(long_dir + "/", D),
        M(long_dir + "/" + "f" * 200, data=b"long", mode=0o755),
        M("source/é ü", data=b"unicode"),
        M("source/caf\udce9", data=b"latin-1"),
        M("source/l", tarfile.SYMTYPE, link="d" * 150 + "/" + "f" * 200),
    ]
    s = normalize(tgz(members))
    archive = tmp_path / "pax.tar.gz"
    archive.write_bytes(s.tarball)
    expr = (
        'let t = builtins.fetchTree { type = "tarball"; url = "file://' + str(archive) + '"; }; '
        "in { inherit (t) narHash; path = t.outPath; }"
    )
    out = real_nix.run(
        ["nix", "eval", "--extra-experimental-features", "flakes", "--impure", "--json",
         "--expr", expr]
    )  # fmt: skip
    got = json.loads(out.stdout)
    assert Hash.parse(got["narHash"]) == s.nar_hash
    assert got["path"] == s.store_path.path()


def test_limits_hold_for_the_canonical_names() -> None:
    """A short top directory must not let a path grow past the limit once named source/."""
    limits = TarballLimits(path=40)
    ok = [M("s/", D), M("s/" + "f" * 33)]  # 35 bytes here, 40 as source/...
    assert normalize(normalize(tgz(ok), limits).tarball, limits)
    with pytest.raises(TarballError, match="longer than 40 bytes"):
        normalize(tgz([M("s/", D), M("s/" + "f" * 34)]), limits)


def test_implied_directories_count_as_entries() -> None:
    limits = TarballLimits(entries=4)
    implied = [M("s/a/b/c/f")]  # the canonical tarball has 5 entries: source, a, b, c, f
    with pytest.raises(TarballError, match="counting implied directories"):
        normalize(tgz(implied), limits)
    fits = [M("s/a/b/f")]
    assert normalize(normalize(tgz(fits), limits).tarball, limits)
