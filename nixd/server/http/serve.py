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
~21,000 req/s. The framework was the bottleneck, so (as DESIGN.md allows) the front is
:func:`nixd.http.serve.serve_http` with :class:`HttpFront` as a small ASGI adapter over it:
exactly what Nix, curl and httpx speak to a binary cache — keep-alive, ``Content-Length``
bodies, ``Expect: 100-continue`` (the interim answer is sent when the app first reads the
body, so a refused upload is never sent), pipelining by sequence, chunked responses when
the app gives no length, no chunked request bodies (501), no HTTP/2. Parsing, limits and
deadlines (a deadline for the whole head, a body idle timeout, connection caps) are
nixd.http's, and so is containment: an app exception ends its connection only (a 500
before the response started, a cut connection after). It drives the same ASGI app the
in-process tests use, so the app does not know which front it runs behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket as stdsocket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import trio

from nixd import systemd
from nixd.bounds import parse_uint
from nixd.errors import ConfigError, FormatError, NixdError
from nixd.http.errors import ResponseStateError
from nixd.http.limits import Limits
from nixd.http.serve import ClientDisconnected, HttpServer, Request, Responder, serve_http
from nixd.nix.nar import NarParser
from nixd.server.access.audit_db import open_audit
from nixd.server.access.credentials import CredentialStore
from nixd.server.access.keys import ServerKeys
from nixd.server.access.shared_policy import open_policy
from nixd.server.access.tokens import TokenIssuer
from nixd.server.asgi import Message
from nixd.server.config import ServerConfig
from nixd.server.flakes.releases import FlakeStore
from nixd.server.http.app import CacheApp, Services
from nixd.server.http.ops import Observed, OpsRoutes
from nixd.server.login.device import DeviceService, RefreshExchanger
from nixd.server.login.exchangers import open_exchangers
from nixd.server.metrics import disable_multiprocess, enable_multiprocess
from nixd.server.mirror.service import MirrorService
from nixd.server.storage.blobs import open_blob_store
from nixd.server.storage.db import open_db
from nixd.server.storage.gc import GcReport, flush_reads, serve_gc
from nixd.server.storage.store import Store

log = logging.getLogger(__name__)

BODY_CHUNK = 1 << 20
ZEROCOPY = "http.response.zerocopysend"
PREPARED = "nixd.http.response.prepared"
LIMITS = Limits(max_body_bytes=64 * 1024**3 + (64 << 20))
"""The server's bounds: nixd.http's defaults (see :class:`~nixd.http.limits.Limits`), with
bodies up to the largest upload the store takes (``storage.max_upload_bytes``' default,
plus slack for a compressed NAR larger than its content); the app bounds each route's
body itself, so this is only the framing's ceiling."""


@contextlib.contextmanager
def open_services(config: ServerConfig) -> Iterator[Services]:
    """Everything the app needs, opened from the state directory; closed on exit."""
    conn = open_db(config.database)
    with contextlib.ExitStack() as stack:
        stack.callback(conn.close)
        blobs = open_blob_store(config)
        store = Store.open(conn, blobs, zstd_level=config.storage.zstd_level)
        stack.callback(flush_reads, store)  # read times noted since the last flush
        keys = ServerKeys.load(config.state_dir, conn=conn)
        issuer = TokenIssuer(
            keys.jwt,
            config.tokens.issuer,
            config.tokens.audience,
            float(config.tokens.access_ttl),
        )
        policy = open_policy(config.policy_path, conn)
        audit = open_audit(config, conn)
        stack.callback(audit.close)
        device = DeviceService(conn, issuer=issuer, audit=audit, settings=config.device)
        flakes = FlakeStore.open(conn, blobs, store.data_version)
        mirror = (
            MirrorService(config.mirror, store, max_nar_size=config.storage.max_upload_bytes)
            if config.mirror
            else None
        )
        yield Services(
            mirror=mirror,
            ops=OpsRoutes(store, metrics=config.server.metrics),
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
            flakes=flakes,
            max_tarball_bytes=config.flakes.max_tarball_bytes,
            public_url=config.server.public_url,
        )


