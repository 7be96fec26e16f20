"""A hostile upstream cannot stop the proxy, grow its memory, keep bytes in its store,
learn the access token or send it elsewhere: each malformed answer ends that request
with the transient status the error map gives (503, or 502 for a body that contradicts
its narinfo), and the proxy goes on serving.

Memory is measured as the peak RSS of this process (the proxy runs in it) while the
hostile answers are read: a bound on bytes, not on time.
"""

from __future__ import annotations

import base64
import logging
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from nixd.auth.model import AccessToken
from nixd.errors import AuthError
from nixd.nix.narinfo import NarInfo
from nixd.proxy.config import UpstreamConfig
from nixd.proxy.localstore import SMALL
from nixd.proxy.server import serve_proxy
from tests.proxy.conftest import ProxyEnv, proxy_config
from tests.proxy.hostile import Hostile, MiB, Script, Signed, endless, ok, response, signed_path
from tests.realnix import RealNix

RSS_BOUND = 100 * MiB
BEARER = "Bearer the-access-token"
HUGE = 400 * MiB


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None, field
    return int(match.group(1))


class PeakRss:
    """Peak RSS growth of this process from now on (``clear_refs`` resets VmHWM)."""

    def __enter__(self) -> PeakRss:
        Path("/proc/self/clear_refs").write_text("5")
        self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    @property
    def growth(self) -> int:
        return (_status_kib("VmHWM") - self.base) * 1024


class Tokens:
    """A TokenSource with one fixed token; counts renewals."""

    def __init__(self, value: str = "the-access-token") -> None:
        self.token = AccessToken(value, expires_at=2e9, identity="token:test")
        self.refreshes = 0

    async def get(self) -> AccessToken:
        return self.token

    async def refresh(self, stale: AccessToken | None) -> AccessToken:
        self.refreshes += 1
        raise AuthError("no renewal in this test")


@pytest.fixture
def signed(tmp_path: Path) -> Signed:
    return signed_path(tmp_path)


@asynccontextmanager
async def proxy_before(
    tmp_path: Path,
    signed: Signed,
    upstream: Hostile,
    *,
    tokens: Tokens | None = None,
    url: str | None = None,
    **kw: object,
) -> AsyncIterator[tuple[ProxyEnv, httpx.AsyncClient]]:
    """A proxy whose only upstream is ``upstream`` (already serving), and a client for it."""
    config = UpstreamConfig(
        url=url or upstream.url,
        trusted_keys=(signed.key.public().render(),),
        auth="nixd" if tokens is not None else "none",
        timeout=10.0,
        **kw,  # type: ignore[arg-type]
    )
    pconfig, secret, netrc = proxy_config(tmp_path, (config,), negative_ttl=0.0)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve_proxy, pconfig, tokens)
        env = ProxyEnv(handle, secret, netrc, Path(pconfig.store_dir), pconfig)
        async with httpx.AsyncClient(
            base_url=handle.url, auth=("nixd", secret), timeout=60
        ) as client:
            yield env, client
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def servers(count: int) -> AsyncIterator[list[Hostile]]:
    async with trio.open_nursery() as nursery:
        yield [await nursery.start(Hostile().serve) for _ in range(count)]
        nursery.cancel_scope.cancel()


async def assert_still_serving(client: httpx.AsyncClient) -> None:
    assert (await client.get("/nix-cache-info")).status_code == 200


def narinfo_cases(signed: Signed, other: Hostile) -> dict[str, Script]:
    text = signed.narinfo()
    absolute = signed.narinfo(url=f"{other.url}/nar/{signed.hash_part}.nar")
    return {
        "narsize-of-5000-digits": ok(text.replace(b"NarSize: 120", b"NarSize: " + b"9" * 5000)),
        "content-length-superscript-two": response(
            200, [("Content-Length", "\u00b2"), ("Connection", "close")], text
        ),
        "content-length-of-5000-digits": response(
            200, [("Content-Length", "1" * 5000), ("Connection", "close")], text
        ),
        "two-content-lengths": response(
            200,
            [("Content-Length", str(len(text))), ("Content-Length", "7"), ("Connection", "close")],
            text,
        ),
        "bare-lf-in-a-header": response(200, [("X-A", "1\nContent-Length: 3")], text),
        "narinfo-of-400-mib-announced": endless(HUGE, announce=True, prefix=text),
        "narinfo-of-400-mib-unannounced": endless(HUGE, announce=False, prefix=text),
        "redirect-to-another-loopback-service": response(
            302,
            [
                ("Location", f"{other.url}/{signed.hash_part}.narinfo"),
                ("Content-Length", "0"),
                ("Connection", "close"),
            ],
        ),
        "absolute-url-to-another-origin": ok(absolute),
    }


