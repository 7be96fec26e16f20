"""The real daemon process against what local users and editors can do to it: every bad
config reload is refused with the reason in ``status``; credentials inside upstream URLs
show nowhere; deep JSON from ``nobody`` ends only its connection; and nothing the daemon
writes is writable by anyone else, even started with umask 000."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.daemon.conftest import NIXD, STATUS_SHOWN, DaemonProcess, cli, start_daemon, write_config
from tests.daemon.test_control import as_nobody
from tests.daemon.tokenserver import TokenServer

PASSWORD = "hunter2-in-the-url"
UPSTREAM = f'[[proxy.upstreams]]\nurl = "http://ci:{PASSWORD}@127.0.0.1:9"\npriority = 60\n'


async def started(daemon: DaemonProcess, factory: list[DaemonProcess]) -> DaemonProcess:
    factory.append(daemon)
    try:
        await daemon.wait_for("READY=1")
    except trio.TooSlowError:
        raise AssertionError(f"no READY=1; daemon log:\n{daemon.log()}") from None
    return daemon


async def status(daemon: DaemonProcess, user: str | None = None) -> dict[str, Any]:
    result = await cli("status", "--json", "--socket", daemon.socket, user=user)
    assert result.returncode in STATUS_SHOWN, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


BAD_RELOADS = [
    ("non-utf8-byte", b"# caf\xe9\n", "not UTF-8"),
    ("ipv6-url-unclosed", b'[[proxy.upstreams]]\nurl = "http://[::1"\n', "proxy.upstreams[1].url"),
    ("port-99999", b'[[proxy.upstreams]]\nurl = "http://127.0.0.1:99999"\n', "Port out of range"),
    ("arrays-2000-deep", b"x = " + b"[" * 2000 + b"]" * 2000 + b"\n", "nested too deeply"),
    ("integer-of-5000-digits", b"x = " + b"9" * 5000 + b"\n", "invalid TOML"),
]


async def test_bad_reloads_are_refused_and_status_says_why(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url, extra=UPSTREAM)
    good = config.read_bytes()
    daemon = await started(await start_daemon(world_dir, config), daemon_factory)
    pid = (await status(daemon))["pid"]
    for count, (name, fragment, reason) in enumerate(BAD_RELOADS, 1):
        config.write_bytes(good + fragment)
        await daemon.wait_log("refused, keeping the old config", count=count)
        data = await status(daemon)
        assert data["pid"] == pid, name
        assert reason in str(data["config_error"]), (name, data["config_error"])
        assert [u["priority"] for u in data["upstreams"]] == [60], name  # the old config
        human = await cli("status", "--socket", daemon.socket, check=STATUS_SHOWN)
        assert b"CONFIG:" in human.stdout and b"old config" in human.stdout
    assert daemon.process.returncode is None
    config.write_bytes(good.replace(b"priority = 60", b"priority = 61"))
    await daemon.wait_log("config reloaded (config file changed)")
    data = await status(daemon)
    assert data["config_error"] is None
    assert [u["priority"] for u in data["upstreams"]] == [61]
    assert "Traceback" not in daemon.log()
    assert await daemon.stop() == 0


async def test_url_credentials_show_in_no_status_metrics_or_log(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url, extra=UPSTREAM)
    daemon = await started(await start_daemon(world_dir, config), daemon_factory)
    proxy = (await status(daemon))["proxy"]["url"]
    secret = (world_dir / "state" / "proxy-secret").read_text().strip()
    async with httpx.AsyncClient(base_url=proxy, auth=("nixd", secret)) as client:
        # port 9 refuses: the upstream's error is recorded, with its name (and Nix is
        # told "absent, not remembered", nixd.proxy.errors)
        assert (await client.get(f"/{'0' * 32}.narinfo")).status_code == 404
        metrics = (await client.get("/metrics")).text
    seen = await status(daemon, user="nobody")
    upstream = seen["upstreams"][0]
    assert upstream["url"] == "http://***@127.0.0.1:9"
    assert upstream["last_error"] and upstream["healthy"] is False
    assert 'upstream="http://***@127.0.0.1:9"' in metrics
    human = await cli("status", "--socket", daemon.socket, user="nobody", check=STATUS_SHOWN)
    for shown in (json.dumps(seen), human.stdout.decode(), metrics, daemon.log()):
        assert PASSWORD not in shown
    assert await daemon.stop() == 0
    assert PASSWORD not in daemon.log()


async def test_deep_json_from_nobody_ends_only_its_connection(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    daemon = await started(await start_daemon(world_dir, config), daemon_factory)
    with trio.fail_after(60):
        result = await trio.run_process(as_nobody(daemon.socket, "deep"), capture_stdout=True)
    assert result.stdout.strip() == b"200"
    assert (await status(daemon))["logged_in"] is False
    assert daemon.process.returncode is None
    assert await daemon.stop() == 0
    assert "Traceback" not in daemon.log()


def _tree(root: Path) -> dict[Path, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[path] = os.lstat(path).st_mode
    return out


@pytest.mark.parametrize("umask", ["000"])
async def test_nothing_the_daemon_writes_is_writable_by_others_under_umask(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess], umask: str
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    before = set(_tree(world_dir))
    command = ["sh", "-c", f'umask {umask} && exec "$@"', "sh", *NIXD, "-v", "daemon"]
    daemon = await started(
        await start_daemon(world_dir, config, command=[*command, "--config", str(config)]),
        daemon_factory,
    )
    await cli(
        "login", "token", "--socket", daemon.socket,
        stdin=token_server.api_token.encode(), check=True,
    )  # fmt: skip
    assert await daemon.stop() == 0
    modes = _tree(world_dir)
    created = {
        p: m
        for p, m in modes.items()
        if p not in before and p != daemon.log_path and not p.name.startswith("notify-")
    }
    socket_path = Path(daemon.socket)
    store = world_dir / "store"
    expected = {
        world_dir / "state" / "state.json": 0o600,
        world_dir / "state" / "proxy-secret": 0o600,
        world_dir / "etc" / "nixd-netrc": 0o600,
        store / "index.sqlite": 0o600,
        store / "nar": 0o700,
        store / "tmp": 0o700,
    }
    for path, mode in expected.items():
        assert stat.S_IMODE(created[path]) == mode, path
    for path, mode in created.items():
        if path == socket_path or stat.S_ISSOCK(mode):
            continue
        assert not stat.S_IMODE(mode) & 0o022, f"{path} is {stat.S_IMODE(mode):o}"
