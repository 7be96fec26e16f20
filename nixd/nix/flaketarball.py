"""Flake source tarballs: check an uploaded ``.tar.gz`` and rewrite it in one canonical form.

A flake release is a tarball that Nix 2.8 fetches as a ``tarball`` input: it unpacks it,
takes the single top-level directory as the source tree, and locks the tree's NAR hash
(``{type = "tarball"; url; narHash}``; 2.8 records no ``lastModified`` for tarballs, newer
Nix takes that directory's mtime, which is :attr:`Source.last_modified`). The tree is the
store path ``fixed_output_path(nar_hash, "source")``, which Nix first tries to substitute
from its binary caches, so the server can serve a release both as the tarball and as that
path.

:func:`normalize` reads an uploaded tarball as a stream (never extracting it to disk),
checks every entry before reading its data, and keeps only what Nix keeps of the tree
(names, file contents, the owner-executable bit, symlink targets). From that tree it
writes the canonical tarball: one top directory ``source``, entries depth first in NAR
order, every mtime ``last_modified``, uid/gid 0 without names, modes 0755 for directories
and executables and 0644 for other files, gzip with mtime 0. So one tree always gives the
same bytes (with the same zlib), whatever the upload's order, owners, modes or times, and
``normalize`` of a canonical tarball gives it back unchanged. :func:`pack_tree` makes the
same from a directory on disk.

Refused, with a :class:`TarballError` naming the entry: absolute paths and ``..``, symlinks
that are absolute or resolve (through other symlinks of the tree) outside it (a symlink
loop is kept: like the kernel, it resolves to nothing after 40 hops), hard links,
devices, fifos, sparse and other special entries, duplicates, a path inside a file or
symlink, more or less than one top-level directory, input that is not gzip or not tar,
truncated input, data after the archive, and anything over :class:`TarballLimits`. Sizes
from headers are checked before any data is read, so a "bomb" costs at most the limits.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from nixd.errors import FormatError
from nixd.nix import nar
from nixd.nix.hashes import Hash
from nixd.nix.nar import TreeNode
from nixd.nix.storepath import StorePath, fixed_output_path

__all__ = ["TOP_DIR", "Source", "TarballError", "TarballLimits", "normalize", "pack_tree"]

TOP_DIR = "source"
"""The name of the top directory in a canonical tarball (and of the store path)."""

_MiB = 1 << 20
_READ = 64 * 1024
_TAIL = 64 * 1024  # decompressed bytes kept to look at the block where tar iteration ended
_MAX_MTIME = 8**11 - 1  # fits the ustar header field, so no pax header is needed for it
_MAX_SYMLINK_HOPS = 40  # Linux's limit
_MAX_RESOLVE_STEPS = 2_000_000  # total work spent checking where symlinks lead


class TarballError(FormatError):
    """A flake tarball is malformed, hostile or over the limits."""


@dataclass(frozen=True, slots=True)
class TarballLimits:
    """Bounds on one tarball. ``unpacked`` counts file contents and symlink targets."""

    compressed: int = 256 * _MiB
    unpacked: int = 1024 * _MiB
    entries: int = 100_000
    path: int = 4096
    depth: int = 64


@dataclass(frozen=True, slots=True)
class Source:
    """A checked source tree, as its canonical tarball and as the store path Nix locks.

    Holds the unpacked tree in memory (bounded by the limits) to write its NAR.
    """

    tarball: bytes = field(repr=False)
    tarball_sha256: str  # hex
    nar_hash: Hash
    nar_size: int
    store_path: StorePath
    last_modified: int
    _nodes: tuple[TreeNode, ...] = field(repr=False, compare=False)

    @property
    def tarball_size(self) -> int:
        return len(self.tarball)

    @property
    def content_address(self) -> str:
        """The narinfo ``CA`` of :attr:`store_path`: ``fixed:r:sha256:<base32>``."""
        return f"fixed:r:{self.nar_hash.encode('base32')}"

    def nar_chunks(self) -> Iterator[bytes]:
        """The NAR of the tree, in chunks of about 1 MiB."""
        return nar.dump_nodes(self._nodes)

    def nar_bytes(self) -> bytes:
        """The whole NAR of the tree."""
        return b"".join(self.nar_chunks())


# ------------------------------------------------------------------------------ the tree


class _Tree:
    """The tree being collected: nodes by path below the top directory, with bounds."""

    def __init__(self, limits: TarballLimits) -> None:
        self.limits = limits
        self.nodes: dict[tuple[bytes, ...], TreeNode] = {(): TreeNode((), "directory")}
        self.explicit: set[tuple[bytes, ...]] = set()  # directories that had their own entry
        self.unpacked = 0
        self.entries = 0

    def count(self, where: str, size: int = 0) -> None:
        """Account for one more entry of ``size`` bytes, before its data is read."""
        self.entries += 1
        if self.entries > self.limits.entries:
            raise TarballError(f"more than {self.limits.entries} entries", where=where)
        if size < 0 or self.unpacked + size > self.limits.unpacked:
            raise TarballError(
                f"unpacked size over the limit of {self.limits.unpacked} bytes", where=where
            )
        self.unpacked += size

    def add(self, node: TreeNode, where: str) -> None:
        path = node.path
        if not path:
            if node.type != "directory":
                raise TarballError("the top-level entry is not a directory", where=where)
            if () in self.explicit:
                raise TarballError("duplicate entry", where=where)
            self.explicit.add(())
            return
        for i in range(1, len(path)):
            parent = self.nodes.get(path[:i])
            if parent is None:
                # An implied directory is an entry of the canonical tarball: count it.
                self._new_node(where)
                self.nodes[path[:i]] = TreeNode(path[:i], "directory")
            elif parent.type != "directory":
                raise TarballError(
                    f"entry is inside {_show(path[:i])!r}, which is a {parent.type}", where=where
                )
        old = self.nodes.get(path)
        if old is not None:
            implicit_dir = old.type == "directory" and path not in self.explicit
            if not (implicit_dir and node.type == "directory"):
                raise TarballError("duplicate entry", where=where)
        else:
            self._new_node(where)
        self.nodes[path] = node
        if node.type == "directory":
            self.explicit.add(path)

    def _new_node(self, where: str) -> None:
        if len(self.nodes) >= self.limits.entries:
            raise TarballError(
                f"more than {self.limits.entries} entries (counting implied directories)",
                where=where,
            )

    def check_symlinks(self) -> None:
        """Refuse a symlink that leads outside the tree, following the tree's symlinks."""
        budget = [_MAX_RESOLVE_STEPS]
        for node in self.nodes.values():
            if node.type == "symlink":
                self._resolve(node, budget)

    def _resolve(self, link: TreeNode, budget: list[int]) -> None:
        where = _show(link.path)
        here: list[bytes] = list(link.path[:-1])
        pending = deque(link.target.split(b"/"))
        hops = 0
        while pending:
            budget[0] -= 1
            if budget[0] < 0:
                raise TarballError("symlinks too many or too complex to check", where=where)
            name = pending.popleft()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if not here:
                    raise TarballError(
                        f"symlink target {_text(link.target)!r} leads outside the tree",
                        where=where,
                    )
                here.pop()
                continue
            here.append(name)
            node = self.nodes.get(tuple(here))
            if node is None or node.type != "symlink":
                continue  # a missing name or a file: the rest cannot climb out on a real system
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                return  # ELOOP, as the kernel says: it leads nowhere, so not outside either
            here.pop()
            if node.target.startswith(b"/"):
                raise TarballError(f"symlink leads through {_show(node.path)!r}", where=where)
            pending.extendleft(reversed(node.target.split(b"/")))

    def finish(self, last_modified: int) -> Source:
        self.check_symlinks()
        if not 0 <= last_modified <= _MAX_MTIME:
            raise TarballError(f"modification time {last_modified} is out of range")
        nodes = tuple(self.nodes[p] for p in sorted(self.nodes))
        tarball = _write_tarball(nodes, last_modified)
        hasher = nar.NarHasher()
        try:
            for chunk in nar.dump_nodes(nodes):
                hasher.update(chunk)
        except FormatError as exc:
            raise TarballError(exc.message, where=exc.where) from None
        return Source(
            tarball=tarball,
            tarball_sha256=hashlib.sha256(tarball).hexdigest(),
            nar_hash=hasher.nar_hash,
            nar_size=hasher.nar_size,
            store_path=fixed_output_path(hasher.nar_hash, TOP_DIR),
            last_modified=last_modified,
            _nodes=nodes,
        )


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _show(path: tuple[bytes, ...]) -> str:
    return "/".join([TOP_DIR, *(_text(p) for p in path)])


