"""The server under systemd: its units verify and are confined, socket activation, READY=1.

The sockets are passed the way systemd passes them (``LISTEN_FDS``, fd 3, ``LISTEN_PID``
set between fork and exec: :data:`tests.serverproc._ACTIVATE`), since
``systemd-socket-activate`` only binds fixed ports and a test never picks one. The
notifications are read from a real ``NOTIFY_SOCKET`` datagram socket, with the sender's
pid from ``SO_PASSCRED``: ``NotifyAccess=main`` accepts only the first process's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from nixd.errors import NixdError
from nixd.server.http.serve import _await_workers, _report_ready
from tests.server.conftest import ServerState
from tests.serverproc import _ACTIVATE, SERVER_CLI, start_server

REPO = Path(__file__).resolve().parents[2]
UNITS = ("nixd-server.service", "nixd-server.socket")
HANG_GUARD = 60.0
"""Seconds a notification may take before the test gives up (never a timing assertion)."""


def _installed(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this venv's nixd-server (verify wants it to exist)."""
    binary = Path(sys.executable).with_name("nixd-server")
    out = []
    for name in UNITS:
        text = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/nixd-server", str(binary)))
        out.append(tmp_path / name)
    return out


def _analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is required (apt-get install systemd)")
    return analyze


def test_server_units_verify(tmp_path: Path) -> None:
    result = subprocess.run(
        [_analyze(), "verify", *map(str, _installed(tmp_path))],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_server_unit_is_confined(tmp_path: Path) -> None:
    """``systemd-analyze security`` rates it 1.5 or better (the daemon, root, rates 2.1)."""
    service = _installed(tmp_path)[0]
    result = subprocess.run(
        [_analyze(), "security", "--offline=yes", "--threshold=15", "--no-pager", str(service)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "Overall exposure level for nixd-server.service" in result.stdout


def test_service_is_notify_socket_activated_and_unprivileged() -> None:
    service = (REPO / "systemd" / "nixd-server.service").read_text().splitlines()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "Sockets=nixd-server.socket",
        "ExecStart=/usr/local/bin/nixd-server serve /var/lib/nixd-server",
        "User=nixd-server",
        "StateDirectory=nixd-server",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
    ):
        assert line in service, line
    assert not any(line.startswith(("ReadWritePaths=", "DynamicUser=")) for line in service)
    socket_unit = (REPO / "systemd" / "nixd-server.socket").read_text().splitlines()
    assert "Service=nixd-server.service" in socket_unit
    assert "ListenStream=127.0.0.1:8080" in socket_unit  # loopback unless widened


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(HANG_GUARD)
        yield sock


def _notifications(sock: socket.socket, until: str) -> list[tuple[int, list[str]]]:
    """(sender pid, lines) of each datagram, up to the one with the line ``until``."""
    got: list[tuple[int, list[str]]] = []
    while True:
        data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(
            struct.unpack("3i", d[:12])[0]
            for level, kind, d in ancdata
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        )
        lines = data.decode().split("\n")
        got.append((pid, lines))
        if until in lines:
            return got


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activated_ready_then_stopping(
    server_state: ServerState, notify_socket: socket.socket, workers: int
) -> None:
    """READY=1 from the first process only, once every worker serves systemd's socket."""
    server = start_server(
        server_state.path,
        activated=True,
        workers=workers,
        env={"NOTIFY_SOCKET": notify_socket.getsockname()},
    )
    try:
        assert server.proc is not None
        main = server.proc.pid
        ready = _notifications(notify_socket, "READY=1")
        assert {pid for pid, _ in ready} == {main}
        status = next(line for _, lines in ready for line in lines if line.startswith("STATUS="))
        assert f"127.0.0.1:{server.port}" in status
        # config.toml says listen = 127.0.0.1:0; the passed socket took its place
        assert server.urls == [f"http://127.0.0.1:{server.port}"]
        children = Path(f"/proc/{main}/task/{main}/children").read_text().split()
        assert len(children) == workers - 1
        for _ in range(8):  # fresh connections: whichever worker accepts answers
            r = httpx.get(f"{server.url}/cache/nix-cache-info")
            assert r.status_code == 200
        assert "socket activation: serving 1 socket(s)" in server.log()
        server.proc.send_signal(signal.SIGTERM)
        stopping = _notifications(notify_socket, "STOPPING=1")
        assert {pid for pid, _ in stopping} == {main}
        assert server.proc.wait(HANG_GUARD) == 0  # one SIGTERM is enough, as from systemd
    finally:
        server.close()


def test_a_passed_socket_that_does_not_listen_is_refused(server_state: ServerState) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listen()ed
        proc = subprocess.run(
            [sys.executable, "-c", _ACTIVATE, str(sock.fileno()), *SERVER_CLI, "serve",
             str(server_state.path)],
            pass_fds=(sock.fileno(),), capture_output=True, text=True, timeout=120,
            check=False, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    assert proc.returncode != 0
    assert "not a listening stream socket" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_first_process_waits_for_every_worker_and_notices_one_that_died() -> None:
    """The readiness pipe of :func:`nixd.server.http.serve.run`, with real pipes."""
    r, w = os.pipe()
    try:
        trio.run(_report_ready, os.dup(w), [])
        trio.run(_report_ready, os.dup(w), [])
        trio.run(_await_workers, r, 2, [])  # two workers reported
    finally:
        os.close(r)
        os.close(w)
    r, w = os.pipe()
    try:
        trio.run(_report_ready, w, [])  # one reports, then the only write end is gone
        with pytest.raises(NixdError, match="1 of 2 other worker"):
            trio.run(_await_workers, r, 2, [])
    finally:
        os.close(r)
