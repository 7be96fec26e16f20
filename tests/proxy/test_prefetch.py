"""Closure prefetch: once Nix asks for the top of a closure, the rest of its narinfos and
small NARs reach the proxy unasked, and Nix's own requests are local hits; the bounds
(references followed per narinfo, queue, budget, concurrency) hold against a narinfo
with 10,000 references; a failing upstream leaves no negative entries; shutdown and an
upstream swap while prefetches are in flight are clean."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from nixd.auth.model import AccessToken
from nixd.errors import LoginFailed
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import SecretKey
from nixd.proxy import prefetch
from nixd.proxy.config import UpstreamConfig
from nixd.proxy.server import serve_proxy
from nixd.proxy.verify import nar_key
from tests.proxy.closure import Closure, store_path, write_closure
from tests.proxy.conftest import ProxyEnv, proxy_config, start_proxy
from tests.proxy.fakecache import FakeCache, Fault
from tests.proxy.hostile import Hostile, ok, signed_path
from tests.realnix import RealNix

HANG_GUARD = 90


@dataclasses.dataclass
class Env:
    closure: Closure
    cache: FakeCache
    proxy: ProxyEnv
    client: httpx.AsyncClient
    key: SecretKey

    def prefetched(self, outcome: str, kind: str) -> float:
        metrics = self.proxy.handle.metrics
        return metrics.get("nixd_proxy_prefetch_total", kind=kind, outcome=outcome)


def upstream(url: str, key: SecretKey) -> UpstreamConfig:
    return UpstreamConfig(url=url, trusted_keys=(key.public().render(),), auth="none")


@asynccontextmanager
async def running(
    tmp_path: Path, n: int = 50, faults: tuple[Fault, ...] = (), **kw: object
) -> AsyncIterator[Env]:
    key = SecretKey.generate("prefetch-test-1")
    closure = write_closure(tmp_path / "cache", n, key)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            cache = await nursery.start(FakeCache(closure.root, faults=list(faults)).serve)
            proxy = await start_proxy(nursery, tmp_path, (upstream(cache.url, key),), **kw)
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                yield Env(closure, cache, proxy, c, key)
            nursery.cancel_scope.cancel()


async def test_closure_arrives_before_nix_asks(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        infos, cache = env.closure.infos, env.cache
        top = infos[0].store_path.hash_part
        assert (await env.client.head(f"/{top}.narinfo")).status_code == 200
        await env.proxy.handle.prefetch_settled()
        # Every narinfo and every NAR reached the proxy once, asked for by nobody but it.
        for info in infos:
            assert cache.requests[f"/{info.store_path.hash_part}.narinfo"] == 1, info
            assert cache.requests[f"/{info.url}"] == 1, info
        assert set(env.proxy.handle.store.nar_keys()) == {nar_key(i) for i in infos}
        assert env.prefetched("fetched", "narinfo") == len(infos) - 1
        assert env.prefetched("fetched", "nar") == len(infos)
        asked = sum(cache.requests.values())
        # Nix's walk (HEAD, HEAD, GET per narinfo, then the NARs) is answered locally.
        for info in infos:
            path = f"/{info.store_path.hash_part}.narinfo"
            for method in ("HEAD", "HEAD", "GET"):
                assert (await env.client.request(method, path)).status_code == 200
        for info in infos:
            text = (await env.client.get(f"/{info.store_path.hash_part}.narinfo")).content
            url = NarInfo.parse(text).url
            r = await env.client.get(f"/{url}")
            assert r.status_code == 200
            assert r.content == (env.closure.root / info.url).read_bytes()
        assert sum(cache.requests.values()) == asked
        assert env.prefetched("hit", "narinfo") == len(infos) - 1
        assert env.prefetched("hit", "nar") == len(infos)
        assert "nixd_proxy_prefetch_total{" in env.proxy.handle.metrics.render()


async def test_prefetch_off(tmp_path: Path) -> None:
    async with running(tmp_path, prefetch=False) as env:
        top = env.closure.infos[0].store_path.hash_part
        assert (await env.client.get(f"/{top}.narinfo")).status_code == 200
        await env.proxy.handle.prefetch_settled()
        await trio.sleep(0.2)  # nothing is running that could ask; give it the chance
        assert list(env.cache.requests) == [f"/{top}.narinfo"]


async def test_concurrency_bound_at_the_upstream(tmp_path: Path) -> None:
    slow = Fault("slow", match="/", times=-1, delay=0.2)
    async with running(tmp_path, n=24, faults=(slow,), prefetch_concurrency=3) as env:
        top = env.closure.infos[0].store_path.hash_part
        assert (await env.client.get(f"/{top}.narinfo")).status_code == 200
        await env.proxy.handle.prefetch_settled()
        assert env.prefetched("fetched", "narinfo") == 23
        assert 2 <= env.cache.max_in_flight <= 3


async def test_nix_request_waits_for_the_prefetch_in_flight(tmp_path: Path) -> None:
    release = trio.Event()
    async with running(tmp_path, n=3) as env:
        first = env.closure.infos[1]
        name = f"/{first.store_path.hash_part}.narinfo"
        env.cache.faults.append(Fault("wait", match=name, release=release))
        top = env.closure.infos[0].store_path.hash_part
        assert (await env.client.get(f"/{top}.narinfo")).status_code == 200
        # the fake upstream has no event to wait on: poll (bounded by the hang guard)
        while env.cache.requests[name] == 0:  # noqa: ASYNC110 (the prefetch is there now)
            await trio.sleep(0.01)
        answers: list[int] = []

        async def ask() -> None:
            answers.append((await env.client.get(name)).status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(0.1)
            release.set()
        assert answers == [200]
        assert env.cache.requests[name] == 1
        assert env.prefetched("hit", "narinfo") == 1


async def test_failing_upstream_leaves_no_negative_entries(tmp_path: Path) -> None:
    async with running(tmp_path, n=7) as env:
        # 0 -> 1, 2; 1 -> 3, 4; 2 -> 5, 6: 1 and 5 fail, 6 is absent, 3 and 4 stay unknown.
        infos = env.closure.infos
        failing = [infos[1].store_path.hash_part, infos[5].store_path.hash_part]
        absent = infos[6].store_path.hash_part
        (env.closure.root / f"{absent}.narinfo").unlink()
        env.cache.faults += [
            Fault("status", match=f"/{failing[0]}.narinfo", times=-1, status=503),
            Fault("reset", match=f"/{failing[1]}.narinfo", times=-1),
            Fault("status", match=f"/{infos[0].url}", times=1, status=500),
        ]
        top = infos[0].store_path.hash_part
        assert (await env.client.head(f"/{top}.narinfo")).status_code == 200
        await env.proxy.handle.prefetch_settled()
        proxy = env.proxy.handle._proxy
        assert env.prefetched("failed", "narinfo") == 2
        assert env.prefetched("absent", "narinfo") == 1
        assert env.prefetched("fetched", "narinfo") == 1
        assert env.prefetched("failed", "nar") == 1
        assert not any(h in proxy.negative for h in failing)
        assert absent in proxy.negative  # a clean 404, as for Nix's own request
        # Nix's own requests see the upstream's real answers, then its recovery.
        assert (await env.client.get(f"/{failing[0]}.narinfo")).status_code == 503
        r = await env.client.get(f"/nar/{nar_key(infos[0])}")
        assert r.status_code == 200  # the prefetch of this NAR failed; Nix's GET did not
        env.cache.faults.clear()
        for hash_part in failing:
            assert (await env.client.get(f"/{hash_part}.narinfo")).status_code == 200
        assert (await env.client.get(f"/{absent}.narinfo")).status_code == 404


async def test_nar_request_joining_a_failed_prefetch_fetches_itself(tmp_path: Path) -> None:
    release = trio.Event()
    async with running(tmp_path, n=1) as env:
        info = env.closure.infos[0]
        nar = f"/{info.url}"
        env.cache.faults.append(Fault("status", match=nar, status=500, release=release))
        hash_part = info.store_path.hash_part
        assert (await env.client.get(f"/{hash_part}.narinfo")).status_code == 200
        metrics = env.proxy.handle.metrics
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await env.client.get(f"/nar/{nar_key(info)}"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            # polled (no event to wait on): the request joined the prefetch's fetch
            while not metrics.get("nixd_proxy_singleflight_joins_total"):  # noqa: ASYNC110
                await trio.sleep(0.01)
            release.set()  # the prefetch's fetch now fails with a 500
        assert [r.status_code for r in answers] == [200]
        assert answers[0].content == (env.closure.root / info.url).read_bytes()
        assert env.cache.requests[nar] == 2
        assert env.prefetched("failed", "nar") == 1


def _hostile_root(tmp_path: Path, refs: int) -> tuple[Hostile, SecretKey, str]:
    """A Hostile upstream whose one narinfo (signed by a trusted key) has ``refs``
    references, none of which it has."""
    signed = signed_path(tmp_path)
    many = tuple(store_path(f"ref-{i}") for i in range(refs))
    info = dataclasses.replace(signed.info, references=many).signed(signed.key)
    hostile = Hostile()
    hostile.routes[f"/{signed.hash_part}.narinfo"] = ok(info.render().encode())
    hostile.routes[f"/{info.url}"] = ok(signed.nar)
    return hostile, signed.key, signed.hash_part


@pytest.mark.parametrize(
    ("kw", "queue", "most"),
    [
        ({}, prefetch.MAX_QUEUE, prefetch.MAX_REFS + 1),  # the per-narinfo cap
        ({"prefetch_ahead": 20}, prefetch.MAX_QUEUE, 20),  # the global budget
        ({}, 10, 10),  # the queue bound
    ],
)
async def test_ten_thousand_references(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kw: dict[str, object],
    queue: int,
    most: int,
) -> None:
    monkeypatch.setattr(prefetch, "MAX_QUEUE", queue)
    hostile, key, root = _hostile_root(tmp_path, 10_000)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(hostile.serve)
            proxy = await start_proxy(nursery, tmp_path, (upstream(hostile.url, key),), **kw)
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                assert (await c.get(f"/{root}.narinfo")).status_code == 200
                await proxy.handle.prefetch_settled()
                fetched = len(hostile.requests) - 1  # the root narinfo Nix asked for
                assert 0 < fetched <= most
                metrics = proxy.handle.metrics
                done = sum(
                    metrics.get("nixd_proxy_prefetch_total", kind=k, outcome=o)
                    for k in ("narinfo", "nar")
                    for o in ("fetched", "absent", "failed")
                )
                assert done == fetched
                if most < prefetch.MAX_REFS:
                    assert metrics.total("nixd_proxy_prefetch_total") - done > 0  # dropped
                # The proxy still answers, its own narinfo included.
                assert (await c.get(f"/{root}.narinfo")).status_code == 200
            nursery.cancel_scope.cancel()


async def _blocked(env: Env, release: trio.Event, concurrency: int) -> None:
    """Make every request but the top narinfo wait; ask the top; wait until the
    prefetches fill ``concurrency`` requests at the upstream."""
    infos = env.closure.infos
    for info in infos:
        env.cache.faults.append(Fault("wait", match=f"/{info.url}", times=-1, release=release))
        if info is not infos[0]:
            name = f"/{info.store_path.hash_part}.narinfo"
            env.cache.faults.append(Fault("wait", match=name, times=-1, release=release))
    top = infos[0].store_path.hash_part
    assert (await env.client.get(f"/{top}.narinfo")).status_code == 200
    while env.cache.in_flight < concurrency:  # noqa: ASYNC110 (polled: no event to wait on)
        await trio.sleep(0.01)


async def test_shutdown_while_prefetching(tmp_path: Path) -> None:
    release = trio.Event()
    async with running(tmp_path, n=20, prefetch_concurrency=3) as env:
        await _blocked(env, release, 3)
        store_dir = env.proxy.store_dir
    # The proxy's nursery was cancelled with three prefetches in flight: nothing leaked.
    assert list((store_dir / "tmp").iterdir()) == []


async def test_upstream_swap_cancels_prefetches(tmp_path: Path) -> None:
    release = trio.Event()
    async with running(tmp_path, n=20, prefetch_concurrency=3) as env:
        await _blocked(env, release, 3)
        handle = env.proxy.handle
        old = handle._proxy.upstreams[0]
        handle.update_upstreams((upstream(env.cache.url, env.key),))
        await handle.prefetch_settled()
        await old.unused.wait()  # every prefetch let go of the retired upstream
        assert old.users == 0
        release.set()
        env.cache.faults.clear()
        name = f"/{env.closure.infos[3].store_path.hash_part}.narinfo"
        assert (await env.client.get(name)).status_code == 200
        await handle.prefetch_settled()


async def test_real_nix_cold_closure_through_prefetch(real_nix: RealNix, tmp_path: Path) -> None:
    async with running(tmp_path, n=80) as env:
        top = env.closure.paths()[0]
        args = [
            "nix", "copy", "--from", env.proxy.url,
            "--option", "trusted-public-keys", env.key.public().render(),
            "--option", "netrc-file", str(env.proxy.netrc),
            "--option", "narinfo-cache-negative-ttl", "0",
            "--option", "substituters", "",
            top,
        ]  # fmt: skip
        store = tmp_path / "dst"
        cache_home = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
        await trio.to_thread.run_sync(
            lambda: real_nix.run(args, store=store, env=cache_home, timeout=120)
        )
        for path in env.closure.paths():
            assert real_nix.real_path(path, store).is_file(), path
        hits = env.prefetched("hit", "narinfo") + env.prefetched("hit", "nar")
        assert hits > 0
        # Each path's narinfo and NAR went to the upstream once, whoever asked first.
        for info in env.closure.infos:
            assert env.cache.requests[f"/{info.store_path.hash_part}.narinfo"] == 1
            assert env.cache.requests[f"/{info.url}"] == 1


class CountingTokens:
    """A TokenSource with one fixed token that counts renewals (refused: no waiting helps)."""

    def __init__(self) -> None:
        self.token = AccessToken("the-access-token", expires_at=2e9, identity="token:test")
        self.refreshes = 0

    async def get(self) -> AccessToken:
        return self.token

    async def refresh(self, stale: AccessToken | None) -> AccessToken:
        self.refreshes += 1
        raise LoginFailed("no renewal in this test")


async def test_prefetch_never_renews_the_token(tmp_path: Path) -> None:
    key = SecretKey.generate("prefetch-test-1")
    closure = write_closure(tmp_path / "cache", 3, key)
    refs = [i.store_path.hash_part for i in closure.infos[1:]]
    faults = [Fault("status", match=f"/{h}.narinfo", times=-1, status=401) for h in refs]
    tokens = CountingTokens()
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            cache = await nursery.start(FakeCache(closure.root, faults=faults).serve)
            config = dataclasses.replace(upstream(cache.url, key), auth="nixd")
            pconfig, secret, _ = proxy_config(tmp_path, (config,))
            handle = await nursery.start(serve_proxy, pconfig, tokens)
            async with httpx.AsyncClient(base_url=handle.url, auth=("nixd", secret)) as c:
                top = closure.infos[0].store_path.hash_part
                assert (await c.get(f"/{top}.narinfo")).status_code == 200
                await handle.prefetch_settled()
                metrics = handle.metrics
                assert (
                    metrics.get("nixd_proxy_prefetch_total", kind="narinfo", outcome="failed") == 2
                )
                # The prefetches' 401s renewed nothing (and took no lock); Nix's request does.
                assert tokens.refreshes == 0
                assert cache.requests[f"/{refs[0]}.narinfo"] == 1
                assert (await c.get(f"/{refs[0]}.narinfo")).status_code == 503
                assert tokens.refreshes == 1
            nursery.cancel_scope.cancel()
