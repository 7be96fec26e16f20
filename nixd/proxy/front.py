"""The proxy's HTTP/1.1 front: a lean connection loop on trio sockets, ``sendfile`` for NARs.

Nix speaks plain HTTP/1.1 with keep-alive to a local substituter and needs nothing
else, so the front is a small loop instead of an ASGI stack: it reads request heads,
parses them with :func:`nixd.proxy.http1.parse_head` (strict; errors answer 400/431/…
and close), calls the handler with a :class:`Request` and a :class:`Responder`, and
reuses the connection. Pipelined requests are served in order from the same buffer.

Responses are framed here: ``Content-Length`` when the handler gives one, else chunked
(HTTP/1.1) or close-delimited (HTTP/1.0). A response whose declared length was not
delivered closes the connection. NAR bodies go from a file descriptor to the socket
with ``os.sendfile``, so a NAR byte is never copied through Python on its way to Nix.
Small responses (narinfo hits) are one ``send`` of bytes the handler may keep ready
(:meth:`Responder.send_prepared`); a write that fits the socket buffer does not pass
through the scheduler, so each request costs one scheduler pass (its read).

:meth:`Responder.abort` cuts the connection mid-body; with a ``Content-Length`` already
sent, Nix sees a failed (partial) transfer. That is how verification failures reach Nix.

Per connection there is one cancel scope: its deadline is the idle (or slow-client)
timeout while waiting for bytes and infinite while a handler runs, and a drain cancels
it only while the connection is idle.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import trio

from nixd.proxy.http1 import MAX_BODY, MAX_HEAD, BadRequest, parse_head

log = logging.getLogger(__name__)

__all__ = [
    "MAX_BODY",
    "MAX_HEAD",
    "Abort",
    "Connection",
    "ConnectionTracker",
    "Request",
    "Responder",
    "serve_connection",
]

READ_SIZE = 1 << 16
SENDFILE_MAX = 1 << 23
SLOW_CLIENT_TIMEOUT = 30.0
"""Bound on waiting for the rest of a started request head or body."""
LINGER = 1.0
"""After an error answer, how long unread request bytes are drained before closing."""

Headers = Sequence[tuple[bytes, bytes]]

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class Abort(Exception):
    """Raised by :meth:`Responder.abort`: the connection is dropped without completing."""


class Connection:
    """Per-connection state a handler may use across requests (e.g. a verified credential)."""

    __slots__ = ("authorized", "idle", "peer_is_loopback", "scope")

    def __init__(self, peer_is_loopback: bool) -> None:
        self.peer_is_loopback = peer_is_loopback
        self.authorized: object = None
        """Set by the handler; the front never reads it."""
        self.idle = True
        self.scope = trio.CancelScope()


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    path: bytes
    """The target without query string."""
    headers: dict[bytes, bytes]
    """Lower-cased names; a repeated header keeps its last value."""
    peer_is_loopback: bool
    connection: Connection | None = None


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


class Responder:
    """Sends one response on a connection; see the module docstring."""

    __slots__ = (
        "_chunked",
        "_fd",
        "_head",
        "_remaining",
        "_sock",
        "ended",
        "keep_alive",
        "sent_bytes",
        "started",
        "status",
    )

    def __init__(self, sock: trio.socket.SocketType, *, head: bool, keep_alive: bool) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._head = head
        self._remaining: int | None = None
        self._chunked = False
        self.keep_alive = keep_alive
        self.status = 0
        self.sent_bytes = 0
        self.started = False
        self.ended = False

    async def start(self, status: int, headers: Headers) -> None:
        """Send the status line and headers; the body follows with send/send_file, then end."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        out = [status_line(status)]
        length: int | None = None
        for name, value in headers:
            if name == b"content-length":
                length = int(value)
            out.append(b"%s: %s\r\n" % (name, value))
        if self._head or status in (204, 304) or status < 200:
            self._remaining = 0
        elif length is not None:
            self._remaining = length
        elif self.keep_alive:
            self._chunked = True
            out.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        await _send_all(self._sock, self._fd, b"".join(out))

    def _account(self, n: int) -> None:
        if self._remaining is not None:
            if n > self._remaining:
                raise RuntimeError(f"{n} bytes beyond the declared Content-Length")
            self._remaining -= n

    async def send(self, data: bytes) -> None:
        if not data or self._head:
            return
        self._account(len(data))
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        await _send_all(self._sock, self._fd, data)

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset`` with sendfile."""
        if count <= 0 or self._head:
            return
        self._account(count)
        if self._chunked:
            await _send_all(self._sock, self._fd, b"%x\r\n" % count)
        await self._sendfile(fd, offset, count)
        if self._chunked:
            await _send_all(self._sock, self._fd, b"\r\n")

    async def _sendfile(self, fd: int, offset: int, count: int) -> None:
        sock = self._sock
        out = self._fd
        while count:
            try:
                n = os.sendfile(out, fd, offset, min(count, SENDFILE_MAX))
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
        if self._chunked:
            await _send_all(self._sock, self._fd, b"0\r\n\r\n")
        self.ended = bool(self._remaining is None or self._remaining == 0)

    async def simple(
        self, status: int, body: bytes, headers: Headers = (), *, head: bool = False
    ) -> None:
        """A whole small response; for HEAD only the headers (with the body's length)."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        out = [status_line(status)]
        out.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
        out.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        if not (head or self._head):
            out.append(body)
        await _send_all(self._sock, self._fd, b"".join(out))
        self.ended = True

    async def send_prepared(self, status: int, data: bytes) -> None:
        """Send a complete response (status line, headers, body if any) kept ready as bytes.

        The bytes must fit the request (no body for HEAD); the connection is closed after
        it when the request asked for that, whatever the bytes say.
        """
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        await _send_all(self._sock, self._fd, data)
        self.ended = True

    def abort(self, reason: str) -> None:
        raise Abort(reason)


async def _send_all(sock: trio.socket.SocketType, fd: int, data: bytes) -> None:
    """Write ``data``; the scheduler is entered only when the socket buffer is full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                raise trio.BrokenResourceError("client went away") from exc
            raise
        view = view[n:]


Handler = Callable[[Request, Responder], Awaitable[None]]


class ConnectionTracker:
    """Counts requests in flight and lets a drain close idle keep-alive connections."""

    def __init__(self) -> None:
        self.active = 0
        self.draining = False
        self.connections: set[Connection] = set()
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
        for conn in list(self.connections):
            if conn.idle:
                conn.scope.cancel()
        await self._idle.wait()


async def serve_connection(
    stream: trio.SocketStream,
    handler: Handler,
    tracker: ConnectionTracker,
    *,
    idle_timeout: float = 75.0,
) -> None:
    """Serve HTTP/1.1 requests on ``stream`` until the peer or the drain closes it."""
    sock = stream.socket
    try:
        peer = sock.getpeername()
        host = str(peer[0]) if isinstance(peer, tuple) else ""
    except OSError:
        host = ""
    conn = Connection(host == "::1" or host.startswith(("127.", "::ffff:127.")))
    tracker.connections.add(conn)
    try:
        with conn.scope:
            await _serve(sock, conn, handler, tracker, idle_timeout)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("connection closed: %s", exc)
    finally:
        tracker.connections.discard(conn)
        await stream.aclose()


async def _serve(
    sock: trio.socket.SocketType,
    conn: Connection,
    handler: Handler,
    tracker: ConnectionTracker,
    idle_timeout: float,
) -> None:
    scope = conn.scope
    buf = b""
    while not tracker.draining:
        # A head: bytes up to the empty line, read with the idle timeout (nothing yet)
        # or the slow-client one (part of a head is in).
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > MAX_HEAD:
                await _refuse(sock, BadRequest(431, "request head too large"))
                return
            conn.idle = not buf
            scope.deadline = trio.current_time() + (SLOW_CLIENT_TIMEOUT if buf else idle_timeout)
            data = await sock.recv(READ_SIZE)
            scope.deadline = math.inf
            conn.idle = False
            if not data:
                return
            start = max(0, len(buf) - 3)
            buf += data
            end = buf.find(b"\r\n\r\n", start)
        if tracker.draining:
            return
        try:
            req = parse_head(buf[:end])
        except BadRequest as exc:
            await _refuse(sock, exc)
            return
        buf = buf[end + 4 :]
        if req.content_length:  # read and drop the body
            while len(buf) < req.content_length:
                scope.deadline = trio.current_time() + SLOW_CLIENT_TIMEOUT
                data = await sock.recv(READ_SIZE)
                scope.deadline = math.inf
                if not data:
                    return
                buf += data
            buf = buf[req.content_length :]
        target = req.target
        q = target.find(b"?")
        request = Request(
            req.method, target if q < 0 else target[:q], req.headers, conn.peer_is_loopback, conn
        )
        responder = Responder(sock, head=req.method == b"HEAD", keep_alive=req.keep_alive)
        tracker.begin()
        try:
            await handler(request, responder)
        except Abort as exc:
            log.info("cut the response to %s: %s", request.path.decode(errors="replace"), exc)
            return
        finally:
            tracker.done()
        if not responder.started:
            await responder.simple(500, b"no response\n")
        if not (responder.ended and responder.keep_alive):
            return


async def _refuse(sock: trio.socket.SocketType, exc: BadRequest) -> None:
    """Answer a request that cannot be served, then close without losing the answer.

    The peer may still be sending (an oversized head): its unread bytes would turn the
    close into a reset that can destroy the answer before the peer reads it, so the
    write side is shut first and the rest read and dropped for a moment.
    """
    body = f"{exc}\n".encode()
    responder = Responder(sock, head=False, keep_alive=False)
    await responder.simple(exc.status, body)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    with trio.move_on_after(LINGER):
        drained = 0
        while drained < (1 << 20):
            data = await sock.recv(READ_SIZE)
            if not data:
                break
            drained += len(data)
