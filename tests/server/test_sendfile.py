"""NAR bodies sent with sendfile: the ASGI zero-copy extension of the server's front.

Over a real loopback socket: ranges are honoured, the connection stays usable after a
file body, a client that stops reading or goes away ends only its own request, and the
cache app's NARs take this path (byte for byte what the in-process transport serves).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import trio

from nixd.nix.narinfo import NarInfo
from nixd.server.http.serve import ZEROCOPY, HttpFront, bind_sockets
from tests.server.appenv import HASH_A, Env, make_nar, upload

BIG = 24 << 20


DATA = os.urandom(BIG)


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(DATA)
    return path


def file_app(path: Path, seen: list[dict[str, Any]]) -> Any:
    """GET /?o=OFFSET&n=COUNT sends that part of ``path`` with zerocopysend."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["extensions"])
        query = parse_qs(scope["query_string"].decode())
        offset = int(query.get("o", ["0"])[0])
        count = int(query.get("n", [str(BIG - offset)])[0])
        with path.open("rb") as f:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(count).encode())],
                }
            )
            await send({"type": ZEROCOPY, "file": f, "offset": offset, "count": count})

    return app


async def serve_front(nursery: trio.Nursery, app: Any) -> tuple[HttpFront, int]:
    front = HttpFront(app, graceful_timeout=5)
    (sock,) = bind_sockets(["127.0.0.1:0"])
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    urls = await nursery.start(front.serve, [listener])
    return front, int(urls[0].rsplit(":", 1)[1])


async def read_response(stream: trio.SocketStream, buffered: bytearray) -> tuple[bytes, bytes]:
    """One response with Content-Length off ``stream``: (head, body)."""
    while b"\r\n\r\n" not in buffered:
        chunk = await stream.receive_some(1 << 16)
        assert chunk, bytes(buffered)
        buffered += chunk
    end = buffered.index(b"\r\n\r\n") + 4
    head = bytes(buffered[:end])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(buffered) < end + length:
        chunk = await stream.receive_some(1 << 20)
        assert chunk, "connection closed mid-body"
        buffered += chunk
    body = bytes(buffered[end : end + length])
    del buffered[: end + length]
    return head, body


async def test_zero_copy_ranges_on_one_kept_alive_connection(
    nursery: trio.Nursery, blob: Path
) -> None:
    seen: list[dict[str, Any]] = []
    front, port = await serve_front(nursery, file_app(blob, seen))
    data = DATA
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buffered = bytearray()
    with trio.fail_after(60):
        for offset, count in ((0, BIG), (10, 100), (BIG - 1, 1), (5, 0), (12345, 9 << 20)):
            await stream.send_all(b"GET /?o=%d&n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (offset, count))
            head, body = await read_response(stream, buffered)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert body == data[offset : offset + count]
    await stream.aclose()
    assert all(ZEROCOPY in ext for ext in seen)
    front.shutdown()


async def test_a_client_that_goes_away_ends_only_its_own_request(
    nursery: trio.Nursery, blob: Path
) -> None:
    front, port = await serve_front(nursery, file_app(blob, []))
    with trio.fail_after(60):
        # One reads a little of a large body and resets the connection ...
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        await sock.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await sock.recv(4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        # ... another stops reading and stays connected (backpressure, not a busy loop) ...
        stalled = await trio.open_tcp_stream("127.0.0.1", port)
        await stalled.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await stalled.receive_some(4096)
        # ... and the server answers everyone else in full meanwhile.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /?o=7&n=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        _, body = await read_response(stream, bytearray())
        assert body == DATA[7:1007]
        await stream.aclose()
        await stalled.aclose()
    front.shutdown()


@pytest.fixture
async def nar(env: Env, tmp_path: Path) -> AsyncIterator[bytes]:
    nar = make_nar(tmp_path / "a", os.urandom(3 << 20))
    async with env.client(auth=env.member, basic=True) as c:
        r = await upload(c, "acme/app", HASH_A, nar)
    assert r.status_code == 200, r.text
    yield nar


async def test_the_cache_serves_its_nars_with_sendfile(
    nursery: trio.Nursery, env: Env, nar: bytes
) -> None:
    """The front's answers (sendfile) equal the in-process transport's (pread), ranges too."""
    sent: list[str] = []
    app = env.app

    async def spy(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def record(message: dict[str, Any]) -> None:
            sent.append(message["type"])
            await send(message)

        await app(scope, receive, record)

    front, port = await serve_front(nursery, spy)
    auth = {"authorization": f"Bearer {await env.access(env.member)}"}
    async with env.client(auth=env.member, basic=True) as local:
        text = (await local.get(f"/cache/{HASH_A}.narinfo")).text
        info = NarInfo.parse(text)
        whole = (await local.get(f"/cache/{info.url}")).content
    assert hashlib.sha256(whole).digest() == info.file_hash.digest  # type: ignore[union-attr]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=auth) as c:
        r = await c.get(f"/cache/{info.url}")
        assert r.status_code == 200 and r.content == whole
        assert ZEROCOPY in sent and "http.response.body" not in sent
        part = await c.get(f"/cache/{info.url}", headers={"range": "bytes=100-4099"})
        assert part.status_code == 206 and part.content == whole[100:4100]
        assert part.headers["content-range"] == f"bytes 100-4099/{len(whole)}"
        tail = await c.get(f"/cache/{info.url}", headers={"range": "bytes=-7"})
        assert tail.status_code == 206 and tail.content == whole[-7:]
        head = await c.head(f"/cache/{info.url}")
        assert head.content == b"" and head.headers["content-length"] == str(len(whole))
        # The narinfo answer is kept ready as bytes (the front's "prepared" extension).
        sent.clear()
        r = await c.get(f"/cache/{HASH_A}.narinfo")
        assert r.status_code == 200 and r.text == text
        assert r.headers["content-type"] == "text/x-nix-narinfo"
        assert sent == ["nixd.http.response.prepared"]
        head = await c.head(f"/cache/{HASH_A}.narinfo")
        assert head.content == b"" and head.headers["content-length"] == str(len(r.content))
        close = await c.get(f"/cache/{HASH_A}.narinfo", headers={"connection": "close"})
        assert close.text == text and close.headers["connection"] == "close"
    front.shutdown()
