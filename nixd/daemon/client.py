"""The CLI's side of the control socket: find the daemon, ask it, explain failures.

The socket path comes from ``--socket``, else ``$NIXD_CONTROL_SOCKET``, else the config file
(``--config`` or the default one, if it exists: without a file the daemon runs on the
defaults), else ``/run/nixd/nixd.sock``.

This is plain :mod:`http.client` over an ``AF_UNIX`` socket rather than httpx: one
request to a local daemon needs no connection pool, and importing httpx (with trio and
the config's dependencies) took most of ``nixd status``'s start-up time. The config
module is imported only when a config file is actually read, for the same reason.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any

from nixd.bounds import load_json
from nixd.errors import ConfigError, FormatError, NixdError

DEFAULT_CONFIG_PATH = "/etc/nixd/config.toml"  # = nixd.daemon.config's; a test keeps them equal
DEFAULT_CONTROL_SOCKET = "/run/nixd/nixd.sock"
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 150.0
"""Seconds to wait for an answer: a login waits for the server's exchange and Nix's setup."""
MAX_ANSWER_BYTES = 4 << 20
MAX_ANSWER_DEPTH = 32


class DaemonUnreachable(NixdError):
    """The CLI could not talk to the daemon."""


class DaemonRefused(NixdError):
    """The daemon answered with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def socket_path(socket_arg: str | None, config_arg: str | None) -> str:
    if socket_arg:
        return socket_arg
    if env := os.environ.get("NIXD_CONTROL_SOCKET"):
        return env
    if not os.path.exists(config_arg or DEFAULT_CONFIG_PATH):
        return DEFAULT_CONTROL_SOCKET  # no config file: the daemon runs on the defaults
    from nixd.daemon.config import load_config  # noqa: PLC0415 - only when a file is read

    if config_arg:
        return load_config(config_arg, missing_ok=True).daemon.control_socket
    try:
        return load_config(DEFAULT_CONFIG_PATH).daemon.control_socket
    except ConfigError:
        return DEFAULT_CONTROL_SOCKET


def _start_hint(config_arg: str | None) -> str:
    config = config_arg or DEFAULT_CONFIG_PATH
    return f"start it with `systemctl start nixd` or `nixd daemon --config {config}`"


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection to a Unix socket (the Host header says ``nixd``)."""

    def __init__(self, path: str) -> None:
        super().__init__("nixd", timeout=CONNECT_TIMEOUT)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(self.path)
            sock.settimeout(READ_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def call(
    path: str,
    method: str,
    endpoint: str,
    body: dict[str, Any] | None = None,
    *,
    config_arg: str | None = None,
) -> dict[str, Any]:
    """One request to the daemon; raises :class:`DaemonUnreachable` / :class:`DaemonRefused`."""
    conn = _UnixConnection(path)
    headers = {"accept": "application/json"}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    try:
        conn.request(method, endpoint, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read(MAX_ANSWER_BYTES + 1)
        status = response.status
    except (ConnectionRefusedError, FileNotFoundError, PermissionError) as exc:
        raise DaemonUnreachable(
            f"cannot reach the nixd daemon at {path} ({(exc.strerror or 'failed').lower()}); "
            f"{_start_hint(config_arg)}"
        ) from exc
    except TimeoutError as exc:
        raise DaemonUnreachable(f"the nixd daemon at {path} did not answer in time") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DaemonUnreachable(f"the nixd daemon at {path} did not answer: {exc!r}") from exc
    finally:
        conn.close()
    try:
        data: Any = load_json(
            raw, max_bytes=MAX_ANSWER_BYTES, max_depth=MAX_ANSWER_DEPTH, what="the answer"
        )
    except FormatError as exc:
        raise DaemonUnreachable(f"the nixd daemon at {path} sent a malformed answer") from exc
    if not isinstance(data, dict):
        raise DaemonUnreachable(f"the nixd daemon at {path} sent a malformed answer")
    if status != 200:
        raise DaemonRefused(
            status,
            str(data.get("error", "error")),
            str(data.get("message", f"HTTP {status}")),
        )
    return data
