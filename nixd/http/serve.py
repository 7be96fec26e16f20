"""The trio half of nixd.http: accept, read requests, call a handler, frame the answer.

:func:`serve_http` is the whole life of an HTTP/1.1 front, in the hypercorn shape:
listeners accept into a connection nursery; ``task_status.started(HttpServer)`` once
accepting; when the ``shutdown`` event passed in is set, accepting stops (connections
not accepted yet stay in the listener's queue, for whoever holds the socket next),
kept-alive connections waiting between requests close, requests in flight get
``graceful_timeout`` seconds (their answers say ``connection: close``), then the rest is
cancelled and the function returns.

**Draining.** A connection that has not had a request yet is not idle: it was accepted
because a client is about to send one (Nix connects, then sends its head at once), and
closing it would reset the client with its request unanswered, a failure it may not
retry (curl retries a *reused* connection that closes, not a new one). So a drain
waits for its first head, within the usual ``head_timeout`` from the accept, and
answers it with ``connection: close``; the same goes for a head partly received. Only
a kept-alive connection that already served a request and is waiting for the next
closes at once: its client retries on a new connection, as HTTP/1.1 clients must.

Per connection, a loop over :class:`~nixd.http.request.RequestReader` on the raw trio
socket (no ``SocketStream`` layers: a warm narinfo answer is one ``os.read``, when the
request is in already, and one ``os.write``). One cancel scope per connection, and one
deadline per connection that a single sweeper task per server enforces (it cancels the
scope of each connection past its deadline, every :func:`sweep_interval`): moving a
deadline is then a float store, where a cancel scope's own deadline costs a heap update
twice per request. Deadlines are kept to within that interval (a few ms for short
timeouts, at most 250 ms):

- a new connection has ``head_timeout`` for its whole first head, counted from the
  accept; a kept-alive one waits ``keepalive_timeout`` for the next request's first
  byte, then ``head_timeout`` for the whole head, counted from that byte. The deadline
  is set once per head, not on every read, so dribbling bytes does not extend it;
- a request body gets ``body_idle_timeout`` between reads; a response write that makes
  no progress for as long cuts the connection too. A small body the handler left
  unread is dropped to keep the connection, within ``head_timeout`` in all (and the
  connection is evictable meanwhile), so trickling an unwanted body holds nothing; a
  larger one, or one the client holds back for a ``100 Continue`` it did not get (a
  refused upload), ends the connection: the answer says ``connection: close`` and the
  close lingers like a refusal's (below), so neither the leftover body is ever read as a
  next request nor a reset destroys the answer;
- while the handler runs (waiting for an upstream, streaming a NAR) there is none.

A refused head (:class:`~nixd.http.errors.BadRequest`) is answered with its status and
``connection: close``, the write side shut, and what the peer still sends read and
dropped for ``Limits.linger`` seconds, so the close is not a reset that destroys the
answer before the peer reads it.

**Connection caps.** ``max_connections`` in all and ``max_connections_per_peer`` per peer
address. At a cap, the connection that has waited longest *between* requests (idle, or
still sending its head) is closed to make room: an idle peer holding connections cannot
lock out another (on loopback every local user shares one address, so this, not the
per-peer count, is what keeps ``nobody`` from starving root), and a client whose kept-alive
connection was closed simply opens a new one. Only when every connection has a request
in flight is the newcomer refused: ``503`` with ``retry-after: 1``, then a short linger.

**Containment.** Whatever goes wrong inside one connection (a peer gone, a handler's
exception, a bug here) is logged and ends that connection; it never reaches the nursery
of the caller. A handler that fails before answering gets a 500; one that fails after
its response started gets its connection cut (a short body fails the transfer at the
client); a second head is never written into a body: :meth:`Responder.start` refuses to
run twice.

**Responses.** :class:`Responder` frames them: ``Content-Length`` when the handler gives
one, else chunked (HTTP/1.1) or close-delimited (HTTP/1.0); a declared length not
delivered closes the connection. NAR bodies go from a file to the socket with
``os.sendfile``, never through Python; a small answer the handler keeps ready as bytes is
one write (:meth:`Responder.send_prepared`), and a write that fits the socket buffer
never enters the scheduler.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket as stdsocket
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus

import trio

from nixd.http.errors import BadRequest, ResponseStateError
from nixd.http.limits import Limits
from nixd.http.request import RequestHead, RequestReader

__all__ = [
    "Abort",
    "ClientDisconnected",
    "Connection",
    "Handler",
    "HttpServer",
    "Request",
    "Responder",
    "serve_http",
    "status_line",
]

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16
SENDFILE_MAX = 1 << 23
EAGER_READS = 8
"""Reads in a row that found data without waiting before the connection yields once."""
DISCARD_MAX = 1 << 16
"""An unread request body up to this size is read and dropped to keep the connection;
a larger one (an upload the handler refused) closes it instead."""
MAX_LINGERING = 64
"""Refused connections lingering at once; more are closed at once (a flood of refusals
must not itself become a way to hold tasks)."""
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

Headers = Sequence[tuple[bytes, bytes]]

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


class Abort(Exception):
    """Raised by :meth:`Responder.abort`: the connection is dropped without completing."""


class ClientDisconnected(trio.BrokenResourceError):
    """The peer closed its side before the request body was complete."""


class Connection:
    """One client connection: its cancel scope, its state, and what a handler keeps on it."""

    __slots__ = (
        "authorized",
        "busy",
        "deadline",
        "evicted",
        "local",
        "partial",
        "peer",
        "peer_is_loopback",
        "scope",
        "served",
        "since",
    )

    def __init__(self, peer: tuple[str, int], local: tuple[str, int]) -> None:
        self.peer = peer
        self.local = local
        host = peer[0]
        self.peer_is_loopback = host == "::1" or host.startswith(("127.", "::ffff:127."))
        self.authorized: object = None
        """Set by a handler (e.g. a verified credential); the front never reads it."""
        self.scope = trio.CancelScope()
        self.deadline = math.inf
        """When the sweeper cancels :attr:`scope` (trio clock); inf while a handler runs."""
        self.busy = False
        """A request is being handled (not evictable, not closed by a drain)."""
        self.partial = False
        """Part of a request head is in."""
        self.served = 0
        """Requests read on this connection; 0: a drain waits for the first one."""
        self.since = 0
        """When the connection last started waiting for a request (HttpServer.tick)."""
        self.evicted = False


class Request:
    """One request as a handler sees it; the body is read with :meth:`receive_body`."""

    __slots__ = (
        "_continued",
        "_limits",
        "_reader",
        "_responder",
        "_sock",
        "connection",
        "head",
        "headers",
        "method",
        "path",
        "query",
        "target",
    )

    def __init__(
        self,
        head: RequestHead,
        connection: Connection,
        *,
        reader: RequestReader,
        sock: trio.socket.SocketType,
        limits: Limits,
    ) -> None:
        self.head = head
        self.method = head.method
        self.target = head.target
        q = head.target.find(b"?")
        self.path = head.target if q < 0 else head.target[:q]
        """The target without its query string."""
        self.query = b"" if q < 0 else head.target[q + 1 :]
        self.headers = head.headers
        """Lower-cased names; repeated fields joined with ``", "``."""
        self.connection = connection
        self._reader = reader
        self._sock = sock
        self._limits = limits
        self._responder: Responder | None = None
        self._continued = False

    @property
    def peer_is_loopback(self) -> bool:
        return self.connection.peer_is_loopback

    @property
    def body_remaining(self) -> int:
        """Bytes of the body not yet received."""
        return self._reader.body_remaining

    @property
    def body_left_unread(self) -> bool:
        """Part of the body is unread and will not be dropped to keep the connection: more
        than ``DISCARD_MAX``, or held back by the client for a ``100 Continue`` it did not
        get. An answer now ends the connection (and says ``connection: close``)."""
        remaining = self._reader.body_remaining
        return remaining > 0 and (
            remaining > DISCARD_MAX or (self.head.expect_continue and not self._continued)
        )

    async def receive_body(self, max_bytes: int = 1 << 20) -> bytes:
        """The next piece of the body (at most ``max_bytes``); b"" once it is complete.

        Sends ``100 Continue`` first when the client asked for it, so a request that is
        refused without reading its body is never sent. Raises ClientDisconnected if the
        peer closes early; ``body_idle_timeout`` without a byte ends the connection.
        """
        reader = self._reader
        if not reader.body_remaining:
            return b""
        chunk = reader.next_body(max_bytes)
        if chunk:
            return chunk
        if self.head.expect_continue and not self._continued:
            self._continued = True
            if self._responder is None or not self._responder.started:
                await _send_all(
                    self._sock, b"HTTP/1.1 100 Continue\r\n\r\n", self._limits.body_idle_timeout
                )
        conn = self.connection
        while not chunk:
            conn.deadline = trio.current_time() + self._limits.body_idle_timeout
            try:
                data = await self._sock.recv(READ_SIZE)
            finally:
                conn.deadline = math.inf
            if not data:
                raise ClientDisconnected("the client closed before the end of the body")
            reader.feed(data)
            chunk = reader.next_body(max_bytes)
        return chunk


class Responder:
    """Sends one response on a connection; see the module docstring."""

    __slots__ = (
        "_chunked",
        "_fd",
        "_head",
        "_remaining",
        "_request",
        "_server",
        "_sock",
        "_stall",
        "_until_close",
        "ended",
        "keep_alive",
        "sent_bytes",
        "started",
        "status",
    )

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        head: bool,
        keep_alive: bool,
        stall_timeout: float = 30.0,
        server: HttpServer | None = None,
    ) -> None:
        self._sock = sock
        self._server = server
        self._fd = sock.fileno()
        self._head = head
        self._stall = stall_timeout
        self._remaining: int | None = None
        self._request: Request | None = None
        """The request answered, while it is handled: its unread body decides keep-alive."""
        self._chunked = False
        self._until_close = False
        self.keep_alive = keep_alive
        """Whether the connection stays open after this response (the front decides;
        a handler may only turn it off)."""
        self.status = 0
        self.sent_bytes = 0
        self.started = False
        self.ended = False

    @property
    def complete(self) -> bool:
        """The response was ended and carried every byte its head announced."""
        return self.ended

    def _begin(self, status: int) -> None:
        if self.started:
            raise ResponseStateError("response already started")
        self.started = True
        self.status = status
        if self._server is not None and self._server.draining:
            self.keep_alive = False  # a drain began while the request was handled
        if self._request is not None and self._request.body_left_unread:
            # Answered before the body was read (a refused upload): the rest of the body
            # cannot be told from a next request, so the connection ends, and says so.
            self.keep_alive = False

    async def start(self, status: int, headers: Headers, first: bytes = b"") -> None:
        """Send the status line, ``headers`` and (in the same write) ``first`` body bytes.

        The body follows with :meth:`send` / :meth:`send_file`, then :meth:`end`.
        """
        self._begin(status)
        out = [status_line(status)]
        length: int | None = None
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                length = int(value)
                continue  # written once, below
            if lname == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                continue
            elif lname == b"transfer-encoding":
                continue  # framing is ours
            if b"\n" in value or b"\r" in value:
                raise ResponseStateError(f"header {lname!r} has a line break in its value")
            out.append(b"%s: %s\r\n" % (name, value))
        if length is not None:
            out.append(b"content-length: %d\r\n" % length)
        if self._head or status in (204, 304) or status < 200:
            self._remaining = 0
        elif length is not None:
            self._remaining = length
        elif self.keep_alive:
            self._chunked = True
            out.append(b"transfer-encoding: chunked\r\n")
        else:
            self._until_close = True  # HTTP/1.0 or closing: the body ends with the connection
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        if first and not self._head:
            self._account(len(first))
            out.append(b"%x\r\n%s\r\n" % (len(first), first) if self._chunked else first)
        await _send_all(self._sock, b"".join(out), self._stall)

    def _account(self, n: int) -> None:
        if self._remaining is not None:
            if n > self._remaining:
                raise ResponseStateError(f"{n} bytes beyond the declared Content-Length")
            self._remaining -= n
        self.sent_bytes += n

    async def send(self, data: bytes) -> None:
        if not self.started or self.ended:
            raise ResponseStateError("send outside a started response")
        if not data or self._head:
            return
        self._account(len(data))
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        await _send_all(self._sock, data, self._stall)

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset`` with sendfile."""
        if not self.started or self.ended:
            raise ResponseStateError("send outside a started response")
        if count <= 0 or self._head:
            return
        self._account(count)
        if self._chunked:
            await _send_all(self._sock, b"%x\r\n" % count, self._stall)
        await self._sendfile(fd, offset, count)
        if self._chunked:
            await _send_all(self._sock, b"\r\n", self._stall)

    async def _sendfile(self, fd: int, offset: int, count: int) -> None:
        sock = self._sock
        # trio's streams set TCP_NOTSENT_LOWAT (16 KiB, for latency): each wakeup then
        # moves little, and a bulk body cost 3-4x the CPU (0.4-0.5 vs 0.13 CPU-s per GiB
        # over loopback, measured). Lifted for the file body, put back for what follows.
        lowat = _lift_lowat(sock) if count >= _BULK else None
        try:
            await self._sendfile_all(fd, offset, count)
        finally:
            if lowat is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(stdsocket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, lowat)

    async def _sendfile_all(self, fd: int, offset: int, count: int) -> None:
        sock = self._sock
        out = self._fd
        while count:
            try:
                n = os.sendfile(out, fd, offset, min(count, SENDFILE_MAX))
            except BlockingIOError:
                await _wait_writable(sock, self._stall)
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise trio.BrokenResourceError("client went away") from exc
                raise
            if n == 0:
                raise OSError(f"file ended {count} bytes early")
            offset += n
            count -= n
            await trio.lowlevel.checkpoint()

    async def end(self) -> None:
        if not self.started or self.ended:
            raise ResponseStateError("end outside a started response")
        if self._chunked:
            await _send_all(self._sock, b"0\r\n\r\n", self._stall)
        self.ended = self._remaining is None or self._remaining == 0
        if self._until_close or not self.ended:
            self.keep_alive = False

    async def simple(
        self, status: int, body: bytes, headers: Headers = (), *, head: bool = False
    ) -> None:
        """A whole small response; for HEAD only the headers (with the body's length)."""
        self._begin(status)
        out = [status_line(status)]
        out.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
        out.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        if not (head or self._head):
            out.append(body)
        await _send_all(self._sock, b"".join(out), self._stall)
        self.ended = True

    async def send_prepared(self, status: int, data: bytes) -> None:
        """Send a complete response (status line, headers, body if any) kept ready as bytes.

        The bytes must fit the request (no body for HEAD) and carry a Content-Length.
        When the connection is to close after it, ``connection: close`` is added if the
        bytes lack it (the rare case; the common one is a single write of ``data``).
        """
        self._begin(status)
        if not self.keep_alive:
            end = data.find(b"\r\n\r\n")
            if end >= 0 and b"\r\nconnection: close" not in data[:end].lower():
                data = data[:end] + b"\r\nconnection: close" + data[end:]
        await _send_all(self._sock, data, self._stall)
        self.ended = True

    def abort(self, reason: str) -> None:
        """Cut the connection now (mid-body: the client sees a failed transfer)."""
        raise Abort(reason)


