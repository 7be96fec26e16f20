"""The daemon on the machines people run: no config file, nix.conf managed elsewhere.

Each test runs the real daemon process and the real CLI; where Nix's reading of the
configuration matters, the real ``nix show-config`` reads the files the daemon wrote.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nixd import exitcodes
from nixd.daemon.config import DEFAULT_PROXY_PORT
from tests.daemon.conftest import (
    NIXD,
    STATUS_SHOWN,
    DaemonProcess,
    cli,
    start_daemon,
    write_config,
)
from tests.daemon.tokenserver import TokenServer
from tests.realnix import NIX_CONF, nix_available


async def _started(
    root: Path, config: Path, factory: list[DaemonProcess], command: list[str] | None = None
) -> DaemonProcess:
    daemon = await start_daemon(root, config, command=command)
    factory.append(daemon)
    try:
        await daemon.wait_for("READY=1", within=60)
    except trio.TooSlowError:
        raise AssertionError(f"no READY=1; daemon log:\n{daemon.log()}") from None
    return daemon


async def _status(socket: str) -> dict[str, object]:
    result = await cli("status", "--json", "--socket", socket, check=STATUS_SHOWN)
    data: dict[str, object] = json.loads(result.stdout)
    return data


def _show_config(conf_dir: Path) -> dict[str, str]:
    """What the real Nix makes of the configuration in ``conf_dir``."""
    if not nix_available():
        pytest.fail("the real `nix` is required (apt-get install nix-bin)")
    out = subprocess.run(
        ["nix", "show-config"],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "NIX_CONF_DIR": str(conf_dir),
            "NIX_USER_CONF_FILES": "",
            "HOME": str(conf_dir),
            "NIX_REMOTE": "",
        },
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return dict(line.partition(" = ")[::2] for line in out.splitlines())


@pytest.mark.realnix
async def test_login_fails_and_says_what_to_add_when_nix_conf_is_a_store_link(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    etc = world_dir / "etc"
    fragment = etc / "nixd.conf"
    static = world_dir / "nix-store-like" / "nix.conf"  # NixOS: a read-only file in the store
    static.parent.mkdir()
    static.write_text(NIX_CONF)
    (etc / "nix.conf").unlink()
    (etc / "nix.conf").symlink_to(static)
    daemon = await _started(world_dir, config, daemon_factory)

    login = await cli(
        "login", "token", "--socket", daemon.socket, stdin=token_server.api_token.encode()
    )
    assert login.returncode == 1, login.stderr
    err = login.stderr.decode()
    assert b"logged in as token:ci-bot" in login.stdout
    assert "logged in, but Nix does not use nixd yet" in err
    assert f"`!include {fragment}`" in err and "services.nixd.enable = true;" in err
    state = await _status(daemon.socket)
    nix = state["nix"]
    assert isinstance(nix, dict)
    assert nix["in_effect"] is False and f"!include {fragment}" in str(nix["problem"])
    assert daemon.log().count("Nix does not read nixd's settings") == 1  # logged once
    human = await cli("status", "--socket", daemon.socket, check=True)
    assert b"NIX:" in human.stdout and b"does not include" in human.stdout
    # the fragment and the netrc are written anyway, the link is untouched
    assert fragment.exists() and (etc / "nixd-netrc").exists()
    assert (etc / "nix.conf").is_symlink() and static.read_text() == NIX_CONF
    proxy = state["proxy"]
    assert isinstance(proxy, dict)
    assert proxy["url"] not in _show_config(etc)["substituters"].split()

    # the system's configuration adds the include (a rebuild on NixOS): now in effect
    static.write_text(NIX_CONF + f"!include {fragment}\n")
    login = await cli(
        "login", "token", "--socket", daemon.socket, stdin=token_server.api_token.encode()
    )
    assert login.returncode == 0, login.stderr
    nix = (await _status(daemon.socket))["nix"]
    assert isinstance(nix, dict) and nix["in_effect"] is True and nix["problem"] is None
    assert "Nix now reads nixd's settings" in daemon.log()
    seen = _show_config(etc)
    assert proxy["url"] in seen["substituters"].split()
    assert seen["netrc-file"] == str(etc / "nixd-netrc")
    assert (etc / "nix.conf").is_symlink()
    assert static.read_text() == NIX_CONF + f"!include {fragment}\n"


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Any request at all is recorded: the test asserts there is none."""

    seen: list[str] = []  # noqa: RUF012 - reset by the fixture

    def _any(self) -> None:
        type(self).seen.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _any

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recording_server() -> Iterator[str]:
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_interactive_login_of_a_user_who_may_not_is_refused_before_the_device_flow(
    world_dir: Path, recording_server: str, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=recording_server)
    daemon = await _started(world_dir, config, daemon_factory)
    refused = await cli(
        "login", "--server", recording_server, "--socket", daemon.socket, user="nobody"
    )
    assert refused.returncode == exitcodes.DENIED
    assert b"/login needs root" in refused.stderr and b"uid 65534" in refused.stderr
    assert b"code" not in refused.stdout  # no device code was shown
    assert _Recorder.seen == []  # and the server was never asked for one


async def test_daemon_starts_on_the_defaults_without_a_config_file(
    world_dir: Path, daemon_factory: list[DaemonProcess]
) -> None:
    """Every default path, in a private mount and network namespace (nothing of this
    machine's /run, /var or the default port is touched); only the control socket's directory
    is shared, so the CLI can ask from outside."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("unshare and ip are required (util-linux, iproute2)")
    (world_dir / "run").mkdir()
    (world_dir / "etc-nix").mkdir()
    absent = world_dir / "no-such-dir" / "config.toml"
    script = (
        "set -e; ip link set lo up; "
        "mount -t tmpfs tmpfs /var/lib; mount -t tmpfs tmpfs /var/cache; "
        'mount -t tmpfs tmpfs /run; mkdir /run/nixd; mount --bind "$0"/run /run/nixd; '
        'if [ -d /etc/nix ]; then mount --bind "$0"/etc-nix /etc/nix; fi; '
        'exec "$@"'
    )
    command = [
        "unshare", "--mount", "--net", "--propagation", "private",
        "sh", "-c", script, str(world_dir),
        *NIXD, "daemon", "--config", str(absent),
    ]  # fmt: skip
    daemon = await _started(world_dir, absent, daemon_factory, command=command)
    socket = str(world_dir / "run" / "nixd.sock")  # /run/nixd/nixd.sock inside
    state = await _status(socket)
    assert state["config"] == str(absent) and state["config_error"] is None
    assert state["logged_in"] is False
    proxy = state["proxy"]
    assert isinstance(proxy, dict) and proxy["url"] == f"http://127.0.0.1:{DEFAULT_PROXY_PORT}"
    store = state["store"]
    assert isinstance(store, dict) and store["dir"] == "/var/cache/nixd/store"
    assert "running on the defaults" in daemon.log()
    assert await daemon.stop() == 0
    assert "Traceback" not in daemon.log()
