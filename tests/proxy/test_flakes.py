"""The proxy's flake routes (nixd.proxy.flakes) against a scripted server on loopback.

A local user without the proxy's secret can fetch ``/f/...`` and ask ``/api/v1/flakes``
as this machine's login — and nothing else: every other route still needs the secret,
no spelling of a path reaches another server route, the token goes to the server's
origin only, redirects are rewritten to the proxy and never followed, answers are
bounded, and a rejected or missing login is a 503 Nix does not remember.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from nixd.proxy.config import FlakesConfig
from nixd.proxy.flakes import check_target, is_flake_request, rewrite_links
from nixd.proxy.server import serve_proxy
from tests.proxy.conftest import ProxyEnv, proxy_config
from tests.proxy.hostile import Hostile, MiB, endless, response
from tests.proxy.test_hostile import BEARER, Tokens

TARBALL = b"\x1f\x8b" + bytes(range(256)) * 40


def server_routes(server: Hostile, other: Hostile | None = None) -> None:
    base = server.url
    exact = f"{base}/f/acme/tool/0.2.0.tar.gz"
    link = f'<{exact}>; rel="immutable"'
    listing = json.dumps({"flakes": [{"org": "acme", "name": "tool", "latest": "0.2.0"}]})
    server.routes.update(
        {
            "/f/acme/tool/0.*.tar.gz": response(
                302,
                [("Location", exact), ("Cache-Control", "no-store"), ("Content-Length", "0")],
            ),
            "/f/acme/tool/%3E%3D0.1%20%3C1.tar.gz": response(
                302, [("Location", "/f/acme/tool/0.2.0.tar.gz"), ("Content-Length", "0")]
            ),
            "/f/acme/tool/0.2.0.tar.gz": response(
                200,
                [
                    ("Content-Type", "application/gzip"),
                    ("Content-Length", str(len(TARBALL))),
                    ("ETag", '"abc"'),
                    ("Cache-Control", "public, max-age=31536000, immutable"),
                    ("Link", link),
                    ("Set-Cookie", "session=1"),
                ],
                TARBALL,
            ),
            "/api/v1/flakes": response(
                200,
                [("Content-Type", "application/json"), ("Content-Length", str(len(listing)))],
                listing.encode(),
            ),
            "/f/acme/rejected/1.tar.gz": response(401, [("Content-Length", "0")]),
            "/f/acme/denied/1.tar.gz": response(403, [("Content-Length", "0")]),
            "/f/acme/broken/1.tar.gz": response(500, [("Content-Length", "0")]),
            "/f/acme/bad/%3E%3E.tar.gz": response(
                400, [("Content-Length", "26")], b'{"message":"bad constraint"}'[:26]
            ),
            "/f/acme/huge/1.tar.gz": response(200, [("Content-Length", str(3 * MiB))]),
            "/f/acme/endless/1.tar.gz": endless(3 * MiB, announce=False),
        }
    )
    if other is not None:
        server.routes["/f/acme/elsewhere/1.tar.gz"] = response(
            302, [("Location", f"{other.url}/f/acme/elsewhere/1.tar.gz"), ("Content-Length", "0")]
        )


@asynccontextmanager
async def flake_proxy(
    tmp_path: Path, flakes: FlakesConfig | None, tokens: Tokens | None = None
) -> AsyncIterator[tuple[ProxyEnv, httpx.AsyncClient]]:
    """A proxy with no upstreams and ``flakes``, and a client *without* the secret."""
    await trio.Path(tmp_path).mkdir(exist_ok=True)
    pconfig, secret, netrc = proxy_config(tmp_path, (), flakes=flakes)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve_proxy, pconfig, tokens or Tokens())
        env = ProxyEnv(handle, secret, netrc, Path(pconfig.store_dir), pconfig)
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as client:
            yield env, client
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def scripted(count: int = 1) -> AsyncIterator[list[Hostile]]:
    async with trio.open_nursery() as nursery:
        servers = [await nursery.start(Hostile().serve) for _ in range(count)]
        server_routes(servers[0], servers[1] if count > 1 else None)
        yield servers
        nursery.cancel_scope.cancel()


def flakes_for(server: Hostile, **kw: object) -> FlakesConfig:
    fields: dict[str, object] = {"max_bytes": MiB, "timeout": 10.0, "token_wait": 0.0, **kw}
    return FlakesConfig(server_url=server.url, **fields)  # type: ignore[arg-type]


async def test_a_constraint_redirects_to_the_proxy_and_the_tarball_streams(
    tmp_path: Path,
) -> None:
    async with scripted() as [server], flake_proxy(tmp_path, flakes_for(server)) as (env, client):
        got = await client.get("/f/acme/tool/0.*.tar.gz")
        assert got.status_code == 302
        assert got.headers["location"] == f"{env.url}/f/acme/tool/0.2.0.tar.gz"
        assert got.headers["cache-control"] == "no-store"
        relative = await client.get("/f/acme/tool/%3E%3D0.1%20%3C1.tar.gz")
        assert relative.headers["location"] == "/f/acme/tool/0.2.0.tar.gz"

        got = await client.get("/f/acme/tool/0.2.0.tar.gz")
        assert got.status_code == 200 and got.content == TARBALL
        assert got.headers["link"] == f'<{env.url}/f/acme/tool/0.2.0.tar.gz>; rel="immutable"'
        assert got.headers["etag"] == '"abc"'
        assert got.headers["content-type"] == "application/gzip"
        assert "set-cookie" not in got.headers
        head = await client.head("/f/acme/tool/0.2.0.tar.gz")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(TARBALL))

        listing = await client.get("/api/v1/flakes", params={"org": "acme"})
        assert listing.json()["flakes"][0]["name"] == "tool"
        # every request reached the server with the machine's token, and only that
        assert [h.get("authorization") for _, h in server.requests] == [BEARER] * 5


async def test_the_callers_own_authorization_is_never_forwarded(tmp_path: Path) -> None:
    async with scripted() as [server], flake_proxy(tmp_path, flakes_for(server)) as (env, client):
        await client.get("/f/acme/tool/0.2.0.tar.gz", auth=("nixd", env.secret))
        await client.get("/api/v1/flakes", headers={"Authorization": "Bearer stolen"})
        assert [h.get("authorization") for _, h in server.requests] == [BEARER, BEARER]


async def test_everything_else_still_needs_the_secret(tmp_path: Path) -> None:
    async with scripted() as [server], flake_proxy(tmp_path, flakes_for(server)) as (_, client):
        for path in (
            "/" + "a" * 32 + ".narinfo",
            "/nar/x.nar",
            "/api/v1/token/status",
            "/api/v1/flakesx",
            "/cache/nix-cache-info",
            "/fx/acme",
        ):
            assert (await client.get(path)).status_code == 401, path
        put = await client.put("/api/v1/flakes/acme/tool/releases/1.0.0", content=b"x")
        assert put.status_code == 405
        assert server.requests == []


async def test_no_spelling_of_a_path_reaches_another_server_route(tmp_path: Path) -> None:
    sneaky = [
        "/f/../cache/" + "a" * 32 + ".narinfo",
        "/f/acme/%2e%2e/%2e%2e/api/v1/token/status",
        "/f/acme/%2E%2E%2Fapi",
        "/f/acme/tool/..%2fx",
        "/f//acme",
        "/f/./acme/tool/1.tar.gz",
        "/api/v1/flakes/../token/status",
        "/api/v1/flakes/acme%5c..%5ctoken",
        "/f/acme/tool/1.tar.gz%00",
        "/f/acme/tool/" + "a" * 5000,
    ]
    async with scripted() as [server], flake_proxy(tmp_path, flakes_for(server)) as (env, _):
        host, port = env.url.removeprefix("http://").split(":")
        for target in sneaky:
            # raw: an HTTP client would normalize the dot segments before sending
            stream = await trio.open_tcp_stream(host, int(port))
            head = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
            await stream.send_all(head.encode())
            answer = b""
            while data := await stream.receive_some(65536):
                answer += data
            await stream.aclose()
            status = int(answer.split(b" ", 2)[1])
            assert status in (400, 401, 414, 431), (target, answer[:200])
        assert server.requests == []


async def test_a_rejected_or_missing_login_is_a_503_not_an_answer(tmp_path: Path) -> None:
    async with scripted() as [server], flake_proxy(tmp_path, flakes_for(server)) as (_, client):
        for path in ("/f/acme/rejected/1.tar.gz", "/f/acme/denied/1.tar.gz"):
            got = await client.get(path)
            assert got.status_code == 503, path
            assert b"rejected" in got.content or b"access token" in got.content
        assert (await client.get("/f/acme/broken/1.tar.gz")).status_code == 503
        missing = await client.get("/f/acme/missing/1.tar.gz")
        assert missing.status_code == 404
        bad = await client.get("/f/acme/bad/%3E%3E.tar.gz")
        assert bad.status_code == 400 and b"bad constraint" in bad.content
    async with flake_proxy(tmp_path / "out", FlakesConfig(server_url=None)) as (_, client):
        got = await client.get("/f/acme/tool/0.*.tar.gz")
        assert got.status_code == 503 and b"not logged in (nixd login)" in got.content
        assert (await client.get("/api/v1/flakes")).status_code == 503


async def test_an_unreachable_server_is_a_503(tmp_path: Path) -> None:
    listener = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener[0].socket.getsockname()[1]
    await listener[0].aclose()  # nothing listens there now
    flakes = FlakesConfig(server_url=f"http://127.0.0.1:{port}", timeout=5.0)
    async with flake_proxy(tmp_path, flakes) as (_, client):
        got = await client.get("/f/acme/tool/1.tar.gz")
        assert got.status_code == 503 and b"cannot be reached" in got.content


async def test_flakes_off_means_the_secret_is_needed(tmp_path: Path) -> None:
    async with scripted() as [server], flake_proxy(tmp_path, None) as (env, client):
        assert (await client.get("/f/acme/tool/0.2.0.tar.gz")).status_code == 401
        with_secret = await client.get("/f/acme/tool/0.2.0.tar.gz", auth=("nixd", env.secret))
        assert with_secret.status_code == 404
        assert server.requests == []


async def test_answers_are_bounded(tmp_path: Path) -> None:
    async with scripted() as [server], flake_proxy(tmp_path, flakes_for(server)) as (_, client):
        huge = await client.get("/f/acme/huge/1.tar.gz")
        assert huge.status_code == 502 and b"larger than" in huge.content
        received = 0
        try:
            async with client.stream("GET", "/f/acme/endless/1.tar.gz") as endless_answer:
                assert endless_answer.status_code == 200
                async for chunk in endless_answer.aiter_raw():
                    received += len(chunk)
        except httpx.RemoteProtocolError:
            pass  # cut: the body did not end as framed
        else:
            raise AssertionError("an over-long body was passed on whole")
        assert received <= MiB
        assert (await client.get("/api/v1/flakes")).status_code == 200  # still serving


async def test_a_redirect_elsewhere_is_passed_on_never_followed(tmp_path: Path) -> None:
    async with (
        scripted(2) as [server, other],
        flake_proxy(tmp_path, flakes_for(server)) as (_, client),
    ):
        got = await client.get("/f/acme/elsewhere/1.tar.gz")
        assert got.status_code == 302
        assert got.headers["location"] == f"{other.url}/f/acme/elsewhere/1.tar.gz"
        assert other.requests == []


async def test_a_new_login_moves_the_routes_and_a_logout_stops_them(tmp_path: Path) -> None:
    async with (
        scripted(2) as [server, second],
        flake_proxy(tmp_path, flakes_for(server)) as (env, client),
    ):
        server_routes(second)
        assert (await client.get("/f/acme/tool/0.2.0.tar.gz")).status_code == 200
        env.handle.update_flakes(flakes_for(second))
        got = await client.get("/f/acme/tool/0.*.tar.gz")
        assert got.headers["location"] == f"{env.url}/f/acme/tool/0.2.0.tar.gz"
        assert len(second.requests) == 1
        env.handle.update_flakes(FlakesConfig(server_url=None))
        assert (await client.get("/f/acme/tool/0.2.0.tar.gz")).status_code == 503
        env.handle.update_flakes(None)
        assert (await client.get("/f/acme/tool/0.2.0.tar.gz")).status_code == 401


async def test_only_requests_for_the_loopback_are_answered(tmp_path: Path) -> None:
    """A page in a local user's browser reaching the proxy through DNS rebinding sends its
    own host name: refused before anything is forwarded."""
    async with scripted() as [server], flake_proxy(tmp_path, flakes_for(server)) as (env, client):
        port = env.url.rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                     "localhost.evil", "[::2]:1"):  # fmt: skip
            got = await client.get("/f/acme/tool/0.2.0.tar.gz", headers={"Host": host})
            assert got.status_code == 403, host
        assert server.requests == []
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]:6493", "127.1.2.3"):
            got = await client.get("/f/acme/tool/0.2.0.tar.gz", headers={"Host": host})
            assert got.status_code == 200, host


def test_what_counts_as_a_flake_request() -> None:
    assert is_flake_request(b"GET", b"/f/acme/tool/1.tar.gz")
    assert is_flake_request(b"HEAD", b"/api/v1/flakes")
    assert is_flake_request(b"GET", b"/api/v1/flakes/acme/tool")
    assert not is_flake_request(b"PUT", b"/api/v1/flakes/acme/tool/releases/1.0.0")
    assert not is_flake_request(b"GET", b"/api/v1/flakesx")
    assert not is_flake_request(b"GET", b"/f")
    assert check_target(b"/f/acme/tool/%5E1.2.tar.gz", b"") == "/f/acme/tool/%5E1.2.tar.gz"
    assert check_target(b"/api/v1/flakes", b"org=acme") == "/api/v1/flakes?org=acme"
    server, proxy = "http://cache.example:8080", "http://127.0.0.1:6493"
    assert rewrite_links(f"<{server}/f/a/b/1.tar.gz>; rel=immutable", server, proxy) == (
        f"<{proxy}/f/a/b/1.tar.gz>; rel=immutable"
    )
    assert rewrite_links(f"{server}x/f", server, proxy) == f"{server}x/f"
