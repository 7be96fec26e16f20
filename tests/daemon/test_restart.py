"""Restarting the real daemon keeps its sockets open: connections queue, none is refused.

Two ways, as the daemon runs: in place (``nixd daemon --restart``, SIGUSR2: an ``exec``
with the sockets inherited), and under a socket holder that restarts it the way systemd
does (``start_held`` in the daemon tests' conftest: the real ``systemd-socket-activate``
binds the sockets; a shell loop keeps them and starts the daemon again each time it
exits). Meanwhile a client keeps asking the proxy; every request must be answered.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from tests.daemon.conftest import (
    NIXD,
    STATUS_SHOWN,
    DaemonProcess,
    cli,
    start_daemon,
    start_held,
    write_config,
)
from tests.daemon.tokenserver import TokenServer


async def status(socket_path: str) -> dict[str, object]:
    result = await cli("status", "--json", "--socket", socket_path, check=STATUS_SHOWN)
    data: dict[str, object] = json.loads(result.stdout)
    return data


@dataclass
class Prober:
    """Asks the proxy for ``/nix-cache-info`` over fresh connections until stopped.

    A connection refused is a failure: that is what holding the sockets prevents. So is
    one closed without an answer: a daemon that stops (a restart in place, SIGTERM)
    answers every connection it accepted, the ones whose request comes while it drains
    too (:mod:`nixd.http.serve`). Only a daemon killed outright (SIGKILL) cannot: with
    ``killed``, such a connection is retried once on a new one, as Nix retries a
    transient failure, and the retry must be answered by the next daemon; those are
    counted in ``dropped``.
    """

    host: str
    port: int
    killed: bool = False
    answered: int = 0
    dropped: int = 0
    failures: list[str] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)

    async def ask(self) -> None:
        with trio.fail_after(90):  # a hang guard: queued connections wait for the next image
            stream = await trio.open_tcp_stream(self.host, self.port)
            async with stream:
                await stream.send_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
                got = b""
                while b"StoreDir:" not in got:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError as exc:  # reset
                        raise _Dropped(got) from exc
                    if not data:
                        raise _Dropped(got)
                    got += data
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                try:
                    await self.ask()
                except _Dropped as dropped:
                    if dropped.args[0] or not self.killed:  # a cut answer, or a stop's drop
                        raise
                    self.dropped += 1
                    await self.ask()
                self.answered += 1
            except (OSError, _Dropped, trio.BrokenResourceError) as exc:
                self.failures.append(repr(exc))
            await trio.sleep(0.01)


class _Dropped(Exception):
    """The connection closed before the whole answer (``args[0]``: what had come)."""


def proxy_address(data: dict[str, object]) -> tuple[str, int]:
    url = str(data["proxy"]["url"])  # type: ignore[index]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def test_restart_in_place_keeps_the_sockets(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    daemon = await start_daemon(world_dir, config)
    daemon_factory.append(daemon)
    await daemon.wait_for("READY=1")
    before = await status(daemon.socket)
    assert before["generation"] == 0
    prober = Prober(*proxy_address(before))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prober.run)
        while prober.answered < 3:  # noqa: ASYNC110 - the prober is answered by another process
            await trio.sleep(0.05)
        answered_before = prober.answered
        with trio.fail_after(150):
            restart = await trio.run_process(
                [*NIXD, "daemon", "--restart", "--socket", daemon.socket],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        assert restart.returncode == 0, restart.stderr.decode() + daemon.log()
        assert b"restarted in place, generation 1" in restart.stdout
        answered_during = prober.answered
        while prober.answered < answered_during + 3:  # noqa: ASYNC110
            await trio.sleep(0.05)
        prober.stop.set()
    assert prober.failures == [], daemon.log()
    assert answered_during > answered_before
    after = await status(daemon.socket)
    assert after["pid"] == before["pid"] == daemon.process.pid
    assert after["generation"] == 1 and after["started_at"] != before["started_at"]
    assert proxy_address(after) == proxy_address(before)
    # systemd is told of the restart as of a reload, and of readiness again after it
    await daemon.wait_for("RELOADING=1")
    await daemon.wait_for("STATUS=restarting in place")
    with trio.fail_after(20):
        while sum("READY=1" in n.split("\n") for n in daemon.notifications) < 2:
            daemon.notifications.append((await daemon.notify.recv(4096)).decode())
    with trio.fail_after(20):  # READY=1 is sent just before the "ready" line is logged
        while "ready (generation 1)" not in daemon.log():  # noqa: ASYNC110
            await trio.sleep(0.05)
    log = daemon.log()
    assert "SIGUSR2: restarting in place" in log and "ready (generation 1)" in log
    assert "socket activation: control, proxy" in log
    assert await daemon.stop() == 0


async def test_restart_in_place_refused_when_the_config_is_broken(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    daemon = await start_daemon(world_dir, config)
    daemon_factory.append(daemon)
    await daemon.wait_for("READY=1")
    good = config.read_text()
    # a key the daemon refuses: written with the watcher's reload refused too
    config.write_text(good + "\n[bogus]\n")
    await daemon.wait_log("refused, keeping the old config")
    with trio.fail_after(150):
        refused = await trio.run_process(
            [*NIXD, "daemon", "--restart", "--socket", daemon.socket],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    assert refused.returncode == 1
    assert b"restart in place refused" in refused.stderr and b"keeps running" in refused.stderr
    await daemon.wait_log("restart in place refused, still running")
    data = await status(daemon.socket)
    assert data["generation"] == 0 and data["restart_refusals"] == 1
    assert data["restart_error"].startswith("restart in place refused: ")
    daemon.process.send_signal(signal.SIGUSR2)  # the signal itself, the same way
    await daemon.wait_log("restart in place refused, still running", count=2)
    assert (await status(daemon.socket))["restart_refusals"] == 2
    config.write_text(good)
    assert await daemon.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_restart_under_a_socket_holder_refuses_nothing(
    world_dir: Path,
    token_server: TokenServer,
    daemon_factory: list[DaemonProcess],
    sig: signal.Signals,
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    daemon, port = await start_held(world_dir, config, daemon_factory)
    first = await status(daemon.socket)  # the first connection starts the daemon
    assert proxy_address(first) == ("127.0.0.1", port)
    prober = Prober("127.0.0.1", port, killed=sig == signal.SIGKILL)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prober.run)
        while prober.answered < 3:  # noqa: ASYNC110
            await trio.sleep(0.05)
        # what `systemctl restart` does to the service (or a crash, with Restart=)
        pid = int(str(first["pid"]))
        os.kill(pid, sig)
        answered_at_kill = prober.answered
        with trio.fail_after(90):
            while True:
                try:
                    now = await status(daemon.socket)
                except AssertionError:
                    continue
                if now["pid"] != pid:
                    break
                await trio.sleep(0.1)
        while prober.answered < answered_at_kill + 3:  # noqa: ASYNC110
            await trio.sleep(0.05)
        prober.stop.set()
    assert prober.failures == [], daemon.log()
    assert proxy_address(now) == ("127.0.0.1", port)
    assert await daemon.stop() == 0


async def test_restart_in_place_moves_a_socket_whose_address_changed(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    """A new proxy address waits for a restart (a reload cannot move it); in place, the
    new image binds it instead of inheriting the old socket."""
    config = write_config(world_dir, server_url=token_server.url)
    daemon = await start_daemon(world_dir, config)
    daemon_factory.append(daemon)
    await daemon.wait_for("READY=1")
    before = await status(daemon.socket)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    await daemon.wait_log("take effect on restart")
    with trio.fail_after(150):
        restart = await trio.run_process(
            [*NIXD, "daemon", "--restart", "--socket", daemon.socket],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    assert restart.returncode == 0, restart.stderr.decode() + daemon.log()
    after = await status(daemon.socket)
    assert proxy_address(after) == ("127.0.0.1", port) != proxy_address(before)
    assert after["generation"] == 1
    assert "the proxy moves to 127.0.0.1:" in daemon.log()
    assert await daemon.stop() == 0
