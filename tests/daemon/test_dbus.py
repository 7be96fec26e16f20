"""The daemon on a real (private) system bus: unit restarts, resume and network signals.

Every test runs a real ``dbus-daemon`` with the stand-in of :mod:`tests.dbus_standin`
owning systemd's, logind's and NetworkManager's names. The last test drives the real
daemon process with ``DBUS_SYSTEM_BUS_ADDRESS`` pointing at that bus.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from jeepney import new_signal
from jeepney.io.trio import open_dbus_connection

from nixd.auth.model import AccessToken
from nixd.daemon import dbus
from nixd.daemon.refresher import Refresher
from nixd.errors import AuthError
from nixd.nix.signing import SecretKey
from tests.daemon.conftest import STATUS_SHOWN, DaemonProcess, cli, start_daemon, write_config
from tests.daemon.tokenserver import TokenServer
from tests.dbus_standin import LOGIN1, PrivateBus, StandIn, open_standin, open_test_bus, start_bus


@pytest.fixture
async def bus(world_dir: Path) -> AsyncIterator[PrivateBus]:
    async with open_test_bus(world_dir / "bus") as b:
        yield b


@pytest.fixture
async def standin(bus: PrivateBus) -> AsyncIterator[StandIn]:
    async with open_standin(bus.address) as s:
        yield s


# -- restarting a unit -----------------------------------------------------------------------


async def test_restart_asks_systemd(bus: PrivateBus, standin: StandIn) -> None:
    restarter = dbus.UnitRestarter(bus=bus.address)
    assert await restarter.try_restart("nix-daemon.service") is True
    assert await restarter.try_restart("other.service") is True
    assert standin.restarts == [("nix-daemon.service", "replace"), ("other.service", "replace")]
    assert restarter.last_error is None


async def test_restart_refused_is_a_logged_warning(
    bus: PrivateBus, standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    standin.fail_restart = "org.freedesktop.systemd1.NoSuchUnit"
    restarter = dbus.UnitRestarter(bus=bus.address)
    with caplog.at_level(logging.INFO, logger="nixd.daemon.dbus"):
        assert await restarter.try_restart("nix-daemon.service") is False
    assert standin.restarts == [("nix-daemon.service", "replace")]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "could not restart nix-daemon.service" in warnings[0].getMessage()
    assert "org.freedesktop.systemd1.NoSuchUnit" in warnings[0].getMessage()
    assert restarter.last_error is not None and "NoSuchUnit" in restarter.last_error


async def test_bus_gone_after_systemd_answered_is_a_warning(
    bus: PrivateBus, standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    restarter = dbus.UnitRestarter(bus=bus.address)
    assert await restarter.try_restart("nix-daemon.service") is True
    await bus.stop()
    with caplog.at_level(logging.INFO, logger="nixd.daemon.dbus"):
        assert await restarter.try_restart("nix-daemon.service") is False
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "could not restart nix-daemon.service" in record.getMessage()
    assert "cannot connect" in record.getMessage()


async def test_no_systemd_on_the_bus_is_said_once(
    bus: PrivateBus, caplog: pytest.LogCaptureFixture
) -> None:
    restarter = dbus.UnitRestarter(bus=bus.address)  # no stand-in: nobody owns systemd1
    with caplog.at_level(logging.DEBUG, logger="nixd.daemon.dbus"):
        assert await restarter.try_restart("nix-daemon.service") is False
        assert await restarter.try_restart("nix-daemon.service") is False
    levels = [r.levelno for r in caplog.records if "not restarting" in r.getMessage()]
    assert levels == [logging.INFO, logging.DEBUG]
    assert "ServiceUnknown" in caplog.records[0].getMessage()


async def test_no_bus_at_all(world_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    address = f"unix:path={world_dir}/nothing-here"
    with caplog.at_level(logging.INFO, logger="nixd.daemon.dbus"):
        assert await dbus.UnitRestarter(bus=address).try_restart("nix-daemon.service") is False
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert f"{world_dir}/nothing-here" in record.getMessage()
    with pytest.raises(dbus.BusError, match="cannot connect: No such file"):
        await dbus.try_restart_unit("nix-daemon.service", bus=address)


def test_system_bus_address_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/tmp/x")
    assert dbus.describe_bus(dbus.SYSTEM_BUS) == "unix:path=/tmp/x"
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS")
    assert dbus.describe_bus(dbus.SYSTEM_BUS) == dbus.DEFAULT_SYSTEM_BUS_ADDRESS


# -- resume and network ----------------------------------------------------------------------


class CountingRenew:
    """A renew function for the refresher: counts exchanges, can be told to fail."""

    def __init__(self, lifetime: float = 3600.0) -> None:
        self.lifetime = lifetime
        self.calls = 0
        self.fail = False
        self.changed = trio.Event()

    def token(self) -> AccessToken:
        now = time.time()
        return AccessToken(f"jwt-{self.calls}", now + self.lifetime, "token:test", now)

    async def __call__(self) -> AccessToken:
        self.calls += 1
        self.changed.set()
        self.changed = trio.Event()
        if self.fail:
            raise AuthError("server unavailable")
        return self.token()

    async def wait_calls(self, count: int) -> None:
        with trio.fail_after(10):
            while self.calls < count:
                await self.changed.wait()


async def settle() -> None:
    """Give a signal that should be ignored the time it would need to be acted upon."""
    await trio.sleep(0.3)


async def test_resume_renews_network_up_renews_only_when_needed(
    bus: PrivateBus, standin: StandIn
) -> None:
    renew = CountingRenew()
    refresher = Refresher()
    refresher.set_login(renew, renew.token())
    watcher = dbus.SystemBusWatcher(dbus.RefreshOnWake(refresher), bus=bus.address)
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.run)
        await nursery.start(watcher.run)
        with trio.fail_after(10):
            await watcher.wait_connected()

        await standin.prepare_for_sleep(True)  # going to sleep: nothing to do
        await standin.network_state(70)  # token fresh: nothing to do
        await settle()
        assert renew.calls == 0

        first = refresher.token
        await standin.prepare_for_sleep(False)
        await renew.wait_calls(1)
        with trio.fail_after(5):
            while refresher.token is first:  # noqa: ASYNC110 - state of the same task tree
                await trio.sleep(0.01)
        assert refresher.last_refresh is not None

        # a failed renewal is retried as soon as the network is (globally) up again
        renew.fail = True
        await standin.prepare_for_sleep(False)
        await renew.wait_calls(2)
        with trio.fail_after(5):
            while refresher.last_error is None:  # noqa: ASYNC110
                await trio.sleep(0.01)
        renew.fail = False
        await standin.network_state(50)  # NM_STATE_CONNECTED_LOCAL: not yet
        await settle()
        assert renew.calls == 2
        await standin.network_state(70)
        await renew.wait_calls(3)
        with trio.fail_after(5):
            while refresher.last_error is not None:  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_network_up_renews_a_token_near_expiry(bus: PrivateBus, standin: StandIn) -> None:
    renew = CountingRenew(lifetime=100.0)  # always "within NEAR_EXPIRY" of its end
    refresher = Refresher()
    refresher.set_login(renew, renew.token())
    watcher = dbus.SystemBusWatcher(dbus.RefreshOnWake(refresher), bus=bus.address)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        with trio.fail_after(10):
            await watcher.wait_connected()
        await standin.network_state(70)
        await renew.wait_calls(1)
        nursery.cancel_scope.cancel()


async def test_only_logind_can_announce_a_resume(bus: PrivateBus, standin: StandIn) -> None:
    renew = CountingRenew()
    refresher = Refresher()
    refresher.set_login(renew, renew.token())
    watcher = dbus.SystemBusWatcher(dbus.RefreshOnWake(refresher), bus=bus.address)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        with trio.fail_after(10):
            await watcher.wait_connected()
        # the same signal from a connection that does not own org.freedesktop.login1
        impostor = await open_dbus_connection(bus.address)
        async with impostor:
            await impostor.send(new_signal(LOGIN1, "PrepareForSleep", "b", (False,)))
            await settle()
        assert renew.calls == 0
        nursery.cancel_scope.cancel()


async def test_watcher_survives_the_bus_and_comes_back(
    world_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    renew = CountingRenew()
    refresher = Refresher()
    refresher.set_login(renew, renew.token())
    directory = world_dir / "bus"
    first = await start_bus(directory)
    watcher = dbus.SystemBusWatcher(
        dbus.RefreshOnWake(refresher), bus=first.address, retry_base=0.05, retry_cap=0.2
    )
    try:
        with caplog.at_level(logging.INFO, logger="nixd.daemon.dbus"):
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher.run)
                with trio.fail_after(10):
                    await watcher.wait_connected()
                await first.stop()
                with trio.fail_after(10):
                    await watcher.wait_connected(False)
                await settle()  # a few failed reconnects: logged once
                async with open_test_bus(directory) as second, open_standin(second.address) as s:
                    # the same socket path (and so the same address minus the guid)
                    assert second.socket == first.socket
                    with trio.fail_after(10):
                        await watcher.wait_connected()
                    await s.prepare_for_sleep(False)
                    await renew.wait_calls(1)
                    nursery.cancel_scope.cancel()
    finally:
        await first.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("lost the system bus" in m for m in messages) == 1
    assert sum(m.startswith("watching the system bus") for m in messages) == 2
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)


# -- the real daemon process -----------------------------------------------------------------


async def status(daemon: DaemonProcess) -> dict[str, object]:
    result = await cli("status", "--json", "--socket", daemon.socket, check=STATUS_SHOWN)
    data: dict[str, object] = json.loads(result.stdout)
    return data


async def test_daemon_restarts_nix_daemon_and_renews_on_resume(
    world_dir: Path,
    token_server: TokenServer,
    daemon_factory: list[DaemonProcess],
    bus: PrivateBus,
    standin: StandIn,
) -> None:
    config = write_config(world_dir, server_url=token_server.url)
    base = config.read_text().replace(
        "restart_nix_daemon = false",
        'restart_nix_daemon = true\nnix_daemon_unit = "nix-daemon-test.service"',
    )
    config.write_text(base)
    daemon = await start_daemon(world_dir, config, env={"DBUS_SYSTEM_BUS_ADDRESS": bus.address})
    daemon_factory.append(daemon)
    await daemon.wait_for("READY=1")
    await daemon.wait_log("watching the system bus at " + bus.address)
    assert standin.restarts == []  # not logged in: nothing written, nothing to restart

    # login writes the fragment: nix-daemon is restarted
    ok = await cli(
        "login", "token", "--socket", daemon.socket, stdin=token_server.api_token.encode() + b"\n"
    )
    assert ok.returncode == 0, ok.stderr
    await standin.wait_restarts(1)
    assert standin.restarts == [("nix-daemon-test.service", "replace")]
    assert token_server.exchanges == 1
    before = await status(daemon)

    # resume: a new token at once, written to the netrc; the fragment is unchanged
    await standin.prepare_for_sleep(False)
    netrc = world_dir / "etc" / "nixd-netrc"
    with trio.fail_after(15):
        while token_server.exchanges < 2 or token_server.issued[1] not in netrc.read_text():  # noqa: ASYNC110
            await trio.sleep(0.05)
    after = await status(daemon)
    assert after["last_refresh"] > before["last_refresh"]  # type: ignore[operator]
    assert after["token_expires_at"] > before["token_expires_at"]  # type: ignore[operator]

    # a config change that changes the fragment (one more trusted key): restart #2. Had the
    # token-only refresh asked for a restart, it would have come first (one lock, in order).
    key = SecretKey.generate("extra-1").public().render()
    config.write_text(base.replace("[proxy]", f'trusted_keys = ["{key}"]\n\n[proxy]', 1))
    await daemon.wait_log("config reloaded (config file changed)")
    await standin.wait_restarts(2)
    assert key in (world_dir / "etc" / "nixd.conf").read_text()
    await settle()
    assert len(standin.restarts) == 2

    # the bus goes away: the daemon carries on, and a restart it cannot ask for is logged
    await bus.stop()
    await daemon.wait_log("lost the system bus")
    config.write_text(base)
    await daemon.wait_log("config reloaded (config file changed)", count=2)
    await daemon.wait_log("WARNING: nixd.daemon.dbus: could not restart nix-daemon-test.service")
    assert key not in (world_dir / "etc" / "nixd.conf").read_text()
    final = await status(daemon)
    assert final["logged_in"] is True and final["token_valid"] is True
    assert await daemon.stop() == 0
    assert "Traceback" not in daemon.log()
