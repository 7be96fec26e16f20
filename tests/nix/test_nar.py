"""NAR writing, hashing and restoring against the real Nix 2.8.

The reference is ``nix-store --dump`` (no store needed), ``nix-store --restore`` and
``nix hash path``: our archives must be byte-identical, and each side must unpack the
other's archive to the same tree with the same modes.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from nixd.errors import FormatError
from nixd.nix import nar
from tests.realnix import RealNix

MiB = 1 << 20


def build_tree(root: Path) -> None:
    """A tree with every case a NAR writer can get wrong."""
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "hello").write_bytes(b"hello\n")
    for n in range(7, 18):  # every padding length
        (root / f"pad{n}").write_bytes(b"p" * n)
    for name, mode in [("run", 0o755), ("owner-x", 0o700), ("group-x", 0o654), ("other-x", 0o601)]:
        (root / name).write_bytes(name.encode())
        (root / name).chmod(mode)
    (root / "ro-exec").write_bytes(b"x")
    (root / "ro-exec").chmod(0o500)
    (root / "emptydir").mkdir()
    (root / "sub dir").mkdir()
    (root / "sub dir" / "with space.txt").write_bytes(b"spaces")
    deep = root / "a" / "b" / "c" / "d" / "e"
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"deep")
    # Sorting traps: raw byte order, not locale or Unicode order; non-UTF-8 names.
    traps = root / "sort"
    traps.mkdir()
    for name in ["a", "B", "Z", "_", "~", "a.b", "a-b", "ab", "a b", "A", "é", "日本", "e\u0301"]:
        (traps / name).write_text(name)
    for raw in [b"\xff\xfe-not-utf8", b"line\nbreak", b"tab\tname", b"\x01ctl", b"\x7f"]:
        with open(os.path.join(os.fsencode(traps), raw), "wb") as f:
            f.write(raw)
    (root / "link-rel").symlink_to("hello")
    (root / "link-abs").symlink_to("/etc/passwd")
    (root / "link-dangling").symlink_to("does/not/exist")
    (root / "link-dir").symlink_to("sub dir")
    (root / "link-dotdot").symlink_to("../../outside")
    (root / "link-long").symlink_to("x/" * 1000 + "y")
    os.symlink(b"\xff\xfe", os.path.join(os.fsencode(root), b"link-bytes"))
    # Sizes around the 1 MiB chunk boundary, and many small files batched into chunks.
    pattern = bytes(range(256)) * 4096
    (root / "one-mib").write_bytes(pattern)
    (root / "one-mib-minus").write_bytes(pattern[:-1])
    (root / "three-mib-plus").write_bytes(pattern * 3 + b"tail!")
    many = root / "many"
    many.mkdir()
    for i in range(600):
        (many / f"f{i:04}").write_bytes(bytes([i % 251]) * (i * 7 % 3000))


def nix_dump(real_nix: RealNix, path: Path) -> bytes:
    return real_nix.run(["nix-store", "--dump", str(path)], store=False).stdout


def snapshot(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Type, content, exec bit and link target of every node, by relative path."""

    def node(p: bytes) -> tuple[object, ...]:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            return ("symlink", os.readlink(p))
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            return ("regular", digest, bool(st.st_mode & stat.S_IXUSR))
        assert stat.S_ISDIR(st.st_mode)
        return ("directory",)

    top = os.fsencode(root)
    result = {b"": node(top)}
    if result[b""] == ("directory",):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                result[os.path.relpath(full, top)] = node(full)
    return result