CASES = [
    "narsize-of-5000-digits",
    "content-length-superscript-two",
    "content-length-of-5000-digits",
    "two-content-lengths",
    "bare-lf-in-a-header",
    "narinfo-of-400-mib-announced",
    "narinfo-of-400-mib-unannounced",
    "redirect-to-another-loopback-service",
    "absolute-url-to-another-origin",
]


@pytest.mark.parametrize("case", CASES)
async def test_malformed_narinfo_answer_is_503_and_nothing_else(
    tmp_path: Path, signed: Signed, case: str
) -> None:
    with trio.fail_after(120):
        async with servers(2) as (upstream, other):
            other.routes[f"/{signed.hash_part}.narinfo"] = ok(signed.narinfo())
            other.routes[f"/nar/{signed.hash_part}.nar"] = ok(signed.nar)
            upstream.routes[f"/{signed.hash_part}.narinfo"] = narinfo_cases(signed, other)[case]
            async with proxy_before(tmp_path, signed, upstream) as (proxy, client):
                with PeakRss() as rss:
                    for method in ("HEAD", "GET"):
                        r = await client.request(method, f"/{signed.hash_part}.narinfo")
                        assert r.status_code == 503, (method, r.text)
                assert rss.growth < RSS_BOUND
                await assert_still_serving(client)
                assert other.requests == []  # no request left loopback-to-loopback for it
                assert proxy.handle.store.nar_keys() == []
                status = proxy.handle.status()["upstreams"][0]
                assert status["healthy"] is False and status["last_error"]
                # The next good answer is served at once: nothing bad was remembered.
                upstream.routes[f"/{signed.hash_part}.narinfo"] = ok(signed.narinfo())
                assert (await client.get(f"/{signed.hash_part}.narinfo")).status_code == 200


@pytest.mark.parametrize("announce", [True, False], ids=["announced", "unannounced"])
async def test_400_mib_for_a_small_nar_is_502_and_not_kept(
    tmp_path: Path, signed: Signed, announce: bool
) -> None:
    nar_path = f"/nar/{signed.hash_part}.nar"
    with trio.fail_after(120):
        async with servers(1) as (upstream,):
            upstream.routes[f"/{signed.hash_part}.narinfo"] = ok(signed.narinfo())
            upstream.routes[nar_path] = endless(HUGE, announce=announce, prefix=signed.nar)
            async with proxy_before(tmp_path, signed, upstream) as (proxy, client):
                info = NarInfo.parse((await client.get(f"/{signed.hash_part}.narinfo")).content)
                with PeakRss() as rss:
                    r = await client.get(f"/{info.url}")
                    assert r.status_code == 502, r.text
                assert rss.growth < RSS_BOUND
                assert proxy.handle.store.nar_keys() == []
                await assert_still_serving(client)
                upstream.routes[nar_path] = ok(signed.nar)
                r = await client.get(f"/{info.url}")
                assert r.status_code == 200 and r.content == signed.nar
                assert len(proxy.handle.store.nar_keys()) == 1


