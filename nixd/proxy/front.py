"""The proxy's HTTP/1.1 front: h11 on trio sockets, with ``sendfile`` for NAR bodies.

Nix speaks plain HTTP/1.1 with keep-alive to a local substituter and needs nothing
else, so the front is a small connection loop instead of an ASGI stack: per request it
parses with h11, calls the handler with a :class:`Request` and a :class:`Responder`, and
reuses the connection. NAR bodies go from a file descriptor to the socket with
``os.sendfile`` (h11 is told only their length, via ``send_with_data_passthrough``), so
a NAR byte is never copied through Python on its way to Nix.

:meth:`Responder.abort` cuts the connection mid-body; with a ``Content-Length`` already
sent, Nix sees a failed (partial) transfer. That is how verification failures reach Nix.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import h11
import trio

log = logging.getLogger(__name__)

MAX_REQUEST_BODY = 1 << 16
MAX_HEAD = 16384
"""Largest request line + headers accepted (431 beyond)."""
READ_SIZE = 1 << 16
SENDFILE_MAX = 1 << 23

Headers = Sequence[tuple[bytes, bytes]]


class Abort(Exception):
    """Raised by :meth:`Responder.abort`: the connection is dropped without completing."""


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    path: bytes
    """The target without query string."""
    headers: dict[bytes, bytes]
    """Lower-cased names; a repeated header keeps its last value."""
    peer_is_loopback: bool


class _FileSlice:
    """What h11 is handed instead of bytes: only the length matters to it."""

    __slots__ = ("count", "fd", "offset")

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd = fd
        self.offset = offset
        self.count = count

    def __len__(self) -> int:
        return self.count


class Responder:
    """Sends one response on a connection; see the module docstring."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self._stream = stream
        self._conn = conn
        self.status = 0
        self.sent_bytes = 0

    async def start(self, status: int, headers: Headers) -> None:
        self.status = status
        await self._stream.send_all(
            self._conn.send(h11.Response(status_code=status, headers=list(headers)))
        )

    async def send(self, data: bytes) -> None:
        if data:
            await self._stream.send_all(self._conn.send(h11.Data(data=data)))

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset`` with sendfile."""
        if count <= 0:
            return
        event = h11.Data(data=_FileSlice(fd, offset, count))  # type: ignore[arg-type]
        parts = self._conn.send_with_data_passthrough(event)
        for part in parts or ():
            if isinstance(part, _FileSlice):
                await self._sendfile(part)
            else:
                await self._stream.send_all(part)

    async def _sendfile(self, part: _FileSlice) -> None:
        sock = self._stream.socket
        out = sock.fileno()
        offset, count = part.offset, part.count
        while count:
            try:
                n = os.sendfile(out, part.fd, offset, min(count, SENDFILE_MAX))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise trio.BrokenResourceError("client went away") from exc
                raise
            if n == 0:
                raise OSError(f"file ended {count} bytes early")
            offset += n
            count -= n
            self.sent_bytes += n
            await trio.lowlevel.checkpoint()

    async def end(self) -> None:
        await self._stream.send_all(self._conn.send(h11.EndOfMessage()))

    async def simple(
        self, status: int, body: bytes, headers: Headers = (), *, head: bool = False
    ) -> None:
        """A whole small response; for HEAD only the headers (with the body's length)."""
        all_headers = [*headers, (b"content-length", str(len(body)).encode())]
        data = self._conn.send(h11.Response(status_code=status, headers=all_headers)) or b""
        self.status = status
        if not head and body:
            data += self._conn.send(h11.Data(data=body)) or b""
        data += self._conn.send(h11.EndOfMessage()) or b""
        await self._stream.send_all(data)

    def abort(self, reason: str) -> None:
        raise Abort(reason)

    @property
    def started(self) -> bool:
        return self._conn.our_state is not h11.SEND_RESPONSE


Handler = Callable[[Request, Responder], Awaitable[None]]


class ConnectionTracker:
    """Counts requests in flight and lets a drain cancel idle keep-alive waits."""

    def __init__(self) -> None:
        self.active = 0
        self.draining = False
        self.idle_scopes: set[trio.CancelScope] = set()
        self._idle = trio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.active += 1
        self._idle = trio.Event() if self.active == 1 else self._idle

    def done(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def drain(self) -> None:
        """Stop keep-alive, close idle connections, wait for requests in flight."""
        self.draining = True
        for scope in list(self.idle_scopes):
            scope.cancel()
        await self._idle.wait()


async def serve_connection(
    stream: trio.SocketStream,
    handler: Handler,
    tracker: ConnectionTracker,
    *,
    idle_timeout: float = 75.0,
) -> None:
    """Serve HTTP/1.1 requests on ``stream`` until the peer or the drain closes it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        peer = stream.socket.getpeername()
        host = str(peer[0]) if isinstance(peer, tuple) else ""
    except OSError:
        host = ""
    loopback = host == "::1" or host.startswith(("127.", "::ffff:127."))
    try:
        while not tracker.draining:
            request = await _read_request(stream, conn, tracker, idle_timeout, loopback)
            if request is None:
                return
            responder = Responder(stream, conn)
            tracker.begin()
            try:
                await handler(request, responder)
            except Abort as exc:
                log.info("cut the response to %s: %s", request.path.decode(errors="replace"), exc)
                return
            finally:
                tracker.done()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
        log.debug("connection closed: %s", exc)
    finally:
        await stream.aclose()


async def _read_request(
    stream: trio.SocketStream,
    conn: h11.Connection,
    tracker: ConnectionTracker,
    idle_timeout: float,
    loopback: bool,
) -> Request | None:
    request: Request | None = None
    body = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            # Malformed request: 400; headers over max_incomplete_event_size: 431.
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = 431 if exc.error_status_hint == 431 else 400
                text = b"request headers too large\n" if status == 431 else b"bad request\n"
                responder = Responder(stream, conn)
                await responder.simple(status, text, [(b"connection", b"close")])
            return None
        if event is h11.NEED_DATA:
            data = await _receive(stream, tracker, idle_timeout if request is None else 30.0)
            if data is None:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            # h11 bounds only a head still incomplete; one that arrived whole is sized here.
            if len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) > MAX_HEAD:
                responder = Responder(stream, conn)
                await responder.simple(
                    431, b"request headers too large\n", [(b"connection", b"close")]
                )
                return None
            target = event.target
            q = target.find(b"?")
            request = Request(
                method=event.method,
                path=target if q < 0 else target[:q],
                headers=dict(event.headers),
                peer_is_loopback=loopback,
            )
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_REQUEST_BODY:
                return None
        elif isinstance(event, h11.EndOfMessage):
            return request
        else:  # ConnectionClosed or PAUSED
            return None


async def _receive(
    stream: trio.SocketStream, tracker: ConnectionTracker, seconds: float
) -> bytes | None:
    scope = trio.move_on_after(seconds)
    tracker.idle_scopes.add(scope)
    try:
        with scope:
            return await stream.receive_some(READ_SIZE)
        return None
    finally:
        tracker.idle_scopes.discard(scope)
