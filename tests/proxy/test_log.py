"""``nix log`` through the proxy: ``/log/<drv>`` from the upstreams, with their credential."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import trio

from nixd.proxy import server as proxy_server
from nixd.proxy.server import serve_proxy
from tests.proxy.conftest import Caches, ProxyEnv, nix_copy, proxy_config, upstream_for
from tests.proxy.fakecache import FakeCache
from tests.proxy.test_faults import FakeTokens
from tests.realnix import RealNix

LOG = b"building '/nix/store/...-nixd-proxy-top.drv'...\nit worked\n"


def with_log(caches: Caches, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the zstd cache holding the build log of the closure's top derivation."""
    root = tmp_path / "cache"
    shutil.copytree(caches.dirs["zstd"], root)
    drv = caches.nix.run(["nix-store", "-qd", caches.top]).stdout.decode().strip()
    (root / "log").mkdir(exist_ok=True)
    (root / "log" / drv.rsplit("/", 1)[1]).write_bytes(LOG)
    return root, drv


async def test_nix_log_through_the_proxy_with_the_upstream_credential(
    real_nix: RealNix, caches: Caches, tmp_path: Path
) -> None:
    root, drv = with_log(caches, tmp_path)
    cache = FakeCache(root, tokens={"fresh-token"})
    tokens = FakeTokens("fresh-token")  # the first token is refused: renewed once, then sent
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.serve)
            config, secret, netrc = proxy_config(
                tmp_path, (upstream_for(cache, caches, auth="nixd"),)
            )
            handle = await nursery.start(serve_proxy, config, tokens)
            proxy = ProxyEnv(handle, secret, netrc, Path(config.store_dir), config)
            fresh = tmp_path / "fresh"
            # An output path substituted through the proxy: `nix log` finds its deriver in
            # the narinfo and asks the proxy for the log.
            await nix_copy(real_nix, proxy, caches, caches.top, store=fresh, cache_home=tmp_path)
            # The derivation itself, valid locally (with no log of its own there).
            await trio.to_thread.run_sync(
                lambda: caches.nix.run(
                    ["nix", "copy", "--derivation", "--no-check-sigs", "--to", str(fresh), drv]
                )
            )
            for what in (caches.top, drv):
                args = [
                    "nix", "log", "--option", "substituters", proxy.url,
                    "--option", "netrc-file", str(netrc), what,
                ]  # fmt: skip
                r = await trio.to_thread.run_sync(
                    lambda a=args: real_nix.run(a, store=fresh, check=False)  # type: ignore[misc]
                )
                assert r.returncode == 0, r.stderr.decode()
                assert r.stdout == LOG
            assert tokens.refreshes == 1

            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", secret)) as c:
                name = drv.rsplit("/", 1)[1]
                assert (await c.head(f"/log/{name}")).headers["content-length"] == str(len(LOG))
                missing = "0" * 32 + "-absent.drv"
                assert (await c.get(f"/log/{missing}")).status_code == 404
                for bad in ("not-a-drv", "0" * 32 + "-x.narinfo", "0" * 32 + "-a%2fb.drv"):
                    assert (await c.get(f"/log/{bad}")).status_code == 400, bad
            async with httpx.AsyncClient(base_url=proxy.url) as c:
                assert (await c.get(f"/log/{name}")).status_code == 401  # no local secret
            nursery.cancel_scope.cancel()


async def test_log_failures_map_like_narinfos(
    caches: Caches, tmp_path: Path, monkeypatch: object
) -> None:
    """A rejected token is a 503 (never 401/404); a log past MAX_LOG is a 503 too."""
    root, drv = with_log(caches, tmp_path)
    name = drv.rsplit("/", 1)[1]
    cache = FakeCache(root, tokens={"fresh-token"})
    tokens = FakeTokens(None)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.serve)
            config, secret, _ = proxy_config(tmp_path, (upstream_for(cache, caches, auth="nixd"),))
            handle = await nursery.start(serve_proxy, config, tokens)
            async with httpx.AsyncClient(base_url=handle.url, auth=("nixd", secret)) as c:
                assert (await c.get(f"/log/{name}")).status_code == 503
                tokens.good = "fresh-token"
                assert (await c.get(f"/log/{name}")).content == LOG
                proxy_server.MAX_LOG, saved = 10, proxy_server.MAX_LOG
                try:
                    assert (await c.get(f"/log/{name}")).status_code == 503
                finally:
                    proxy_server.MAX_LOG = saved
            nursery.cancel_scope.cancel()
