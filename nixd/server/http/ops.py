"""What an operator asks of the server: is it alive, is it ready, what has it done.

``/healthz``
    Live: 200 ``{"status": "ok"}`` whenever the process answers HTTP. Nothing else is
    asked, so a slow disk never gets a healthy server restarted.
``/readyz``
    Ready: the storage answers (:meth:`~nixd.server.storage.store.Store.check`: the
    database a trivial query, the blob storage its own check: a probe file in a
    directory, a HEAD of a bucket). 200 ``{"status":
    "ready"}``, else 503 ``{"status": "unready", "failed": ["blobs"]}`` — the parts only,
    never a path or an error text (those are logged at WARNING). A check runs in a worker
    thread (a remote backend may block) and its result is kept for a second, so a flood
    of probes costs one check a second per worker.
``/metrics``
    Prometheus text format (:mod:`nixd.server.metrics`), for whom ``[server] metrics``
    allows: ``"loopback"`` (the default) answers only a peer on a loopback address whose
    request carries no ``Forwarded``, ``X-Forwarded-For`` or ``X-Real-IP`` header (a
    reverse proxy on the same host is a loopback peer too, and usually adds one of those;
    one that adds none must not forward ``/metrics``); ``"public"`` answers anyone;
    ``"off"`` nobody, and counts nothing. A refused scrape is a 404, like any unknown
    path. The metrics hold no slice, path or identity names (route templates only), but
    they do tell traffic volumes, which is why they are not public by default.

None of the three needs a credential, and none writes an audit line: probes every few
seconds would drown the log that matters.

**Per request** (:class:`Observed`, around the whole app): the route template
(:func:`route_of`), counts, latency and bytes go to the metrics, and one access log line
goes to the logger ``nixd.server.http.access`` (``[server] access_log``)::

    a1b2c3000001 GET /cache/acme/app/0123….narinfo 200 412B 0.4ms token 127.0.0.1

request id (the one 5xx bodies and the audit log show), method, the path as sent without
its query (a token in a query string never reaches the log; non-printable bytes are
``\\xNN``; at most 256 bytes, then ``…``), status (``cut`` after it when the connection
was cut mid-answer), body bytes sent, duration, the identity kind (``-`` before one was
looked at), the peer address. No header is ever logged, so neither is Authorization.

Measured with ``bench/server_bench.py`` (narinfo hit, 1 worker, durable audit, wrk -c32,
2,000 paths; CPU-µs per request, interleaved runs): both off 86 and 88, metrics on 84,
metrics and access log on 97 and 107. The counting (children kept per label set, no
label lookup) is within the noise; the log line is ~7 µs of :mod:`logging` in
isolation (record, format, write), which is why it can be turned off.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import sqlite3
import time
from typing import Any

import trio

from nixd.server import metrics as server_metrics
from nixd.server.asgi import Message, Receive, Scope, Send
from nixd.server.errors import MethodNotAllowed, NotFound, StorageFull, StorageUnavailable
from nixd.server.storage.db import DatabaseError
from nixd.server.storage.store import Store, StoreError

log = logging.getLogger(__name__)
access_log = logging.getLogger("nixd.server.http.access")

PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
METRICS_ACCESS = ("loopback", "public", "off")
READY_TTL = 1.0
"""Seconds a readiness result is reused."""
MAX_LOGGED_PATH = 256
ZEROCOPY = "http.response.zerocopysend"
PREPARED = "nixd.http.response.prepared"
_FORWARDING = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip"})
_API_ROUTES = frozenset(
    {
        "/api/v1/token/exchange",
        "/api/v1/token/status",
        "/api/v1/cache/keys",
        "/.well-known/jwks.json",
    }
)
_VIEW_FILES = frozenset({"nar", "log", "realisations", "nix-cache-info"})
_UNSAFE = re.compile(rb"[^\x21-\x5b\x5d-\x7e]")
"""Bytes an access log line shows escaped: controls, space, backslash, non-ASCII."""


def route_of(path: str) -> tuple[str, str | None]:
    """The route template of a request path, and the kind of file it names, if any.

    Mirrors the dispatch of :class:`~nixd.server.http.app.CacheApp`; every answer is one
    of a few dozen fixed strings, whatever the path (see :mod:`nixd.server.metrics`).
    """
    if path.startswith("/cache/"):
        parts = path[7:].split("/")
        if parts[0] in _VIEW_FILES or len(parts) == 1:
            prefix, rest = "/cache/", parts
        elif len(parts) == 2 or parts[1] in _VIEW_FILES:
            prefix, rest = "/cache/{org}/", parts[1:]
        else:
            prefix, rest = "/cache/{org}/{project}/", parts[2:]
        first = rest[0]
        if len(rest) == 1:
            if first == "nix-cache-info":
                return prefix + "nix-cache-info", None
            if first.endswith(".narinfo"):
                return prefix + "*.narinfo", "narinfo"
            if first.endswith(".ls"):
                return prefix + "*.ls", None
        elif first == "nar":
            return prefix + "nar/*", "nar"
        elif first == "log":
            return prefix + "log/*", "log"
        elif first == "realisations":
            return prefix + "realisations/*", None
        return prefix + "other", None
    if path in _API_ROUTES or path in PATHS:
        return path, None
    if path.startswith("/api/v1/device/"):
        return "/api/v1/device/*", None
    if path == "/device" or path.startswith("/device/"):
        return "/device/*", None
    return "other", None


def shown_path(raw: bytes) -> str:
    """A request path as an access log may show it: bounded, printable, one line."""
    cut = raw[:MAX_LOGGED_PATH]
    text = _UNSAFE.sub(lambda m: b"\\x%02x" % m[0][0], cut).decode("ascii")
    return text + "…" if len(raw) > MAX_LOGGED_PATH else text


def storage_error(exc: BaseException) -> tuple[str, str] | None:
    """``(backend, error)`` of a request's storage failure, for the metrics; else None."""
    if isinstance(exc, StorageFull):
        return "blobs", "full"
    if isinstance(exc, StorageUnavailable):
        return "blobs", "unavailable"
    if isinstance(exc, DatabaseError | sqlite3.Error):
        return "database", "failed"
    if isinstance(exc, StoreError | OSError):
        return "blobs", "failed"
    return None


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class OpsRoutes:
    """``/healthz``, ``/readyz`` and ``/metrics`` (dispatched by the app's route table)."""

    def __init__(self, store: Store, *, metrics: str = "loopback") -> None:
        if metrics not in METRICS_ACCESS:
            raise ValueError(f"metrics access {metrics!r}")
        self.store = store
        self.metrics = metrics
        self._ready: tuple[float, list[str]] | None = None
        self._checking = trio.Lock()

    async def handle(self, scope: Scope, send: Send, path: str) -> None:
        method = scope["method"]
        if path == "/metrics" and not self._may_scrape(scope):
            raise NotFound()
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{method} is not supported on {path}")
        head = method == "HEAD"
        if path == "/healthz":
            await _answer(send, 200, _JSON, b'{"status": "ok"}', head)
        elif path == "/readyz":
            failed = await self.readiness()
            if failed:
                body = json.dumps({"status": "unready", "failed": failed}).encode()
                await _answer(send, 503, _JSON, body, head)
            else:
                await _answer(send, 200, _JSON, b'{"status": "ready"}', head)
        else:
            body = await trio.to_thread.run_sync(server_metrics.exposition)
            await _answer(send, 200, server_metrics.CONTENT_TYPE.encode(), body, head)

    async def readiness(self) -> list[str]:
        """The storage parts that fail their check (kept for :data:`READY_TTL` seconds)."""
        async with self._checking:  # one check at a time; the others reuse its result
            now = time.monotonic()
            if self._ready is not None and now - self._ready[0] < READY_TTL:
                return self._ready[1]
            failed = await trio.to_thread.run_sync(self.store.check)
            self._ready = (time.monotonic(), failed)
        if failed and self.metrics != "off":
            counter = server_metrics.metrics().storage_errors
            for backend in failed:
                counter.labels(backend, "unready").inc()
        return failed

    def _may_scrape(self, scope: Scope) -> bool:
        if self.metrics == "public":
            return True
        if self.metrics == "off":
            return False
        client = scope.get("client")
        if not client or not is_loopback(str(client[0])):
            return False
        return not any(name in _FORWARDING for name, _ in scope["headers"])