@pytest.mark.parametrize("announce", [True, False], ids=["announced", "unannounced"])
async def test_a_large_nar_body_longer_than_its_narinfo_is_cut(
    tmp_path: Path, announce: bool
) -> None:
    big = signed_path(tmp_path, "hostile-big", b"y" * (2 * SMALL))
    nar_path = f"/nar/{big.hash_part}.nar"
    with trio.fail_after(120):
        async with servers(1) as (upstream,):
            upstream.routes[f"/{big.hash_part}.narinfo"] = ok(big.narinfo())
            upstream.routes[nar_path] = endless(HUGE, announce=announce, prefix=big.nar)
            async with proxy_before(tmp_path, big, upstream) as (proxy, client):
                info = NarInfo.parse((await client.get(f"/{big.hash_part}.narinfo")).content)
                with PeakRss() as rss:
                    try:
                        r = await client.get(f"/{info.url}")
                    except httpx.RemoteProtocolError:
                        pass  # headers were out: the transfer is cut, as Nix must see it
                    else:
                        assert r.status_code == 502
                assert rss.growth < RSS_BOUND
                await proxy.handle.downloads_settled()
                assert proxy.handle.store.nar_keys() == []
                await assert_still_serving(client)


@pytest.mark.parametrize("announce", [True, False], ids=["raw-path", "httpx-path"])
async def test_token_goes_only_to_its_origin(
    tmp_path: Path, signed: Signed, announce: bool
) -> None:
    """With foreign_urls = "anonymous" an absolute narinfo URL on another origin is
    fetched, without the token; the upstream's own origin gets it."""
    tokens = Tokens()
    with trio.fail_after(60):
        async with servers(2) as (upstream, cdn):
            absolute = signed.narinfo(url=f"{cdn.url}/nar/{signed.hash_part}.nar")
            upstream.routes[f"/{signed.hash_part}.narinfo"] = ok(absolute)
            cdn.routes[f"/nar/{signed.hash_part}.nar"] = (
                ok(signed.nar)
                if announce
                else response(200, [("Connection", "close")], signed.nar)  # close-delimited
            )
            async with proxy_before(
                tmp_path, signed, upstream, tokens=tokens, foreign_urls="anonymous"
            ) as (_, client):
                info = NarInfo.parse((await client.get(f"/{signed.hash_part}.narinfo")).content)
                r = await client.get(f"/{info.url}")
                assert r.status_code == 200 and r.content == signed.nar
        assert upstream.requests
        assert all(
            h.get("authorization") == "Bearer the-access-token" for _, h in upstream.requests
        )
        assert set(cdn.paths()) == {f"/nar/{signed.hash_part}.nar"}
        assert all("authorization" not in h for _, h in cdn.requests)


async def test_same_origin_redirects_are_followed_with_the_credential(
    tmp_path: Path, signed: Signed
) -> None:
    tokens = Tokens()
    moved = f"/moved/{signed.hash_part}.narinfo"
    with trio.fail_after(60):
        async with servers(1) as (upstream,):
            upstream.routes[f"/{signed.hash_part}.narinfo"] = response(
                307, [("Location", moved), ("Content-Length", "0"), ("Connection", "close")]
            )
            upstream.routes[moved] = ok(signed.narinfo())
            upstream.routes[f"/nar/{signed.hash_part}.nar"] = ok(signed.nar)
            async with proxy_before(tmp_path, signed, upstream, tokens=tokens) as (_, client):
                r = await client.get(f"/{signed.hash_part}.narinfo")
                assert r.status_code == 200
        assert moved in upstream.paths()
        assert all(
            h.get("authorization") == "Bearer the-access-token" for _, h in upstream.requests
        )


async def test_redirect_loops_end(tmp_path: Path, signed: Signed) -> None:
    with trio.fail_after(60):
        async with servers(1) as (upstream,):
            upstream.routes[f"/{signed.hash_part}.narinfo"] = response(
                302,
                [
                    ("Location", f"/{signed.hash_part}.narinfo"),
                    ("Content-Length", "0"),
                    ("Connection", "close"),
                ],
            )
            async with proxy_before(tmp_path, signed, upstream) as (_, client):
                assert (await client.get(f"/{signed.hash_part}.narinfo")).status_code == 503
                await assert_still_serving(client)
        assert len(upstream.requests) <= 1 + 1 + 5  # raw try, httpx try, five redirects


