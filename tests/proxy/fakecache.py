"""A static binary cache over a directory (as `nix copy --to file://DIR` writes it), on
loopback, with injectable faults: the misbehaving upstream of the proxy tests.

Faults apply to the next ``times`` matching requests (``times=-1``: forever):

- ``truncate``: announce the full Content-Length, send half the body, close;
- ``corrupt``: flip one byte in the middle of the body (same length);
- ``slow``: wait ``delay`` seconds before answering;
- ``reset``: read the request and reset the connection (SO_LINGER 0);
- ``status``: answer ``status`` (e.g. 503) with a short body;
- ``wait``: answer only once ``release`` is set (an upstream that is down for a while).

Any other fault with a ``release`` waits for it too before it is applied.

``Range: bytes=N-`` is answered with a 206 (unless ``ranges`` is False), as the real
server does; every ``Range`` asked for is recorded in ``ranges_asked``.

With ``tokens`` set, requests need ``Authorization: Bearer <one of tokens>`` (else 401).
``requests`` counts GETs/HEADs per path, so tests can see what reached the upstream.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio


@dataclass
class Fault:
    kind: str
    match: str = ".nar"  # substring of the request path
    times: int = 1
    status: int = 503
    delay: float = 5.0
    release: trio.Event | None = None
    """``wait`` (or any other kind): answer only once this is set."""


@dataclass
class FakeCache:
    root: Path
    faults: list[Fault] = field(default_factory=list)
    tokens: set[str] | None = None
    requests: Counter[str] = field(default_factory=Counter)
    port: int = 0
    """The port to listen on (0: any); then the one listened on, so a restart reuses it."""
    stopped: bool = False
    ranges: bool = True
    """Answer ``Range: bytes=N-`` with a 206 (False: ignore it and send the whole file)."""
    ranges_asked: list[str] = field(default_factory=list)
    in_flight: int = 0
    """Requests being answered now; ``max_in_flight`` is the most there ever were."""
    max_in_flight: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, suffix: str) -> int:
        return sum(n for p, n in self.requests.items() if p.endswith(suffix))

    def _fault(self, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.times != 0 and fault.match in path:
                if fault.times > 0:
                    fault.times -= 1
                return fault
        return None

    async def serve(
        self, *, task_status: trio.TaskStatus[FakeCache] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._connection, listeners)
            task_status.started(self)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = None
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    answered = await self._respond(stream, conn, request)
                finally:
                    self.in_flight -= 1
                if not answered:
                    return
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await stream.aclose()

    async def _respond(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request
    ) -> bool:
        path = request.target.decode().split("?")[0]
        self.requests[path] += 1
        asked = dict(request.headers).get(b"range")
        if asked is not None:
            self.ranges_asked.append(asked.decode())

        async def simple(
            status: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
        ) -> None:
            hs = [("content-length", str(len(body))), *headers]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=hs)))
            if body and request.method != b"HEAD":
                await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))

        if self.tokens is not None:
            auth = dict(request.headers).get(b"authorization", b"").decode()
            if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
                await simple(401, b"token rejected\n", (("www-authenticate", "Bearer"),))
                return True
        fault = self._fault(path)
        if fault is not None and fault.kind == "slow":
            await trio.sleep(fault.delay)
        if fault is not None and fault.kind == "wait":
            assert fault.release is not None
        if fault is not None and fault.release is not None:
            await fault.release.wait()
        if fault is not None and fault.kind == "reset":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if fault is not None and fault.kind == "status":
            await simple(fault.status, b"injected failure\n")
            return True
        file = (self.root / path.lstrip("/")).resolve()
        if not file.is_relative_to(self.root.resolve()) or not file.is_file():
            await simple(404, b"not found\n")
            return True
        body = file.read_bytes()
        if fault is not None and fault.kind == "corrupt":
            mid = len(body) // 2
            body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1 :]
        status, headers = 200, [("accept-ranges", "bytes")] if self.ranges else []
        if asked is not None:
            start = int(asked.decode().removeprefix("bytes=").rstrip("-"))
            if self.ranges and start < len(body):
                headers.append(("content-range", f"bytes {start}-{len(body) - 1}/{len(body)}"))
                status, body = 206, body[start:]
        headers.append(("content-length", str(len(body))))
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if request.method == b"HEAD":
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return True
        if fault is not None and fault.kind == "truncate":
            await stream.send_all(conn.send(h11.Data(data=body[: len(body) // 2])))
            return False
        view = memoryview(body)
        for i in range(0, len(body), 65536):
            await stream.send_all(conn.send(h11.Data(data=bytes(view[i : i + 65536]))))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return True
