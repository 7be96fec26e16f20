"""Restarting the daemon without closing its sockets, so Nix never finds the port closed.

A restart is survived when the listening sockets outlive the process that accepts on
them: a connection made meanwhile waits in the kernel's accept queue, and is answered by
the next process instead of being refused. How each way of running the daemon gets that:

- **systemd**: the socket units (``nixd.socket``, ``nixd-proxy.socket``) own the
  sockets; ``systemctl restart nixd`` stops the process while systemd keeps listening,
  and hands the same sockets to the next one (``LISTEN_FDS``, :mod:`nixd.systemd`).
- **launchd**: the plist's ``Sockets`` entry (``proxy``) plays the same part; the daemon
  takes the socket with ``launch_activate_socket`` (:func:`launchd_sockets`).
- **neither** (a shell, a container, runit, OpenRC): ``nixd daemon --restart`` or
  ``SIGUSR2`` restarts the daemon *in place*: it stops accepting (the sockets stay open,
  connections queue), lets requests in flight finish for ``daemon.shutdown_grace``
  seconds, and ``exec``\\ s its own command line again with the listening sockets
  inherited the way systemd passes them (fd 3 on, ``LISTEN_FDS``/``LISTEN_FDNAMES``, and
  ``LISTEN_PID``, which ``exec`` keeps). The pid does not change, so whatever supervises
  the daemon sees nothing; an upgraded package takes effect, since the new image loads
  the installed code. The config is checked first: a restart that could not start again
  is refused and the daemon keeps running.

A Nix transfer still in flight when the grace ends is cut; Nix 2.8 retries it with
``Range`` from the offset it has, that connection waits in the queue, and the next
process serves it (the proxy tails a fresh download from that offset). A plain stop and
start without a socket holder leaves the port closed for the start-up time, which Nix's
retries (about 4 s in all) do not reliably cover: use one of the three above.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from nixd.bounds import parse_uint
from nixd.errors import ConfigError, FormatError

log = logging.getLogger(__name__)

GENERATION_ENV = "NIXD_GENERATION"
"""How many in-place restarts led to this image (shown in ``nixd status``)."""
_HIGH_FD = 100
"""Inherited sockets are parked above this before they are moved to fd 3 on."""


def generation() -> int:
    """The in-place restart count this process was started with (0 for a fresh start)."""
    text = os.environ.get(GENERATION_ENV, "0")
    try:
        return parse_uint(text, limit=1 << 31, what=GENERATION_ENV)
    except FormatError:
        return 0


def restart_command() -> list[str]:
    """The command line this process was started with, interpreter options included."""
    return [sys.executable, *sys.orig_argv[1:]]


@dataclass
class Handoff:
    """Listening sockets (duplicated, so closing the servers' copies keeps them open) and
    the command to run again; :meth:`exec` replaces this process."""

    sockets: list[tuple[str, int]]
    argv: list[str]

    def close(self) -> None:
        """Give the sockets up (a handoff that will not happen after all)."""
        for _, fd in self.sockets:
            os.close(fd)
        self.sockets = []

    def exec(self) -> None:
        """``exec`` the command with the sockets at fd 3, 4, ... as systemd passes them.

        Only returns by raising (``OSError`` if the exec itself failed).
        """
        parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, _HIGH_FD) for _, fd in self.sockets]
        for _, fd in self.sockets:
            os.close(fd)
        for i, fd in enumerate(parked):
            os.dup2(fd, 3 + i, inheritable=True)
            os.close(fd)
        env = dict(os.environ)
        env.update(
            LISTEN_FDS=str(len(parked)),
            LISTEN_FDNAMES=":".join(name for name, _ in self.sockets),
            LISTEN_PID=str(os.getpid()),
        )
        env[GENERATION_ENV] = str(generation() + 1)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(self.argv[0], self.argv, env)  # noqa: S606 - our own command line, no shell


class _Socket(Protocol):
    def fileno(self) -> int: ...


def prepare(named: Sequence[tuple[str, _Socket]], argv: list[str]) -> Handoff:
    """A :class:`Handoff` of ``named`` listening sockets to ``argv``, or ConfigError.

    Refused when ``argv[0]`` cannot be executed: the daemon would stop and not come back.
    """
    if not os.access(argv[0], os.X_OK):
        raise ConfigError(f"cannot restart in place: {argv[0]} is not executable")
    return Handoff([(name, os.dup(sock.fileno())) for name, sock in named], argv)


def launchd_sockets(name: str) -> list[socket.socket]:
    """The sockets of the plist's ``Sockets`` entry ``name`` (macOS), else none.

    ``launch_activate_socket(3)`` is the only way to get them; it is in libSystem, so
    ctypes reaches it without any compiled extension.
    """
    if sys.platform != "darwin":
        return []
    path = ctypes.util.find_library("System") or ctypes.util.find_library("c")
    lib = ctypes.CDLL(path)
    activate = lib.launch_activate_socket
    activate.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.POINTER(ctypes.c_int)),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    activate.restype = ctypes.c_int
    fds = ctypes.POINTER(ctypes.c_int)()
    count = ctypes.c_size_t(0)
    error = activate(name.encode(), ctypes.byref(fds), ctypes.byref(count))
    if error != 0:  # ESRCH: not started by launchd; ENOENT: no such entry
        log.debug("launchd socket %s: %s", name, os.strerror(error))
        return []
    try:
        result = [socket.socket(fileno=fds[i]) for i in range(count.value)]
    finally:
        lib.free.argtypes = [ctypes.c_void_p]
        lib.free(fds)
    log.debug("launchd socket activation: %d %s socket(s)", len(result), name)
    return result