async def test_credentials_in_the_url_are_sent_to_it_and_shown_nowhere(
    tmp_path: Path, signed: Signed, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "hunter2-secret"
    with trio.fail_after(60):
        async with servers(1) as (upstream,):
            upstream.routes[f"/{signed.hash_part}.narinfo"] = ok(signed.narinfo())
            upstream.routes[f"/nar/{signed.hash_part}.nar"] = response(
                500, [("Content-Length", "0"), ("Connection", "close")]
            )
            url = f"http://ci:{password}@127.0.0.1:{upstream.port}"
            async with proxy_before(tmp_path, signed, upstream, url=url) as (proxy, client):
                info = NarInfo.parse((await client.get(f"/{signed.hash_part}.narinfo")).content)
                assert (await client.get(f"/{info.url}")).status_code == 503
                metrics = (await client.get("/metrics")).text
                status = repr(proxy.handle.status())
        basic = "Basic " + base64.b64encode(f"ci:{password}".encode()).decode()
        assert all(h.get("authorization") == basic for _, h in upstream.requests)
        assert f"127.0.0.1:{upstream.port}" in metrics and f"127.0.0.1:{upstream.port}" in status
        for shown in (metrics, status, caplog.text):
            assert password not in shown
        assert "***@127.0.0.1" in status


@pytest.mark.parametrize("case", ["narsize-of-5000-digits", "narinfo-of-400-mib-unannounced"])
async def test_real_nix_sees_a_transient_failure_then_substitutes(
    real_nix: RealNix, tmp_path: Path, signed: Signed, case: str
) -> None:
    """Nix 2.8 fails the copy (a 503 is not cached as absent) and, once the upstream
    answers properly, substitutes the path from the same proxy."""
    store_path = signed.info.store_path.path()
    with trio.fail_after(240):
        async with servers(2) as (upstream, other):
            upstream.routes[f"/{signed.hash_part}.narinfo"] = narinfo_cases(signed, other)[case]
            upstream.routes[f"/nar/{signed.hash_part}.nar"] = ok(signed.nar)
            async with proxy_before(tmp_path, signed, upstream) as (proxy, client):
                args = [
                    "nix", "copy", "--from", proxy.url,
                    "--option", "trusted-public-keys", signed.key.public().render(),
                    "--option", "netrc-file", str(proxy.netrc),
                    "--option", "substituters", "",
                    "--option", "download-attempts", "2",
                    store_path,
                ]  # fmt: skip
                env = {"XDG_CACHE_HOME": str(tmp_path / "c")}

                def copy() -> subprocess.CompletedProcess[bytes]:
                    return real_nix.run(
                        args, store=tmp_path / "s", check=False, env=env, timeout=120
                    )

                failed = await trio.to_thread.run_sync(copy)
                assert failed.returncode != 0
                assert b"503" in failed.stderr, failed.stderr.decode()
                await assert_still_serving(client)
                upstream.routes[f"/{signed.hash_part}.narinfo"] = ok(signed.narinfo())
                healed = await trio.to_thread.run_sync(copy)
                assert healed.returncode == 0, healed.stderr.decode()
                assert real_nix.real_path(store_path, tmp_path / "s").read_bytes() == b"hello\n"


async def test_anonymous_upstreams_follow_redirects_elsewhere_without_the_token(
    tmp_path: Path, signed: Signed
) -> None:
    """A cache handing NARs to presigned object-store URLs (another origin) works with
    foreign_urls = "anonymous"; the token stays with the cache."""
    tokens = Tokens()
    nar_path = f"/nar/{signed.hash_part}.nar"
    with trio.fail_after(60):
        async with servers(2) as (upstream, store):
            upstream.routes[f"/{signed.hash_part}.narinfo"] = ok(signed.narinfo())
            upstream.routes[nar_path] = response(
                302,
                [
                    ("Location", f"{store.url}/bucket/x?X-Signature=abc"),
                    ("Content-Length", "0"),
                    ("Connection", "close"),
                ],
            )
            store.routes["/bucket/x"] = ok(signed.nar)
            async with proxy_before(
                tmp_path, signed, upstream, tokens=tokens, foreign_urls="anonymous"
            ) as (_, client):
                info = NarInfo.parse((await client.get(f"/{signed.hash_part}.narinfo")).content)
                r = await client.get(f"/{info.url}")
                assert r.status_code == 200 and r.content == signed.nar
        assert all(h.get("authorization") == BEARER for _, h in upstream.requests)
        assert store.paths() == ["/bucket/x"]
        assert all("authorization" not in h for _, h in store.requests)