def _check_target(target: bytes, where: str) -> None:
    if not target:
        raise TarballError("symlink has an empty target", where=where)
    if b"\0" in target or len(target) > nar.MAX_TARGET:
        raise TarballError("symlink target has a NUL or is too long", where=where)
    if target.startswith(b"/"):
        raise TarballError(f"symlink target {_text(target)!r} is absolute", where=where)


# ----------------------------------------------------------------------------- writing


def _write_tarball(nodes: tuple[TreeNode, ...], mtime: int) -> bytes:
    out = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of names and times.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz,
        tarfile.open(
            fileobj=gz,
            mode="w|",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tar,  # fmt: skip
    ):
        for node in nodes:
            info = tarfile.TarInfo(
                "/".join([TOP_DIR, *(p.decode("utf-8", "surrogateescape") for p in node.path)])
            )
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if node.type == "directory":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif node.type == "symlink":
                info.type, info.mode = tarfile.SYMTYPE, 0o777
                info.linkname = node.target.decode("utf-8", "surrogateescape")
                tar.addfile(info)
            else:
                info.type, info.mode = tarfile.REGTYPE, 0o755 if node.executable else 0o644
                info.size = len(node.contents)
                tar.addfile(info, io.BytesIO(node.contents))
    return out.getvalue()