def modes(root: Path) -> dict[bytes, int]:
    top = os.fsencode(root)
    result = {b"": stat.S_IMODE(os.lstat(top).st_mode)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not stat.S_ISLNK(st.st_mode):
                result[os.path.relpath(full, top)] = stat.S_IMODE(st.st_mode)
    return result


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    build_tree(root)
    return root


def test_dump_is_byte_identical_to_nix(real_nix: RealNix, tree: Path) -> None:
    chunks = list(nar.dump(tree))
    assert b"".join(chunks) == nix_dump(real_nix, tree)
    assert all(isinstance(c, bytes) for c in chunks)
    assert max(map(len, chunks)) <= 2 * MiB
    assert len(chunks) > 3  # streamed, not one blob


@pytest.mark.parametrize(
    "kind", ["file", "empty-file", "exec-file", "symlink", "dangling", "empty-dir", "sparse-dir"]
)
def test_dump_of_any_root(real_nix: RealNix, tmp_path: Path, kind: str) -> None:
    root = tmp_path / "root"
    if kind == "file":
        root.write_bytes(b"contents\n")
    elif kind == "empty-file":
        root.write_bytes(b"")
    elif kind == "exec-file":
        root.write_bytes(b"#!/bin/sh\n")
        root.chmod(0o555)
    elif kind == "symlink":
        (tmp_path / "target").mkdir()
        root.symlink_to("target")
    elif kind == "dangling":
        root.symlink_to("/nowhere/at/all")
    else:
        root.mkdir()
        if kind == "sparse-dir":
            (root / "only").mkdir()
    ours = b"".join(nar.dump(root))
    assert ours == nix_dump(real_nix, root)
    digest, size = nar.hash_path(root)
    assert (digest.digest, size) == (hashlib.sha256(ours).digest(), len(ours))


def test_deep_nesting_dumps_and_restores(real_nix: RealNix, tmp_path: Path) -> None:
    # Deeper than the restorer keeps directory fds open, so it climbs back through "..".
    root = tmp_path / "deep"
    path = os.fsencode(root)
    os.mkdir(path)
    for i in range(150):
        path = os.path.join(path, b"d")
        os.mkdir(path)
        with open(os.path.join(path, b"f%d" % i), "wb") as f:
            f.write(b"level %d" % i)
    data = nix_dump(real_nix, root)
    assert b"".join(nar.dump(root)) == data
    nar.restore([data], tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(root)
    # A deep partial restore is removed again.
    with pytest.raises(FormatError, match="truncated"):
        nar.restore([data[: len(data) - 100]], tmp_path / "partial")
    assert not (tmp_path / "partial").exists()


def test_hash_matches_nix_hash_path(real_nix: RealNix, tree: Path) -> None:
    digest, size = nar.hash_path(tree)
    out = real_nix.run(["nix", "hash", "path", "--base32", str(tree)]).stdout.decode().strip()
    assert str(digest) == f"sha256:{out}"
    assert size == len(nix_dump(real_nix, tree))


def test_hasher_in_pieces() -> None:
    hasher = nar.NarHasher()
    for piece in (b"abc", bytearray(b"def"), memoryview(b"ghij")):
        hasher.update(piece)
    assert hasher.nar_size == 10
    assert hasher.nar_hash.digest == hashlib.sha256(b"abcdefghij").digest()


def test_big_sparse_file_in_constant_memory(real_nix: RealNix, tmp_path: Path) -> None:
    big = tmp_path / "big"
    size = 100 * MiB + 12345
    with open(big, "wb") as f:  # mostly holes, with data at a few places
        for at in (0, 7 * MiB + 3, 64 * MiB - 1, size - 5):
            f.seek(at)
            f.write(b"data!")
        f.truncate(size)
    big.chmod(0o755)

    ref, ref_size = hashlib.sha256(), 0
    with subprocess.Popen(
        ["nix-store", "--dump", str(big)], stdout=subprocess.PIPE, env=real_nix.env
    ) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(MiB):
            ref.update(chunk)
            ref_size += len(chunk)
        assert proc.wait(timeout=60) == 0

    tracemalloc.start()
    try:
        ours, our_size = hashlib.sha256(), 0
        for chunk in nar.dump(big):
            ours.update(chunk)
            our_size += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (ours.hexdigest(), our_size) == (ref.hexdigest(), ref_size)
    assert peak < 8 * MiB
    digest, hsize = nar.hash_path(big)
    assert (digest.digest.hex(), hsize) == (ref.hexdigest(), ref_size)


def test_unsupported_file_types_name_the_path(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    os.mkfifo(root / "fifo")
    with pytest.raises(FormatError, match="fifo") as info:
        b"".join(nar.dump(root))
    assert info.value.where == str(root / "fifo")
    os.unlink(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        with pytest.raises(FormatError, match="socket") as info:
            nar.hash_path(root)
    assert info.value.where == str(root / "sock")
    os.mkfifo(tmp_path / "rootfifo")
    with pytest.raises(FormatError, match="fifo"):
        nar.hash_path(tmp_path / "rootfifo")


def test_missing_path_is_an_os_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        nar.hash_path(tmp_path / "nope")
    assert info.value.filename == str(tmp_path / "nope")


def test_nix_restores_our_archive(real_nix: RealNix, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "by-nix"
    real_nix.run(["nix-store", "--restore", str(out)], store=False, input=b"".join(nar.dump(tree)))
    assert snapshot(out) == snapshot(tree)


def test_we_restore_nix_archive_like_nix(real_nix: RealNix, tree: Path, tmp_path: Path) -> None:
    data = nix_dump(real_nix, tree)
    theirs, ours = tmp_path / "by-nix", tmp_path / "by-us"
    real_nix.run(["nix-store", "--restore", str(theirs)], store=False, input=data)
    old = os.umask(0o077)  # Nix ignores the umask (it sets 022); so do we
    try:
        nar.restore([data[i : i + 65536] for i in range(0, len(data), 65536)], ours)
    finally:
        os.umask(old)
    assert snapshot(ours) == snapshot(tree)
    assert modes(ours) == modes(theirs)
    assert set(modes(ours).values()) == {0o644, 0o755}


@pytest.mark.parametrize("kind", ["file", "exec", "symlink"])
def test_restore_non_directory_roots(real_nix: RealNix, tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    if kind == "symlink":
        src.symlink_to("../elsewhere")
    else:
        src.write_bytes(b"x" * 10)
        src.chmod(0o700 if kind == "exec" else 0o600)
    data = nix_dump(real_nix, src)
    nar.restore([data], tmp_path / "ours")
    real_nix.run(["nix-store", "--restore", str(tmp_path / "theirs")], store=False, input=data)
    assert snapshot(tmp_path / "ours") == snapshot(src)
    if kind != "symlink":
        assert modes(tmp_path / "ours") == modes(tmp_path / "theirs")


def test_restore_into_an_empty_directory(tmp_path: Path, tree: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    nar.restore(nar.dump(tree), dest)
    assert snapshot(dest) == snapshot(tree)


def test_restore_refuses_an_existing_destination(tmp_path: Path) -> None:
    data = b"".join(nar.dump(Path(__file__).parent))  # any directory
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        nar.restore([data], full)
    assert os.listdir(full) == ["keep"]

    (tmp_path / "file").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        nar.restore([data], tmp_path / "file")
    assert (tmp_path / "file").read_bytes() == b"mine"

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")  # never followed, even to an empty dir
    with pytest.raises(FileExistsError):
        nar.restore([data], tmp_path / "link")
    assert os.listdir(tmp_path / "real") == []

    empty = tmp_path / "empty"
    empty.mkdir()
    file_nar = b"".join(nar.dump(tmp_path / "file"))
    with pytest.raises(FileExistsError, match="only a directory"):
        nar.restore([file_nar], empty)
    assert empty.is_dir()
    assert os.listdir(empty) == []


def test_restore_never_writes_outside_dest(tmp_path: Path) -> None:
    # Symlinks pointing out of the tree are created, never followed.
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-up").symlink_to("../outside")
    (src / "b-abs").symlink_to(str(tmp_path / "outside"))
    (src / "c").write_bytes(b"c")
    data = b"".join(nar.dump(src))
    (tmp_path / "outside").mkdir()
    nar.restore([data], tmp_path / "dest")
    assert os.listdir(tmp_path / "outside") == []
    assert snapshot(tmp_path / "dest") == snapshot(src)


def test_failed_restore_keeps_a_pre_existing_dest(tmp_path: Path, tree: Path) -> None:
    data = b"".join(nar.dump(tree))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(FormatError, match="truncated"):
        nar.restore([data[:5000]], dest)
    assert dest.is_dir()  # not ours to remove
    assert sorted(os.listdir(tmp_path)) == ["dest", "tree"]


def _nodes_of(root: Path) -> list[nar.TreeNode]:
    """The tree at ``root`` as TreeNodes in archive order (what dump_nodes expects)."""
    nodes = []
    for entry in nar.list_entries(nar.dump(root)):
        path = tuple(os.fsencode(p) for p in entry.path.split("/")) if entry.path else ()
        full = os.path.join(root, entry.path) if entry.path else str(root)
        if entry.type == "regular":
            contents = Path(full).read_bytes()
            nodes.append(nar.TreeNode(path, "regular", entry.executable, contents))
        elif entry.type == "symlink":
            nodes.append(nar.TreeNode(path, "symlink", target=entry.target))
        else:
            nodes.append(nar.TreeNode(path, "directory"))
    return nodes


def test_dump_nodes_is_byte_identical_to_nix(real_nix: RealNix, tree: Path) -> None:
    chunks = list(nar.dump_nodes(_nodes_of(tree)))
    assert b"".join(chunks) == nix_dump(real_nix, tree)
    assert max(map(len, chunks)) <= 2 * MiB


def test_dump_nodes_single_file_and_symlink_roots() -> None:
    file_nar = b"".join(nar.dump_nodes([nar.TreeNode((), "regular", True, b"#!")]))
    assert nar.list_entries([file_nar]) == [nar.NarEntry("", "regular", 2, True)]
    link_nar = b"".join(nar.dump_nodes([nar.TreeNode((), "symlink", target=b"x")]))
    assert nar.list_entries([link_nar]) == [nar.NarEntry("", "symlink", target=b"x")]


D = nar.TreeNode((), "directory")


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([], "no nodes"),
        ([nar.TreeNode((b"a",), "directory")], "first node must be the root"),
        ([D, D], "root comes more than once"),
        (
            [D, nar.TreeNode((b"b",), "regular"), nar.TreeNode((b"a",), "regular")],
            "out of archive order",
        ),
        ([D, nar.TreeNode((b"a",), "regular"), nar.TreeNode((b"a",), "regular")], "duplicate"),
        ([D, nar.TreeNode((b"a", b"b"), "regular")], "outside a directory"),
        (
            [D, nar.TreeNode((b"a",), "regular"), nar.TreeNode((b"a", b"b"), "regular")],
            "outside a directory",
        ),
        ([D, nar.TreeNode((b"..",), "regular")], "invalid entry name"),
        ([D, nar.TreeNode((b"a/b",), "regular")], "invalid entry name"),
        ([D, nar.TreeNode((b"a\0",), "regular")], "invalid entry name"),
        ([D, nar.TreeNode((b"n" * 256,), "regular")], "longer than 255"),
        ([D, nar.TreeNode((b"l",), "symlink")], "symlink target is empty"),
        ([nar.TreeNode((), "regular"), nar.TreeNode((b"a",), "regular")], "nodes after a root"),
    ],
)
def test_dump_nodes_refuses_what_is_not_a_tree(nodes: list[nar.TreeNode], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        b"".join(nar.dump_nodes(nodes))
