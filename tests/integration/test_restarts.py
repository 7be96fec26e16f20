"""A large substitution with the real Nix survives restarts of the daemon and the server.

The session's large path (``BIG_BYTES``, random, so its NAR is as large) is substituted
by a real ``nix-store --realise`` through the daemon's proxy; the server's answers pass a
relay (:mod:`tests.integration.relay`) that paces them, so the transfer takes a known
minimum time. When the relay has sent on a quarter of the file, one of three restarts
happens, and the build must still get every byte:

- the daemon under a socket holder (the real ``systemd-socket-activate``, restarted the
  way ``systemctl restart`` does: SIGTERM, then started again on the same sockets);
- the daemon restarted in place (``nixd daemon --restart``: the sockets are inherited
  across an ``exec``);
- the server killed and started again on its port: the proxy resumes with ``Range``.

Nothing here is timed: the steps wait for bytes forwarded, a pid that changed, a
counter. The grace the daemon gives downloads in flight is short (1 s) and the pacing
makes the rest of the transfer take longer than that, so each daemon restart really
cuts Nix's transfer, and Nix's own ``Range`` retry is what the next daemon serves.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from tests.daemon.conftest import NIXD, DaemonProcess
from tests.integration.conftest import (
    BIG_BYTES,
    SERVER_HOST,
    CacheState,
    Loop,
    Server,
    curl,
    serve,
    start_loop,
)
from tests.integration.relay import PacedRelay

pytestmark = pytest.mark.realnix

#: the pace of the server's answers: BIG_BYTES take at least 6 s
RATE = BIG_BYTES // 6
#: a restart happens once this much of the NAR has been sent on
RESTART_AT = BIG_BYTES // 4


def retried(stderr: bytes) -> list[str]:
    """Nix's own warnings about a cut transfer it retried (with ``Range`` if it had bytes)."""
    return [line for line in stderr.decode(errors="replace").splitlines() if "retrying" in line]


async def metric(loop: Loop, name: str) -> float:
    got = await curl(f"{loop.proxy}/metrics")
    match = re.search(rf"(?m)^{name} (\S+)$", got.stdout.decode())
    return float(match.group(1)) if match else 0.0


async def substitute_across(
    loop: Loop,
    cache: CacheState,
    relay: PacedRelay,
    root: Path,
    restart: Callable[[], Awaitable[None]],
) -> subprocess.CompletedProcess[bytes]:
    """``nix-store --realise`` the large path; ``restart()`` once a quarter has passed."""
    nix = loop.nix(root / "nix")
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def realise() -> None:
        run = functools.partial(nix.run, ["nix-store", "--realise", cache.big], check=False)
        results.append(await trio.to_thread.run_sync(run))

    with trio.fail_after(600):  # a hang guard only
        async with trio.open_nursery() as nursery:
            nursery.start_soon(realise)
            await relay.wait_forwarded(RESTART_AT)
            await restart()
    (result,) = results
    assert result.returncode == 0, result.stderr.decode() + loop.daemon.log()
    assert nix.real_path(cache.big).read_bytes() == cache.big_file.read_bytes()
    return result


async def relayed_loop(
    nursery: trio.Nursery,
    cache: CacheState,
    root: Path,
    servers: list[Server],
    daemons: list[DaemonProcess],
    *,
    hold: bool = False,
    held: bool = False,
) -> tuple[Loop, PacedRelay]:
    server = serve(servers, cache, root, access_ttl=3600, hold=hold)
    relay = await nursery.start(PacedRelay(SERVER_HOST, server.process.port, RATE).serve)
    loop = await start_loop(
        root, server, daemons, shutdown_grace=1, server_url=relay.url, held=held
    )
    return loop, relay


async def test_daemon_restart_with_held_sockets(
    cache_state: CacheState,
    world_dir: Path,
    server_factory: list[Server],
    daemon_factory: list[DaemonProcess],
) -> None:
    """What ``systemctl restart nixd`` does with the socket units holding the sockets."""
    async with trio.open_nursery() as nursery:
        loop, relay = await relayed_loop(
            nursery, cache_state, world_dir, server_factory, daemon_factory, held=True
        )
        first = int((await loop.status())["pid"])  # type: ignore[call-overload]

        async def restart() -> None:
            os.kill(first, signal.SIGTERM)
            while True:  # the holder starts the next daemon on the same sockets
                try:
                    pid = int((await loop.status())["pid"])  # type: ignore[call-overload]
                except AssertionError:
                    pid = first  # between the two daemons: the queued request timed out
                if pid != first:
                    return
                await trio.sleep(0.2)

        result = await substitute_across(loop, cache_state, relay, world_dir, restart)
        nursery.cancel_scope.cancel()
    assert retried(result.stderr), "the restart did not cut the transfer"
    assert "did not finish within" in loop.daemon.log()  # the first daemon cut it
    assert await loop.daemon.stop() == 0


async def test_daemon_restart_in_place(
    cache_state: CacheState,
    world_dir: Path,
    server_factory: list[Server],
    daemon_factory: list[DaemonProcess],
) -> None:
    """Without a socket holder: ``nixd daemon --restart`` keeps the sockets across exec."""
    async with trio.open_nursery() as nursery:
        loop, relay = await relayed_loop(
            nursery, cache_state, world_dir, server_factory, daemon_factory
        )

        async def restart() -> None:
            done = await trio.run_process(
                [*NIXD, "daemon", "--restart", "--socket", loop.daemon.socket],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr.decode() + loop.daemon.log()

        result = await substitute_across(loop, cache_state, relay, world_dir, restart)
        nursery.cancel_scope.cancel()
    assert retried(result.stderr), "the restart did not cut the transfer"
    status = await loop.status()
    assert status["generation"] == 1 and status["pid"] == loop.daemon.process.pid
    assert "did not finish within" in loop.daemon.log()
    assert await loop.daemon.stop() == 0


async def test_server_restart_mid_stream_is_resumed_with_range(
    cache_state: CacheState,
    world_dir: Path,
    server_factory: list[Server],
    daemon_factory: list[DaemonProcess],
) -> None:
    """The server goes away mid-body and comes back on its port; Nix never notices."""
    async with trio.open_nursery() as nursery:
        loop, relay = await relayed_loop(
            nursery, cache_state, world_dir, server_factory, daemon_factory, hold=True
        )
        server = loop.server.process

        async def restart() -> None:
            await trio.to_thread.run_sync(server.kill)
            await trio.to_thread.run_sync(server.start)

        result = await substitute_across(loop, cache_state, relay, world_dir, restart)
        resumes = await metric(loop, "nixd_proxy_upstream_resumes_total")
        nursery.cancel_scope.cancel()
    assert server.starts == 2
    assert resumes >= 1, loop.daemon.log()
    assert retried(result.stderr) == [], result.stderr.decode()  # Nix saw a pause only
    assert "resuming in" in loop.daemon.log()
    assert await loop.daemon.stop() == 0