# ----------------------------------------------------------------------------- reading


class _Gunzip(io.RawIOBase):
    """Decompresses gzip from ``source`` with bounds, for tarfile to read as a stream.

    Counts compressed bytes (``limits.compressed``) and decompressed bytes (file contents
    plus headers: a bound derived from the limits), and keeps the last bytes it handed
    out so the end of the tar archive can be checked after tarfile stops reading.
    """

    def __init__(self, source: BinaryIO, limits: TarballLimits) -> None:
        self._source = source
        self._limit_in = limits.compressed
        # Headers: a block each, plus long-name records up to the path limit for some.
        self._limit_out = limits.unpacked + limits.entries * 1024 + 8 * _MiB
        self._in = 0
        self.pos = 0  # decompressed bytes handed out
        self.tail = bytearray()
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""
        self._eof = False
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read_some(len(b))
        n = len(data)
        memoryview(b)[:n] = data
        return n

    def read_some(self, n: int) -> bytes:
        while not self._pending and not self._eof:
            self._fill(n)
        data, self._pending = self._pending[:n], self._pending[n:]
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > _TAIL:
            del self.tail[: len(self.tail) - _TAIL]
        return data

    def _fill(self, n: int) -> None:
        if self._z.eof:
            if self._z.unused_data or self._source.read(1):
                raise TarballError("data after the end of the gzip stream")
            self._eof = True
            return
        chunk = self._z.unconsumed_tail
        if not chunk:
            chunk = self._source.read(_READ)
            if not self._started:
                self._started = True
                while chunk and len(chunk) < 2:  # a stream may hand out one byte at a time
                    more = self._source.read(_READ)
                    if not more:
                        break
                    chunk += more
                if not chunk:
                    raise TarballError("the tarball is empty (not gzip)")
                if not chunk.startswith(b"\x1f\x8b"):
                    raise TarballError("not a gzip file (a flake tarball must be .tar.gz)")
            if not chunk:
                raise TarballError("truncated gzip data (the upload ended early)")
            self._in += len(chunk)
            if self._in > self._limit_in:
                raise TarballError(f"compressed tarball is larger than {self._limit_in} bytes")
        try:
            out = self._z.decompress(chunk, max(n, _READ))
        except zlib.error as exc:
            raise TarballError(f"corrupt gzip data: {exc}") from None
        if self.pos + len(self._pending) + len(out) > self._limit_out:
            raise TarballError(
                f"decompressed tarball is larger than {self._limit_out} bytes (a gzip bomb?)"
            )
        self._pending += out

    def block_at(self, offset: int) -> bytes:
        """The 512 bytes at ``offset`` of the decompressed stream (fewer at its end)."""
        start = self.pos - len(self.tail)
        if offset < start:
            raise TarballError("internal: tar end block is no longer buffered")
        have = bytes(self.tail[offset - start :])
        while len(have) < tarfile.BLOCKSIZE:
            more = self.read_some(tarfile.BLOCKSIZE - len(have))
            if not more:
                break
            have += more
        return have[: tarfile.BLOCKSIZE]

    def drain_zeros(self) -> None:
        """Read to the end; only NUL padding may follow the archive."""
        while data := self.read_some(_READ):
            if data.count(0) != len(data):
                raise TarballError("data after the end of the tar archive")