def run(config: ServerConfig, *, listen: Sequence[str] | None = None, workers: int = 0) -> None:
    """The ``nixd-server serve`` process tree: bind, fork ``workers - 1`` more, serve.

    The sockets are bound (or taken from socket activation, :func:`listening_sockets`)
    before forking, so every worker accepts on the same listening sockets and the kernel
    spreads connections over them. Workers share the database (WAL), the blob directory
    and the audit log (the file takes an ``flock`` per batch; on PostgreSQL the table's
    head row is locked per batch, across instances too); their caches notice each
    other's commits through ``PRAGMA data_version``. SIGTERM to the first process
    stops the others after it.

    **Readiness.** The first process is the one systemd started (``MAINPID``; the unit
    says ``NotifyAccess=main``), so it alone talks to systemd: each other worker writes a
    byte to a pipe once its listeners are served, and the first process writes the
    address file and sends ``READY=1`` only when it is serving and every worker has
    reported. A worker that dies before reporting closes its end of the pipe: the server
    then stops with an error instead of running short of a worker. ``STOPPING=1`` goes
    out when the first process begins to shut down.
    """
    count = workers or config.server.workers
    sockets = listening_sockets(config, listen)
    children: list[int] = []
    # Several workers count into one directory of value files, made for this run and
    # removed after it (nixd.server.metrics); one worker counts in memory.
    values = enable_multiprocess() if count > 1 and config.server.metrics != "off" else None
    if values is not None:
        log.info("metrics of %d workers in %s", count, values)
    ready_r, ready_w = os.pipe()
    try:
        for _ in range(count - 1):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                code = 0
                try:
                    os.close(ready_r)
                    trio.run(
                        partial(
                            serve,
                            config,
                            sockets=sockets,
                            write_address=False,
                            collect_garbage=False,
                            ready=partial(_report_ready, ready_w),
                        )
                    )
                except BaseException:
                    log.exception("worker %d failed", os.getpid())
                    code = 1
                os._exit(code)
            children.append(pid)
        os.close(ready_w)
        ready_w = -1
        trio.run(
            partial(
                serve,
                config,
                sockets=sockets,
                ready=partial(_await_workers, ready_r, count - 1),
                notify=True,
            )
        )
    finally:
        for fd in (ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if values is not None:
            disable_multiprocess(values)


def listening_sockets(config: ServerConfig, listen: Sequence[str] | None) -> list[stdsocket.socket]:
    """What ``serve`` accepts on: systemd's sockets (``LISTEN_FDS``), else the config's.

    Sockets passed by socket activation (every name: the shipped ``nixd-server.socket``
    passes one, a drop-in may add more) take the place of ``server.listen``, whose
    addresses would otherwise collide with them; ``--listen`` addresses are bound as
    well. A passed descriptor that is not a listening stream socket is a config error.
    """
    activated = [sock for group in systemd.listen_fds().values() for sock in group]
    for sock in activated:
        if sock.type != stdsocket.SOCK_STREAM or not sock.getsockopt(
            stdsocket.SOL_SOCKET, stdsocket.SO_ACCEPTCONN
        ):
            raise ConfigError(
                f"socket activation passed fd {sock.fileno()}, which is not a listening "
                "stream socket (ListenStream= in the .socket unit)"
            )
    if activated:
        log.info("socket activation: serving %d socket(s) passed by systemd", len(activated))
        return activated + bind_sockets(list(listen or ()))
    return bind_sockets(list(listen or config.server.listen))


async def _report_ready(fd: int, urls: Sequence[str]) -> None:
    """A worker's listeners are served: one byte to the first process, then the pipe closes."""
    del urls
    os.write(fd, b".")
    os.close(fd)


async def _await_workers(fd: int, count: int, urls: Sequence[str]) -> None:
    """Wait for ``count`` workers' bytes; a worker that died first is a startup failure."""
    del urls
    stream = trio.lowlevel.FdStream(os.dup(fd))
    async with stream:
        seen = 0
        while seen < count:
            chunk = await stream.receive_some(count - seen)
            if not chunk:
                raise NixdError(
                    f"{count - seen} of {count} other worker(s) exited before serving; "
                    "see their errors above"
                )
            seen += len(chunk)


async def serve(
    config: ServerConfig,
    *,
    listen: Sequence[str] | None = None,
    sockets: Sequence[stdsocket.socket] | None = None,
    write_address: bool = True,
    ready: Callable[[list[str]], Awaitable[None]] | None = None,
    notify: bool = False,
    collect_garbage: bool = True,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation); ``started`` gets the bound URLs.

    Binds ``listen`` (default ``server.listen``) unless bound ``sockets`` are given.
    Once every listener is served, ``ready`` is awaited (:func:`run` waits there for the
    other workers), then the address file is written, systemd is told ``READY=1`` (with
    ``notify``) and ``started`` is called; ``notify`` also sends ``STOPPING=1`` when the
    shutdown begins. Every process flushes its noted read times (``[gc] access_flush``);
    with ``collect_garbage`` (the first process of :func:`run`) it also runs the periodic
    GC (``[gc] interval``, :func:`nixd.server.storage.gc.serve_gc`).
    """
    own = sockets is None
    if sockets is None:
        sockets = bind_sockets(list(listen or config.server.listen))
    listeners = [
        trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup())) for sock in sockets
    ]
    if own:  # the duplicates are the listeners now; given sockets stay the caller's
        for sock in sockets:
            sock.close()
    with open_services(config) as services:
        limits = dataclasses.replace(
            LIMITS,
            max_body_bytes=max(LIMITS.max_body_bytes, config.storage.max_upload_bytes + (64 << 20)),
        )
        app: Any = CacheApp(services)
        if config.server.metrics != "off" or config.server.access_log:
            app = Observed(
                app, metrics=config.server.metrics != "off", access_log=config.server.access_log
            )
        front = HttpFront(app, graceful_timeout=config.server.graceful_timeout, limits=limits)
        async with trio.open_nursery() as nursery:
            services.durable_reads = config.audit.durable_reads
            services.background = nursery
            nursery.start_soon(_watch_signals, front, notify)
            nursery.start_soon(services.policy.watch)
            nursery.start_soon(_housekeeping, config, services, collect_garbage)
            if services.mirror is not None:  # closure completion; the first process resumes
                nursery.start_soon(partial(services.mirror.run, resume=collect_garbage))
            urls = await nursery.start(front.serve, listeners)
            if ready is not None:
                await ready(urls)
            log.info("serving on %s (pid %d)", ", ".join(urls), os.getpid())
            if write_address and config.address_path is not None:
                _write_address(config.address_path, urls)
            if notify:
                systemd.notify("READY=1", f"STATUS=serving on {', '.join(urls)}")
            task_status.started(urls)
            await front.finished.wait()
            nursery.cancel_scope.cancel()


async def _housekeeping(config: ServerConfig, services: Services, collect_garbage: bool) -> None:
    """Read times to the database, and (``collect_garbage``) the periodic GC, audited."""

    async def audit(report: GcReport) -> None:
        await services.audit.arecord(
            {
                "request_id": f"gc-{int(time.time() * 1000)}",
                "identity": "system:nixd-server",
                "action": "admin:gc",
                "resource": "*",
                "decision": "allow",
                "rule": "gc-interval",
                "source": "local",
                "paths": report.paths_removed,
                "nars": len(report.nars),
                "orphans": len(report.orphan_blobs),
                "missing": len(report.missing_blobs),
                "bytes": report.bytes_freed,
            }
        )

    await serve_gc(
        services.store,
        lambda: Store(open_db(config.database), services.store.blobs),  # boto3 is thread-safe
        config.retention,
        interval=config.gc.interval if collect_garbage else 0.0,
        grace=config.gc.grace,
        access_flush=config.gc.access_flush,
        audit=audit,
    )


def bind_sockets(binds: Sequence[str]) -> list[stdsocket.socket]:
    """Listening sockets for ``host:port``, ``[v6]:port`` or ``fd://N`` (from systemd)."""
    return [_bind(b) for b in binds]


def _bind(bind: str) -> stdsocket.socket:
    if bind.startswith("fd://"):
        try:
            return stdsocket.socket(fileno=int(bind[5:]))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"listen {bind!r}: not a usable socket: {exc}") from exc
    host, sep, port_text = bind.rpartition(":")
    try:
        port = parse_uint(port_text, limit=65535, what="port")
    except FormatError:
        port = -1
    if not sep or port < 0:
        raise ConfigError(f"listen {bind!r}: expected host:port, [v6]:port or fd://N")
    host = host.strip("[]")
    try:
        infos = stdsocket.getaddrinfo(
            host or None, port, type=stdsocket.SOCK_STREAM, flags=stdsocket.AI_PASSIVE
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


class HttpFront:
    """HTTP/1.1 connections in (:mod:`nixd.http`), ASGI ``http`` scopes out."""

    def __init__(
        self, app: Any, *, graceful_timeout: float = 10.0, limits: Limits | None = None
    ) -> None:
        self.app = app
        self.graceful_timeout = graceful_timeout
        self.limits = limits or LIMITS
        self.stopping = False
        self.finished = trio.Event()
        self._shutdown = trio.Event()

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                server: HttpServer = await nursery.start(
                    partial(
                        serve_http,
                        listeners,
                        self.handle,
                        limits=self.limits,
                        shutdown=self._shutdown,
                        graceful_timeout=self.graceful_timeout,
                    )
                )
                task_status.started(server.urls)
        finally:
            self.finished.set()

    def shutdown(self) -> None:
        """Stop accepting; idle connections close now, busy ones after their response."""
        self.stopping = True
        self._shutdown.set()

    async def handle(self, request: Request, resp: Responder) -> None:
        """One request through the ASGI app; exceptions are the front's (it cuts or 500s)."""
        conn = request.connection
        raw_path = request.path
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.head.version.decode(),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": unquote_to_bytes(raw_path).decode("utf-8", "replace"),
            "raw_path": raw_path,
            "query_string": request.query,
            "root_path": "",
            "headers": request.head.fields,
            "client": conn.peer,
            "server": conn.local,
            "extensions": {ZEROCOPY: {}, PREPARED: {}},
        }
        response = _AsgiResponse(resp)

        async def receive() -> Message:
            try:
                chunk = await request.receive_body(BODY_CHUNK)
            except ClientDisconnected:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": chunk, "more_body": request.body_remaining > 0}

        await self.app(scope, receive, response.send)
        response.finish()