_TCP_NOTSENT_LOWAT = getattr(stdsocket, "TCP_NOTSENT_LOWAT", 25)
_BULK = 1 << 20
"""File bodies from this size on are sent with TCP_NOTSENT_LOWAT lifted."""


def _lift_lowat(sock: trio.socket.SocketType) -> int | None:
    """Lift TCP_NOTSENT_LOWAT for a bulk send; the previous value, None if not set."""
    try:
        before = int(sock.getsockopt(stdsocket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT))
        sock.setsockopt(stdsocket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, 1 << 30)
    except OSError:
        return None  # not TCP (a Unix socket) or not Linux: nothing to lift
    return before


async def _wait_writable(sock: trio.socket.SocketType, stall: float) -> None:
    with trio.move_on_after(stall) as waited:
        await trio.lowlevel.wait_writable(sock)
    if waited.cancelled_caught:
        raise trio.BrokenResourceError(f"the client read nothing for {stall:.0f} s")


async def _send_all(sock: trio.socket.SocketType, data: bytes, stall: float) -> None:
    """Write ``data``; the scheduler is entered only when the socket buffer is full."""
    fd = sock.fileno()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _wait_writable(sock, stall)
            continue
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                raise trio.BrokenResourceError("client went away") from exc
            raise
        view = view[n:]


