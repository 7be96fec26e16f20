"""``kill -9`` of the daemon while it writes the login state, netrc and nix.conf.

Whenever the daemon dies, Nix's files are complete — the old version or the new one — and
the real ``nix`` parses them; the restarted daemon carries on.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import trio

from nixd.nix.netrc import parse_netrc
from tests.daemon.conftest import STATUS_SHOWN, DaemonProcess, cli, start_daemon, write_config
from tests.daemon.tokenserver import TokenServer

USER_CONF = "experimental-features = nix-command\nconnect-timeout = 7\n"


async def nix_reads(etc: Path) -> str:
    """The real nix parses nix.conf (with nixd's include) and prints its settings."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NIX_CONF_DIR": str(etc),
        "NIX_USER_CONF_FILES": "",
        "HOME": str(etc),
    }
    with trio.fail_after(30):
        result = await trio.run_process(
            ["nix", "show-config"], env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def check_files(root: Path) -> None:
    etc = root / "etc"
    conf = (etc / "nix.conf").read_text()
    assert conf.startswith(USER_CONF), conf  # the user's lines are never lost
    assert conf.count("nixd.conf") <= 1
    netrc = etc / "nixd-netrc"
    if netrc.exists():
        entries = parse_netrc(netrc.read_text(), source=str(netrc))
        assert any(e.machine == "127.0.0.1" and e.login == "nixd" for e in entries)
    fragment = etc / "nixd.conf"
    if fragment.exists():
        text = fragment.read_text()
        assert "extra-substituters = http://127.0.0.1:" in text
        assert text.endswith("\n")
    state = root / "state" / "state.json"
    if state.exists():
        json.loads(state.read_text())  # complete JSON, never half a file


async def churn(daemon: DaemonProcess, token_server: TokenServer, config: Path) -> None:
    """Log in and out and change the config, as fast as the daemon allows."""
    path = trio.Path(config)
    base = await path.read_text()
    extra = '\n[[proxy.upstreams]]\nurl = "http://127.0.0.1:9"\n'
    i = 0
    while True:
        i += 1
        await path.write_text(base + (extra if i % 2 else ""))
        await cli("login", "token", "--socket", daemon.socket,
                  stdin=token_server.api_token.encode())  # fmt: skip
        if i % 3 == 0:
            await cli("logout", "--socket", daemon.socket)


async def test_kill_9_during_writes_leaves_complete_files(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    (world_dir / "etc" / "nix.conf").write_text(USER_CONF)
    rng = random.Random(1234)
    for _round in range(5):
        daemon = await start_daemon(world_dir, config)
        daemon_factory.append(daemon)
        await daemon.wait_for("READY=1")
        before = token_server.exchanges
        async with trio.open_nursery() as nursery:
            nursery.start_soon(churn, daemon, token_server, config)
            # kill only once this round's churn is under way (CLI start-up is slow on a
            # loaded machine), at a random moment among the writes that follow
            with trio.fail_after(60):
                while token_server.exchanges == before:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            await trio.sleep(rng.random() * 0.8)
            daemon.process.send_signal(signal.SIGKILL)
            with trio.fail_after(10):
                await daemon.process.wait()
            nursery.cancel_scope.cancel()
        check_files(world_dir)
        await nix_reads(world_dir / "etc")
    assert token_server.exchanges >= 5  # every round's kill landed among logins

    # the restarted daemon carries on: it answers, and one more login sets everything up
    config.write_text(config.read_text())
    daemon = await start_daemon(world_dir, config)
    daemon_factory.append(daemon)
    await daemon.wait_for("READY=1")
    await cli("login", "token", "--socket", daemon.socket,
              stdin=token_server.api_token.encode(), check=True)  # fmt: skip
    result = await cli("status", "--json", "--socket", daemon.socket, check=STATUS_SHOWN)
    status = json.loads(result.stdout)
    assert status["identity"] == "token:ci-bot" and status["token_valid"] is True
    check_files(world_dir)
    shown = await nix_reads(world_dir / "etc")
    substituters = next(line for line in shown.splitlines() if line.startswith("substituters"))
    assert status["proxy"]["url"] in substituters
    assert "connect-timeout = 7" in shown
    assert await daemon.stop() == 0
