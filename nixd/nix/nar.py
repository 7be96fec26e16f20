"""NAR, the Nix ARchive: the canonical serialisation of a file system tree.

A NAR is a sequence of *strings*: a little-endian u64 length, the bytes, then NUL padding
to a multiple of 8. The grammar (see ``libutil/archive.cc`` in Nix)::

    nar       = str("nix-archive-1") node
    node      = str("(") str("type") body str(")")
    body      = str("regular") [str("executable") str("")] str("contents") str(data)
              | str("symlink") str("target") str(target)
              | str("directory") entry*
    entry     = str("entry") str("(") str("name") str(name) str("node") node str(")")

Only the owner-x bit of a file survives, entries are sorted by raw bytes, and nothing else
(mtime, owner, other modes) is recorded, so a tree has exactly one NAR: its sha256 is the
``NarHash`` that narinfos sign.

This module has three parts, all without sockets or an event loop:

- :func:`dump` streams the NAR of a tree in chunks of about 1 MiB, in constant memory,
  byte-identical to ``nix-store --dump``; :func:`hash_path` and :class:`NarHasher` give the
  ``NarHash``/``NarSize`` of it. :func:`dump_nodes` writes the same archive for a tree that
  is not on disk (an unpacked tarball held in memory), given as :class:`TreeNode` s.
- :class:`NarParser` is a strict sans-I/O parser: it is fed bytes as they arrive and raises
  :class:`~nixd.errors.FormatError` (with the byte offset and the path inside the archive) at
  the first byte that is not the canonical NAR of some tree. It reports what it sees to a
  :class:`NarVisitor`; file contents are passed through as slices of the fed buffers.
- :func:`restore` unpacks a NAR into a new directory without ever writing outside it, and
  :func:`validate` checks an archive and returns its hash and size.

The parser accepts only what ``nix-store --dump`` can produce (canonical tag order, the
``executable`` marker with an empty value), which is stricter than Nix itself: Nix also
accepts, for example, trailing bytes after the archive.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, cast

from nixd.errors import FormatError
from nixd.nix.hashes import Hash

__all__ = [
    "MAX_DEPTH",
    "MAX_NAME",
    "MAX_TARGET",
    "NarEntry",
    "NarHasher",
    "NarParser",
    "NarVisitor",
    "TreeNode",
    "dump",
    "dump_nodes",
    "hash_path",
    "list_entries",
    "restore",
    "validate",
]

CHUNK_SIZE = 1 << 20
"""Target size of the chunks :func:`dump` yields, and of the reads it does."""

MAX_NAME = 255
"""Longest entry name accepted (NAME_MAX on Linux)."""
MAX_TARGET = 4095
"""Longest symlink target accepted (PATH_MAX - 1 on Linux)."""
MAX_DEPTH = 2048
"""Deepest directory nesting accepted: a deeper tree cannot be named within PATH_MAX, so
Nix could not have dumped it."""
MAX_CONTENTS = (1 << 63) - 1
"""Largest file accepted (Nix reads the size as a signed 64-bit offset)."""


def _str(data: bytes) -> bytes:
    """A NAR string: u64 LE length, the bytes, NUL padding to a multiple of 8."""
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


_MAGIC = _str(b"nix-archive-1")
_OPEN = _str(b"(")
_CLOSE = _str(b")")
_OPEN_TYPE = _OPEN + _str(b"type")
_T_REGULAR = _str(b"regular")
_T_SYMLINK = _str(b"symlink")
_T_DIRECTORY = _str(b"directory")
_CONTENTS = _str(b"contents")
_EXECUTABLE = _str(b"executable") + _str(b"")
_TARGET = _str(b"target")
_ENTRY = _str(b"entry")
_ENTRY_OPEN_NAME = _ENTRY + _OPEN + _str(b"name")
_NODE = _str(b"node")
_NODE_OPEN_TYPE = _NODE + _OPEN_TYPE

# Whole headers as dump() writes them; a regular file's is followed by its u64 size.
_HDR_FILE = _OPEN_TYPE + _T_REGULAR + _CONTENTS
_HDR_EXEC = _OPEN_TYPE + _T_REGULAR + _EXECUTABLE + _CONTENTS
_HDR_SYMLINK = _OPEN_TYPE + _T_SYMLINK + _TARGET
_HDR_DIR = _OPEN_TYPE + _T_DIRECTORY
_PAD = bytes(8)

_LE: Literal["little"] = "little"


# --------------------------------------------------------------------------------- writing


def dump(path: str | os.PathLike[str] | bytes) -> Iterator[bytes]:
    """Stream the NAR of ``path`` (not following a symlink at ``path`` itself).

    Yields ``bytes`` chunks of up to about 1 MiB that the caller may keep. Files are read in
    1 MiB pieces, never whole. Raises :class:`FormatError` for a file type NAR cannot hold
    (fifo, socket, device) or a file that shrinks while it is read, and ``OSError`` for
    I/O errors, both naming the path.
    """
    return cast(Iterator[bytes], _dump(os.fsencode(path), reuse=False))


def hash_path(path: str | os.PathLike[str] | bytes) -> tuple[Hash, int]:
    """The ``NarHash`` (sha256) and ``NarSize`` of the tree at ``path``."""
    hasher = NarHasher()
    for chunk in _dump(os.fsencode(path), reuse=True):
        hasher.update(chunk)
    return hasher.nar_hash, hasher.nar_size


class NarHasher:
    """Running sha256 and size of a NAR, fed chunk by chunk."""

    __slots__ = ("_sha", "_size")

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._size = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self._sha.update(chunk)
        self._size += memoryview(chunk).nbytes

    @property
    def nar_hash(self) -> Hash:
        return Hash("sha256", self._sha.digest())

    @property
    def nar_size(self) -> int:
        return self._size


def _dump(root: bytes, *, reuse: bool) -> Iterator[bytes | memoryview]:
    """The NAR writer. With ``reuse`` large files are yielded as memoryviews of one
    reused buffer, valid only until the next chunk is requested (for hashing)."""
    try:
        yield from _dump_tree(root, reuse)
    except OSError as exc:
        # Paths are bytes here; name them as text in messages.
        if isinstance(exc.filename, bytes):
            exc.filename = os.fsdecode(exc.filename)
        raise


def _dump_tree(root: bytes, reuse: bool) -> Iterator[bytes | memoryview]:
    out = bytearray(_MAGIC)
    big = bytearray(CHUNK_SIZE) if reuse else None
    # Directories being written: (path, remaining entries in reverse sorted order).
    stack: list[tuple[bytes, list[os.DirEntry[bytes]]]] = []
    st = os.lstat(root)
    path = root
    entry: os.DirEntry[bytes] | None = None
    while True:
        # Write the node at `path` (`st` for the root, else `entry`).
        if entry is None:
            kind = st.st_mode
            is_dir, is_link, is_reg = stat.S_ISDIR(kind), stat.S_ISLNK(kind), stat.S_ISREG(kind)
        else:
            is_link = entry.is_symlink()
            is_dir = not is_link and entry.is_dir(follow_symlinks=False)
            is_reg = not is_link and not is_dir and entry.is_file(follow_symlinks=False)
        if is_reg:
            yield from _dump_file(path, out, big)
            if stack:
                out += _CLOSE
        elif is_link:
            out += _HDR_SYMLINK
            out += _str(os.readlink(path))
            out += _CLOSE
            if stack:
                out += _CLOSE
        elif is_dir:
            out += _HDR_DIR
            if len(stack) >= MAX_DEPTH:
                raise FormatError("directory nesting too deep", where=os.fsdecode(path))
            with os.scandir(path) as it:
                entries = sorted(it, key=_entry_name, reverse=True)
            stack.append((path, entries))
        else:
            kind = st.st_mode if entry is None else entry.stat(follow_symlinks=False).st_mode
            raise FormatError(
                f"cannot archive a {_kind_name(kind)}: NAR holds only files, directories "
                "and symlinks",
                where=os.fsdecode(path),
            )
        if len(out) >= CHUNK_SIZE:
            yield bytes(out)
            out.clear()
        # Find the next node: the next entry of the innermost unfinished directory.
        while stack:
            dirpath, entries = stack[-1]
            if entries:
                entry = entries.pop()
                name = entry.name
                out += _ENTRY_OPEN_NAME
                out += _str(name)
                out += _NODE
                path = dirpath + b"/" + name if dirpath != b"/" else b"/" + name
                break
            stack.pop()
            out += _CLOSE  # the directory node
            if stack:
                out += _CLOSE  # the entry holding it
        else:
            if out:
                yield bytes(out)
            return


@dataclass(frozen=True, slots=True)
class TreeNode:
    """One node of a tree held in memory, for :func:`dump_nodes`.

    ``path`` is the list of names from the root (``()`` is the root itself).
    """

    path: tuple[bytes, ...]
    type: Literal["regular", "directory", "symlink"]
    executable: bool = False
    contents: bytes = b""
    target: bytes = b""


def dump_nodes(nodes: Iterable[TreeNode]) -> Iterator[bytes]:
    """Stream the NAR of a tree given node by node in archive order.

    Archive order is depth first with each directory's entries sorted by the bytes of
    their names, which is the order of ``sorted()`` on the ``path`` tuples; the root comes
    first. Anything else (a missing parent, a node inside a file, a duplicate, a name that
    NAR cannot hold) raises :class:`FormatError` naming the path, so the archive written
    is always the canonical NAR of some tree, as :func:`dump` writes it.
    """
    out = bytearray(_MAGIC)
    # Open directories: the path of each and the last name written in it.
    open_dirs: list[tuple[tuple[bytes, ...], bytes | None]] = []
    started = False
    it = iter(nodes)
    for node in it:
        path = node.path
        where = os.fsdecode(b"/".join(path)) or "/"
        if not started:
            if path:
                raise FormatError("the first node must be the root", where=where)
            started = True
        else:
            if not path:
                raise FormatError("the root comes more than once", where=where)
            while open_dirs and open_dirs[-1][0] != path[:-1]:
                open_dirs.pop()
                out += _CLOSE + _CLOSE  # the directory node and the entry holding it
            if not open_dirs:
                raise FormatError("node out of archive order or outside a directory", where=where)
            dir_path, last = open_dirs[-1]
            name = path[-1]
            if last is not None and name <= last:
                raise FormatError("node out of archive order or a duplicate", where=where)
            _check_name(name, where)
            open_dirs[-1] = (dir_path, name)
            out += _ENTRY_OPEN_NAME
            out += _str(name)
            out += _NODE
        if node.type == "directory":
            if len(path) >= MAX_DEPTH:
                raise FormatError("directory nesting too deep", where=where)
            out += _HDR_DIR
            open_dirs.append((path, None))
            continue
        if node.type == "regular":
            size = len(node.contents)
            out += _HDR_EXEC if node.executable else _HDR_FILE
            out += size.to_bytes(8, _LE)
            if size + len(out) > CHUNK_SIZE:
                yield bytes(out)
                out.clear()
                view = memoryview(node.contents)
                for start in range(0, size, CHUNK_SIZE):
                    yield bytes(view[start : start + CHUNK_SIZE])
            else:
                out += node.contents
            out += _PAD[: -size % 8]
        elif node.type == "symlink":
            if not node.target or b"\0" in node.target or len(node.target) > MAX_TARGET:
                raise FormatError("symlink target is empty, has a NUL or is too long", where=where)
            out += _HDR_SYMLINK
            out += _str(node.target)
        else:
            raise FormatError(f"unknown node type {node.type!r}", where=where)
        out += _CLOSE
        if path:
            out += _CLOSE  # the entry holding it
        if len(out) >= CHUNK_SIZE:
            yield bytes(out)
            out.clear()
        if not path:
            break  # a root that is a file or symlink is the whole tree
    if not started:
        raise FormatError("no nodes: a tree has at least its root")
    for _ in it:
        raise FormatError("nodes after a root that is not a directory")
    while open_dirs:
        open_dirs.pop()
        out += _CLOSE
        if open_dirs:
            out += _CLOSE
    if out:
        yield bytes(out)


def _check_name(name: bytes, where: str) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FormatError(f"invalid entry name {name!r}", where=where)
    if len(name) > MAX_NAME:
        raise FormatError(f"entry name longer than {MAX_NAME} bytes", where=where)


def _entry_name(entry: os.DirEntry[bytes]) -> bytes:
    return entry.name


def _dump_file(path: bytes, out: bytearray, big: bytearray | None) -> Iterator[bytes | memoryview]:
    """Append a regular file's node to ``out`` (yielding ``out`` and large contents as
    needed), without the enclosing entry's close."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError("file changed type while being archived", where=os.fsdecode(path))
        size = st.st_size
        out += _HDR_EXEC if st.st_mode & stat.S_IXUSR else _HDR_FILE
        out += size.to_bytes(8, _LE)
        left = size
        if size + len(out) > CHUNK_SIZE:
            if out:
                yield bytes(out)
                out.clear()
            while left > CHUNK_SIZE:
                if big is not None:
                    n = os.readv(fd, [big])
                    if n:
                        yield memoryview(big)[:n]
                else:
                    data = os.read(fd, CHUNK_SIZE)
                    n = len(data)
                    if n:
                        yield data
                if n == 0:
                    raise FormatError(
                        f"file shrank while being archived (expected {size} bytes)",
                        where=os.fsdecode(path),
                    )
                left -= n
        while left:
            data = os.read(fd, left)
            if not data:
                raise FormatError(
                    f"file shrank while being archived (expected {size} bytes)",
                    where=os.fsdecode(path),
                )
            out += data
            left -= len(data)
        out += _PAD[: -size % 8]
        out += _CLOSE
    finally:
        os.close(fd)


