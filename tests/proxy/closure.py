"""A synthetic closure written as a static binary cache: ``n`` one-file store paths, path
``i`` referencing paths ``2i+1`` and ``2i+2`` (a tree ``log2 n`` levels deep, as Nix walks
it level by level), each NAR zstd-compressed and small, each narinfo signed.

Built in Python rather than by the real Nix: the prefetch tests need dozens of paths and
only their narinfos and NARs (the real Nix substitutes them all the same: input-addressed
paths are trusted by their signature, and their NarHash is right).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import zstandard

from nixd.nix import base32, nar
from nixd.nix.hashes import Hash
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import SecretKey
from nixd.nix.storepath import StorePath


@dataclass
class Closure:
    root: Path
    infos: list[NarInfo]
    """By index: ``infos[0]`` is the top of the closure."""

    @property
    def hash_parts(self) -> list[str]:
        return [i.store_path.hash_part for i in self.infos]

    def paths(self) -> list[str]:
        return [f"/nix/store/{i.store_path.basename}" for i in self.infos]


def store_path(name: str) -> StorePath:
    digest = hashlib.sha256(name.encode()).digest()[:20]
    return StorePath.from_basename(f"{base32.encode(digest)}-{name}")


def write_closure(root: Path, n: int, key: SecretKey, *, tag: str = "prefetch") -> Closure:
    """Write the closure under ``root`` (``<hash>.narinfo``, ``nar/<filehash>.nar.zst``)."""
    (root / "nar").mkdir(parents=True, exist_ok=True)
    (root / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    paths = [store_path(f"{tag}-{i}") for i in range(n)]
    content = root.parent / f"{root.name}-content"
    compressor = zstandard.ZstdCompressor()
    infos = []
    for i, path in enumerate(paths):
        content.write_bytes(f"path {i} of the {tag} closure\n".encode() * (1 + i % 7))
        data = b"".join(nar.dump(content))
        packed = compressor.compress(data)
        file_hash = hashlib.sha256(packed).digest()
        url = f"nar/{base32.encode(file_hash)}.nar.zst"
        (root / url).write_bytes(packed)
        refs = tuple(paths[j] for j in (2 * i + 1, 2 * i + 2) if j < n)
        info = NarInfo(
            store_path=path,
            url=url,
            compression="zstd",
            file_hash=Hash("sha256", file_hash),
            file_size=len(packed),
            nar_hash=Hash("sha256", hashlib.sha256(data).digest()),
            nar_size=len(data),
            references=refs,
            deriver=None,
            system=None,
            sigs=(),
            ca=None,
        ).signed(key)
        (root / f"{path.hash_part}.narinfo").write_text(info.render())
        infos.append(info)
    content.unlink()
    return Closure(root, infos)
