"""The pieces of a restart in place that do not need a running daemon (see test_restart)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nixd.daemon import handoff
from nixd.errors import ConfigError


def test_generation_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(handoff.GENERATION_ENV, raising=False)
    assert handoff.generation() == 0
    monkeypatch.setenv(handoff.GENERATION_ENV, "3")
    assert handoff.generation() == 3
    for junk in ("9" * 5000, "²", "-1", ""):
        monkeypatch.setenv(handoff.GENERATION_ENV, junk)
        assert handoff.generation() == 0


def test_a_command_that_cannot_run_is_refused(tmp_path: Path) -> None:
    with socket.socket() as sock, pytest.raises(ConfigError, match="not executable"):
        handoff.prepare([("proxy", sock)], [str(tmp_path / "gone"), "daemon"])


def test_restart_command_is_our_command_line() -> None:
    argv = handoff.restart_command()
    assert argv[0] == sys.executable and argv[1:] == sys.orig_argv[1:]


def test_exec_passes_the_sockets_as_systemd_does(tmp_path: Path) -> None:
    """A child execs a small program through a Handoff; it finds the socket at fd 3."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        program = (
            "import os, socket, json;"
            "from nixd import systemd; from nixd.daemon import handoff;"
            "s = systemd.listen_fds();"
            "print(json.dumps({k: [x.getsockname()[1] for x in v] for k, v in s.items()}),"
            " handoff.generation(), os.getpid())"
        )
        child = (
            "import os, socket, sys; from nixd.daemon import handoff;"
            f"s = socket.socket(fileno=os.dup({listener.fileno()}));"
            "h = handoff.prepare([('proxy', s)], [sys.executable, '-c', sys.argv[1]]);"
            "s.close(); print(os.getpid(), flush=True); h.exec()"
        )
        out = subprocess.run(
            [sys.executable, "-c", child, program],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            pass_fds=(listener.fileno(),),
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
    assert out.returncode == 0, out.stderr
    pid_before, line = out.stdout.splitlines()
    sockets, generation, pid_after = line.rsplit(" ", 2)
    assert sockets == f'{{"proxy": [{port}]}}'
    assert generation == "1" and pid_after == pid_before  # exec keeps the pid


def test_launchd_sockets_only_on_macos() -> None:
    if sys.platform != "darwin":
        assert handoff.launchd_sockets("proxy") == []