def _kind_name(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return f"file of type {stat.S_IFMT(mode):#o}"


# --------------------------------------------------------------------------------- parsing


class NarVisitor:
    """What a :class:`NarParser` reports, in archive order. Override what you need.

    ``name`` is the entry name (raw bytes), or ``None`` for the root node. A directory's
    entries come between :meth:`start_directory` and :meth:`end_directory`; a regular
    file's data comes as :meth:`contents` calls between :meth:`regular` and
    :meth:`end_regular`. ``data`` is a view into the caller's buffer: use or copy it
    before returning.
    """

    def start_directory(self, name: bytes | None) -> None:
        """A directory node begins."""

    def end_directory(self) -> None:
        """The innermost open directory is complete."""

    def regular(self, name: bytes | None, executable: bool, size: int) -> None:
        """A regular file of ``size`` bytes begins."""

    def contents(self, data: memoryview) -> None:
        """The next piece of the current file's data."""

    def end_regular(self) -> None:
        """The current file's data is complete."""

    def symlink(self, name: bytes | None, target: bytes) -> None:
        """A symlink node."""


# What the grammar generator yields: n > 0 to ask for exactly n more bytes, 0 after it
# has set ``_left`` to the size of file data to pass through to the visitor.
_Grammar = Generator[int, bytes, None]


class NarParser:
    """A strict, incremental (sans-I/O) NAR parser.

    Call :meth:`feed` with the bytes as they arrive and :meth:`close` at the end. Any
    deviation from the canonical NAR of some tree raises :class:`FormatError` whose
    ``where`` gives the byte offset and the path inside the archive; after that the parser
    stays failed. File data is handed to the visitor in slices of the fed buffers (never
    copied), so validating a large archive costs little more than reading it.
    """

    def __init__(self, visitor: NarVisitor | None = None) -> None:
        self._visitor = visitor
        self._buf = bytearray()  # bytes of an incomplete token
        self._need = 0  # bytes the grammar waits for
        self._left = 0  # file data bytes still to pass through
        self._offset = 0  # bytes consumed by the grammar so far
        self._names: list[bytes] = []  # archive path of the current node
        self._done = False
        self._error: FormatError | None = None
        self._grammar = self._parse()
        self._need = next(self._grammar)

    @property
    def offset(self) -> int:
        """Bytes of the archive consumed so far."""
        return self._offset + len(self._buf)

    @property
    def done(self) -> bool:
        """True once a complete archive has been read."""
        return self._done

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Parse the next piece of the archive."""
        if self._error is not None:
            raise self._error
        try:
            self._feed(memoryview(data).cast("B"))
        except FormatError as exc:
            self._error = exc
            raise

    def close(self) -> None:
        """Declare the end of input; raise :class:`FormatError` if the archive is incomplete."""
        if self._error is not None:
            raise self._error
        if not self._done:
            what = f"{self._left} more bytes of file data" if self._left else "more bytes"
            self._error = self._fail(f"archive is truncated: expected {what}", self.offset)
            raise self._error

    def _feed(self, mv: memoryview) -> None:
        i, n = 0, len(mv)
        buf = self._buf
        visitor = self._visitor
        while True:
            if self._left:
                take = min(self._left, n - i)
                if not take:
                    return
                if visitor is not None:
                    visitor.contents(mv[i : i + take])
                i += take
                self._left -= take
                self._offset += take
                if self._left:
                    return
                self._advance(b"")
                continue
            if self._done:
                if i < n:
                    raise self._fail("trailing bytes after the end of the archive", self._offset)
                return
            need = self._need
            if buf:
                take = min(need - len(buf), n - i)
                buf += mv[i : i + take]
                i += take
                if len(buf) < need:
                    return
                token = bytes(buf)
                buf.clear()
            else:
                if n - i < need:
                    buf += mv[i:]
                    return
                token = mv[i : i + need].tobytes()
                i += need
            self._offset += need
            self._advance(token)

    def _advance(self, token: bytes) -> None:
        try:
            self._need = self._grammar.send(token)
        except StopIteration:
            self._done = True
            self._need = 0

    def _path(self) -> str:
        return "/" + "/".join(n.decode("utf-8", "backslashreplace") for n in self._names)

    def _fail(self, message: str, offset: int) -> FormatError:
        return FormatError(message, where=f"NAR byte {offset}, at {self._path()}")

    def _expect(self, got: bytes, want: bytes, start: int, what: str) -> None:
        """Fail at the first byte where ``got`` differs from the literal ``want``."""
        if got != want:
            at = next(k for k in range(len(want)) if got[k] != want[k])
            raise self._fail(f"expected {what}", start + at)

    def _parse(self) -> _Grammar:
        """The grammar, as a generator that asks for bytes (see ``_Grammar``)."""
        visitor = self._visitor
        names = self._names
        prev: list[bytes] = []  # per open directory: the last entry name seen
        tok = yield len(_MAGIC)
        self._expect(tok, _MAGIC, 0, "the NAR magic 'nix-archive-1'")
        tok = yield len(_OPEN_TYPE) + 16
        self._expect(tok[:-16], _OPEN_TYPE, self._offset - len(tok), "'(' 'type'")
        ntype = tok[-16:]
        name: bytes | None = None
        while True:
            # A node, after "( type" and the first 16 bytes of its type string.
            start = self._offset - 16
            if ntype == _T_REGULAR:
                tok = yield 24
                if tok[:16] == _CONTENTS:
                    executable = False
                    size_bytes = tok[16:]
                else:
                    self._expect(tok, _EXECUTABLE[:24], start + 16, "'contents' or 'executable'")
                    tok = yield 32
                    self._expect(
                        tok[:24], _EXECUTABLE[24:] + _CONTENTS, start + 40, "'' 'contents'"
                    )
                    executable = True
                    size_bytes = tok[24:]
                size = int.from_bytes(size_bytes, _LE)
                if size > MAX_CONTENTS:
                    raise self._fail(f"file size {size} is too large", self._offset - 8)
                if visitor is not None:
                    visitor.regular(name, executable, size)
                if size:
                    self._left = size
                    yield 0
                close = _CLOSE + _CLOSE if prev else _CLOSE
                tok = yield -size % 8 + len(close)
                pad = -size % 8
                if tok[:pad] != _PAD[:pad]:
                    raise self._fail("non-zero padding after file data", self._offset - len(tok))
                if visitor is not None:
                    visitor.end_regular()
                self._expect(tok[pad:], close, self._offset - len(close), "')'")
            elif ntype == _T_SYMLINK:
                tok = yield 24
                self._expect(tok[:16], _TARGET, start + 16, "'target'")
                target = yield from self._read_str(tok[16:], MAX_TARGET, "symlink target")
                if not target or b"\0" in target:
                    raise self._fail(
                        "symlink target is empty or contains NUL", self._offset - len(target)
                    )
                if visitor is not None:
                    visitor.symlink(name, target)
                close = _CLOSE + _CLOSE if prev else _CLOSE
                tok = yield len(close)
                self._expect(tok, close, self._offset - len(close), "')'")
            elif ntype == _T_DIRECTORY[:16]:
                tok = yield 8
                self._expect(tok, _T_DIRECTORY[16:], start + 16, "node type 'directory'")
                if len(prev) >= MAX_DEPTH:
                    raise self._fail(f"directories nested deeper than {MAX_DEPTH}", start)
                if visitor is not None:
                    visitor.start_directory(name)
                prev.append(b"")
            else:
                raise self._fail("expected node type 'regular', 'symlink' or 'directory'", start)
            # Next: an entry of the innermost open directory, or its end.
            while True:
                if not prev:
                    return
                if prev[-1]:
                    names.pop()
                tok = yield 16
                if tok == _ENTRY:
                    break
                self._expect(tok, _CLOSE, self._offset - 16, "'entry' or ')'")
                prev.pop()
                if visitor is not None:
                    visitor.end_directory()
                if prev:
                    tok = yield 16
                    self._expect(tok, _CLOSE, self._offset - 16, "')' closing the entry")
            tok = yield 40
            self._expect(tok[:32], _ENTRY_OPEN_NAME[16:], self._offset - 40, "'(' 'name'")
            start = self._offset - 8
            length = int.from_bytes(tok[32:], _LE)
            if length > MAX_NAME:
                raise self._fail(f"entry name of {length} bytes is too long", start)
            tok = yield (length + 7 & ~7) + len(_NODE_OPEN_TYPE) + 16
            name = tok[:length]
            body_end = length + 7 & ~7
            if tok[length:body_end] != _PAD[: body_end - length]:
                raise self._fail("non-zero padding after entry name", start + 8 + length)
            if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
                raise self._fail(f"invalid entry name {name!r}", start)
            if name <= prev[-1]:
                problem = "duplicate" if name == prev[-1] else "unsorted"
                raise self._fail(
                    f"{problem} entry name {name!r} after {prev[-1]!r}: names must be unique "
                    "and sorted by bytes",
                    start,
                )
            prev[-1] = name
            names.append(name)
            node_at = start + 8 + body_end
            self._expect(
                tok[body_end : body_end + len(_NODE_OPEN_TYPE)],
                _NODE_OPEN_TYPE,
                node_at,
                "'node' '(' 'type'",
            )
            ntype = tok[-16:]

    def _read_str(self, header: bytes, limit: int, what: str) -> Generator[int, bytes, bytes]:
        """Read the body of a string whose 8-byte length ``header`` was just consumed."""
        start = self._offset - 8
        length = int.from_bytes(header, _LE)
        if length > limit:
            raise self._fail(f"{what} of {length} bytes is too long (limit {limit})", start)
        padded = length + 7 & ~7
        body = (yield padded) if padded else b""
        if body[length:] != _PAD[: padded - length]:
            raise self._fail(f"non-zero padding after {what}", start + 8 + length)
        return body[:length]


def validate(chunks: Iterable[bytes | bytearray | memoryview]) -> tuple[Hash, int]:
    """Check that ``chunks`` form one canonical NAR; return its ``NarHash`` and ``NarSize``."""
    parser = NarParser()
    hasher = NarHasher()
    for chunk in chunks:
        hasher.update(chunk)
        parser.feed(chunk)
    parser.close()
    return hasher.nar_hash, hasher.nar_size


@dataclass(frozen=True, slots=True)
class NarEntry:
    """One node of an archive, as ``nix nar ls -R`` would list it."""

    path: str  # "" for the root, else "a/b"
    type: str  # "regular", "directory" or "symlink"
    size: int = 0
    executable: bool = False
    target: bytes = b""


class _Lister(NarVisitor):
    def __init__(self) -> None:
        self.entries: list[NarEntry] = []
        self._dirs: list[str] = []

    def _path(self, name: bytes | None) -> str:
        if name is None:
            return ""
        base = self._dirs[-1]
        return f"{base}/{os.fsdecode(name)}" if base else os.fsdecode(name)

    def start_directory(self, name: bytes | None) -> None:
        path = self._path(name)
        self.entries.append(NarEntry(path, "directory"))
        self._dirs.append(path)

    def end_directory(self) -> None:
        self._dirs.pop()

    def regular(self, name: bytes | None, executable: bool, size: int) -> None:
        self.entries.append(NarEntry(self._path(name), "regular", size, executable))

    def symlink(self, name: bytes | None, target: bytes) -> None:
        self.entries.append(NarEntry(self._path(name), "symlink", target=target))


def list_entries(chunks: Iterable[bytes | bytearray | memoryview]) -> list[NarEntry]:
    """Parse a whole archive and list its nodes in archive order."""
    lister = _Lister()
    parser = NarParser(lister)
    for chunk in chunks:
        parser.feed(chunk)
    parser.close()
    return lister.entries


# --------------------------------------------------------------------------------- restoring

_FD_WINDOW = 64  # directory fds kept open; deeper ancestors are reopened through ".."


class _Restorer(NarVisitor):
    """Creates the tree relative to directory fds, so no path is ever resolved through
    something the archive created; every name is created exclusively (O_EXCL, mkdir,
    symlink fail on an existing name) and never followed.

    Modes are those ``nix-store --restore`` gives (it runs with umask 022): directories
    0755, files 0644, executables 0755.
    """

    def __init__(self, parent_fd: int, root_name: str, root_exists: bool) -> None:
        self._parent_fd = parent_fd
        self._root_name = root_name
        self._root_exists = root_exists
        # Open directories: [fd or -1 when closed to save fds, st_dev, st_ino].
        self._dirs: list[list[int]] = []
        self._file: int = -1
        self._exec = False
        self.created_root = False

    def _where(self, name: bytes | None) -> tuple[int, str | bytes]:
        if name is None:
            if self._root_exists:
                raise FileExistsError(
                    errno.EEXIST,
                    "only a directory archive can be restored into an existing directory",
                    self._root_name,
                )
            return self._parent_fd, self._root_name
        return self._dirs[-1][0], name

    def start_directory(self, name: bytes | None) -> None:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        if name is None and self._root_exists:
            fd = os.open(self._root_name, flags, dir_fd=self._parent_fd)
        else:
            dir_fd, target = self._where(name)
            os.mkdir(target, 0o700, dir_fd=dir_fd)
            self.created_root = self.created_root or name is None
            fd = os.open(target, flags, dir_fd=dir_fd)
        st = os.fstat(fd)
        os.fchmod(fd, 0o755)
        self._dirs.append([fd, st.st_dev, st.st_ino])
        if len(self._dirs) > _FD_WINDOW:
            old = self._dirs[-_FD_WINDOW - 1]
            os.close(old[0])
            old[0] = -1

    def end_directory(self) -> None:
        fd = self._dirs.pop()[0]
        try:
            if self._dirs and self._dirs[-1][0] < 0:
                parent = self._dirs[-1]
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                pfd = os.open("..", flags, dir_fd=fd)
                st = os.fstat(pfd)
                if (st.st_dev, st.st_ino) != (parent[1], parent[2]):
                    os.close(pfd)
                    raise FormatError("directory was moved during restore", where=self._root_name)
                parent[0] = pfd
        finally:
            os.close(fd)

    def regular(self, name: bytes | None, executable: bool, size: int) -> None:
        dir_fd, target = self._where(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._file = os.open(target, flags, 0o600, dir_fd=dir_fd)
        self.created_root = self.created_root or name is None
        self._exec = executable

    def contents(self, data: memoryview) -> None:
        while data:
            n = os.write(self._file, data)
            data = data[n:]

    def end_regular(self) -> None:
        fd, self._file = self._file, -1
        try:
            os.fchmod(fd, 0o755 if self._exec else 0o644)
        finally:
            os.close(fd)

    def symlink(self, name: bytes | None, target: bytes) -> None:
        dir_fd, where = self._where(name)
        os.symlink(target, where, dir_fd=dir_fd)
        self.created_root = self.created_root or name is None

    def close_all(self) -> None:
        if self._file >= 0:
            os.close(self._file)
            self._file = -1
        for d in self._dirs:
            if d[0] >= 0:
                os.close(d[0])
        self._dirs.clear()


def restore(chunks: Iterable[bytes | bytearray | memoryview], dest: str | os.PathLike[str]) -> None:
    """Unpack the NAR in ``chunks`` at ``dest``, which must not exist or be an empty
    directory (then the archive must be a directory).

    Nothing is written outside ``dest`` and nothing the archive creates is followed. On any
    error (a malformed archive raises :class:`FormatError` with offset and path) the
    partial tree is removed if this call created ``dest``; a pre-existing ``dest`` is left
    as it is.
    """
    dest_str = os.path.abspath(os.fspath(dest))
    parent, root_name = os.path.split(dest_str)
    if not root_name:
        raise FormatError("destination must not be the root directory", where=dest_str)
    try:
        st = os.lstat(dest_str)
    except FileNotFoundError:
        root_exists = False
    else:
        if not stat.S_ISDIR(st.st_mode) or os.listdir(dest_str):
            raise FileExistsError(
                errno.EEXIST, "destination exists and is not an empty directory", dest_str
            )
        root_exists = True
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    restorer = _Restorer(parent_fd, root_name, root_exists)
    parser = NarParser(restorer)
    try:
        try:
            for chunk in chunks:
                parser.feed(chunk)
            parser.close()
        finally:
            restorer.close_all()
    except BaseException:
        if restorer.created_root:
            _remove(parent_fd, root_name)
        raise
    finally:
        os.close(parent_fd)


def _remove(parent_fd: int, name: str) -> None:
    """Remove ``name`` (any type) under ``parent_fd`` without following symlinks.

    Iterative and holding one directory fd at a time (``shutil.rmtree`` recurses, and a
    restored tree may be :data:`MAX_DEPTH` deep); it climbs back through ``..`` and checks
    that it arrives where it came from.
    """
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=parent_fd)
    # Per level: (name in its parent, (dev, ino) of the parent, subdirectories left).
    stack: list[tuple[str, tuple[int, int], list[str]]] = []
    subdirs = _clear_files(fd)
    try:
        while True:
            if subdirs:
                child = subdirs.pop()
                here = os.fstat(fd)
                cfd = os.open(child, flags, dir_fd=fd)
                os.close(fd)
                fd = cfd
                stack.append((child, (here.st_dev, here.st_ino), subdirs))
                subdirs = _clear_files(fd)
                continue
            if not stack:
                break
            child, parent_id, subdirs = stack.pop()
            up = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = up
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != parent_id:
                raise OSError(errno.ESTALE, "directory moved while being removed", name)
            os.rmdir(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def _clear_files(fd: int) -> list[str]:
    """Unlink every non-directory in the directory ``fd``; return its subdirectories."""
    subdirs = []
    with os.scandir(fd) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.name)
            else:
                os.unlink(e.name, dir_fd=fd)
    return subdirs
