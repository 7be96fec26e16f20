"""Running the cache server: build its services from a state directory, serve HTTP/1.1.

:func:`serve` is the whole life of a server process, in the trio/hypercorn shape: an outer
nursery holding the policy watcher, the signal watcher and the listeners; readiness
reported with ``task_status.started(bound_urls)`` once every listener is bound (and the
URLs written to ``server.address_file`` for whoever started the process); SIGTERM/SIGINT
stop the accepting, idle connections close, in-flight requests (NAR streams) get
``graceful_timeout`` seconds, then everything is cancelled and the database closed.

**Why not Hypercorn.** Measured on the 2-core benchmark machine: Hypercorn's trio worker
answered a fixed 3-line ``nix-cache-info`` at ~1,300 req/s, the app alone (called directly)
handles ~5,000 narinfo req/s with auth, policy and audit, and a bare trio socket loop does
~21,000 req/s. The framework was the bottleneck, so (as DESIGN.md allows) this module has
a lean HTTP/1.1 front: exactly what Nix, curl and httpx speak to a binary cache —
keep-alive, ``Content-Length`` bodies, ``Expect: 100-continue`` (the interim answer is
sent when the app first reads the body, so a refused upload is never sent), pipelining
by sequence, no chunked request bodies (411/501), no HTTP/2. It drives the same ASGI app
the in-process tests use, so the app does not know which front it runs behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket as stdsocket
from collections.abc import Iterator, Sequence
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import trio

from nixd.errors import ConfigError
from nixd.nix.nar import NarParser
from nixd.server.access.audit import AuditLog
from nixd.server.access.credentials import CredentialStore
from nixd.server.access.keys import ServerKeys
from nixd.server.access.policy import PolicyHolder
from nixd.server.access.tokens import TokenIssuer
from nixd.server.asgi import Message
from nixd.server.config import ServerConfig
from nixd.server.http.app import CacheApp, Services
from nixd.server.login.device import DeviceService, RefreshExchanger
from nixd.server.login.exchangers import open_exchangers
from nixd.server.storage.db import open_db
from nixd.server.storage.store import Store

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
RECV = 256 * 1024
BODY_CHUNK = 1 << 20
IDLE_TIMEOUT = 75.0
HEAD_TIMEOUT = 30.0


@contextlib.contextmanager
def open_services(config: ServerConfig) -> Iterator[Services]:
    """Everything the app needs, opened from the state directory; closed on exit."""
    conn = open_db(config.database_path)
    with contextlib.ExitStack() as stack:
        stack.callback(conn.close)
        store = Store.open(conn, config.blobs_path, zstd_level=config.storage.zstd_level)
        keys = ServerKeys.load(config.state_dir)
        issuer = TokenIssuer(
            keys.jwt,
            config.tokens.issuer,
            config.tokens.audience,
            float(config.tokens.access_ttl),
        )
        policy = PolicyHolder(config.policy_path)
        audit = AuditLog(config.audit_path)
        stack.callback(audit.close)
        device = DeviceService(conn, issuer=issuer, audit=audit, settings=config.device)
        yield Services(
            store=store,
            credentials=CredentialStore(conn),
            issuer=issuer,
            keys=keys,
            policy=policy,
            audit=audit,
            max_upload_bytes=config.storage.max_upload_bytes,
            nar_checker=NarParser,
            exchangers={**open_exchangers(config), "refresh": RefreshExchanger(device)},
            device=device,
        )


def run(config: ServerConfig, *, listen: Sequence[str] | None = None, workers: int = 0) -> None:
    """The ``nixd-server serve`` process tree: bind, fork ``workers - 1`` more, serve.

    The sockets are bound (and the address file written) before forking, so every worker
    accepts on the same listening sockets and the kernel spreads connections over them.
    Workers share the database (WAL), the blob directory and the audit log (the audit log
    takes an ``flock`` per batch); their caches notice each other's commits through
    ``PRAGMA data_version``. SIGTERM to the first process stops the others after it.
    """
    count = workers or config.server.workers
    sockets = bind_sockets(list(listen or config.server.listen))
    children: list[int] = []
    for _ in range(count - 1):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                trio.run(partial(serve, config, sockets=sockets, write_address=False))
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            os._exit(code)
        children.append(pid)
    try:
        trio.run(partial(serve, config, sockets=sockets))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


async def serve(
    config: ServerConfig,
    *,
    listen: Sequence[str] | None = None,
    sockets: Sequence[stdsocket.socket] | None = None,
    write_address: bool = True,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation); ``started`` gets the bound URLs.

    Binds ``listen`` (default ``server.listen``) unless bound ``sockets`` are given.
    """
    if sockets is None:
        sockets = bind_sockets(list(listen or config.server.listen))
    listeners = [
        trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup())) for sock in sockets
    ]
    with open_services(config) as services:
        front = HttpFront(CacheApp(services), graceful_timeout=config.server.graceful_timeout)
        async with trio.open_nursery() as nursery:
            services.durable_reads = config.audit.durable_reads
            services.background = nursery
            nursery.start_soon(_watch_signals, front)
            nursery.start_soon(services.policy.watch)
            urls = await nursery.start(front.serve, listeners)
            log.info("serving on %s (pid %d)", ", ".join(urls), os.getpid())
            if write_address and config.address_path is not None:
                _write_address(config.address_path, urls)
            task_status.started(urls)
            await front.finished.wait()
            nursery.cancel_scope.cancel()


