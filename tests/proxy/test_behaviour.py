"""Proxy behaviour seen over HTTP: single-flight, negative cache, priorities, Range,
metrics; and the local store's LRU cap and restart recovery."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import trio

from nixd.nix.narinfo import NarInfo
from nixd.proxy.localstore import LocalStore
from nixd.proxy.metrics import Metrics
from tests.proxy.conftest import Caches, start_proxy, upstream_for
from tests.proxy.fakecache import FakeCache, Fault


def hash_part(path: str) -> str:
    return path.rsplit("/", maxsplit=1)[-1][:32]


def upstream_file(caches: Caches, compression: str, path: str) -> bytes:
    info = NarInfo.parse((caches.dirs[compression] / f"{hash_part(path)}.narinfo").read_bytes())
    return (caches.dirs[compression] / info.url).read_bytes()


async def test_single_flight_and_range(
    caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    fake_upstream.faults.append(Fault("slow", match=".nar.zst", times=1, delay=0.5))
    expected = upstream_file(caches, "zstd", caches.blob)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, tmp_path, (upstream_for(fake_upstream, caches),))
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                info = NarInfo.parse((await c.get(f"/{hash_part(caches.blob)}.narinfo")).content)
                assert info.url.startswith("nar/") and info.url.endswith(".nar.zst")
                bodies: list[bytes] = []

                async def fetch(headers: dict[str, str], status: int) -> None:
                    r = await c.get(f"/{info.url}", headers=headers)
                    assert r.status_code == status
                    bodies.append(r.content)

                async with trio.open_nursery() as inner:
                    inner.start_soon(fetch, {}, 200)
                    inner.start_soon(fetch, {}, 200)
                    inner.start_soon(fetch, {"Range": "bytes=1000-"}, 206)
                    # A Range with a number no file has is ignored, even mid-download.
                    inner.start_soon(fetch, {"Range": "bytes=" + "9" * 5000 + "-"}, 200)
                assert sorted(bodies, key=len) == [expected[1000:], expected, expected, expected]
                assert fake_upstream.count(".nar.zst") == 1
                assert proxy.handle.metrics.total("nixd_proxy_singleflight_joins_total") == 3
                await proxy.handle.downloads_settled()
                # Warm: served from the local store, with Range.
                r = await c.get(f"/{info.url}", headers={"Range": "bytes=10-19"})
                assert r.status_code == 206 and r.content == expected[10:20]
                assert r.headers["content-range"] == f"bytes 10-19/{len(expected)}"
                # A range not served is the whole file: never a 416, never a 500.
                for ignored in (
                    b"bytes=%d-" % len(expected),
                    b"bytes=" + b"9" * 5000 + b"-",
                    b"bytes=0-" + b"9" * 5000,
                    b"bytes=0-1,5-6",
                    b"bytes=5-4",
                    b"bytes=\xb2-",  # Latin-1 superscript two: str.isdigit() says yes
                ):
                    r = await c.get(f"/{info.url}", headers={b"range": ignored})
                    assert r.status_code == 200 and r.content == expected, ignored
                r = await c.get(f"/{info.url}", headers={"Range": "bytes=-10"})
                assert r.status_code == 206 and r.content == expected[-10:]
                head = await c.head(f"/{info.url}")
                assert int(head.headers["content-length"]) == len(expected)
                assert fake_upstream.count(".nar.zst") == 1
                metrics = (await c.get("/metrics")).text
                assert 'nixd_proxy_local_hits_total{kind="nar"}' in metrics
                assert "nixd_proxy_upstream_latency_seconds_bucket" in metrics
            nursery.cancel_scope.cancel()


async def test_negative_cache(caches: Caches, tmp_path: Path, fake_upstream: FakeCache) -> None:
    missing = "0" * 32
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(
                nursery, tmp_path, (upstream_for(fake_upstream, caches),), negative_ttl=0.3
            )
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                for _ in range(3):
                    assert (await c.get(f"/{missing}.narinfo")).status_code == 404
                assert fake_upstream.count(f"/{missing}.narinfo") == 1
                await trio.sleep(0.35)
                assert (await c.head(f"/{missing}.narinfo")).status_code == 404
                assert fake_upstream.count(f"/{missing}.narinfo") == 2
            nursery.cancel_scope.cancel()


async def test_best_priority_verified_answer_wins(caches: Caches, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            zstd = await nursery.start(FakeCache(caches.dirs["zstd"]).serve)
            xz = await nursery.start(FakeCache(caches.dirs["xz"]).serve)
            untrusted = caches.other_key.public().render()
            # Priority 10 is signed by a key not trusted for it: the xz one (20) wins.
            upstreams = (
                upstream_for(zstd, caches, priority=10, trusted_keys=(untrusted,)),
                upstream_for(xz, caches, priority=20),
            )
            proxy = await start_proxy(nursery, tmp_path, upstreams)
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                r = await c.get(f"/{hash_part(caches.top)}.narinfo")
                assert NarInfo.parse(r.content).url.endswith(".nar.xz")
                proxy.handle.update_upstreams(
                    (upstream_for(zstd, caches, priority=10), upstream_for(xz, caches, priority=20))
                )
                r = await c.get(f"/{hash_part(caches.top)}.narinfo")
                info = NarInfo.parse(r.content)
                assert info.url.endswith(".nar.zst")
                assert info.verify([caches.key.public()])  # the upstream's signature is kept
                nar = await c.get(f"/{info.url}")
                assert nar.content == upstream_file(caches, "zstd", caches.top)
            nursery.cancel_scope.cancel()


def test_lru_eviction_and_restart_recovery(tmp_path: Path) -> None:
    metrics = Metrics()
    store = LocalStore(tmp_path / "s", 3000, metrics)
    keys = [f"{c * 32}-{'1' * 52}.nar.zst" for c in "abcd"]
    for i, key in enumerate(keys[:3]):
        temp = store.new_temp()
        temp.write_bytes(b"x" * 1000)
        assert store.admit(key, temp, key[:32], f"narinfo {i}".encode())
    assert store.total_bytes == 3000
    assert store.nar(keys[0]) is not None  # a is now the most recently used
    temp = store.new_temp()
    temp.write_bytes(b"y" * 1000)
    store.admit(keys[3], temp, keys[3][:32], b"narinfo 3")
    assert set(store.nar_keys()) == {keys[0], keys[2], keys[3]}
    assert store.narinfo(keys[1][:32]) is None
    assert not (store.nar_dir / keys[1]).exists()
    assert metrics.get("nixd_proxy_store_evictions_total") == 1
    big = store.new_temp()
    big.write_bytes(b"z" * 4000)
    assert not store.admit(keys[1], big, keys[1][:32], b"too big")
    store.close()

    # A crash left a temp file, an orphan NAR file and an index row whose file is gone.
    (tmp_path / "s" / "tmp" / "left.part").write_bytes(b"partial")
    (tmp_path / "s" / "nar" / keys[1]).write_bytes(b"orphan")
    os.unlink(tmp_path / "s" / "nar" / keys[2])
    # The index is trusted at start (no file is stat'ed), tmp/ is emptied at once, and
    # the reconciliation runs after start.
    store = LocalStore(tmp_path / "s", 3000, Metrics())
    assert os.listdir(tmp_path / "s" / "tmp") == []
    assert set(store.nar_keys()) == {keys[0], keys[2], keys[3]}
    trio.run(store.reconcile)
    assert set(store.nar_keys()) == {keys[0], keys[3]}
    assert store.total_bytes == 2000
    assert sorted(os.listdir(tmp_path / "s" / "nar")) == sorted([keys[0], keys[3]])
    assert store.narinfo(keys[0][:32]) == b"narinfo 0"
    store.close()

    # A file that goes missing is found out when it is served: the row is dropped.
    os.unlink(tmp_path / "s" / "nar" / keys[3])
    store = LocalStore(tmp_path / "s", 3000, Metrics())
    assert store.small_nar(keys[3]) is None
    assert set(store.nar_keys()) == {keys[0]}
    assert store.narinfo(keys[3][:32]) is None
    assert store.total_bytes == 1000
    store.close()
