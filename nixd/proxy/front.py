"""The proxy's HTTP/1.1 front: nixd.http's server with the proxy's limits.

Nix speaks plain HTTP/1.1 with keep-alive to a local substituter and needs nothing else,
so the front is :func:`nixd.http.serve.serve_http` (a lean loop on trio sockets, strict
parsing by :mod:`nixd.http.request`) rather than an ASGI stack. What the proxy relies on,
measured when it was designed:

- a warm narinfo answer is one read and one write of bytes kept ready
  (:meth:`~nixd.http.serve.Responder.send_prepared`), with no cancel-scope deadline
  moved (a sweeper keeps them, :mod:`nixd.http.serve`). Measured with ``wrk -t2 -c32``
  keep-alive on one warm narinfo, the proxy in its own process, 5 interleaved rounds
  on the 2-core machine under a load of ~6 from other work: 25.7 CPU-µs per request at
  19.8k req/s (before the read and deadline changes 40.4 µs at 12.9k req/s; nginx
  serving the same file 13.8 µs at 31.8k req/s). About half of the proxy's time is the
  ``write`` syscall itself (on loopback it carries the receiver's TCP work); most of
  the rest is trio's wait for the next request (``epoll_ctl``, scheduling). A general
  parser (h11, ~121 µs per request in a server loop) would more than triple it. The
  strict reader costs ~5.6 µs a head (the previous hand parser ~4.9 µs).
  Measured end to end on the 2-core machine (``wrk -t1 -c8`` on ``/nix-cache-info``,
  best of 5 interleaved rounds, other work running): the previous front 29.7k req/s at
  25.5 µs of proxy CPU per request, this one 26.6k req/s at 24.4 µs: the same within
  the noise;
- NAR bodies go from a file to the socket with ``os.sendfile``
  (:meth:`~nixd.http.serve.Responder.send_file`): a NAR byte is never copied through
  Python on its way to Nix;
- :meth:`~nixd.http.serve.Responder.abort` cuts a connection mid-body: with a
  ``Content-Length`` already sent, Nix sees a failed (partial) transfer. That is how
  verification failures reach Nix.

The limits are the proxy's (:data:`LIMITS`): heads are small (Nix sends ~200 bytes),
bodies are never wanted (GET/HEAD only; a small one is read and dropped), and every
local user comes from 127.0.0.1, so the connection cap relies on evicting idle
connections (see :mod:`nixd.http.serve`) rather than on a per-peer count. A drain has
no timeout of its own: the daemon bounds it with its ``shutdown_grace``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import trio

from nixd.http.limits import Limits
from nixd.http.serve import (
    Abort,
    Connection,
    Handler,
    HttpServer,
    Request,
    Responder,
    serve_http,
)

__all__ = [
    "LIMITS",
    "Abort",
    "Connection",
    "Handler",
    "HttpServer",
    "Request",
    "Responder",
    "serve_front",
]

LIMITS = Limits(
    max_head_bytes=16384,
    max_body_bytes=1 << 16,
    max_connections=512,
    max_connections_per_peer=512,  # all local users share 127.0.0.1; eviction protects
    keepalive_timeout=75.0,
)
"""The proxy's bounds: heads and bodies far above what Nix sends; see the module doc."""


async def serve_front(
    listeners: Sequence[trio.SocketListener],
    handler: Handler,
    shutdown: trio.Event,
    *,
    limits: Limits | None = None,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the proxy's requests until ``shutdown`` is set and in-flight requests end."""
    await serve_http(
        listeners,
        handler,
        limits=limits or LIMITS,
        shutdown=shutdown,
        graceful_timeout=math.inf,
        task_status=task_status,
    )