_REGULAR = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_KINDS = {
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}


def normalize(data: bytes | BinaryIO, limits: TarballLimits | None = None) -> Source:
    """Check an uploaded ``.tar.gz`` (bytes or a binary file) and make its :class:`Source`."""
    limits = limits or TarballLimits()
    source: BinaryIO = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    gunzip = _Gunzip(source, limits)
    tree = _Tree(limits)
    try:
        tar = tarfile.open(  # noqa: SIM115 - closed by the with below, after the checks
            fileobj=cast(BinaryIO, gunzip), mode="r|", encoding="utf-8",
            errors="surrogateescape",
        )  # fmt: skip
    except TarballError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise TarballError(f"not a tar archive: {exc}") from None
    with tar:
        return _read(tar, tree, gunzip, limits)


def _read(tar: tarfile.TarFile, tree: _Tree, gunzip: _Gunzip, limits: TarballLimits) -> Source:
    top: bytes | None = None
    top_mtime: int | None = None
    newest = 0
    try:
        while True:
            member = tar.next()
            # Stream mode: keep nothing of the entries already read.
            tar.members.clear()  # type: ignore[attr-defined]
            if member is None:
                break
            raw = member.name.encode("utf-8", "surrogateescape")
            where = _text(raw)
            parts = _split(raw, member.isdir(), limits, where)
            if not parts:
                if not member.isdir():
                    raise TarballError("entry has no name", where=where)
                tree.count(where)  # "." or "./": the archive's own root, nothing to keep
                continue
            if top is None:
                top = parts[0]
            elif parts[0] != top:
                raise TarballError(
                    f"more than one top-level entry: {_text(top)!r} and {_text(parts[0])!r}",
                    where=where,
                )
            path = tuple(parts[1:])
            if len(TOP_DIR) + sum(len(p) + 1 for p in path) > limits.path:
                # As named in the canonical tarball, which must pass these limits again.
                raise TarballError(f"path longer than {limits.path} bytes", where=where[:200])
            mtime = _mtime(member.mtime, where)
            newest = max(newest, mtime)
            if member.type in _REGULAR:
                tree.count(where, member.size)
                reader = tar.extractfile(member)
                assert reader is not None  # a regular file always has a reader
                contents = reader.read(member.size)
                if len(contents) != member.size:
                    raise TarballError("file data is truncated", where=where)
                node = TreeNode(path, "regular", bool(member.mode & stat.S_IXUSR), contents)
            elif member.type == tarfile.DIRTYPE:
                tree.count(where)
                node = TreeNode(path, "directory")
                if not path:
                    top_mtime = mtime
            elif member.type == tarfile.SYMTYPE:
                target = member.linkname.encode("utf-8", "surrogateescape")
                tree.count(where, len(target))
                _check_target(target, where)
                node = TreeNode(path, "symlink", target=target)
            else:
                kind = _KINDS.get(member.type, f"entry of type {member.type!r}")
                raise TarballError(f"a {kind} cannot be part of a flake source", where=where)
            tree.add(node, where)
        end = gunzip.block_at(tar.offset)
        if len(end) < tarfile.BLOCKSIZE:
            raise TarballError("the tar archive is truncated (no end-of-archive marker)")
        if end.count(0) != len(end):
            raise TarballError(f"invalid tar header at byte {tar.offset} of the archive")
        gunzip.drain_zeros()
    except TarballError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise TarballError(f"invalid tar archive: {exc}") from None
    if top is None:
        raise TarballError("the archive is empty: it needs one top-level directory")
    return tree.finish(newest if top_mtime is None else top_mtime)


