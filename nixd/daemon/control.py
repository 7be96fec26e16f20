"""The control socket: a small HTTP+JSON API on a Unix socket, checked by peer credentials.

Routes::

    GET  /status    anyone            -> the status document (never a token)
    GET  /version   anyone            -> {"version": ...}
    GET  /login     root or group     -> {"allowed": true} (asked before a browser login)
    POST /login     root or group     {"method": "token", "token": ..., "server": ...}
    POST /logout    root or group
    POST /push      root or group     {"paths": [...], "to": "org/project"}  -> a push job
    POST /push/job  root or group     {"job": id}                            -> its progress
    GET  /push      root or group     -> the push jobs and the queue (nixd.daemon.push)

The socket is mode 0666 so that every local user can read the status; who may change the
login is decided here, per connection, from ``SO_PEERCRED`` (the kernel's record of the
connecting process's uid/gid, which the client cannot forge): uid 0, a primary gid equal to
the configured ``control_group``, or a user listed in that group. The server is plain h11
on a trio listener, so it is small, and the peer's socket is at hand.

Since every local user can connect, nothing a connection sends may cost more than that
connection (DESIGN.md, "Containment"):

- one request per connection, read under one deadline for the whole request
  (:data:`REQUEST_TIMEOUT`, not renewed by each read); heads and bodies of at most
  :data:`MAX_BODY` bytes;
- a body is decoded only on a route that takes one (``POST /login``), with
  :func:`nixd.bounds.load_json` (size and nesting depth bounded); a body sent to any other
  route is read off the socket and never looked at;
- at most :data:`MAX_PER_USER` connections per non-root uid and :data:`MAX_CONNECTIONS`
  for all non-root users together; root is never turned away, so idle connections of
  other users cannot lock root out of ``login``/``status`` (where the kernel gives no
  peer credentials, every peer counts as one unknown user);
- whatever fails while serving a connection is logged and ends that connection only.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
import trio

from nixd.bounds import load_json, parse_uint
from nixd.daemon.files import make_dirs
from nixd.errors import (
    AuthError,
    ConfigError,
    FormatError,
    LoginFailed,
    NixdError,
    UpstreamError,
)

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
"""Largest request head, and largest body, accepted."""
MAX_DEPTH = 16
"""Deepest nesting of a JSON body (a login request is two levels deep)."""
REQUEST_TIMEOUT = 10.0
"""Seconds for the whole request to arrive, and for the answer to be taken."""
#: how long a login may take (it contacts the server)
HANDLER_TIMEOUT = 120.0
MAX_PER_USER = 8
"""Connections open at once for one non-root uid (the CLI needs one)."""
MAX_CONNECTIONS = 64
"""Connections open at once for all non-root users together."""


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer | None:
    """The connecting process's pid/uid/gid (Linux ``SO_PEERCRED``); None where unsupported."""
    if sys.platform != "linux":
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def may_administer(peer: Peer | None, group: str | None) -> bool:
    """Root, or a member (primary or supplementary) of ``group``."""
    if peer is None:
        return False
    if peer.uid == 0:
        return True
    if group is None:
        return False
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False
    if peer.gid == entry.gr_gid:
        return True
    try:
        user = pwd.getpwuid(peer.uid)
    except KeyError:
        return False
    return user.pw_gid == entry.gr_gid or user.pw_name in entry.gr_mem