def bind_sockets(binds: Sequence[str]) -> list[stdsocket.socket]:
    """Listening sockets for ``host:port``, ``[v6]:port`` or ``fd://N`` (from systemd)."""
    return [_bind(b) for b in binds]


def _bind(bind: str) -> stdsocket.socket:
    if bind.startswith("fd://"):
        try:
            return stdsocket.socket(fileno=int(bind[5:]))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"listen {bind!r}: not a usable socket: {exc}") from exc
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen {bind!r}: expected host:port, [v6]:port or fd://N")
    host = host.strip("[]")
    try:
        infos = stdsocket.getaddrinfo(
            host or None, int(port), type=stdsocket.SOCK_STREAM, flags=stdsocket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = stdsocket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"listen {bind!r}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
        if family == stdsocket.AF_INET6:
            sock.setsockopt(stdsocket.IPPROTO_IPV6, stdsocket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"listen {bind!r}: {exc.strerror or exc}") from exc
    return sock


def _url(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Conn:
    """One client connection: its cancel scope and whether a request is in flight."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.busy = False


class HttpFront:
    """HTTP/1.1 connections in, ASGI ``http`` scopes out (see the module docstring)."""

    def __init__(self, app: Any, *, graceful_timeout: float = 10.0) -> None:
        self.app = app
        self.graceful_timeout = graceful_timeout
        self.stopping = False
        self.finished = trio.Event()
        self._accept_scope = trio.CancelScope()
        self._conns: set[_Conn] = set()

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with trio.open_nursery() as conns:
                with self._accept_scope:
                    async with trio.open_nursery() as accept:
                        await accept.start(
                            partial(
                                trio.serve_listeners,
                                self._connection,
                                listeners,
                                handler_nursery=conns,
                            )
                        )
                        task_status.started([_url(x) for x in listeners])
                # Accepting has stopped: drain for graceful_timeout, then cancel the rest.
                conns.cancel_scope.deadline = trio.current_time() + self.graceful_timeout
        finally:
            self.finished.set()

    def shutdown(self) -> None:
        """Stop accepting; idle connections close now, busy ones after their response."""
        self.stopping = True
        self._accept_scope.cancel()
        for conn in list(self._conns):
            if not conn.busy:
                conn.scope.cancel()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = _Conn()
        self._conns.add(conn)
        try:
            with conn.scope:
                await _Exchange(self, stream, conn).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._conns.discard(conn)
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()


class _Exchange:
    """The request/response loop of one connection."""

    def __init__(self, front: HttpFront, stream: trio.SocketStream, conn: _Conn) -> None:
        self.front = front
        self.stream = stream
        self.conn = conn
        self.buf = bytearray()
        try:
            peer = stream.socket.getpeername()
            local = stream.socket.getsockname()
        except OSError:
            peer, local = ("", 0), ("", 0)
        self.client = (str(peer[0]), int(peer[1]))
        self.server = (str(local[0]), int(local[1]))

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(RECV)
        if not data:
            return False
        self.buf += data
        return True

    async def _head(self) -> bytes | None:
        """The next request head (without the blank line); None on a clean close."""
        first = True
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                await self._simple(431, b"request head too large\n")
                return None
            timeout = IDLE_TIMEOUT if first and not self.buf else HEAD_TIMEOUT
            first = False
            with trio.move_on_after(timeout):
                if not await self._fill():
                    return None
                continue
            return None

    async def _simple(self, status: int, body: bytes) -> None:
        await self.stream.send_all(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _reason(status), len(body), body)
        )

    async def run(self) -> None:
        while not self.front.stopping:
            head = await self._head()
            if head is None:
                return
            self.conn.busy = True
            try:
                keep = await self._request(head)
            finally:
                self.conn.busy = False
            if not keep:
                return

    async def _request(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        try:
            method, target, version = lines[0].split(b" ")
        except ValueError:
            await self._simple(400, b"malformed request line\n")
            return False
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            await self._simple(505, b"HTTP/1.1 only\n")
            return False
        headers: list[tuple[bytes, bytes]] = []
        length = 0
        expect_continue = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                await self._simple(400, b"malformed header\n")
                return False
            name = name.lower()
            value = value.strip()
            headers.append((name, value))
            if name == b"content-length":
                if not value.isdigit():
                    await self._simple(400, b"bad content-length\n")
                    return False
                length = int(value)
            elif name == b"transfer-encoding":
                await self._simple(501, b"chunked request bodies are not supported\n")
                return False
            elif name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
            elif name == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        raw_path, _, query = target.partition(b"?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version[5:].decode(),
            "method": method.decode("ascii", "replace"),
            "scheme": "http",
            "path": unquote_to_bytes(raw_path).decode("utf-8", "replace"),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self.client,
            "server": self.server,
        }
        state = _Response()
        remaining = length

        async def receive() -> Message:
            nonlocal remaining, expect_continue
            if remaining == 0:
                return {"type": "http.request", "body": b"", "more_body": False}
            if expect_continue:
                expect_continue = False
                await self.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            if not self.buf and not await self._fill():
                return {"type": "http.disconnect"}
            take = min(remaining, len(self.buf), BODY_CHUNK)
            chunk = bytes(self.buf[:take])
            del self.buf[:take]
            remaining -= take
            return {"type": "http.request", "body": chunk, "more_body": remaining > 0}

        async def send(message: Message) -> None:
            await state.send(self.stream, message, method == b"HEAD")

        try:
            await self.front.app(scope, receive, send)
        except Exception:
            log.exception("request %s %s failed", scope["method"], scope["path"])
            if not state.started:
                await self._simple(500, b"internal error\n")
            return False
        if not state.complete:
            return False
        if remaining:
            # The app answered without reading the body (a refusal): the connection is
            # out of step unless we could skip it, so close it instead.
            return False
        return keep_alive and state.keep_alive and not self.front.stopping


class _Response:
    """Turns ASGI send events into bytes; one head, then the body."""

    def __init__(self) -> None:
        self.started = False
        self.complete = False
        self.keep_alive = True
        self._head = b""
        self._length: int | None = None
        self._sent = 0

    async def send(self, stream: trio.SocketStream, message: Message, head_only: bool) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            status = int(message["status"])
            parts = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
            for name, value in message.get("headers", ()):
                lname = name.lower()
                if lname == b"content-length":
                    self._length = int(value)
                parts.append(b"%s: %s\r\n" % (name, value))
            if self._length is None:
                self.keep_alive = False  # the end of the body is the end of the connection
                parts.append(b"connection: close\r\n")
            parts.append(b"\r\n")
            self._head = b"".join(parts)
            self.started = True
        elif kind == "http.response.body":
            body = b"" if head_only else bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            out = self._head + body if self._head else body
            self._head = b""
            if out:
                await stream.send_all(out)
            self._sent += len(body)
            if not more:
                self.complete = True
                if not head_only and self._length is not None and self._sent != self._length:
                    self.keep_alive = False


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


async def _watch_signals(front: HttpFront) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            front.shutdown()
            return


def _write_address(path: Path, urls: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{u}\n" for u in urls))
    os.replace(tmp, path)
