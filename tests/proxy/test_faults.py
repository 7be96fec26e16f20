"""A misbehaving upstream: Nix fails cleanly or succeeds after a retry, and nothing that
does not match a signed narinfo lands in the Nix store or the proxy's store."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from nixd.auth.model import AccessToken
from nixd.errors import LoginFailed
from nixd.nix.narinfo import NarInfo
from nixd.proxy.config import UpstreamConfig
from nixd.proxy.server import serve_proxy
from nixd.proxy.verify import NarVerifier
from tests.proxy.conftest import (
    Caches,
    ProxyEnv,
    nix_copy,
    proxy_config,
    start_proxy,
    upstream_for,
)
from tests.proxy.fakecache import FakeCache, Fault
from tests.proxy.test_realnix import assert_closure_copied
from tests.realnix import RealNix


def assert_local_store_verified(proxy: ProxyEnv) -> None:
    """Every NAR the proxy kept decompresses to the NarHash of the narinfo it kept."""
    store = proxy.handle.store
    for key in store.nar_keys():
        text = store.narinfo(key[:32])
        assert text is not None
        info = NarInfo.parse(text)
        assert info.url == f"nar/{key}"
        found = store.nar(key, touch=False)
        assert found is not None
        verifier = NarVerifier(info, key)
        verifier.feed(found[0].read_bytes())
        verifier.finish()


def hash_part(path: str) -> str:
    return path.rsplit("/", maxsplit=1)[-1][:32]


@pytest.mark.parametrize(
    ("fault", "succeeds"),
    [
        (Fault("truncate", times=1), True),
        (Fault("reset", times=1), True),
        (Fault("status", match=".narinfo", times=2, status=500), True),
        (Fault("reset", match=".narinfo", times=1), True),
        (Fault("slow", match=".narinfo", times=1, delay=3.0), True),
        (Fault("corrupt", times=-1), False),
        (Fault("truncate", times=-1), False),
        (Fault("status", match=".nar.zst", times=-1, status=502), False),
    ],
    ids=lambda v: f"{v.kind}-{v.match}-{v.times}" if isinstance(v, Fault) else str(v),
)
async def test_misbehaving_upstream(
    real_nix: RealNix,
    caches: Caches,
    tmp_path: Path,
    fake_upstream: FakeCache,
    fault: Fault,
    succeeds: bool,
) -> None:
    fake_upstream.faults.append(fault)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(
                nursery,
                tmp_path,
                (upstream_for(fake_upstream, caches, timeout=1.0),),
                resume_delay=0.01,  # a download cut forever gives up at once
            )
            proc = await nix_copy(
                real_nix,
                proxy,
                caches,
                caches.top,
                store=tmp_path / "s",
                cache_home=tmp_path / "c",
                check=False,
            )
            await proxy.handle.downloads_settled()
            if succeeds:
                assert proc.returncode == 0, proc.stderr.decode()
                assert_closure_copied(caches, real_nix, tmp_path / "s")
            else:
                assert proc.returncode != 0
                assert not real_nix.real_path(caches.top, tmp_path / "s").exists()
            assert_local_store_verified(proxy)
            if fault.kind == "corrupt":
                assert proxy.handle.metrics.total("nixd_proxy_verification_failures_total") > 0
            if not succeeds:
                assert not any(
                    k.startswith(hash_part(caches.blob)) for k in proxy.handle.store.nar_keys()
                )
            nursery.cancel_scope.cancel()


async def test_wrongly_signed_narinfo_is_not_served(
    real_nix: RealNix, caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    other = UpstreamConfig(
        url=fake_upstream.url, trusted_keys=(caches.other_key.public().render(),), auth="none"
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, tmp_path, (other,))
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                r = await c.get(f"/{hash_part(caches.top)}.narinfo")
                assert r.status_code == 404
            proc = await nix_copy(
                real_nix,
                proxy,
                caches,
                caches.top,
                store=tmp_path / "s",
                cache_home=tmp_path / "c",
                check=False,
            )
            assert proc.returncode != 0
            assert not real_nix.real_path(caches.top, tmp_path / "s").exists()
            assert fake_upstream.count(".nar.zst") == 0
            assert proxy.handle.metrics.get(
                "nixd_proxy_verification_failures_total", stage="narinfo"
            )
            nursery.cancel_scope.cancel()


class FakeTokens:
    """A TokenSource whose first token the upstream rejects; refresh gives a good one."""

    def __init__(self, good: str | None) -> None:
        self.current = AccessToken("stale-token", expires_at=2e9, identity="token:test")
        self.good = good
        self.refreshes = 0

    async def get(self) -> AccessToken:
        return self.current

    async def refresh(self, stale: AccessToken | None) -> AccessToken:
        self.refreshes += 1
        await trio.sleep(0.05)
        if self.good is None:
            raise LoginFailed("credential rejected")  # refused: no waiting helps
        self.current = AccessToken(self.good, expires_at=2e9, identity="token:test")
        return self.current


async def test_upstream_401_refreshes_the_token_once(
    real_nix: RealNix, caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    fake_upstream.tokens = {"fresh-token"}
    tokens = FakeTokens("fresh-token")
    config, secret, netrc = proxy_config(
        tmp_path, (upstream_for(fake_upstream, caches, auth="nixd"),)
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve_proxy, config, tokens)
            proxy = ProxyEnv(handle, secret, netrc, Path(config.store_dir), config)
            await nix_copy(
                real_nix, proxy, caches, caches.top, store=tmp_path / "s", cache_home=tmp_path / "c"
            )
            assert_closure_copied(caches, real_nix, tmp_path / "s")
            assert tokens.refreshes == 1
            nursery.cancel_scope.cancel()


async def test_rejected_token_is_503_never_401(
    caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    fake_upstream.tokens = {"fresh-token"}
    tokens = FakeTokens(None)
    config, secret, _ = proxy_config(tmp_path, (upstream_for(fake_upstream, caches, auth="nixd"),))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve_proxy, config, tokens)
            async with httpx.AsyncClient(base_url=handle.url, auth=("nixd", secret)) as c:
                for method in ("HEAD", "GET"):
                    r = await c.request(method, f"/{hash_part(caches.top)}.narinfo")
                    assert r.status_code == 503
                # The next request is not answered from a negative cache: still 503.
                r = await c.get(f"/{hash_part(caches.top)}.narinfo")
                assert r.status_code == 503
            # Once the upstream accepts the token, the same path is served at once.
            tokens.good = "fresh-token"
            async with httpx.AsyncClient(base_url=handle.url, auth=("nixd", secret)) as c:
                r = await c.get(f"/{hash_part(caches.top)}.narinfo")
                assert r.status_code == 200
            nursery.cancel_scope.cancel()


async def test_upstream_5xx_is_503_and_not_remembered(
    caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    fake_upstream.faults.append(Fault("status", match=".narinfo", times=1, status=500))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, tmp_path, (upstream_for(fake_upstream, caches),))
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                assert (await c.get(f"/{hash_part(caches.top)}.narinfo")).status_code == 503
                assert (await c.get(f"/{hash_part(caches.top)}.narinfo")).status_code == 200
            nursery.cancel_scope.cancel()
