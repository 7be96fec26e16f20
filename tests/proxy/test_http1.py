"""The proxy's strict request-head parser, alone and behind the real front.

Alone: what it accepts and the status each kind of malformed head gets. Behind the
front: keep-alive, pipelining, HTTP/1.0, bodies, and random bytes that never crash it
(the answer is a well-formed status line or nothing, and the proxy serves on).
"""

from __future__ import annotations

import base64
import re
import tempfile
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy.conftest import ProxyEnv, start_proxy


def _auth(proxy: ProxyEnv) -> bytes:
    return b"Basic " + base64.b64encode(b"nixd:" + proxy.secret.encode())


async def _exchange(url: str, raw: bytes, *, eof: bool = True) -> bytes:
    """Send ``raw`` on a fresh connection (then EOF) and read until the proxy closes it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(raw)
        if eof:
            await stream.send_eof()
        reply = b""
        try:
            while chunk := await stream.receive_some(65536):
                reply += chunk
        except trio.BrokenResourceError:
            pass  # a reset after the answer
    return reply


def _statuses(reply: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)


async def test_pipelined_keep_alive_http10_and_bodies(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, tmp_path, ())
            auth = _auth(proxy)
            info = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n"
            missing = b"HEAD /" + b"0" * 32 + b".narinfo HTTP/1.1\r\nHost: x\r\nAuthorization: "
            post = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            close = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            after = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n"
            raw = info + missing + auth + b"\r\n\r\n" + post + info + close + after
            reply = await _exchange(proxy.url, raw)
            # Five answers in order; nothing after the one that asked to close.
            assert _statuses(reply) == [b"200", b"404", b"405", b"200", b"200"]
            assert reply.count(b"StoreDir: /nix/store") == 3
            assert reply.lower().count(b"connection: close") == 1

            http10 = await _exchange(proxy.url, b"GET /nix-cache-info HTTP/1.0\r\n\r\n" + info)
            assert _statuses(http10) == [b"200"] and b"connection: close" in http10.lower()

            # A request split across writes is put together.
            host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                for part in (b"GET /nix-cache", b"-info HTTP/1.1\r\nHo", b"st: x\r\n\r", b"\n"):
                    await stream.send_all(part)
                    await trio.sleep(0.01)
                got = b""
                while b"StoreDir" not in got:
                    got += await stream.receive_some(65536)
                assert got.startswith(b"HTTP/1.1 200 ")
            nursery.cancel_scope.cancel()


_REQUEST_PARTS = [
    b"GET ",
    b"HEAD ",
    b"/nix-cache-info",
    b"/" + b"a" * 32 + b".narinfo",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"\r\n",
    b"Host: x",
    b"Content-Length: 3",
    b"Transfer-Encoding: chunked",
    b"Connection: close",
    b":",
    b" ",
    b"\n",
    b"\x00",
]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.lists(
            st.one_of(st.sampled_from(_REQUEST_PARTS), st.binary(max_size=8)), max_size=30
        ).map(b"".join),
    )
)
async def test_random_bytes_never_crash_the_front(raw: bytes) -> None:
    with trio.fail_after(20), tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, Path(tmp), ())
            reply = await _exchange(proxy.url, raw)
            if reply:
                assert re.match(rb"HTTP/1\.1 [1-5]\d\d [^\r\n]*\r\n", reply), reply[:200]
                statuses = _statuses(reply)
                assert statuses
                assert all(
                    s in (b"200", b"400", b"401", b"404", b"405", b"413", b"431", b"501", b"505")
                    for s in statuses
                )
            ok = await _exchange(
                proxy.url, b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert ok.startswith(b"HTTP/1.1 200 ")
            nursery.cancel_scope.cancel()
