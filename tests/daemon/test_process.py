"""The real daemon process: readiness, the CLI over the control socket, reload, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
from pathlib import Path

import httpx
import trio

from nixd import exitcodes
from tests.daemon.conftest import NIXD, STATUS_SHOWN, DaemonProcess, cli, start_daemon, write_config
from tests.daemon.tokenserver import KEYS, TokenServer


async def started(root: Path, config: Path, factory: list[DaemonProcess]) -> DaemonProcess:
    daemon = await start_daemon(root, config)
    factory.append(daemon)
    try:
        await daemon.wait_for("READY=1")
    except trio.TooSlowError:
        raise AssertionError(f"no READY=1; daemon log:\n{daemon.log()}") from None
    return daemon


async def status(daemon: DaemonProcess) -> dict[str, object]:
    result = await cli("status", "--json", "--socket", daemon.socket, check=STATUS_SHOWN)
    data: dict[str, object] = json.loads(result.stdout)
    return data


async def test_ready_status_login_logout_sigterm(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    daemon = await started(world_dir, config, daemon_factory)
    assert any(n.startswith("READY=1") and "STATUS=" in n for n in daemon.notifications)
    sock = os.stat(daemon.socket)
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o666

    before = await status(daemon)
    assert before["logged_in"] is False and before["identity"] is None

    # a wrong token is refused by the server, and the CLI says so
    bad = await cli("login", "token", "--socket", daemon.socket, stdin=b"nixd_wrong\n")
    assert bad.returncode == exitcodes.DENIED
    assert b"rejected the credential" in bad.stderr

    # the API token comes from stdin, never from argv
    ok = await cli(
        "login", "token", "--socket", daemon.socket, stdin=token_server.api_token.encode() + b"\n"
    )
    assert ok.returncode == 0, ok.stderr
    assert b"logged in as token:ci-bot" in ok.stdout
    assert token_server.exchanges == 1

    after = await status(daemon)
    assert after["logged_in"] is True
    assert after["identity"] == "token:ci-bot"
    assert after["server"] == token_server.url
    assert after["pinned_keys"] == KEYS
    assert after["token_valid"] is True
    text = json.dumps(after)
    assert token_server.api_token not in text
    assert all(issued not in text for issued in token_server.issued)
    human = await cli("status", "--socket", daemon.socket, check=True)  # logged in: exit 0
    assert b"token:ci-bot" in human.stdout
    assert token_server.issued[0].encode() not in human.stdout

    state_file = world_dir / "state" / "state.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600

    # Nix is told about the proxy: netrc with the local secret, fragment, include line
    proxy_url = after["proxy"]["url"]  # type: ignore[index]
    assert str(proxy_url).startswith("http://127.0.0.1:")
    secret = (world_dir / "state" / "proxy-secret").read_text().strip()
    netrc = world_dir / "etc" / "nixd-netrc"
    assert stat.S_IMODE(netrc.stat().st_mode) == 0o600
    assert f"machine 127.0.0.1 login nixd password {secret}" in netrc.read_text()
    assert token_server.issued[-1] in netrc.read_text()  # the server host, for nix copy
    fragment = (world_dir / "etc" / "nixd.conf").read_text()
    assert f"extra-substituters = {proxy_url}" in fragment
    assert KEYS[0] in fragment and str(netrc) in fragment
    assert (world_dir / "etc" / "nix.conf").read_text().count("nixd.conf") == 1
    log = daemon.log()
    assert token_server.api_token not in log and token_server.issued[0] not in log

    out = await cli("logout", "--socket", daemon.socket, check=True)
    assert b"logged out token:ci-bot" in out.stdout
    assert not state_file.exists()
    logged_out = await cli("status", "--socket", daemon.socket)
    assert logged_out.returncode == exitcodes.NOT_LOGGED_IN and b"nobody" in logged_out.stdout
    assert (await status(daemon))["logged_in"] is False
    # logout removes exactly what nixd added (nix.conf was empty before)
    assert not netrc.exists() and not (world_dir / "etc" / "nixd.conf").exists()
    assert (world_dir / "etc" / "nix.conf").read_text() == ""

    assert await daemon.stop() == 0
    assert "STOPPING=1" in "\n".join(daemon.notifications) or await _drain(daemon, "STOPPING=1")
    assert "Traceback" not in daemon.log()


async def _drain(daemon: DaemonProcess, line: str) -> bool:
    with trio.move_on_after(2):
        await daemon.wait_for(line)
        return True
    return False


async def test_restart_keeps_the_login_without_a_new_exchange(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    daemon = await started(world_dir, config, daemon_factory)
    await cli("login", "token", "--socket", daemon.socket,
              stdin=token_server.api_token.encode(), check=True)  # fmt: skip
    assert await daemon.stop() == 0
    daemon = await started(world_dir, config, daemon_factory)
    data = await status(daemon)
    assert data["identity"] == "token:ci-bot" and data["token_valid"] is True
    assert token_server.exchanges == 1


async def test_unprivileged_user_may_read_status_but_not_log_in(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    daemon = await started(world_dir, config, daemon_factory)
    seen = await cli("status", "--json", "--socket", daemon.socket, user="nobody")
    assert seen.returncode == exitcodes.NOT_LOGGED_IN, seen.stderr
    assert seen.stderr == b""
    assert json.loads(seen.stdout)["logged_in"] is False

    refused = await cli(
        "login", "token", "--socket", daemon.socket, user="nobody",
        stdin=token_server.api_token.encode(),
    )  # fmt: skip
    assert refused.returncode == exitcodes.DENIED
    assert b"/login needs root" in refused.stderr and b"uid 65534" in refused.stderr
    assert token_server.exchanges == 0
    logout = await cli("logout", "--socket", daemon.socket, user="nobody")
    assert logout.returncode == exitcodes.DENIED and b"needs root" in logout.stderr


async def test_cli_without_daemon_says_how_to_start_it(tmp_path: Path) -> None:
    result = await cli("status", "--socket", str(tmp_path / "absent.sock"))
    assert result.returncode == exitcodes.UNREACHABLE
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "cannot reach the nixd daemon" in err
    assert "systemctl start nixd" in err and "nixd daemon --config" in err
    # with --json the error is JSON on stdout, so `2>&1 | jq` still reads JSON
    result = await cli("status", "--json", "--socket", str(tmp_path / "absent.sock"))
    assert result.returncode == exitcodes.UNREACHABLE and result.stderr == b""
    error = json.loads(result.stdout)["error"]
    assert (error["code"], error["kind"]) == (exitcodes.UNREACHABLE, "unreachable")
    assert "cannot reach the nixd daemon" in error["message"]


async def test_config_reload_keeps_old_config_on_error(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    daemon = await started(world_dir, config, daemon_factory)
    good = config.read_text()

    config.write_text(good.replace("shutdown_grace = 2", "shutdown_grace = 2\nbogus = 1"))
    await daemon.wait_log("refused, keeping the old config")
    assert f"{config}:daemon.bogus: unknown key" in daemon.log()
    data = await status(daemon)
    assert "config not reloaded" in str(data["last_error"])

    # a valid change (a new upstream) is applied in place; SIGHUP works too
    config.write_text(good + '\n[[proxy.upstreams]]\nurl = "http://127.0.0.1:9"\npriority = 60\n')
    await daemon.wait_log("config reloaded (config file changed)")
    # write_text truncates first: the watcher may have reloaded the half-written file too
    with trio.fail_after(20):
        while [u["url"] for u in (await status(daemon))["upstreams"]] != ["http://127.0.0.1:9"]:  # noqa: ASYNC110 - another process
            await trio.sleep(0.1)
    config.write_text(good)
    daemon.process.send_signal(signal.SIGHUP)
    await daemon.wait_log("config reloaded (SIGHUP)")
    assert daemon.process.returncode is None
    assert await daemon.stop() == 0


async def test_socket_activation_with_systemd_socket_activate(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    """systemd-socket-activate binds both sockets and starts the daemon on first contact."""
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is required (apt-get install systemd)"
    with socket.socket() as probe:  # a free port for the proxy's activated listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(world_dir, server_url=token_server.url)
    (world_dir / "run").mkdir()
    control = world_dir / "run" / "nixd.sock"
    command = [
        activate,
        "-l", str(control),
        "-l", f"127.0.0.1:{port}",
        "--fdname=control:proxy",
        "-E", "NOTIFY_SOCKET",
        "-E", "PYTHONUNBUFFERED",
        *NIXD, "-v", "daemon", "--config", str(config),
    ]  # fmt: skip
    daemon = await start_daemon(world_dir, config, command=command)
    daemon_factory.append(daemon)
    with trio.fail_after(20):
        while not control.exists():  # noqa: ASYNC110 - another process creates it
            await trio.sleep(0.05)
    assert daemon.notifications == []  # nothing runs until someone connects
    data = await status(daemon)  # this connection starts the daemon, which answers it
    await daemon.wait_for("READY=1")
    assert data["proxy"]["url"] == f"http://127.0.0.1:{port}"  # type: ignore[index]
    assert "socket activation" in daemon.log()
    # the activated proxy port answers (nix-cache-info is public)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/nix-cache-info")
    assert response.status_code == 200 and b"StoreDir:" in response.content
    assert await daemon.stop() == 0


async def test_watchdog_pings(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    daemon = await start_daemon(world_dir, config, env={"WATCHDOG_USEC": "400000"})
    daemon_factory.append(daemon)
    await daemon.wait_for("READY=1")
    with trio.fail_after(10):
        while sum(n == "WATCHDOG=1" for n in daemon.notifications) < 3:
            daemon.notifications.append((await daemon.notify.recv(4096)).decode())
    assert await daemon.stop() == 0
