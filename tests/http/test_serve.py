"""serve_http itself, with handlers written to fail: responder rules, caps, drain.

The conformance suite covers what both real fronts do with hostile bytes; this module
covers what only a handler can provoke: a second response start, a body that fails
mid-stream, every connection busy, a shutdown with requests in flight.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import trio

from nixd.http import Limits
from nixd.http.serve import HttpServer, Request, Responder, serve_http

GUARD = 60


@dataclass
class Running:
    server: HttpServer
    shutdown: trio.Event
    release: trio.Event = field(default_factory=trio.Event)
    entered: int = 0
    changed: trio.Event = field(default_factory=trio.Event)

    def enter(self) -> None:
        self.entered += 1
        self.changed.set()
        self.changed = trio.Event()

    async def wait_entered(self, n: int) -> None:
        while self.entered < n:
            await self.changed.wait()

    @property
    def port(self) -> int:
        return self.server.addresses[0][1]


async def handler(request: Request, resp: Responder) -> None:
    running = RUNNING[0]
    path = request.path
    if path == b"/ok":
        await resp.simple(200, b"ok\n")
    elif path == b"/twice":
        await resp.start(200, [(b"content-length", b"10")])
        await resp.send(b"12345")
        await resp.start(200, [(b"content-length", b"10")])
    elif path == b"/fail-mid-body":
        await resp.start(200, [(b"content-length", b"10")])
        await resp.send(b"12345")
        raise RuntimeError("the body failed")
    elif path == b"/fail-early":
        raise RuntimeError("failed before answering")
    elif path == b"/wait":
        running.enter()
        await running.release.wait()
        await resp.simple(200, b"waited\n")
    elif path == b"/forever":
        running.enter()
        await trio.sleep_forever()
    else:
        await resp.simple(404, b"no\n")


RUNNING: list[Running] = []


async def start(nursery: trio.Nursery, limits: Limits, graceful: float = 5.0) -> Running:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    shutdown = trio.Event()
    server = await nursery.start(
        lambda task_status: serve_http(
            [listener],
            handler,
            limits=limits,
            shutdown=shutdown,
            graceful_timeout=graceful,
            task_status=task_status,
        )
    )
    running = Running(server, shutdown)
    RUNNING[:] = [running]
    return running


@pytest.fixture
async def running(nursery: trio.Nursery) -> AsyncIterator[Running]:
    yield await start(nursery, Limits(max_connections=3, max_connections_per_peer=3, linger=0.2))


async def talk(port: int, raw: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        reply = b""
        try:
            while chunk := await stream.receive_some(65536):
                reply += chunk
        except trio.BrokenResourceError:
            pass
    return reply


def get(path: bytes, *, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path, extra)


@pytest.mark.parametrize("path", [b"/twice", b"/fail-mid-body"])
async def test_a_failed_body_cuts_the_connection_with_one_head(
    running: Running, path: bytes
) -> None:
    with trio.fail_after(GUARD):
        reply = await talk(running.port, get(path) + get(b"/ok"))
        assert reply.count(b"HTTP/1.1") == 1  # no second head inside the body
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\n12345")
        assert (await talk(running.port, get(b"/ok", close=True))).startswith(b"HTTP/1.1 200 ")


async def test_a_handler_failing_before_answering_gets_a_500(running: Running) -> None:
    with trio.fail_after(GUARD):
        reply = await talk(running.port, get(b"/fail-early") + get(b"/ok"))
        assert re.findall(rb"HTTP/1\.1 (\d+)", reply) == [b"500"]
        assert b"connection: close" in reply
        assert (await talk(running.port, get(b"/ok", close=True))).startswith(b"HTTP/1.1 200 ")


async def test_busy_connections_are_not_evicted_and_newcomers_get_503(
    running: Running, nursery: trio.Nursery
) -> None:
    with trio.fail_after(GUARD):
        send, receive = trio.open_memory_channel[bytes](3)

        async def waiting() -> None:
            await send.send(await talk(running.port, get(b"/wait", close=True)))

        for _ in range(3):
            nursery.start_soon(waiting)
        await running.wait_entered(3)
        refused = await talk(running.port, get(b"/ok", close=True))
        assert refused.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in refused
        running.release.set()
        replies = [await receive.receive() for _ in range(3)]
        assert all(r.startswith(b"HTTP/1.1 200 ") for r in replies)
        assert (await talk(running.port, get(b"/ok", close=True))).startswith(b"HTTP/1.1 200 ")


async def test_requests_per_connection(nursery: trio.Nursery) -> None:
    running = await start(nursery, Limits(max_requests_per_connection=2))
    with trio.fail_after(GUARD):
        reply = await talk(running.port, get(b"/ok") * 3)
        assert re.findall(rb"HTTP/1\.1 (\d+)", reply) == [b"200", b"200"]
        assert reply.count(b"connection: close") == 1


async def receive_answer(stream: trio.SocketStream) -> bytes:
    """One whole answer of the ``/ok`` handler (``ok\n`` ends it)."""
    reply = b""
    while not reply.endswith(b"\r\n\r\nok\n"):
        chunk = await stream.receive_some(65536)
        assert chunk, reply
        reply += chunk
    return reply


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a state of the server that no event announces (a hang guard bounds it)."""
    while not condition():  # noqa: ASYNC110 - polled: the server has no event for it
        await trio.sleep(0.01)


