"""The proxy's HTTP/1.1 front against raw bytes: malformed requests get 400, oversized
headers 431, and the proxy keeps serving other connections."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.proxy.conftest import start_proxy


async def _exchange(url: str, raw: bytes) -> bytes:
    """Send ``raw`` on a fresh connection and read until the proxy closes it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(raw)
        reply = b""
        while chunk := await stream.receive_some(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n", b"400"),
        (b"GET /nix-cache-info HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
        (b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000, b"431"),  # unfinished
    ],
)
async def test_malformed_requests_are_refused_and_serving_goes_on(
    tmp_path: Path, raw: bytes, status: bytes
) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, tmp_path, ())
            reply = await _exchange(proxy.url, raw)
            assert reply.startswith(b"HTTP/1.1 " + status + b" ")
            assert b"connection: close" in reply.lower()
            ok = await _exchange(
                proxy.url, b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert ok.startswith(b"HTTP/1.1 200 ") and b"StoreDir: /nix/store" in ok
            nursery.cancel_scope.cancel()
