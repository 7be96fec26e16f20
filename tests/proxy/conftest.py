"""Fixtures for the proxy: a real closure in static caches, a fake upstream, the proxy."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from nixd.nix.signing import SecretKey
from nixd.proxy.config import ProxyConfig, UpstreamConfig
from nixd.proxy.server import ProxyHandle, serve_proxy
from tests.proxy.fakecache import FakeCache
from tests.realnix import RealNix, nix_available

CLOSURE = """
let
  mk = name: script: derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
  };
  blob = mk "nixd-proxy-blob" ''
    /bin/mkdir $out
    /usr/bin/head -c 3000000 /dev/urandom > $out/data
    echo small > $out/small
  '';
  leaf = mk "nixd-proxy-leaf" "echo leaf > $out";
in mk "nixd-proxy-top" ''
  /bin/mkdir $out
  echo ${blob} > $out/blob
  echo ${leaf} > $out/leaf
''
"""


@dataclass
class Caches:
    """Store paths built once per module and copied into static caches."""

    nix: RealNix
    top: str
    closure: list[str]
    blob: str
    key: SecretKey
    other_key: SecretKey
    dirs: dict[str, Path]  # compression -> cache dir


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Caches]:
    if not nix_available():
        pytest.fail("the real `nix` is required (apt-get install nix-bin)")
    root = tmp_path_factory.mktemp("proxy-caches")
    nix = RealNix.create(root / "nix")
    shared = " ".join(p for p in ("/bin", "/usr", "/lib", "/lib64") if os.path.exists(p))
    with (nix.root / "etc" / "nix.conf").open("a") as f:
        f.write(f"substituters =\nsandbox-paths = {shared}\n")
    top = nix.build(CLOSURE)
    closure = nix.run(["nix-store", "-qR", top]).stdout.decode().split()
    blob = next(p for p in closure if p.endswith("-nixd-proxy-blob"))
    key = SecretKey.generate("proxy-test-1")
    other = SecretKey.generate("proxy-test-other")
    sk = root / "sk"
    sk.write_text(key.render())
    dirs = {}
    for compression in ("zstd", "none", "xz"):
        d = root / f"cache-{compression}"
        nix.run(
            ["nix", "copy", "--to", f"file://{d}?compression={compression}&secret-key={sk}", top]
        )
        dirs[compression] = d
    yield Caches(nix, top, sorted(closure), blob, key, other, dirs)


@pytest.fixture
async def fake_upstream(caches: Caches) -> AsyncIterator[FakeCache]:
    async with trio.open_nursery() as nursery:
        cache = await nursery.start(FakeCache(caches.dirs["zstd"]).serve)
        yield cache
        nursery.cancel_scope.cancel()


@dataclass
class ProxyEnv:
    handle: ProxyHandle
    secret: str
    netrc: Path
    store_dir: Path
    config: ProxyConfig

    @property
    def url(self) -> str:
        return self.handle.url


def proxy_config(
    tmp_path: Path, upstreams: tuple[UpstreamConfig, ...], **kw: object
) -> tuple[ProxyConfig, str, Path]:
    secret = secrets.token_urlsafe(32)
    secret_file = tmp_path / "proxy-secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login nixd password {secret}\n")
    config = ProxyConfig(
        secret_file=str(secret_file),
        store_dir=str(tmp_path / "proxy-store"),
        upstreams=upstreams,
        **kw,  # type: ignore[arg-type]
    )
    return config, secret, netrc


async def start_proxy(
    nursery: trio.Nursery, tmp_path: Path, upstreams: tuple[UpstreamConfig, ...], **kw: object
) -> ProxyEnv:
    config, secret, netrc = proxy_config(tmp_path, upstreams, **kw)
    handle = await nursery.start(serve_proxy, config, None)
    return ProxyEnv(handle, secret, netrc, Path(config.store_dir), config)


def upstream_for(cache: FakeCache, caches: Caches, **kw: object) -> UpstreamConfig:
    fields: dict[str, object] = {
        "url": cache.url,
        "priority": 40,
        "trusted_keys": (caches.key.public().render(),),
        "auth": "none",
        **kw,
    }
    return UpstreamConfig(**fields)  # type: ignore[arg-type]


async def nix_copy(
    nix: RealNix,
    proxy: ProxyEnv,
    caches: Caches,
    path: str,
    *,
    store: Path,
    cache_home: Path,
    check: bool = True,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    """`nix copy --from` the proxy into ``store`` (a chroot store), off the event loop."""
    args = [
        "nix",
        "copy",
        "--from",
        proxy.url,
        "--option",
        "trusted-public-keys",
        caches.key.public().render(),
        "--option",
        "netrc-file",
        str(proxy.netrc),
        "--option",
        "narinfo-cache-negative-ttl",
        "0",
        "--option",
        "substituters",
        "",
        *extra,
        path,
    ]
    env = {"XDG_CACHE_HOME": str(cache_home)}
    return await trio.to_thread.run_sync(
        lambda: nix.run(args, store=store, check=check, env=env, timeout=120)
    )
