"""The one launcher for a real ``nixd-server serve`` process in tests.

A test gets a :class:`ServerProcess` from :func:`start_server` (or the context manager
:func:`running_server`): the server listens on a port the kernel picked (port 0) and the
URL is read from the address file the server writes once it is bound (``run/address``
in the state directory), so no test guesses a free port. Every wait is bounded, and
:meth:`ServerProcess.stop` ends the process (SIGTERM, then SIGKILL).

Restarts keep the port. Two ways, chosen per server:

- ``hold=True``: the test process binds and holds the listening socket and hands it to
  each server process as ``--listen fd://N`` (how systemd passes a socket). The port
  never closes: while the server is down, connections wait in the accept queue and the
  next process answers them. For tests of what a client sees across a server restart.
- ``hold=False`` (default): a restart binds ``host:port`` again. While the server is
  down the port is closed and connections are refused, for tests of an unreachable
  server.
- ``activated=True``: held as with ``hold``, but passed the way systemd's socket
  activation does (``LISTEN_FDS=1``, the socket at fd 3, ``LISTEN_PID`` the server's own
  pid), with no ``--listen``: the server must find it by itself.

Other helpers: :data:`SERVER_CLI` runs ``nixd-server`` from this tree; :func:`server_cli`
runs one command and checks it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVER_CLI = [sys.executable, "-m", "nixd.server.cli"]
"""``nixd-server`` from the tree under test (never an installed one)."""
START_TIMEOUT = 60.0
"""Hang guard for a server to write its address file (a busy machine starts slowly)."""
STOP_TIMEOUT = 20.0


def server_cli(
    *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``nixd-server ARGS``; with ``check``, fail with its output if it fails."""
    proc = subprocess.run(
        [*SERVER_CLI, *args], input=stdin, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"nixd-server {' '.join(args[:3])} exited {proc.returncode}:\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc


@dataclass
class ServerProcess:
    """A ``nixd-server serve STATE_DIR`` process that can be stopped and started again."""

    state_dir: Path
    host: str = "127.0.0.1"
    hold: bool = False
    activated: bool = False
    workers: int = 1
    extra_listen: Sequence[str] = ()
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    urls: list[str] = field(default_factory=list)
    """What the server wrote to its address file at the last start (its bound URLs)."""
    _port: int = 0
    _held: socket.socket | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        """The first bound URL, ``http://host:port`` (the same across restarts)."""
        assert self.urls, "the server was never started"
        return self.urls[0].rstrip("/")

    @property
    def port(self) -> int:
        return self._port

    @property
    def address_file(self) -> Path:
        return self.state_dir / "run" / "address"

    def log(self) -> str:
        path = self.log_path
        return path.read_text(errors="replace") if path and path.exists() else ""

    def _listen_args(self) -> tuple[list[str], tuple[int, ...]]:
        if self.hold or self.activated:
            if self._held is None:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                held = socket.socket(family, socket.SOCK_STREAM)
                held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                held.bind((self.host, 0))
                held.listen(1024)
                self._held = held
                self._port = int(held.getsockname()[1])
            fd = self._held.fileno()
            return ([] if self.activated else [f"fd://{fd}"]), (fd,)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return [f"{host}:{self._port}"], ()

    def start(self) -> ServerProcess:
        """Start (or start again, on the same port) and wait for the address file."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        listen, fds = self._listen_args()
        args = [a for addr in (*listen, *self.extra_listen) for a in ("--listen", addr)]
        args += ["--workers", str(self.workers)]
        address = self.address_file
        address.unlink(missing_ok=True)
        log_path = self.log_path or self.state_dir / "serve.log"
        self.log_path = log_path
        command = [*SERVER_CLI, "serve", str(self.state_dir), *args]
        if self.activated:
            command = [sys.executable, "-c", _ACTIVATE, str(fds[0]), *command]
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                pass_fds=fds,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not (address.exists() and address.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"nixd-server did not start:\n{self.log()}")
            time.sleep(0.05)
        self.urls = address.read_text().split()
        if not self._port:
            self._port = int(self.urls[0].rstrip("/").rsplit(":", 1)[1])
        self.starts += 1
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the process (``sig``, then SIGKILL after a while); its exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: the server goes away at once, mid-response if it was answering."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)

    def restart(self, sig: int = signal.SIGTERM) -> ServerProcess:
        self.stop(sig)
        return self.start()

    def close(self) -> None:
        """Stop the process and let go of a held socket (the port closes)."""
        self.stop()
        if self._held is not None:
            self._held.close()
            self._held = None


_ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "os.dup2(fd, 3)\n"
    "if fd != 3: os.close(fd)\n"
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES='http')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
"""What systemd does between fork and exec for a socket-activated service (exec keeps
the pid, so ``LISTEN_PID`` is the server's)."""


def start_server(
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    hold: bool = False,
    activated: bool = False,
    workers: int = 1,
    extra_listen: Sequence[str] = (),
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """A started :class:`ServerProcess` for an initialized state directory."""
    server = ServerProcess(
        state_dir, host=host, hold=hold, activated=activated, workers=workers,
        extra_listen=extra_listen,
        log_path=log_path, env=dict(env or {}),
    )  # fmt: skip
    try:
        return server.start()
    except BaseException:
        server.close()
        raise


@contextlib.contextmanager
def running_server(state_dir: Path, **kw: object) -> Iterator[ServerProcess]:
    """:func:`start_server`, closed on the way out."""
    server = start_server(state_dir, **kw)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()
