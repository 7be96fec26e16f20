"""The CLI's side of the control socket: find the daemon, ask it, explain failures.

The socket path comes from ``--socket``, else ``$NIXD_CONTROL_SOCKET``, else the config file
(``--config`` or the default one, if readable), else ``/run/nixd/nixd.sock``.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from nixd.daemon.config import DEFAULT_CONFIG_PATH, DEFAULT_CONTROL_SOCKET, load_config
from nixd.errors import ConfigError, NixdError

CLIENT_TIMEOUT = httpx.Timeout(10.0, read=150.0)


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
    if config_arg:
        return load_config(config_arg, missing_ok=True).daemon.control_socket
    try:
        return load_config(DEFAULT_CONFIG_PATH).daemon.control_socket
    except ConfigError:
        return DEFAULT_CONTROL_SOCKET


def _start_hint(config_arg: str | None) -> str:
    config = config_arg or DEFAULT_CONFIG_PATH
    return f"start it with `systemctl start nixd` or `nixd daemon --config {config}`"


def call(
    path: str,
    method: str,
    endpoint: str,
    body: dict[str, Any] | None = None,
    *,
    config_arg: str | None = None,
) -> dict[str, Any]:
    """One request to the daemon; raises :class:`DaemonUnreachable` / :class:`DaemonRefused`."""
    transport = httpx.HTTPTransport(uds=path)
    try:
        with httpx.Client(transport=transport, base_url="http://nixd", timeout=CLIENT_TIMEOUT) as c:
            response = c.request(method, endpoint, json=body)
    except (httpx.ConnectError, FileNotFoundError) as exc:
        raise DaemonUnreachable(
            f"cannot reach the nixd daemon at {path} ({_reason(exc)}); {_start_hint(config_arg)}"
        ) from exc
    except httpx.HTTPError as exc:
        raise DaemonUnreachable(f"the nixd daemon at {path} did not answer: {exc}") from exc
    try:
        data: Any = response.json()
    except ValueError as exc:
        raise DaemonUnreachable(f"the nixd daemon at {path} sent a malformed answer") from exc
    if response.status_code != 200:
        raise DaemonRefused(
            response.status_code,
            str(data.get("error", "error")),
            str(data.get("message", f"HTTP {response.status_code}")),
        )
    if not isinstance(data, dict):
        raise DaemonUnreachable(f"the nixd daemon at {path} sent a malformed answer")
    return data


def _reason(exc: Exception) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
    return "connection failed"
