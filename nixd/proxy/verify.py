"""Verification: which narinfos may be served and which NAR files may be kept.

Trust has two steps, because a narinfo's signature covers the *uncompressed* NAR
(``NarHash``/``NarSize``) but Nix downloads the *compressed* file:

1. A narinfo is served only if it names the requested store path and carries a valid
   signature by a key trusted for the upstream that sent it (:func:`check_narinfo`).
2. While a NAR streams to Nix, its bytes are hashed and compared with ``FileHash`` /
   ``FileSize`` (for ``Compression: none`` those are ``NarHash``/``NarSize``); on a
   mismatch the transfer to Nix is cut. The signature does not cover ``FileHash``, so
   before the file enters the local store :func:`nar_matches` decompresses it (in a worker
   thread) and checks ``NarHash``/``NarSize`` against the signed narinfo.

Small NARs (a few KiB, most of a typical closure) are fetched whole into memory instead and
checked by :func:`check_small_nar` inline, before a byte goes to Nix: decompressing and
hashing them takes microseconds, less than handing them to a worker thread would.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
from collections.abc import Iterable
from typing import Protocol

import zstandard

from nixd.errors import FormatError, IntegrityError
from nixd.nix import base32
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey

READ_SIZE = 1 << 20

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


class _Decompressor(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


def _decompressor(compression: str) -> _Decompressor | None:
    if compression == "zstd":
        return zstandard.ZstdDecompressor().decompressobj()
    if compression == "xz":
        return lzma.LZMADecompressor()
    if compression == "bzip2":
        return bz2.BZ2Decompressor()
    return None


def can_verify(compression: str) -> bool:
    return compression == "none" or _decompressor(compression) is not None


def nar_matches(path: str | os.PathLike[str], info: NarInfo) -> bool:
    """Decompress the file at ``path`` and compare with the signed NarHash/NarSize.

    Blocking and CPU-bound: run it with ``trio.to_thread.run_sync``. False also for a
    compression this build cannot decompress (such NARs are served but never kept).
    """
    sha = hashlib.sha256()
    size = 0
    if info.compression == "none":
        with open(path, "rb") as f:
            while chunk := f.read(READ_SIZE):
                sha.update(chunk)
                size += len(chunk)
                if size > info.nar_size:
                    return False
        return size == info.nar_size and sha.digest() == info.nar_hash.digest
    if info.compression == "zstd":
        with open(path, "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_size=READ_SIZE)
            try:
                while chunk := reader.read(READ_SIZE):
                    sha.update(chunk)
                    size += len(chunk)
                    if size > info.nar_size:
                        return False
            except zstandard.ZstdError:
                return False
        return size == info.nar_size and sha.digest() == info.nar_hash.digest
    decomp = _decompressor(info.compression)
    if decomp is None:
        return False
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_SIZE):
                out = decomp.decompress(chunk)
                sha.update(out)
                size += len(out)
                if size > info.nar_size:
                    return False
    except (OSError, ValueError, EOFError, lzma.LZMAError):
        return False
    return size == info.nar_size and sha.digest() == info.nar_hash.digest


def nar_bytes_match(data: bytes, info: NarInfo) -> bool:
    """:func:`nar_matches` for a file held in memory (small NARs; runs inline)."""
    limit = info.nar_size + 1  # bounds what a decompression bomb can make us allocate
    try:
        if info.compression == "none":
            nar = data
        elif info.compression == "zstd":
            nar = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
        elif info.compression == "xz":
            nar = lzma.LZMADecompressor().decompress(data, max_length=limit)
        elif info.compression == "bzip2":
            nar = bz2.BZ2Decompressor().decompress(data, max_length=limit)
        else:
            return False
    except (OSError, ValueError, EOFError, lzma.LZMAError, zstandard.ZstdError):
        return False
    return len(nar) == info.nar_size and hashlib.sha256(nar).digest() == info.nar_hash.digest


def check_small_nar(data: bytes, info: NarInfo, key: str) -> None:
    """Raise :class:`IntegrityError` unless ``data`` is the file the signed narinfo names.

    Checks FileSize/FileHash (what the upstream must have sent) and then the signed
    NarHash/NarSize of the decompressed NAR.
    """
    expected = expected_raw(info)
    if expected is None:
        raise IntegrityError(f"{key}: the narinfo gives no file hash to check a small NAR by")
    digest, size = expected
    if len(data) != size:
        raise IntegrityError(f"{key}: upstream sent {len(data)} bytes, the narinfo says {size}")
    if hashlib.sha256(data).digest() != digest:
        raise IntegrityError(f"{key}: file hash does not match the narinfo")
    if not nar_bytes_match(data, info):
        raise IntegrityError(f"{key}: NAR does not match the signed NarHash/NarSize")
