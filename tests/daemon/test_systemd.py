"""sd_notify, LISTEN_FDS parsing and the watchdog interval, against real sockets."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nixd import systemd
from nixd.daemon.control import Peer, may_administer


def test_notify_sends_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify("READY=1", "STATUS=serving")
        assert receiver.recv(100) == b"READY=1\nSTATUS=serving"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"nixd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1")
        assert receiver.recv(100) == b"WATCHDOG=1"


def test_listen_fds_only_for_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "control:proxy")
    assert systemd.listen_fds() == {}
    assert "LISTEN_FDS" not in os.environ  # never inherited by children


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    assert systemd.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None


def _has_systemd_python() -> bool:
    """Whether systemd-python is installed (the checkout's own ``systemd/`` directory of
    unit files is importable as a namespace package, so look for the module inside)."""
    try:
        return importlib.util.find_spec("systemd.journal") is not None
    except ModuleNotFoundError:
        return False


def test_journald_only_when_stderr_is_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    assert systemd.journald_handler() is None
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    handler = systemd.journald_handler()
    assert handler is not None
    if _has_systemd_python():  # the optional nixd[journal]
        assert type(handler).__name__ == "JournalHandler"
    else:
        assert isinstance(handler.formatter, systemd.PriorityPrefixFormatter)


def test_journald_priorities_without_systemd_python(tmp_path: Path) -> None:
    """Without systemd-python, stderr lines carry sd-daemon(3) <N> priority prefixes."""
    log = tmp_path / "journal-stream"
    script = textwrap.dedent(
        """
        import logging, os, sys
        sys.modules["systemd"] = None  # systemd-python absent: its import fails
        st = os.fstat(2)
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        from nixd.daemon.main import configure_logging
        configure_logging("debug")
        log = logging.getLogger("nixd.test")
        log.debug("debug line")
        log.info("info line")
        log.warning("warning line")
        log.error("error line\\nsecond line")
        log.critical("critical line")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        """
    )
    with open(log, "wb") as stderr:
        subprocess.run([sys.executable, "-c", script], stderr=stderr, check=True, timeout=60)
    lines = log.read_text().splitlines()
    assert lines[:6] == [
        "<7>nixd.test: debug line",
        "<6>nixd.test: info line",
        "<4>nixd.test: warning line",
        "<3>nixd.test: error line",
        "<3>second line",
        "<2>nixd.test: critical line",
    ]
    assert lines[6] == "<3>nixd.test: failed"
    assert all(line.startswith("<3>") for line in lines[7:]) and "boom" in lines[-1]


def test_may_administer() -> None:
    assert may_administer(Peer(1, 0, 0), None)
    assert not may_administer(Peer(1, 65534, 65534), None)
    assert not may_administer(None, "root")
    assert may_administer(Peer(1, 65534, 0), "root")  # primary gid is the group
    assert not may_administer(Peer(1, 65534, 65534), "root")


def test_listen_fds_refuses_numbers_out_of_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    for count in ("9" * 5000, "²", "65", "-1"):
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", count)
        assert systemd.listen_fds() == {}
