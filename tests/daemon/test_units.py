"""The shipped service definitions: the systemd units verify, the launchd plist parses."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nixd.daemon.config import DEFAULT_PROXY_PORT, load_config

REPO = Path(__file__).resolve().parents[2]
UNITS = ("nixd.service", "nixd.socket", "nixd-proxy.socket")


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is required (apt-get install systemd)")
    nixd = Path(sys.executable).with_name("nixd")
    for name in UNITS:
        text = (REPO / "systemd" / name).read_text()
        # verify insists the ExecStart binary exists: point it at the installed nixd
        (tmp_path / name).write_text(text.replace("/usr/local/bin/nixd", str(nixd)))
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / n) for n in UNITS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_service_is_notify_and_names_its_sockets() -> None:
    service = (REPO / "systemd" / "nixd.service").read_text()
    assert "Type=notify" in service and "WatchdogSec=" in service
    assert "ExecReload=/bin/kill -HUP $MAINPID" in service
    assert "ProtectSystem=strict" in service and "NoNewPrivileges=yes" in service
    assert "FileDescriptorName=control" in (REPO / "systemd" / "nixd.socket").read_text()
    assert "FileDescriptorName=proxy" in (REPO / "systemd" / "nixd-proxy.socket").read_text()


def test_launchd_plist_parses() -> None:
    with open(REPO / "launchd" / "org.nixd.daemon.plist", "rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "org.nixd.daemon"
    assert plist["ProgramArguments"][1:] == ["daemon", "--config", "/etc/nixd/config.toml"]
    # launchd holds the proxy's socket across restarts (see nixd.daemon.handoff)
    proxy = plist["Sockets"]["proxy"]
    port = str(DEFAULT_PROXY_PORT)
    assert (proxy["SockNodeName"], proxy["SockServiceName"]) == ("127.0.0.1", port)
    assert proxy["SockType"] == "stream"
    socket_unit = (REPO / "systemd" / "nixd-proxy.socket").read_text()
    assert f"ListenStream=127.0.0.1:{port}" in socket_unit  # the same port on both


def test_default_proxy_port_collides_with_no_known_tool(tmp_path: Path) -> None:
    # 37515: magic-nix-cache and flakehub-cache-action; 5000: nix-serve, harmonia;
    # 8080: attic; 8501: ncps
    assert DEFAULT_PROXY_PORT not in (37515, 5000, 8080, 8501)
    assert 1024 < DEFAULT_PROXY_PORT < 32768  # below every ephemeral port range
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if ranges.exists():
        low, high = (int(x) for x in ranges.read_text().split())
        assert not low <= DEFAULT_PROXY_PORT <= high
    empty = tmp_path / "config.toml"
    empty.write_text("")
    proxy = load_config(str(empty)).proxy
    assert (proxy.listen_host, proxy.listen_port) == ("127.0.0.1", DEFAULT_PROXY_PORT)


def test_systemd_and_launchd_run_the_same_installed_binary() -> None:
    """packaging/ installs /usr/local/bin/nixd; both service definitions run exactly it."""
    service = (REPO / "systemd" / "nixd.service").read_text()
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    with open(REPO / "launchd" / "org.nixd.daemon.plist", "rb") as f:
        plist = plistlib.load(f)
    assert exec_start.removeprefix("ExecStart=").split() == plist["ProgramArguments"]
    assert plist["ProgramArguments"][0] == "/usr/local/bin/nixd"


def test_etc_nix_is_writable_but_optional() -> None:
    """``-``: a machine without /etc/nix (Nix not installed yet) still starts the unit."""
    service = (REPO / "systemd" / "nixd.service").read_text().splitlines()
    assert "ReadWritePaths=-/etc/nix" in service
    assert "ProtectSystem=strict" in service
