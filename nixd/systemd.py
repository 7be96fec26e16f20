"""What nixd's services tell systemd, and what systemd hands them.

Shared by the daemon (:mod:`nixd.daemon.main`) and the cache server's ``serve``
(:mod:`nixd.server.http.serve`), so it sits at the package root, which both may import.

- :func:`notify` sends ``READY=1`` / ``STATUS=...`` / ``WATCHDOG=1`` / ``STOPPING=1`` as one
  datagram to ``$NOTIFY_SOCKET`` (the sd_notify protocol; a path or an ``@abstract`` name).
  It is a raw datagram rather than libsystemd's ``sd_notify`` so it works the same without
  systemd-python (macOS, minimal images) and never blocks.
- :func:`listen_fds` takes the sockets of socket activation (``$LISTEN_FDS`` from fd 3 on,
  named by ``$LISTEN_FDNAMES``) when ``$LISTEN_PID`` is us, and clears the variables so
  children do not inherit them.
- :func:`watchdog_interval` is how often to send ``WATCHDOG=1`` (half of ``WatchdogSec``).
- :func:`journald_handler` logs to the journal when stderr is the journal stream
  (``$JOURNAL_STREAM``), so messages keep their priority: with structured fields through
  systemd-python's ``JournalHandler`` when that optional package is installed (the extra
  ``nixd[journal]``; it has no wheel and needs a compiler), else as stderr lines that
  start with sd-daemon(3)'s ``<N>`` priority prefix, which journald strips and turns into
  the entry's priority — every line of a multi-line message (a traceback) carries it,
  since journald splits the stream at newlines.
"""

from __future__ import annotations

import logging
import os
import socket

from nixd.bounds import parse_uint
from nixd.errors import FormatError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 64
"""More passed sockets than this is not a socket activation nixd knows."""


def notify(*lines: str) -> bool:
    """Send sd_notify lines (``"READY=1"``, ``"STATUS=..."``); False if not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc.strerror)
        return False
    return True


def listen_fds(*, unset_environment: bool = True) -> dict[str, list[socket.socket]]:
    """Sockets passed by socket activation, by name (unnamed ones are ``"unknown"``)."""
    try:
        env = os.environ
        pid = parse_uint(env.get("LISTEN_PID", ""), limit=1 << 31, what="LISTEN_PID")
        count = parse_uint(env.get("LISTEN_FDS", ""), limit=MAX_LISTEN_FDS, what="LISTEN_FDS")
    except FormatError:
        return {}
    names = (
        os.environ.get("LISTEN_FDNAMES", "").split(":") if "LISTEN_FDNAMES" in os.environ else []
    )
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return {}
    result: dict[str, list[socket.socket]] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        name = names[i] if i < len(names) and names[i] else "unknown"
        result.setdefault(name, []).append(sock)
    log.debug("socket activation: %s", {k: len(v) for k, v in result.items()})
    return result


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is set for us."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    wpid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (wpid and wpid != str(os.getpid())):
        return None
    return usec / 1e6 / 2


def journald_handler() -> logging.Handler | None:
    """A journald handler when our stderr is connected to the journal, else None."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return None
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return None
    if (st.st_dev, st.st_ino) != (dev, ino):
        return None
    try:
        from systemd.journal import JournalHandler  # noqa: PLC0415
    except ImportError:
        prefixed = logging.StreamHandler()
        prefixed.setFormatter(PriorityPrefixFormatter("%(name)s: %(message)s"))
        return prefixed
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="nixd")
    return handler


SD_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
"""Python level (at least) → syslog priority of sd-daemon(3): crit, err, warning, info;
anything lower is debug (7)."""


def priority_of(levelno: int) -> int:
    for level, priority in SD_PRIORITIES:
        if levelno >= level:
            return priority
    return 7


class PriorityPrefixFormatter(logging.Formatter):
    """Prefix every line with ``<N>``, the priority journald reads from a stream."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority_of(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))