async def _wait_and_receive(sock: trio.socket.SocketType, fd: int) -> bytes:
    """The next bytes from the peer once it sends some (b"" at its end of stream)."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.read(fd, READ_SIZE)
        except BlockingIOError:
            continue  # woken without data (a spurious wake)


Handler = Callable[[Request, Responder], Awaitable[None]]


class HttpServer:
    """A running :func:`serve_http`: what ``task_status.started`` hands back."""

    def __init__(self, listeners: Sequence[trio.SocketListener], limits: Limits) -> None:
        self.listeners = list(listeners)
        self.limits = limits
        self.addresses: list[tuple[str, int]] = []
        for listener in self.listeners:
            name = listener.socket.getsockname()
            self.addresses.append((str(name[0]), int(name[1])))
        self.draining = False
        self.closed = trio.Event()
        """Set when serve_http has returned (every connection ended)."""
        self.connections: set[Connection] = set()
        self._by_peer: dict[str, set[Connection]] = {}
        self._lingering = 0
        self._refusal_logged = -math.inf
        self._ticks = 0

    def tick(self) -> int:
        """A counter that orders events without reading the clock."""
        self._ticks += 1
        return self._ticks

    @property
    def urls(self) -> list[str]:
        return [
            f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            for host, port in self.addresses
        ]

    # -- connection accounting -----------------------------------------------------------

    def _admit(self, conn: Connection) -> bool:
        """Make room for ``conn`` under the caps (evicting an idle one); False: refuse."""
        limits = self.limits
        peers = self._by_peer.get(conn.peer[0])
        full = peers is not None and len(peers) >= limits.max_connections_per_peer
        if full and peers is not None and not self._evict(peers):
            return False
        if len(self.connections) >= limits.max_connections and not self._evict(self.connections):
            return False
        self.connections.add(conn)
        self._by_peer.setdefault(conn.peer[0], set()).add(conn)
        return True

    def _evict(self, pool: set[Connection]) -> bool:
        waiting = [c for c in pool if not c.busy]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: c.since)
        log.debug("closing an idle connection from %s to make room", victim.peer[0])
        victim.evicted = True
        self._forget(victim)
        victim.scope.cancel()
        return True

    def _forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        peers = self._by_peer.get(conn.peer[0])
        if peers is not None:
            peers.discard(conn)
            if not peers:
                del self._by_peer[conn.peer[0]]

    def _drain(self) -> None:
        """Stop keeping connections alive; close those waiting between requests now.

        Connections without a request yet, or with part of a head, keep their head
        deadline and are answered (see the module docstring).
        """
        self.draining = True
        for conn in list(self.connections):
            if conn.served and not conn.busy and not conn.partial:
                conn.scope.cancel()


async def serve_http(
    listeners: Sequence[trio.SocketListener],
    handler: Handler,
    *,
    limits: Limits | None = None,
    shutdown: trio.Event | None = None,
    graceful_timeout: float = 10.0,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP/1.1 on ``listeners`` until ``shutdown`` is set and drained, or cancelled.

    ``graceful_timeout`` (may be ``math.inf``) bounds how long requests in flight may
    finish after ``shutdown``; the listeners are closed on the way out.
    """
    server = HttpServer(listeners, limits or Limits())
    try:
        async with trio.open_nursery() as sweeping:
            sweeping.start_soon(_sweep, server)
            await _serve(server, handler, shutdown, graceful_timeout, task_status)
            sweeping.cancel_scope.cancel()
    finally:
        for listener in server.listeners:
            listener.socket.close()
        server.closed.set()