class ApiError(NixdError):
    """An answer other than 200, with a status and a code for the client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_answer(exc: Exception) -> tuple[int, dict[str, Any]]:
    """The one place that decides what a client of the control socket sees for an error."""
    if isinstance(exc, ApiError):
        return exc.status, {"error": exc.code, "message": exc.message}
    if isinstance(exc, LoginFailed):
        return 403, {"error": "login_failed", "message": str(exc)}
    if isinstance(exc, AuthError):
        return 401, {"error": "auth", "message": str(exc)}
    if isinstance(exc, UpstreamError):
        return 502, {"error": "upstream", "message": str(exc)}
    if isinstance(exc, ConfigError):
        return 500, {"error": "config", "message": str(exc)}
    if isinstance(exc, NixdError):
        return 500, {"error": "nixd", "message": str(exc)}
    log.error("control request failed", exc_info=exc)
    return 500, {"error": "internal", "message": "internal error; see the daemon's log"}


Handler = Callable[[Peer | None, Any], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler
    privileged: bool
    takes_body: bool = False
    """Only then is the body decoded (as bounded JSON); otherwise it is ignored."""


class ControlServer:
    """Routes requests to handlers; ``group`` may change on config reload."""

    def __init__(self, routes: dict[tuple[str, str], Route], group: str | None) -> None:
        self.routes = routes
        self.group = group
        self._per_user: Counter[int | None] = Counter()
        self._others = 0

    async def dispatch(
        self, peer: Peer | None, method: str, path: str, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        route = self.routes.get((method, path))
        if route is None:
            if any(p == path for _m, p in self.routes):
                return 405, {"error": "method_not_allowed", "message": f"{method} {path}"}
            return 404, {"error": "not_found", "message": f"no such endpoint {path[:200]}"}
        if route.privileged and not may_administer(peer, self.group):
            who = "unknown user" if peer is None else f"uid {peer.uid}"
            need = "root" + (f" or a member of group {self.group!r}" if self.group else "")
            log.warning("refused %s %s from %s", method, path, who)
            return 403, {"error": "forbidden", "message": f"{path} needs {need} ({who})"}
        data: Any = None
        if route.takes_body:
            try:
                data = (
                    load_json(body, max_bytes=MAX_BODY, max_depth=MAX_DEPTH, what="the body")
                    if body
                    else {}
                )
            except FormatError as exc:
                return 400, {"error": "bad_request", "message": str(exc)}
        try:
            with trio.fail_after(HANDLER_TIMEOUT):
                return 200, await route.handler(peer, data)
        except trio.TooSlowError:
            return 504, {"error": "timeout", "message": f"{path} took too long"}
        except Exception as exc:
            return error_answer(exc)

    def _admit(self, peer: Peer | None) -> str | None:
        """Why this peer may not open another connection now; None if it may."""
        if peer is not None and peer.uid == 0:
            return None
        uid = None if peer is None else peer.uid
        if self._per_user[uid] >= MAX_PER_USER:
            return f"uid {uid} has {MAX_PER_USER} connections open already"
        if self._others >= MAX_CONNECTIONS:
            return f"{MAX_CONNECTIONS} connections of other users are open already"
        return None

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one request on one connection; nothing it does escapes it."""
        try:
            try:
                peer = peer_credentials(stream.socket)  # type: ignore[arg-type]
            except OSError:
                peer = None
            refused = self._admit(peer)
            if refused is not None:
                log.warning("control socket: turned a connection away: %s", refused)
                conn = h11.Connection(h11.SERVER)
                with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
                    await _send(stream, conn, 503, {"error": "busy", "message": refused})
                return
            uid = None if peer is None else peer.uid
            counted = uid != 0
            if counted:
                self._per_user[uid] += 1
                self._others += 1
            try:
                await self._serve(stream, peer)
            finally:
                if counted:
                    self._per_user[uid] -= 1
                    if not self._per_user[uid]:
                        del self._per_user[uid]
                    self._others -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass
        except Exception as exc:  # containment: this connection ends, the daemon does not
            log.error("control connection failed", exc_info=exc)
        finally:
            await stream.aclose()

    async def _serve(self, stream: trio.SocketStream, peer: Peer | None) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request, body = await _read_request(stream, conn)
            target = request.target.decode("ascii", "replace").split("?")[0]
            method = request.method.decode("ascii", "replace")
            status, answer = await self.dispatch(peer, method, target, body)
            with trio.fail_after(REQUEST_TIMEOUT):
                await _send(stream, conn, status, answer)
        except (h11.RemoteProtocolError, _TooLarge) as exc:
            status = 413 if isinstance(exc, _TooLarge) else 400
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with (
                    trio.move_on_after(1),
                    contextlib.suppress(trio.BrokenResourceError, h11.LocalProtocolError),
                ):
                    await _send(stream, conn, status, {"error": "bad_request", "message": str(exc)})
                    await _linger(stream)


async def _linger(stream: trio.SocketStream) -> None:
    """Close our side and drop what the peer still sends, so the answer is not lost.

    Closing with unread bytes makes the kernel reset the connection, which can destroy
    the answer before the peer reads it. Bounded: at most 1 MiB, under the caller's
    deadline.
    """
    stream.socket.shutdown(socket.SHUT_WR)
    drained = 0
    while drained < (1 << 20) and (data := await stream.receive_some(65536)):
        drained += len(data)


class _TooLarge(Exception):
    pass


def _over(length: bytes, limit: int) -> bool:
    try:
        return parse_uint(length, limit=1 << 64, what="Content-Length") > limit
    except FormatError:
        return True


async def _read_request(
    stream: trio.SocketStream, conn: h11.Connection
) -> tuple[h11.Request, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    received = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            received += len(data)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            # h11 bounds only a head still incomplete: one that needed more than
            # MAX_BODY bytes to arrive is refused however it was split into reads.
            if received > MAX_BODY:
                raise _TooLarge(f"request head larger than {MAX_BODY} bytes")
            request = event
            length = dict(event.headers).get(b"content-length")
            if length is not None and _over(length, MAX_BODY):
                raise _TooLarge(f"body larger than {MAX_BODY} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _TooLarge(f"body larger than {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("client went away")


async def _send(
    stream: trio.SocketStream, conn: h11.Connection, status: int, answer: dict[str, Any]
) -> None:
    payload = json.dumps(answer, indent=1).encode() + b"\n"
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        ("Connection", "close"),
    ]
    out = conn.send(h11.Response(status_code=status, headers=headers))
    out = (out or b"") + (conn.send(h11.Data(data=payload)) or b"")
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


async def open_control_listener(path: str) -> trio.SocketListener:
    """Bind the control socket at ``path`` (replacing a stale one), mode 0666."""
    directory = os.path.dirname(path)
    if directory:
        make_dirs(directory, 0o755)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await sock.bind(path)
        os.chmod(path, 0o666)  # noqa: S103 - access is checked per request (SO_PEERCRED)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on the control socket {path}: {exc.strerror}") from exc
    return trio.SocketListener(sock)


async def serve_control(
    server: ControlServer,
    listener: trio.SocketListener,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API on ``listener`` until cancelled."""
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, [listener])
        task_status.started()
