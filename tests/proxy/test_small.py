"""Small NARs: fetched whole and verified inline before Nix gets a byte; served from memory;
access times batched in memory and still persisted across a restart."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import httpx
import pytest
import trio
import zstandard

from nixd.errors import IntegrityError
from nixd.nix.hashes import Hash
from nixd.nix.narinfo import NarInfo
from nixd.proxy import localstore
from nixd.proxy.localstore import SMALL, LocalStore
from nixd.proxy.metrics import Metrics
from nixd.proxy.verify import check_small_nar
from tests.proxy.conftest import Caches, start_proxy, upstream_for
from tests.proxy.fakecache import FakeCache, Fault


def small_path(caches: Caches) -> tuple[str, NarInfo, bytes]:
    """A closure member whose zstd NAR file is small, its narinfo and that file."""
    for path in caches.closure:
        hash_part = path.rsplit("/", 1)[-1][:32]
        text = (caches.dirs["zstd"] / f"{hash_part}.narinfo").read_bytes()
        info = NarInfo.parse(text)
        if info.file_size is not None and info.file_size <= SMALL:
            return hash_part, info, (caches.dirs["zstd"] / info.url).read_bytes()
    raise AssertionError("no small NAR in the test closure")


def test_check_small_nar(caches: Caches) -> None:
    _, info, data = small_path(caches)
    check_small_nar(data, info, "k")
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF
    # A damaged compressed file is refused by what it decompresses to (its FileHash,
    # unsigned, is not computed: the signed NarHash proves more).
    with pytest.raises(IntegrityError, match=r"decompress|signed Nar"):
        check_small_nar(bytes(corrupt), info, "k")
    with pytest.raises(IntegrityError, match="bytes"):
        check_small_nar(data[:-1], info, "k")
    # FileHash/FileSize are not signed: an upstream may send another file with a matching
    # (unsigned) FileHash. The signed NarHash still refuses it.
    other = zstandard.ZstdCompressor().compress(b"not the signed NAR" * 10)
    lying = dataclasses.replace(
        info,
        file_hash=Hash("sha256", hashlib.sha256(other).digest()),
        file_size=len(other),
    )
    with pytest.raises(IntegrityError, match="signed Nar"):
        check_small_nar(other, lying, "k")
    # A decompression bomb is cut at NarSize + 1 bytes, not expanded in full.
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    assert len(bomb) <= SMALL
    bombing = dataclasses.replace(
        info, file_hash=Hash("sha256", hashlib.sha256(bomb).digest()), file_size=len(bomb)
    )
    with pytest.raises(IntegrityError, match="more than the signed NarSize"):
        check_small_nar(bomb, bombing, "k")


async def test_small_nar_corrupted_once_is_refused_then_kept(
    caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    hash_part, _, data = small_path(caches)
    fake_upstream.faults.append(Fault("corrupt", match=".nar.zst", times=1))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            # no prefetch: the NAR request itself meets the corrupt answer
            proxy = await start_proxy(
                nursery, tmp_path, (upstream_for(fake_upstream, caches),), prefetch=False
            )
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                info = NarInfo.parse((await c.get(f"/{hash_part}.narinfo")).content)
                key = info.url.removeprefix("nar/")
                r = await c.get(f"/{info.url}")
                assert r.status_code == 502  # refused before a byte of the NAR went out
                assert proxy.handle.store.nar_keys() == []
                metrics = proxy.handle.metrics
                assert metrics.total("nixd_proxy_verification_failures_total") == 1
                r = await c.get(f"/{info.url}")
                assert r.status_code == 200 and r.content == data
                assert proxy.handle.store.nar_keys() == [key]
                assert (proxy.store_dir / "nar" / key).read_bytes() == data
                # Warm, from memory even with the file gone; Range and HEAD too.
                (proxy.store_dir / "nar" / key).unlink()
                r = await c.get(f"/{info.url}", headers={"Range": "bytes=5-9"})
                assert r.status_code == 206 and r.content == data[5:10]
                assert r.headers["content-range"] == f"bytes 5-9/{len(data)}"
                for ignored in (f"bytes={len(data)}-", "bytes=" + "9" * 5000 + "-"):
                    r = await c.get(f"/{info.url}", headers={"Range": ignored})
                    assert r.status_code == 200 and r.content == data, ignored
                r = await c.head(f"/{info.url}")
                assert r.status_code == 200 and r.headers["content-length"] == str(len(data))
                assert fake_upstream.count(".nar.zst") == 2
                # Both upstream fetches and both narinfo lookups shared one connection.
                upstream = proxy.handle._proxy.upstreams[0]
                assert sum(len(v) for v in upstream._idle.values()) == 1
            nursery.cancel_scope.cancel()


def test_access_times_batched_and_persisted_across_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(localstore, "FLUSH_INTERVAL", 3600.0)
    store = LocalStore(tmp_path / "s", 3000, Metrics())
    keys = [f"{c * 32}-{'1' * 52}.nar.zst" for c in "abcd"]
    for i, key in enumerate(keys[:3]):
        assert store.admit_bytes(key, bytes([i]) * 1000, key[:32], f"narinfo {i}".encode())
    assert store.small_nar(keys[0]) == b"\0" * 1000  # a is now the most recently used
    # The hit wrote nothing yet: the index still has a as the oldest.
    (oldest,) = store.db.execute("SELECT key FROM nars ORDER BY atime LIMIT 1").fetchone()
    assert oldest == keys[0]
    store.close()  # writes the batched access times

    store = LocalStore(tmp_path / "s", 3000, Metrics())
    assert store.nar_keys() == [keys[1], keys[2], keys[0]]
    assert store.small_nar(keys[1]) == b"\1" * 1000  # read from disk once after the restart
    (store.nar_dir / keys[1]).unlink()
    assert store.small_nar(keys[1]) == b"\1" * 1000  # then from memory
    # Eviction sees the batched times: c is now the least recently used.
    assert store.admit_bytes(keys[3], b"\3" * 1000, keys[3][:32], b"narinfo 3")
    assert store.nar_keys() == [keys[0], keys[1], keys[3]]
    assert store.small_nar(keys[2]) is None
    store.close()
