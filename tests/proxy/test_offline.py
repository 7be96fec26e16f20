"""The real Nix with the proxy's upstream unreachable: builds go on, nothing is remembered.

What Nix 2.8 does with each answer is in :mod:`nixd.proxy.errors`; here the proxy's
upstream is down (connections refused), a derivation that can be built locally is built
at once, and once the upstream is back the same output is substituted from it, by a Nix
sharing the first one's narinfo cache: no path was remembered as absent, by Nix or by
the proxy. A path that only the upstream has fails to realise while it is down, with
Nix's message, rather than after minutes of retries.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from nixd.daemon.nixsetup import NIX_SETTINGS
from tests.proxy.conftest import Caches, ProxyEnv, start_proxy, upstream_for
from tests.proxy.fakecache import FakeCache
from tests.realnix import RealNix

BUILDABLE = """derivation {{
  name = "nixd-offline-{name}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo {name} > $out" ];
}}"""


def _conf(proxy: ProxyEnv, caches: Caches) -> str:
    shared = " ".join(p for p in ("/bin", "/usr", "/lib", "/lib64") if os.path.exists(p))
    settings = "".join(f"{k} = {v}\n" for k, v in NIX_SETTINGS.items())  # as nixd writes
    return (
        f"substituters = {proxy.url}\n"
        f"trusted-public-keys = {caches.key.public().render()}\n"
        f"netrc-file = {proxy.netrc}\n"
        f"sandbox-paths = {shared}\n" + settings
    )


async def _run(
    nix: RealNix, args: list[str], store: Path, cache_home: Path
) -> subprocess.CompletedProcess[bytes]:
    env = {"XDG_CACHE_HOME": str(cache_home)}
    return await trio.to_thread.run_sync(
        lambda: nix.run(args, store=store, check=False, env=env, timeout=120)
    )


@pytest.fixture
def upstream_cache(caches: Caches, tmp_path: Path) -> tuple[Path, str, str]:
    """A signed cache holding two outputs built elsewhere: (dir, buildable, only upstream)."""
    builder = caches.nix
    out = builder.build(BUILDABLE.format(name="a"))
    only = builder.build(BUILDABLE.format(name="upstream-only"))
    sk = tmp_path / "sk"
    sk.write_text(caches.key.render())
    d = tmp_path / "upstream-cache"
    builder.run(["nix", "copy", "--to", f"file://{d}?compression=zstd&secret-key={sk}", out, only])
    return d, out, only


async def test_upstream_down_builds_then_substitutes_once_back(
    real_nix: RealNix, caches: Caches, tmp_path: Path, upstream_cache: tuple[Path, str, str]
) -> None:
    cache_dir, out, only = upstream_cache
    with trio.fail_after(240):  # a hang guard only: every step below is seconds
        async with trio.open_nursery() as nursery:
            cache = FakeCache(cache_dir)
            scope = trio.CancelScope()

            async def run_upstream(task_status: trio.TaskStatus[FakeCache]) -> None:
                with scope:
                    await cache.serve(task_status=task_status)

            await nursery.start(run_upstream)
            scope.cancel()  # the upstream is down: its port now refuses connections
            await trio.lowlevel.checkpoint()
            proxy = await start_proxy(
                nursery, tmp_path, (upstream_for(cache, caches, offline_probe=0.2),)
            )
            with (real_nix.root / "etc" / "nix.conf").open("a") as f:
                f.write(_conf(proxy, caches))
            cache_home = tmp_path / "nix-cache"
            metrics = proxy.handle.metrics

            built = await _run(
                real_nix,
                ["nix-build", "--no-out-link", "-E", BUILDABLE.format(name="a")],
                tmp_path / "s1",
                cache_home,
            )
            log = built.stderr.decode(errors="replace")
            assert built.returncode == 0, log
            assert built.stdout.decode().strip() == out
            assert real_nix.real_path(out, tmp_path / "s1").read_text() == "a\n"
            assert f"building '{out}" not in log and "building '/nix/store/" in log, log
            # Answered 404 (Nix's "not here"), never a 5xx Nix would retry for ~5 s.
            assert metrics.get("nixd_proxy_requests_total", kind="narinfo", status="404") >= 1
            server_errors = [
                labels
                for (name, labels), n in metrics.values.items()
                if name == "nixd_proxy_requests_total" and dict(labels)["status"] >= "500" and n
            ]
            assert server_errors == []
            unreachable = metrics.get(
                "nixd_proxy_upstream_requests_total", upstream=cache.url, outcome="unreachable"
            )
            assert unreachable >= 1
            assert metrics.total("nixd_proxy_misses_total") == 0  # not a miss to the proxy

            # A path only the upstream has: fails, with Nix's own words, and does not hang.
            missing = await _run(real_nix, ["nix-store", "-r", only], tmp_path / "s1", cache_home)
            assert missing.returncode != 0
            assert only in missing.stderr.decode(errors="replace")

            # The upstream comes back on the same port; after one probe interval the
            # proxy tries it again, and Nix (same narinfo cache) substitutes.
            await nursery.start(cache.serve)
            await trio.sleep(0.3)
            again = await _run(
                real_nix,
                ["nix-build", "--no-out-link", "-E", BUILDABLE.format(name="a")],
                tmp_path / "s2",
                cache_home,
            )
            log = again.stderr.decode(errors="replace")
            assert again.returncode == 0, log
            assert f"copying path '{out}' from '{proxy.url}'" in log, log
            assert "building '/nix/store/" not in log.replace(".drv'", ""), log
            assert real_nix.real_path(out, tmp_path / "s2").read_text() == "a\n"
            fetched = await _run(real_nix, ["nix-store", "-r", only], tmp_path / "s1", cache_home)
            assert fetched.returncode == 0, fetched.stderr.decode(errors="replace")
            assert real_nix.real_path(only, tmp_path / "s1").read_text() == "upstream-only\n"
            nursery.cancel_scope.cancel()
