"""While the daemon's token is being renewed, requests wait for it (bounded) instead of
being answered 503 at once; a wait that ends without a token is the transient 503."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import trio

from nixd.auth.model import AccessToken
from nixd.errors import AuthError
from nixd.proxy.server import serve_proxy
from tests.proxy.conftest import Caches, proxy_config, upstream_for
from tests.proxy.fakecache import FakeCache


class SlowTokens:
    """A TokenSource whose renewal fails (or hangs) for its first ``ready_after`` tries
    (None: always)."""

    def __init__(self, *, ready_after: int | None = None, hang: bool = False) -> None:
        self.ready_after = ready_after
        self.hang = hang
        self.gets = 0

    async def get(self) -> AccessToken:
        self.gets += 1
        if self.ready_after is None or self.gets <= self.ready_after:
            if self.hang:
                await trio.sleep(math.inf)
            raise AuthError("token renewal failed: the server did not answer")
        return AccessToken("good-token", expires_at=2e9, identity="token:test")

    async def refresh(self, stale: AccessToken | None) -> AccessToken:
        return await self.get()


def _narinfo(caches: Caches) -> str:
    return "/" + caches.top.removeprefix("/nix/store/")[:32] + ".narinfo"


async def _proxy_get(
    caches: Caches, tmp_path: Path, tokens: SlowTokens, token_wait: float
) -> tuple[int, int, int]:
    """(status of a first request, of a second one, the token tries the second made)
    through a proxy whose upstream takes the tokens of ``tokens``."""
    cache = FakeCache(caches.dirs["zstd"], tokens={"good-token"})
    with trio.fail_after(60):  # hang guard
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.serve)
            upstream = upstream_for(cache, caches, auth="nixd", token_wait=token_wait)
            config, secret, _ = proxy_config(tmp_path, (upstream,))
            handle = await nursery.start(serve_proxy, config, tokens)
            async with httpx.AsyncClient(base_url=handle.url, auth=("nixd", secret)) as c:
                first = (await c.get(_narinfo(caches))).status_code
                before = tokens.gets
                second = (await c.get(_narinfo(caches))).status_code
            nursery.cancel_scope.cancel()
    return first, second, tokens.gets - before


async def test_request_waits_for_a_renewal_in_progress(caches: Caches, tmp_path: Path) -> None:
    tokens = SlowTokens(ready_after=3)
    first, second, _ = await _proxy_get(caches, tmp_path, tokens, 30.0)
    assert (first, second) == (200, 200)  # waited through 3 failed tries, no 503


async def test_wait_in_vain_is_503_then_no_more_waiting(caches: Caches, tmp_path: Path) -> None:
    tokens = SlowTokens()
    first, second, tries = await _proxy_get(caches, tmp_path, tokens, 0.3)
    assert (first, second) == (503, 503)  # transient: never 401/404 that Nix remembers
    assert tokens.gets - tries >= 2  # the first request waited, trying again
    assert tries == 1  # after a wait in vain, the next one tried once and did not wait
    hang = SlowTokens(hang=True)
    (tmp_path / "h").mkdir()
    first, _, _ = await _proxy_get(caches, tmp_path / "h", hang, 0.3)
    assert first == 503  # a renewal that hangs is bounded by the same wait
