"""Verification: which narinfos may be served and which NAR files may be kept.

Trust has two steps, because a narinfo's signature covers the *uncompressed* NAR
(``NarHash``/``NarSize``) but Nix downloads the *compressed* file:

1. A narinfo is served only if it names the requested store path and carries a valid
   signature by a key trusted for the upstream that sent it (:func:`check_narinfo`).
2. A NAR file is checked in one pass as it arrives by a :class:`NarVerifier`: its length
   against ``FileSize`` (unsigned: it only bounds what the upstream may send), and its
   bytes, decompressed as they come, against the signed ``NarHash``/``NarSize`` (for an
   uncompressed file that one hash is also its ``FileHash``; a compressed file's
   ``FileHash``, also unsigned, would prove nothing more and is not computed). The proxy
   releases the last byte of a NAR to Nix, and keeps the file, only once
   :meth:`NarVerifier.finish` passed; a decompressed stream longer than ``NarSize`` (a
   decompression bomb) is cut as soon as it passes it. The file is never read a second
   time.

Small NARs (a few KiB, most of a typical closure) are fetched whole into memory instead and
checked by :func:`check_small_nar` (the same verifier, fed once) inline, before a byte goes
to Nix: decompressing and hashing them takes microseconds, less than handing them to a
worker thread would.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
from collections.abc import Callable, Iterable
from typing import Protocol

import brotli
import zstandard

from nixd.errors import FormatError, IntegrityError
from nixd.nix import base32
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey

EXTENSIONS = {"none": "", "xz": ".xz", "zstd": ".zst", "bzip2": ".bz2", "br": ".br"}
"""File name suffix after ``.nar`` per compression, as Nix names NARs."""


class UntrustedNarInfo(FormatError):
    """A narinfo without a valid signature by a trusted key, or for another path."""


def check_narinfo(info: NarInfo, hash_part: str, keys: Iterable[PublicKey]) -> list[str]:
    """Raise :class:`UntrustedNarInfo` unless ``info`` is for ``hash_part`` and signed by
    one of ``keys``; return the names of the keys that signed it."""
    if info.store_path.hash_part != hash_part:
        raise UntrustedNarInfo(
            f"narinfo for {hash_part} names another path {info.store_path.basename}"
        )
    names = info.verify(keys)
    if not names:
        raise UntrustedNarInfo(
            f"narinfo for {info.store_path.basename} has no valid signature by a trusted key"
        )
    return names


def nar_key(info: NarInfo) -> str:
    """The proxy's file name for the NAR of ``info``: ``<hash part>-<digest>.nar<ext>``.

    It names the store path (so after a restart the proxy can find the narinfo again) and
    the exact file (the FileHash, or the NarHash when an upstream gave no FileHash), so two
    upstreams compressing differently never share a name.
    """
    digest = (info.file_hash or info.nar_hash).digest
    return f"{info.store_path.hash_part}-{base32.encode(digest)}.nar{extension(info)}"


def extension(info: NarInfo) -> str:
    return EXTENSIONS.get(info.compression, "." + info.compression)


def parse_nar_key(name: str) -> str | None:
    """The store-path hash part of a proxy NAR file name, or None if it is not one."""
    hash_part, sep, rest = name.partition("-")
    digest, dot, ext = rest.partition(".nar")
    if not sep or not dot or len(hash_part) != 32 or len(digest) != 52:
        return None
    if ext not in EXTENSIONS.values() or not all(c in base32.ALPHABET for c in hash_part + digest):
        return None
    return hash_part


def expected_raw(info: NarInfo) -> tuple[bytes, int] | None:
    """sha256 digest and size the file as downloaded must have, if the narinfo says."""
    if info.file_hash is not None and info.file_hash.algo == "sha256" and info.file_size:
        return info.file_hash.digest, info.file_size
    if info.compression == "none":
        return info.nar_hash.digest, info.nar_size
    return None


def can_verify(compression: str) -> bool:
    return compression in _STREAMS or compression == "none"


OUT_BLOCK = 1 << 20
"""Most decompressed bytes produced per step: what bounds a decompression bomb's memory."""


class _Sink:
    """Where decompressed NAR bytes go: hashed and counted, cut past NarSize."""

    __slots__ = ("limit", "sha", "size")

    def __init__(self, limit: int) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.limit = limit

    def write(self, data: bytes | memoryview) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise _Overlong
        self.sha.update(data)
        return len(data)


class _Overlong(Exception):
    """The decompressed NAR passed its signed NarSize (raised from inside a decompressor)."""


class _Stream(Protocol):
    def feed(self, data: bytes | memoryview) -> None: ...
    def complete(self) -> bool: ...


class _Zstd:
    """zstd through ``stream_writer``: it hands the sink at most ``OUT_BLOCK`` bytes at a
    time, so a bomb is cut at NarSize + one block, never expanded in memory. Concatenated
    frames decode as one stream, as the ``zstd`` tool does. Whether the last frame was
    complete is not tracked: a truncated frame yields fewer bytes than NarSize."""

    def __init__(self, sink: _Sink) -> None:
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            sink,  # type: ignore[arg-type]  # only its write() is called
            write_size=OUT_BLOCK,
            write_return_read=True,
        )

    def feed(self, data: bytes | memoryview) -> None:
        self._writer.write(data)

    def complete(self) -> bool:
        return True