class _AsgiResponse:
    """ASGI send events onto a Responder: one head (sent with the first body), then body.

    ``http.response.zerocopysend`` (the ASGI zero-copy send extension, offered in every
    scope's ``extensions``) carries ``file`` (an ``int`` descriptor or an object with
    ``fileno()``), ``offset`` (default: 0; the spec's default is the file position, and
    this adapter never reads that), ``count`` (default: to the end of the file) and
    ``more_body``: the bytes go from the page cache to the socket with ``os.sendfile``
    (:meth:`~nixd.http.serve.Responder.send_file`), in blocks, each waiting for the socket
    to drain (backpressure); a client that goes away ends that request only. The file
    stays the app's to close.

    ``nixd.http.response.prepared`` (this front's own) carries ``status`` and ``data``, a
    whole response kept ready as bytes (status line, headers with ``Content-Length``,
    the body unless the request is HEAD), sent instead of start + body in one write
    (:meth:`~nixd.http.serve.Responder.send_prepared`, which adds ``connection: close``
    when the connection is to close). The cache app keeps its narinfo answers so.
    """

    __slots__ = ("_headers", "_resp", "_status")

    def __init__(self, resp: Responder) -> None:
        self._resp = resp
        self._status: int | None = None
        self._headers: list[tuple[bytes, bytes]] = []

    async def send(self, message: Message) -> None:
        kind = message["type"]
        resp = self._resp
        if kind == "http.response.start":
            if self._status is not None or resp.started:
                raise ResponseStateError("http.response.start sent twice")
            self._status = int(message["status"])
            self._headers = [(bytes(n), bytes(v)) for n, v in message.get("headers", ())]
        elif kind == "http.response.body":
            body = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            if not resp.started:
                if self._status is None:
                    raise ResponseStateError("http.response.body before http.response.start")
                await resp.start(self._status, self._headers, body)
            elif body:
                await resp.send(body)
            if not more:
                await resp.end()
        elif kind == ZEROCOPY:
            await self._zerocopy(message)
        elif kind == PREPARED:
            if self._status is not None or resp.started:
                raise ResponseStateError(f"{PREPARED} after the response started")
            self._status = int(message["status"])
            await resp.send_prepared(self._status, bytes(message["data"]))

    async def _zerocopy(self, message: Message) -> None:
        resp = self._resp
        file = message["file"]
        fd = file if isinstance(file, int) else int(file.fileno())
        offset = int(message.get("offset") or 0)
        count = message.get("count")
        if count is None:
            count = os.fstat(fd).st_size - offset
        count = int(count)
        if offset < 0 or count < 0:
            raise ResponseStateError(f"zerocopysend of {count} bytes at offset {offset}")
        if not resp.started:
            if self._status is None:
                raise ResponseStateError("http.response.zerocopysend before http.response.start")
            await resp.start(self._status, self._headers)
        await resp.send_file(fd, offset, count)
        if not message.get("more_body", False):
            await resp.end()

    def finish(self) -> None:
        """After the app returned: a started head without its end leaves the body short."""
        if self._status is not None and not self._resp.started:
            raise ResponseStateError("the app sent http.response.start but no body")


async def _watch_signals(front: HttpFront, notify: bool) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # Kept open until the server is done: a second SIGTERM (the first worker passes
        # systemd's on to the others, which may have had one already) must not kill a
        # worker that is still letting its downloads finish.
        async for signum in signals:
            if front.stopping:
                continue
            log.info("received %s: shutting down", signal.Signals(signum).name)
            if notify:
                systemd.notify("STOPPING=1", "STATUS=shutting down")
            front.shutdown()


def _write_address(path: Path, urls: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{u}\n" for u in urls))
    os.replace(tmp, path)
