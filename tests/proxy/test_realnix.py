"""The real `nix` substitutes through the proxy: cold from an upstream, warm from the local
store with the upstream gone, and not at all without the local secret."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.proxy.conftest import Caches, nix_copy, start_proxy, upstream_for
from tests.proxy.fakecache import FakeCache
from tests.realnix import RealNix


def same_tree(a: Path, b: Path) -> bool:
    if a.is_symlink() or b.is_symlink():
        return a.is_symlink() and b.is_symlink() and a.readlink() == b.readlink()
    if a.is_dir():
        names = sorted(p.name for p in a.iterdir())
        return (
            b.is_dir()
            and names == sorted(p.name for p in b.iterdir())
            and all(same_tree(a / n, b / n) for n in names)
        )
    return b.is_file() and a.read_bytes() == b.read_bytes()


def assert_closure_copied(caches: Caches, nix: RealNix, store: Path) -> None:
    for path in caches.closure:
        assert same_tree(caches.nix.real_path(path), nix.real_path(path, store)), path


@pytest.mark.parametrize("compression", ["zstd", "none", "xz"])
async def test_cold_then_warm_with_upstream_stopped(
    real_nix: RealNix, caches: Caches, tmp_path: Path, compression: str
) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            upstream_scope = trio.CancelScope()
            cache = FakeCache(caches.dirs[compression])

            async def run_upstream(task_status: trio.TaskStatus[FakeCache]) -> None:
                with upstream_scope:
                    await cache.serve(task_status=task_status)

            await nursery.start(run_upstream)
            proxy = await start_proxy(nursery, tmp_path, (upstream_for(cache, caches),))

            await nix_copy(
                real_nix,
                proxy,
                caches,
                caches.top,
                store=tmp_path / "s1",
                cache_home=tmp_path / "c1",
            )
            assert_closure_copied(caches, real_nix, tmp_path / "s1")
            assert cache.count(".narinfo") >= len(caches.closure)
            metrics = proxy.handle.metrics
            # Admission to the local store happens off the hot path: wait for it.
            await proxy.handle.downloads_settled()
            assert len(proxy.handle.store.nar_keys()) == len(caches.closure)
            assert metrics.total("nixd_proxy_verification_failures_total") == 0

            upstream_scope.cancel()
            await nix_copy(
                real_nix,
                proxy,
                caches,
                caches.top,
                store=tmp_path / "s2",
                cache_home=tmp_path / "c2",
            )
            assert_closure_copied(caches, real_nix, tmp_path / "s2")
            assert metrics.get("nixd_proxy_local_hits_total", kind="nar") >= len(caches.closure)
            nursery.cancel_scope.cancel()


async def test_local_store_survives_restart(
    real_nix: RealNix, caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[object]) -> None:
                with scope:
                    env = await start_proxy(
                        nursery, tmp_path, (upstream_for(fake_upstream, caches),)
                    )
                    task_status.started(env)
                    await trio.sleep_forever()

            proxy = await nursery.start(run)
            await nix_copy(
                real_nix,
                proxy,
                caches,
                caches.top,
                store=tmp_path / "s1",
                cache_home=tmp_path / "c1",
            )
            await proxy.handle.downloads_settled()
            assert len(proxy.handle.store.nar_keys()) == len(caches.closure)
            nursery.cancel_scope.cancel()
        before = fake_upstream.count(".nar.zst")
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, tmp_path, (upstream_for(fake_upstream, caches),))
            assert len(proxy.handle.store.nar_keys()) == len(caches.closure)
            await nix_copy(
                real_nix,
                proxy,
                caches,
                caches.top,
                store=tmp_path / "s2",
                cache_home=tmp_path / "c2",
            )
            assert_closure_copied(caches, real_nix, tmp_path / "s2")
            assert fake_upstream.count(".nar.zst") == before
            nursery.cancel_scope.cancel()


async def test_without_the_secret_nothing_is_served(
    real_nix: RealNix, caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            # no prefetch: every upstream request below is one a client's request made
            proxy = await start_proxy(
                nursery, tmp_path, (upstream_for(fake_upstream, caches),), prefetch=False
            )
            hash_part = caches.top.split("/")[-1][:32]
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                # nix-cache-info is public (Nix must be able to read it), the rest is not.
                assert (await client.get("/nix-cache-info")).status_code == 200
                for auth in (None, ("nixd", "wrong"), ("root", proxy.secret)):
                    r = await client.get(f"/{hash_part}.narinfo", auth=auth)
                    assert r.status_code == 401, auth
                r = await client.get(f"/{hash_part}.narinfo", auth=("nixd", proxy.secret))
                assert r.status_code == 200
                assert "URL: nar/" in r.text
            assert fake_upstream.count(".narinfo") == 1

            wrong = tmp_path / "wrong-netrc"
            wrong.write_text("machine 127.0.0.1 login nixd password nope\n")
            proc = await nix_copy(
                real_nix,
                proxy,
                caches,
                caches.top,
                store=tmp_path / "s1",
                cache_home=tmp_path / "c1",
                check=False,
                extra=("--option", "netrc-file", str(wrong)),
            )
            assert proc.returncode != 0
            assert not (tmp_path / "s1" / caches.top.lstrip("/")).exists()
            assert fake_upstream.count(".nar.zst") == 0
            nursery.cancel_scope.cancel()
