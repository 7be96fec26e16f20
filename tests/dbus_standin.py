"""A private system bus for tests: a real ``dbus-daemon`` plus stand-ins for systemd,
logind and NetworkManager.

:func:`open_test_bus` runs ``/usr/bin/dbus-daemon`` on a unix socket in a temp dir with a
config that allows everything, and yields its address (what ``DBUS_SYSTEM_BUS_ADDRESS``
would hold). :class:`StandIn` is one jeepney connection that owns
``org.freedesktop.systemd1``, ``org.freedesktop.login1`` and
``org.freedesktop.NetworkManager``: it answers ``Manager.TryRestartUnit`` (recording each
call, or answering with a chosen D-Bus error) and emits logind's ``PrepareForSleep`` and
NetworkManager's ``StateChanged`` on demand.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import trio
from jeepney import (
    DBusAddress,
    HeaderFields,
    MessageType,
    message_bus,
    new_error,
    new_method_return,
    new_signal,
)
from jeepney.io.trio import DBusConnection, open_dbus_connection

DBUS_DAEMON = "/usr/bin/dbus-daemon"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="*"/>
  </policy>
</busconfig>
"""

NAMES = (
    "org.freedesktop.systemd1",
    "org.freedesktop.login1",
    "org.freedesktop.NetworkManager",
)
LOGIN1 = DBusAddress("/org/freedesktop/login1", interface="org.freedesktop.login1.Manager")
NM = DBusAddress("/org/freedesktop/NetworkManager", interface="org.freedesktop.NetworkManager")


@dataclass
class PrivateBus:
    address: str
    socket: Path
    process: trio.Process

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        with trio.fail_after(10):
            await self.process.wait()


def _prepare(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    socket = directory / "system_bus_socket"
    socket.unlink(missing_ok=True)
    config = directory / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=socket))
    return socket, config


async def start_bus(directory: Path) -> PrivateBus:
    """Start a dbus-daemon listening in ``directory``; returns once it accepts clients."""
    socket, config = _prepare(directory)
    with open(directory / "bus.log", "ab") as log:  # noqa: ASYNC230 - opened once, local
        process = await trio.lowlevel.open_process(
            [DBUS_DAEMON, f"--config-file={config}", "--nofork", "--nopidfile", "--print-address"],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert process.stdout is not None
    line = b""
    try:
        with trio.fail_after(10):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1024)
                if not chunk:
                    raise AssertionError("dbus-daemon exited before printing its address")
                line += chunk
    except BaseException:
        process.kill()
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await process.wait()
        raise
    return PrivateBus(line.decode().strip(), socket, process)


@contextlib.asynccontextmanager
async def open_test_bus(directory: Path) -> AsyncIterator[PrivateBus]:
    """A dbus-daemon for the duration of the block, killed at the end."""
    bus = await start_bus(directory)
    try:
        yield bus
    finally:
        with trio.CancelScope(shield=True):
            await bus.stop()


@dataclass
class StandIn:
    """systemd, logind and NetworkManager as far as nixd talks to them."""

    address: str
    #: (unit, mode) of every TryRestartUnit call, in order
    restarts: list[tuple[str, str]] = field(default_factory=list)
    #: answer TryRestartUnit with this D-Bus error name instead of a job
    fail_restart: str | None = None
    conn: DBusConnection | None = None
    _restarted: trio.Event = field(default_factory=trio.Event)

    async def serve(self, *, task_status: trio.TaskStatus[StandIn]) -> None:
        """Own the names and answer calls until cancelled or the bus goes away."""
        conn = await open_dbus_connection(self.address)
        async with conn:
            self.conn = conn
            for name in NAMES:
                await conn.send(message_bus.RequestName(name))
            # the replies arrive in order; wait until the last name is ours
            pending = len(NAMES)
            with trio.fail_after(10):
                while pending:
                    msg = await conn.receive()
                    if msg.header.message_type == MessageType.method_return:
                        assert msg.body == (1,), f"could not own a name: {msg.body}"
                        pending -= 1
            task_status.started(self)
            with contextlib.suppress(trio.EndOfChannel, trio.BrokenResourceError):
                while True:
                    msg = await conn.receive()
                    if msg.header.message_type == MessageType.method_call:
                        await self._answer(conn, msg)

    async def _answer(self, conn: DBusConnection, msg: object) -> None:
        fields = msg.header.fields  # type: ignore[attr-defined]
        call = (fields.get(HeaderFields.interface), fields.get(HeaderFields.member))
        if call == ("org.freedesktop.systemd1.Manager", "TryRestartUnit"):
            unit, mode = msg.body  # type: ignore[attr-defined]
            self.restarts.append((unit, mode))
            self._restarted.set()
            self._restarted = trio.Event()
            if self.fail_restart is not None:
                reply = new_error(msg, self.fail_restart, "s", (f"Unit {unit} refused.",))
            else:
                job = f"/org/freedesktop/systemd1/job/{len(self.restarts)}"
                reply = new_method_return(msg, "o", (job,))
        else:
            reply = new_error(
                msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (f"no {call[1]} here",)
            )
        await conn.send(reply)

    async def wait_restarts(self, count: int, within: float = 15.0) -> None:
        with trio.fail_after(within):
            while len(self.restarts) < count:
                await self._restarted.wait()

    async def prepare_for_sleep(self, sleeping: bool) -> None:
        assert self.conn is not None
        await self.conn.send(new_signal(LOGIN1, "PrepareForSleep", "b", (sleeping,)))

    async def network_state(self, state: int) -> None:
        assert self.conn is not None
        await self.conn.send(new_signal(NM, "StateChanged", "u", (state,)))


@contextlib.asynccontextmanager
async def open_standin(address: str) -> AsyncIterator[StandIn]:
    async with trio.open_nursery() as nursery:
        standin: StandIn = await nursery.start(StandIn(address).serve)
        yield standin
        nursery.cancel_scope.cancel()