def sweep_interval(limits: Limits) -> float:
    """How often connection deadlines are checked: a tenth of the shortest timeout,
    between 5 ms and 250 ms."""
    shortest = min(limits.head_timeout, limits.keepalive_timeout, limits.body_idle_timeout)
    return min(max(shortest / 10, 0.005), 0.25)


async def _sweep(server: HttpServer) -> None:
    """Cancel every connection past its deadline (see the module docstring)."""
    interval = sweep_interval(server.limits)
    while True:
        await trio.sleep(interval)
        now = trio.current_time()
        for conn in [c for c in server.connections if c.deadline <= now]:
            conn.scope.cancel()


async def _serve(
    server: HttpServer,
    handler: Handler,
    shutdown: trio.Event | None,
    graceful_timeout: float,
    task_status: trio.TaskStatus[HttpServer],
) -> None:
    """Accept until ``shutdown``, then drain (see :func:`serve_http`)."""
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            for listener in server.listeners:
                accepting.start_soon(_accept_loop, server, listener, handler, connections)
            task_status.started(server)
            if shutdown is None:
                await trio.sleep_forever()
            await shutdown.wait()
            accepting.cancel_scope.cancel()
        for listener in server.listeners:
            await listener.aclose()
        server._drain()
        connections.cancel_scope.deadline = trio.current_time() + graceful_timeout