def _split(raw: bytes, is_dir: bool, limits: TarballLimits, where: str) -> list[bytes]:
    """The names of a member's path; refuses what could land outside the tree."""
    if len(raw) > limits.path:
        raise TarballError(f"path longer than {limits.path} bytes", where=where[:200] + "...")
    if raw.startswith(b"/"):
        raise TarballError("absolute path", where=where)
    if b"\0" in raw:
        raise TarballError("path has a NUL byte", where=where)
    if is_dir:
        raw = raw.rstrip(b"/")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise TarballError("path has a '..' component", where=where)
    if len(parts) > limits.depth + 1:
        raise TarballError(f"path deeper than {limits.depth} directories", where=where)
    for part in parts:
        if len(part) > nar.MAX_NAME:
            raise TarballError(f"a name is longer than {nar.MAX_NAME} bytes", where=where)
    return parts


def _mtime(value: float, where: str) -> int:
    if not 0 <= value <= _MAX_MTIME:
        raise TarballError(f"modification time {value} is out of range", where=where)
    return int(value)


def pack_tree(root: Path, last_modified: int, limits: TarballLimits | None = None) -> Source:
    """The :class:`Source` of the directory ``root``, as if it were an uploaded tarball.

    Walks ``root`` without following symlinks and applies the same checks as
    :func:`normalize`, so ``pack_tree(d, t)`` equals ``normalize`` of any tarball of ``d``
    whose top directory has mtime ``t``.
    """
    limits = limits or TarballLimits()
    tree = _Tree(limits)
    tree.count(str(root))
    tree.add(TreeNode((), "directory"), str(root))
    stack: list[tuple[bytes, ...]] = [()]
    base = os.fsencode(root)
    while stack:
        dir_path = stack.pop()
        with os.scandir(os.path.join(base, *dir_path) if dir_path else base) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            path = (*dir_path, entry.name)
            where = _show(path)
            if len(b"/".join(path)) + len(TOP_DIR) + 1 > limits.path:
                raise TarballError(f"path longer than {limits.path} bytes", where=where)
            if len(path) > limits.depth:
                raise TarballError(f"path deeper than {limits.depth} directories", where=where)
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                tree.count(where)
                tree.add(TreeNode(path, "directory"), where)
                stack.append(path)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(entry.path)
                tree.count(where, len(target))
                _check_target(target, where)
                tree.add(TreeNode(path, "symlink", target=target), where)
            elif stat.S_ISREG(st.st_mode):
                tree.count(where, st.st_size)
                with open(entry.path, "rb") as f:
                    contents = f.read(st.st_size + 1)
                if len(contents) != st.st_size:
                    raise TarballError("file changed size while being read", where=where)
                node = TreeNode(path, "regular", bool(st.st_mode & stat.S_IXUSR), contents)
                tree.add(node, where)
            else:
                raise TarballError("not a file, directory or symlink", where=where)
    return tree.finish(last_modified)