async def test_shutdown_drains_in_flight_and_closes_idle(nursery: trio.Nursery) -> None:
    running = await start(nursery, Limits())
    with trio.fail_after(GUARD):
        idle = await trio.open_tcp_stream("127.0.0.1", running.port)
        await idle.send_all(get(b"/ok"))
        assert b"connection: close" not in await receive_answer(idle)  # kept alive
        busy = await trio.open_tcp_stream("127.0.0.1", running.port)
        await busy.send_all(get(b"/wait"))
        await running.wait_entered(1)
        running.shutdown.set()
        assert await idle.receive_some(100) == b""  # idle after a request: closed at once
        running.release.set()
        reply = b""
        while chunk := await busy.receive_some(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 ") and b"connection: close" in reply
        await running.server.closed.wait()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", running.port)
        await idle.aclose()
        await busy.aclose()


async def test_a_drain_answers_connections_that_had_no_request_yet(
    nursery: trio.Nursery,
) -> None:
    """A connection accepted before the drain whose head comes during it is answered,
    with ``connection: close``: closing it would reset a client that did nothing wrong
    (a restart in place drains while Nix is connecting)."""
    running = await start(nursery, Limits(head_timeout=GUARD))  # no head deadline in the way
    server = running.server
    with trio.fail_after(GUARD):
        silent = await trio.open_tcp_stream("127.0.0.1", running.port)
        partial = await trio.open_tcp_stream("127.0.0.1", running.port)
        async with silent, partial:
            await partial.send_all(get(b"/ok")[:10])
            await until(lambda: len(server.connections) == 2)  # both accepted
            running.shutdown.set()
            await until(lambda: server.draining)
            for stream in (silent, partial):
                assert not server.closed.is_set()  # waiting for those heads
                await stream.send_all(get(b"/ok")[10 if stream is partial else 0 :])
                reply = await receive_answer(stream)
                assert reply.startswith(b"HTTP/1.1 200 ") and b"connection: close" in reply
                assert await stream.receive_some(100) == b""  # then closed
        await server.closed.wait()


async def test_graceful_timeout_cancels_what_does_not_finish(nursery: trio.Nursery) -> None:
    running = await start(nursery, Limits(), graceful=0.2)
    with trio.fail_after(GUARD):
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        await stream.send_all(get(b"/forever"))
        await running.wait_entered(1)
        running.shutdown.set()
        await running.server.closed.wait()
        assert await stream.receive_some(100) == b""
        await stream.aclose()


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        Limits(max_connections=0)
    with pytest.raises(ValueError):
        Limits(head_timeout=0)
    with pytest.raises(ValueError):
        Limits(keepalive_timeout=-math.inf)
