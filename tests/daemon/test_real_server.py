"""End to end with the real ``nixd-server``: the daemon logs in, pins its keys, renews."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import trio

from tests.daemon.conftest import DaemonProcess, cli, start_daemon, write_config

SERVER = [
    sys.executable,
    "-c",
    "import sys; from nixd.server.cli import main; sys.exit(main())",
]


async def test_login_against_the_real_server(
    world_dir: Path, daemon_factory: list[DaemonProcess]
) -> None:
    state = world_dir / "server"
    with trio.fail_after(60):
        init = await trio.run_process(
            [*SERVER, "init", str(state)], capture_stdout=True, capture_stderr=True
        )
    match = re.search(rb"(nixd_[A-Za-z0-9_-]+)", init.stdout)
    assert match, init.stdout
    api_token = match.group(1)
    log = open(world_dir / "server.log", "wb")  # noqa: ASYNC230, SIM115 - closed below
    server = await trio.lowlevel.open_process(
        [*SERVER, "serve", str(state), "--listen", "127.0.0.2:0"],
        stdout=log,
        stderr=log,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        address = state / "run" / "address"
        with trio.fail_after(30):
            while not address.exists() or not address.read_text().strip():  # noqa: ASYNC110
                await trio.sleep(0.05)
        url = address.read_text().split()[0].rstrip("/")
        async with httpx.AsyncClient() as client:
            keys = (await client.get(f"{url}/api/v1/cache/keys")).json()["keys"]

        config = write_config(world_dir, server_url=url)
        daemon = await start_daemon(world_dir, config)
        daemon_factory.append(daemon)
        await daemon.wait_for("READY=1")
        login = await cli("login", "token", "--socket", daemon.socket, stdin=api_token)
        assert login.returncode == 0, login.stderr.decode() + daemon.log()
        result = await cli("status", "--json", "--socket", daemon.socket, check=True)
        status = json.loads(result.stdout)
        assert status["logged_in"] and status["token_valid"]
        assert status["identity"].startswith("token:")
        assert status["pinned_keys"] == keys
        assert [u["url"] for u in status["upstreams"]] == [f"{url}/cache"]
        assert api_token.decode() not in daemon.log()
        assert await daemon.stop() == 0
    finally:
        server.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await server.wait()
        if server.returncode is None:
            server.kill()
            await server.wait()
        log.close()