_JSON = b"application/json"


async def _answer(send: Send, status: int, kind: bytes, body: bytes, head: bool) -> None:
    headers = [
        (b"content-type", kind),
        (b"cache-control", b"no-store"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


class Observed:
    """The app with metrics and an access log line per request around it.

    Costs a clock read, a route template and a few dict lookups per request: the
    labelled children of every metric are kept per (route, method, status), so the hot
    path never goes through prometheus_client's label lookup.
    """

    def __init__(self, app: Any, *, metrics: bool = True, access_log: bool = True) -> None:
        self.app = app
        self.count = metrics
        self.log_access = access_log
        self._m = server_metrics.metrics() if metrics else None
        self._children: dict[tuple[str, str, int], tuple[Any, ...]] = {}
        self._kinds: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = [0, 0, 0]  # status, body bytes sent, body bytes received

        async def observed_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.body":
                state[1] += len(message.get("body", b""))
            elif kind == "http.response.start":
                state[0] = int(message["status"])
            elif kind == ZEROCOPY:
                state[1] += int(message.get("count") or 0)
            elif kind == PREPARED:
                state[0] = int(message["status"])
                data = message["data"]
                state[1] += max(0, len(data) - data.find(b"\r\n\r\n") - 4)
            await send(message)

        async def observed_receive() -> Message:
            message = await receive()
            body = message.get("body")
            if body:
                state[2] += len(body)
            return message

        cut = True
        try:
            await self.app(scope, observed_receive, observed_send)
            cut = False
        finally:
            self._record(scope, state, time.perf_counter() - start, cut)

    def _record(self, scope: Scope, state: list[int], elapsed: float, cut: bool) -> None:
        status, sent, received = state
        if status == 0:
            status = 500  # the front answers an app that failed before answering
        method = scope["method"]
        route, kind = route_of(scope["path"])
        if self._m is not None:
            self._count(
                route, kind, method, status=status, sent=sent, received=received, elapsed=elapsed
            )
        if self.log_access:
            ctx = scope.get("nixd.ctx")
            identity = getattr(ctx, "identity", None)
            client = scope.get("client")
            access_log.info(
                "%s %s %s %d%s %dB %.1fms %s %s",
                getattr(ctx, "request_id", "-"),
                method[:16],
                shown_path(scope.get("raw_path") or scope["path"].encode("utf-8", "replace")),
                status,
                " cut" if cut else "",
                sent,
                elapsed * 1000,
                identity.kind if identity is not None else "-",
                client[0] if client else "-",
            )

    def _count(
        self,
        route: str,
        kind: str | None,
        method: str,
        *,
        status: int,
        sent: int,
        received: int,
        elapsed: float,
    ) -> None:
        m = self._m
        assert m is not None
        if method not in server_metrics.METHODS:
            method = "other"
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                m.requests.labels(route, method, str(status)),
                m.duration.labels(route),
                m.sent.labels(route),
                m.received.labels(route),
            )
        requests, duration, sent_bytes, received_bytes = children
        requests.inc()
        duration.observe(elapsed)
        if sent:
            sent_bytes.inc(sent)
        if received:
            received_bytes.inc(received)
        if kind is not None and 200 <= status < 300:
            if method == "PUT":
                self._kind("up", kind).inc()
            elif method == "GET":
                self._kind("down", kind).inc()

    def _kind(self, direction: str, kind: str) -> Any:
        key = (direction, kind)
        child = self._kinds.get(key)
        if child is None:
            assert self._m is not None
            family = self._m.uploads if direction == "up" else self._m.downloads
            child = self._kinds[key] = family.labels(kind)
        return child


def count_storage_error(enabled: bool, exc: BaseException) -> None:
    """Count a request's storage failure (called where the app maps errors to answers)."""
    if not enabled:
        return
    which = storage_error(exc)
    if which is not None:
        server_metrics.metrics().storage_errors.labels(*which).inc()
