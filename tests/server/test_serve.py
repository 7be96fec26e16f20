"""The lean HTTP/1.1 front, over a real loopback socket, with a small ASGI app behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from nixd.server.http.serve import HttpFront, bind_sockets


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """GET echoes the path; PUT /refuse answers 403 unread; PUT /take reads the body."""
    if scope["method"] == "PUT" and scope["path"] == "/refuse":
        status, body = 403, b"no"
    elif scope["method"] == "PUT":
        got = b""
        while True:
            msg = await receive()
            got += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        status, body = 200, b"took %d" % len(got)
    elif scope["path"] == "/fail-mid-stream":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"10")],
            }
        )
        await send({"type": "http.response.body", "body": b"12345", "more_body": True})
        raise RuntimeError("the store went away mid-stream")
    elif scope["path"] == "/no-length":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"two"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    elif scope["path"] == "/slow":
        await trio.sleep(0.5)
        status, body = 200, b"slow done"
    else:
        status, body = 200, scope["path"].encode()
    head = scope["method"] == "HEAD"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


@pytest.fixture
async def front(nursery: trio.Nursery) -> AsyncIterator[tuple[HttpFront, int]]:
    f = HttpFront(app, graceful_timeout=5)
    (sock,) = bind_sockets(["127.0.0.1:0"])
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    urls = await nursery.start(f.serve, [listener])
    yield f, int(urls[0].rsplit(":", 1)[1])
    f.shutdown()


async def talk(port: int, data: bytes, *, until: bytes | None = None) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    with trio.fail_after(5):
        await stream.send_all(data)
        while until is None or until not in out:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            out += chunk
    await stream.aclose()
    return out


async def test_keep_alive_pipelining_and_head(front: tuple[HttpFront, int]) -> None:
    _, port = front
    out = await talk(
        port,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /bb HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /c%20d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    parts = out.split(b"HTTP/1.1 200 OK\r\n")
    assert len(parts) == 4
    assert parts[1].endswith(b"\r\n\r\n/a")
    assert b"content-length: 3" in parts[2] and parts[2].endswith(b"\r\n\r\n")
    assert parts[3].endswith(b"/c d")


async def test_expect_continue_only_when_the_body_is_wanted(front: tuple[HttpFront, int]) -> None:
    _, port = front
    refused = await talk(
        port,
        b"PUT /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    assert refused.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"100 Continue" not in refused  # closed rather than left out of step
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(5):
        await stream.send_all(
            b"PUT /take HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        assert await stream.receive_some(1000) == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(b"hello")
        reply = b""
        while b"took" not in reply:
            reply += await stream.receive_some(1000)
    await stream.aclose()
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"took 5")


async def test_refusals(front: tuple[HttpFront, int]) -> None:
    _, port = front
    chunked = await talk(port, b"PUT /take HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 501 ")
    assert (await talk(port, b"GET / HTTP/2.0\r\n\r\n")).startswith(b"HTTP/1.1 505 ")
    assert (await talk(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000
    assert (await talk(port, big)).startswith(b"HTTP/1.1 431 ")


async def test_graceful_shutdown_finishes_in_flight(front: tuple[HttpFront, int]) -> None:
    f, port = front
    result: list[bytes] = []

    async def slow() -> None:
        result.append(
            await talk(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", until=b"slow done")
        )

    async with trio.open_nursery() as n:
        n.start_soon(slow)
        await trio.sleep(0.1)
        f.shutdown()
    assert result[0].endswith(b"slow done")
    with trio.fail_after(5):
        await f.finished.wait()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_an_app_failing_mid_stream_cuts_the_connection(front: tuple[HttpFront, int]) -> None:
    """No second head (a 500) inside the first body: the short body fails the transfer."""
    _, port = front
    out = await talk(
        port,
        b"GET /fail-mid-stream HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert out.count(b"HTTP/1.1 ") == 1
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\n12345")
    assert (await talk(port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).endswith(
        b"/a"
    )


async def test_a_body_without_length_is_chunked_on_keep_alive(
    front: tuple[HttpFront, int],
) -> None:
    _, port = front
    out = await talk(
        port,
        b"GET /no-length HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    first, _, second = out.partition(b"0\r\n\r\n")
    assert b"transfer-encoding: chunked" in first
    assert first.endswith(b"\r\n\r\n4\r\none \r\n3\r\ntwo\r\n")
    assert second.startswith(b"HTTP/1.1 200 OK") and second.endswith(b"/a")
