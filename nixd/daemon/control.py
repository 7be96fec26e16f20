"""The control socket: a small HTTP+JSON API on a Unix socket, checked by peer credentials.

Routes::

    GET  /status    anyone            -> the status document (never a token)
    GET  /version   anyone            -> {"version": ...}
    POST /login     root or group     {"method": "token", "token": ..., "server": ...}
    POST /logout    root or group

The socket is mode 0666 so that every local user can read the status; who may change the
login is decided here, per connection, from ``SO_PEERCRED`` (the kernel's record of the
connecting process's uid/gid, which the client cannot forge): uid 0, a primary gid equal to
the configured ``control_group``, or a user listed in that group. One request per
connection, bodies of at most 64 KiB; the server is plain h11 on a trio listener, so it is
small, and the peer's socket is at hand.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
import trio

from nixd.errors import AuthError, ConfigError, LoginFailed, NixdError, UpstreamError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 30.0
#: how long a login may take (it contacts the server)
HANDLER_TIMEOUT = 120.0


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


class ControlServer:
    """Routes requests to handlers; ``group`` may change on config reload."""

    def __init__(self, routes: dict[tuple[str, str], Route], group: str | None) -> None:
        self.routes = routes
        self.group = group

    async def dispatch(
        self, peer: Peer | None, method: str, path: str, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        route = self.routes.get((method, path))
        if route is None:
            if any(p == path for _m, p in self.routes):
                return 405, {"error": "method_not_allowed", "message": f"{method} {path}"}
            return 404, {"error": "not_found", "message": f"no such endpoint {path}"}
        if route.privileged and not may_administer(peer, self.group):
            who = "unknown user" if peer is None else f"uid {peer.uid}"
            need = "root" + (f" or a member of group {self.group!r}" if self.group else "")
            log.warning("refused %s %s from %s", method, path, who)
            return 403, {"error": "forbidden", "message": f"{path} needs {need} ({who})"}
        try:
            data: Any = json.loads(body) if body else {}
        except ValueError:
            return 400, {"error": "bad_request", "message": "the body is not JSON"}
        try:
            with trio.fail_after(HANDLER_TIMEOUT):
                return 200, await route.handler(peer, data)
        except trio.TooSlowError:
            return 504, {"error": "timeout", "message": f"{path} took too long"}
        except Exception as exc:
            return error_answer(exc)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one request on one connection."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
        try:
            peer = peer_credentials(stream.socket)  # type: ignore[arg-type]
            with trio.fail_after(REQUEST_TIMEOUT):
                request, body = await _read_request(stream, conn)
            status, answer = await self.dispatch(
                peer, request.method.decode(), request.target.decode().split("?")[0], body
            )
            await _send(stream, conn, status, answer)
        except (h11.RemoteProtocolError, _TooLarge) as exc:
            status = 413 if isinstance(exc, _TooLarge) else 400
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(trio.BrokenResourceError, h11.LocalProtocolError):
                    await _send(stream, conn, status, {"error": "bad_request", "message": str(exc)})
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass
        finally:
            await stream.aclose()


class _TooLarge(Exception):
    pass


async def _read_request(
    stream: trio.SocketStream, conn: h11.Connection
) -> tuple[h11.Request, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
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
        os.makedirs(directory, mode=0o755, exist_ok=True)
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