async def _accept_loop(
    server: HttpServer,
    listener: trio.SocketListener,
    handler: Handler,
    connections: trio.Nursery,
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except trio.ClosedResourceError:
            return
        except OSError as exc:
            # Out of descriptors or memory: wait a moment rather than spin (trio does
            # the same in serve_listeners); anything else is logged, not fatal either.
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                log.warning("accept failed: %s", exc)
            else:
                log.error("accept failed (%s); pausing 100 ms", exc)
            await trio.sleep(0.1)
            continue
        sock = stream.socket
        try:
            peer = sock.getpeername()
            local = sock.getsockname()
            conn = Connection((str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])))
        except OSError:
            sock.close()
            continue
        conn.since = server.tick()
        if server._admit(conn):
            connections.start_soon(_serve_connection, server, sock, conn, handler)
        else:
            now = trio.current_time()
            if now - server._refusal_logged > 10:  # a flood must not flood the log too
                server._refusal_logged = now
                log.warning("at the connection cap: refusing %s (and maybe more)", conn.peer[0])
            _refuse_busy(server, sock, connections)


def _refuse_busy(server: HttpServer, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
    """503 without waiting for the request; linger only while few others do."""
    body = b"too many connections, retry later\n"
    answer = status_line(
        503
    ) + b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    try:
        os.write(sock.fileno(), answer)  # a fresh socket's buffer always has room
        sock.shutdown(stdsocket.SHUT_WR)
    except OSError:
        sock.close()
        return
    if server._lingering >= MAX_LINGERING:
        sock.close()
        return
    nursery.start_soon(_linger_and_close, server, sock)


async def _linger_and_close(server: HttpServer, sock: trio.socket.SocketType) -> None:
    server._lingering += 1
    try:
        await _linger(sock, server.limits.linger)
    finally:
        server._lingering -= 1
        sock.close()


async def _linger(sock: trio.socket.SocketType, seconds: float) -> None:
    """Read and drop what the peer still sends (at most 1 MiB, ``seconds``), then return."""
    with trio.move_on_after(seconds):
        drained = 0
        try:
            while drained < (1 << 20):
                data = await sock.recv(READ_SIZE)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass


async def _serve_connection(
    server: HttpServer, sock: trio.socket.SocketType, conn: Connection, handler: Handler
) -> None:
    try:
        with conn.scope:
            await _Exchange(server, sock, conn, handler).run()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("connection from %s closed: %s", conn.peer[0], exc)
    except Exception:
        log.exception("connection from %s failed; closed it", conn.peer[0])
    finally:
        if not conn.evicted:
            server._forget(conn)
        sock.close()


class _Exchange:
    """The request/response loop of one connection."""

    __slots__ = ("conn", "handler", "limits", "reader", "server", "sock")

    def __init__(
        self,
        server: HttpServer,
        sock: trio.socket.SocketType,
        conn: Connection,
        handler: Handler,
    ) -> None:
        self.server = server
        self.sock = sock
        self.conn = conn
        self.handler = handler
        self.limits = server.limits
        self.reader = RequestReader(server.limits)

    async def run(self) -> None:
        limits = self.limits
        reader = self.reader
        conn = self.conn
        sock = self.sock
        fd = sock.fileno()
        server = self.server
        head_deadline: float | None = trio.current_time() + limits.head_timeout
        eager = 0
        while True:
            # -- the next head: keep-alive wait for its first byte, then the whole-head
            # deadline, set once (see the module docstring). The common case, a whole
            # head in one read, costs one recv and no clock reading.
            while True:
                if reader.buffered:
                    try:
                        req = reader.next_head()
                    except BadRequest as exc:
                        await self._refuse(exc)
                        return
                    if req is not None:
                        break
                    conn.partial = True
                    if head_deadline is None:
                        head_deadline = trio.current_time() + limits.head_timeout
                    conn.deadline = head_deadline
                elif server.draining and conn.served:
                    return  # between requests: close (a first head is still awaited)
                elif head_deadline is not None:
                    conn.deadline = head_deadline
                else:
                    conn.deadline = trio.current_time() + limits.keepalive_timeout
                # A read first, and a wait only when it would block: under load the next
                # request is often in already (measured: ~20% less CPU per warm request
                # than waiting first). A read that did not wait did not checkpoint
                # either, so every EAGER_READS of them in a row yield once (fairness,
                # cancellation) -- trio's recv would add two checkpoints to every read.
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    eager = 0
                    data = await _wait_and_receive(sock, fd)
                else:
                    eager += 1
                    if eager >= EAGER_READS:
                        eager = 0
                        await trio.lowlevel.checkpoint()
                if not data:
                    return  # the peer closed (or half-closed) between requests
                reader.feed(data)
            conn.deadline = math.inf
            conn.busy = True
            conn.partial = False
            conn.served += 1
            keep_alive = (
                req.keep_alive
                and conn.served < limits.max_requests_per_connection
                and not server.draining
            )
            if not await self._handle(req, keep_alive):
                return
            conn.busy = False
            conn.since = server.tick()
            head_deadline = None

    async def _handle(self, head: RequestHead, keep_alive: bool) -> bool:
        """Serve one request; whether the connection may carry another."""
        request = Request(head, self.conn, reader=self.reader, sock=self.sock, limits=self.limits)
        responder = Responder(
            self.sock,
            head=head.method == b"HEAD",
            keep_alive=keep_alive,
            stall_timeout=self.limits.body_idle_timeout,
            server=self.server,
        )
        request._responder = responder
        responder._request = request
        try:
            return await self._run_handler(request, responder)
        finally:
            request._responder = responder._request = None  # no cycle left to collect

    async def _run_handler(self, request: Request, responder: Responder) -> bool:
        head = request.head
        try:
            await self.handler(request, responder)
        except Abort as exc:
            log.info("cut the response to %s: %s", _show(request.path), exc)
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("client of %s went away: %s", _show(request.path), exc)
            return False
        except Exception:
            log.exception(
                "%s %s failed", head.method.decode("ascii", "replace"), _show(request.path)
            )
            if not responder.started:
                responder.keep_alive = False
                await responder.simple(500, b"internal error\n")
                await self._close_unread()
            return False  # started: cut, so a short body fails instead of a second head
        if not responder.started:
            log.error("no response to %s; answered 500", _show(request.path))
            responder.keep_alive = False
            await responder.simple(500, b"no response\n")
            await self._close_unread()
            return False
        if not (responder.complete and responder.keep_alive):
            if responder.complete:
                await self._close_unread()
            return False
        remaining = self.reader.body_remaining
        if remaining:
            # The handler answered without reading the body: drop a small one to keep
            # the connection in step; close for a large one, or one the client holds
            # back for a 100 Continue it never got (the answer said connection: close).
            # The drop has ``head_timeout`` in all and the connection is evictable
            # meanwhile: a body nobody wants must not hold a connection by trickling.
            if request.body_left_unread:
                await self._close_unread()
                return False
            request._continued = True
            self.conn.busy = False
            with trio.move_on_after(self.limits.head_timeout):
                while await request.receive_body(DISCARD_MAX):
                    pass
            if self.reader.body_remaining:
                return False
        return True

    async def _close_unread(self) -> None:
        """Before closing with part of a request body unread: shut the write side and
        drop what the peer still sends for ``Limits.linger`` seconds (at most 1 MiB).

        Closing a socket with unread bytes in its receive queue sends a reset, and a
        reset can destroy the answer in the peer's queue before it reads it: a client
        cut mid-upload sees "connection reset" instead of the 507 that says why. A
        client that got the answer stops sending and closes (curl: "HTTP error before
        end of send, stop sending"), which ends the wait at once.
        """
        if not self.reader.body_remaining:
            return
        self.conn.busy = False  # evictable meanwhile
        try:
            self.sock.shutdown(stdsocket.SHUT_WR)
        except OSError:
            return
        await _linger(self.sock, self.limits.linger)

    async def _refuse(self, exc: BadRequest) -> None:
        """Answer a refused head, then close without losing the answer (see module doc)."""
        log.debug("refused a request from %s: %s", self.conn.peer[0], exc)
        self.conn.deadline = math.inf
        responder = Responder(
            self.sock, head=False, keep_alive=False, stall_timeout=self.limits.linger
        )
        await responder.simple(exc.status, f"{exc}\n".encode())
        try:
            self.sock.shutdown(stdsocket.SHUT_WR)
        except OSError:
            return
        await _linger(self.sock, self.limits.linger)


def _show(path: bytes) -> str:
    return path[:200].decode("ascii", "replace")
