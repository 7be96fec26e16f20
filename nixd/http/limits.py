"""One value holding every bound of an HTTP/1.1 front (hypercorn's ``Config`` idea).

A front is given a :class:`Limits`; nothing in :mod:`nixd.http` has another number of
its own. The defaults suit a front on the open network that serves small requests; a
room with other needs (the proxy on loopback, the server's uploads) passes its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one peer can make a front hold: bytes, connections and time."""

    max_head_bytes: int = 64 * 1024
    """Request line + headers + the empty line. Nix and curl send ~200 bytes, a browser
    with cookies a few KiB, a bearer JWT ~1-2 KiB; 64 KiB is nginx's order (4 x 8 KiB
    buffers, 16 KiB lines) with room to spare. 431 beyond."""
    max_body_bytes: int = 1 << 20
    """Largest request ``Content-Length``; 413 beyond. A room that takes uploads raises
    it to its own upload limit, and the handler still bounds what it buffers."""
    max_header_count: int = 100
    """Header lines per head (431 beyond); real clients send 5-25."""
    max_connections: int = 512
    """Open connections in all. Each costs a file descriptor and a task; 512 leaves
    room under the common 1024-descriptor soft limit for the store and the database."""
    max_connections_per_peer: int = 128
    """Open connections from one peer address, so one host cannot take all of
    ``max_connections``. On loopback every local user shares 127.0.0.1: that case is
    covered by evicting idle connections instead (see :mod:`nixd.http.serve`)."""
    head_timeout: float = 10.0
    """Seconds for a WHOLE request head, from its first byte (from the accept for the
    first request): a deadline, not an idle timeout, so a client dribbling one byte at a
    time cannot hold a connection longer than this. A head is a few hundred bytes;
    10 s is generous even on a congested link."""
    body_idle_timeout: float = 30.0
    """Seconds without a byte of a request body, and without progress writing a
    response, before the connection is cut. Idle, not total: uploads may take hours."""
    keepalive_timeout: float = 75.0
    """Seconds an idle kept-alive connection waits for the next request (nginx's
    default; longer than the 60 s curl keeps idle connections, so the client closes
    first and never races a reused connection against our close)."""
    max_requests_per_connection: int = 10_000
    """Requests served on one connection before it is closed (``connection: close`` on
    the last). Bounds how long per-connection state (a remembered credential) lives;
    high enough that a closure of thousands of paths (~4 requests each) rarely
    reconnects."""
    linger: float = 1.0
    """After a refusal (4xx/5xx and close), seconds spent reading and dropping what the
    peer still sends, so the close is not a reset that destroys the answer."""

    def __post_init__(self) -> None:
        for name in (
            "max_head_bytes",
            "max_body_bytes",
            "max_header_count",
            "max_connections",
            "max_connections_per_peer",
            "max_requests_per_connection",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1")
        for name in ("head_timeout", "body_idle_timeout", "keepalive_timeout", "linger"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive")
