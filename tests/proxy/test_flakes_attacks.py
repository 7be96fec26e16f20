"""The proxy's secret-less flake routes against request-line and Host tricks: an
absolute-form target naming another origin, Host spellings that only look like the
loopback, and a query that tries to name another path."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.proxy.test_flakes import flake_proxy, flakes_for, scripted


async def _raw(url: str, target: str, host: str) -> bytes:
    hostname, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(hostname, int(port))
    head = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    await stream.send_all(head.encode())
    answer = b""
    while data := await stream.receive_some(65536):
        answer += data
    await stream.aclose()
    return answer


async def test_no_target_or_host_reaches_another_origin_or_route(tmp_path: Path) -> None:
    async with (
        scripted(2) as [server, other],
        flake_proxy(tmp_path, flakes_for(server)) as (
            env,
            _,
        ),
    ):
        loop = env.url.removeprefix("http://")
        cases = [
            (f"{other.url}/f/acme/tool/0.2.0.tar.gz", loop),
            (f"{other.url}/api/v1/flakes", loop),
            ("/f/acme/tool/0.2.0.tar.gz", "127.0.0.1@evil.example"),
            ("/f/acme/tool/0.2.0.tar.gz", "127.0.0.1.evil.example"),
            ("/f/acme/tool/0.2.0.tar.gz", "localhost.evil.example"),
            ("/f/acme/tool/0.2.0.tar.gz", "evil.example:80"),
            ("/api/v1/flakes?x=%2e%2e", loop),
            ("/f/acme/tool/0.2.0.tar.gz#x", loop),
            ("/f/acme/tool/0.2.0.tar.gz\\..\\..\\api", loop),
        ]
        for target, host in cases:
            answer = await _raw(env.url, target, host)
            status = int(answer.split(b" ", 2)[1])
            assert status in (400, 401, 403), (target, host, answer[:200])
        assert other.requests == [] and server.requests == []
        # A query that spells a path stays a query: the path the server routes is the listing.
        answer = await _raw(env.url, "/api/v1/flakes?x=/../../token/status", loop)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert [path for path, _ in server.requests] == ["/api/v1/flakes"]