class _Lzma:
    """xz or bzip2 through the stdlib decompressors, ``max_length`` bounded; concatenated
    streams are read one after the other (as ``xz -d`` and ``bzip2 -d`` do), and the last
    one must be complete."""

    def __init__(self, sink: _Sink, factory: Callable[[], lzma.LZMADecompressor]) -> None:
        self._sink = sink
        self._factory = factory
        self._decomp = factory()
        self._started = False

    def feed(self, data: bytes | memoryview) -> None:
        chunk = bytes(data)
        while chunk:
            decomp = self._decomp
            if decomp.eof:
                decomp = self._decomp = self._factory()
            self._started = True
            self._sink.write(decomp.decompress(chunk, max_length=OUT_BLOCK))
            while not decomp.eof and not decomp.needs_input:
                self._sink.write(decomp.decompress(b"", max_length=OUT_BLOCK))
            chunk = decomp.unused_data if decomp.eof else b""

    def complete(self) -> bool:
        return self._started and self._decomp.eof


class _Brotli:
    """brotli through the ``Brotli`` package, its output limited per call the same way."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink
        self._decomp = brotli.Decompressor()

    def feed(self, data: bytes | memoryview) -> None:
        decomp = self._decomp
        if decomp.is_finished():
            raise ValueError("data after the end of the brotli stream")
        self._sink.write(decomp.process(data, output_buffer_limit=OUT_BLOCK))
        while not decomp.can_accept_more_data():
            self._sink.write(decomp.process(b"", output_buffer_limit=OUT_BLOCK))

    def complete(self) -> bool:
        return bool(self._decomp.is_finished())


_STREAMS: dict[str, Callable[[_Sink], _Stream]] = {
    "zstd": _Zstd,
    "br": _Brotli,
    "xz": lambda sink: _Lzma(sink, lzma.LZMADecompressor),
    "bzip2": lambda sink: _Lzma(sink, bz2.BZ2Decompressor),  # type: ignore[arg-type]
}

_DECOMPRESS_ERRORS = (
    zstandard.ZstdError,
    lzma.LZMAError,
    brotli.error,
    OSError,
    EOFError,
    ValueError,
)


class NarVerifier:
    """Checks a NAR file incrementally, in whatever chunks it arrives.

    :meth:`feed` counts the file bytes (FileSize, when the narinfo gives it), decompresses
    them and hashes the NAR (NarHash/NarSize, signed); :meth:`finish` says whether all of
    it matched. Overlong input (past FileSize) and overlong output (past
    NarSize: a decompression bomb) raise at once, in the chunk that crossed the line.
    The state lives in the object, so a download resumed with ``Range`` feeds the same
    verifier from where it was cut. Pure computation: sha256, zstd, lzma and bz2 release
    the GIL on large buffers, so :meth:`feed` is meant for a worker thread.
    """

    def __init__(self, info: NarInfo, key: str) -> None:
        self.key = key
        self.info = info
        expected = expected_raw(info)
        self.file_digest = expected[0] if expected else None
        self.file_size = expected[1] if expected else None
        self.received = 0
        """File bytes fed so far."""
        self._nar = _Sink(info.nar_size)
        factory = _STREAMS.get(info.compression)
        if factory is None and info.compression != "none":
            raise IntegrityError(f"{key}: cannot verify {info.compression} NARs")
        # Uncompressed: the file is the NAR, so one hash serves FileHash and NarHash.
        # Compressed: FileHash is not computed. The signature does not cover it, and the
        # signed NarHash of the decompressed stream (complete, nothing after its end)
        # proves all it would; it cost 0.3 CPU-s per GiB of NAR for a half-random 256 MiB
        # NAR in zstd (0.99 with it, 0.69 without), up to 0.65 for incompressible data.
        # FileSize is still checked: it bounds what the upstream may send.
        self._stream = factory(self._nar) if factory is not None else None

    def feed(self, data: bytes | memoryview) -> None:
        """Take the next file bytes; IntegrityError as soon as they cannot match."""
        n = len(data)
        if not n:
            return
        if self.file_size is not None and self.received + n > self.file_size:
            raise IntegrityError(f"{self.key}: upstream sent more than {self.file_size} bytes")
        self.received += n
        try:
            if self._stream is None:
                self._nar.write(data)
                return
            self._stream.feed(data)
        except _Overlong:
            raise IntegrityError(
                f"{self.key}: decompresses to more than the signed NarSize "
                f"({self.info.nar_size} bytes)"
            ) from None
        except _DECOMPRESS_ERRORS as exc:
            raise IntegrityError(
                f"{self.key}: does not decompress as {self.info.compression}: {exc}"
            ) from None

    def finish(self) -> None:
        """Raise IntegrityError unless the file fed so far is the one the narinfo names."""
        if self.file_size is not None and self.received != self.file_size:
            raise IntegrityError(
                f"{self.key}: upstream sent {self.received} bytes, the narinfo says "
                f"{self.file_size}"
            )
        digest = self.file_digest
        if self._stream is None and digest is not None and self._nar.sha.digest() != digest:
            raise IntegrityError(f"{self.key}: file hash does not match the narinfo")
        if self._stream is not None and not self._stream.complete():
            raise IntegrityError(f"{self.key}: the {self.info.compression} stream is truncated")
        nar = self._nar
        if nar.size != self.info.nar_size or nar.sha.digest() != self.info.nar_hash.digest:
            raise IntegrityError(f"{self.key}: NAR does not match the signed NarHash/NarSize")


def check_small_nar(data: bytes, info: NarInfo, key: str) -> None:
    """Raise :class:`IntegrityError` unless ``data`` is the file the signed narinfo names.

    The same :class:`NarVerifier` as for streamed NARs, fed the whole file at once;
    small NARs must come with a FileHash/FileSize (the short path relies on the size).
    """
    if expected_raw(info) is None:
        raise IntegrityError(f"{key}: the narinfo gives no file hash to check a small NAR by")
    verifier = NarVerifier(info, key)
    verifier.feed(data)
    verifier.finish()
