"""End to end with the real ``nixd-server``: the daemon logs in, pins its keys, renews."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import httpx
import trio

from tests.daemon.conftest import STATUS_SHOWN, DaemonProcess, cli, start_daemon, write_config
from tests.serverproc import server_cli, start_server


async def test_login_against_the_real_server(
    world_dir: Path, daemon_factory: list[DaemonProcess]
) -> None:
    state = world_dir / "server"
    init = await trio.to_thread.run_sync(server_cli, "init", str(state))
    match = re.search(r"(nixd_[A-Za-z0-9_-]+)", init.stdout)
    assert match, init.stdout
    api_token = match.group(1)
    server = await trio.to_thread.run_sync(functools.partial(start_server, state, host="127.0.0.2"))
    try:
        url = server.url
        async with httpx.AsyncClient() as client:
            keys = (await client.get(f"{url}/api/v1/cache/keys")).json()["keys"]

        config = write_config(world_dir, server_url=url)
        daemon = await start_daemon(world_dir, config)
        daemon_factory.append(daemon)
        await daemon.wait_for("READY=1")
        login = await cli("login", "token", "--socket", daemon.socket, stdin=api_token.encode())
        assert login.returncode == 0, login.stderr.decode() + daemon.log()
        result = await cli("status", "--json", "--socket", daemon.socket, check=STATUS_SHOWN)
        status = json.loads(result.stdout)
        assert status["logged_in"] and status["token_valid"]
        assert status["identity"].startswith("token:")
        assert status["pinned_keys"] == keys
        assert [u["url"] for u in status["upstreams"]] == [f"{url}/cache"]
        assert api_token not in daemon.log()
        assert await daemon.stop() == 0
    finally:
        await trio.to_thread.run_sync(server.close)
