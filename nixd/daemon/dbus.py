"""The daemon on the system D-Bus: restart nix-daemon, and wake up with the machine.

Two conversations, both with jeepney's trio backend over plain connections (no router task:
each conversation is one task reading its own socket, so a bus that goes away surfaces as
one exception in one place):

- **Restarting nix-daemon.** nix-daemon reads nix.conf only when it starts, so after nixd
  changes the fragment :class:`UnitRestarter` asks systemd
  (``org.freedesktop.systemd1.Manager.TryRestartUnit(unit, "replace")``, which leaves a
  stopped unit stopped). Each request opens its own short connection: restarts are rare,
  and nothing stale survives a restart of the bus. "Not under systemd" means there is no
  system bus or systemd is not on it; that is said once at info level and the request is a
  no-op. Any other failure (including a bus gone after systemd had answered) is logged as
  a warning; nothing here raises into the daemon.
- **Waking up.** :class:`SystemBusWatcher` subscribes to logind's
  ``PrepareForSleep(false)`` (the machine resumed) and NetworkManager's ``StateChanged``
  (70 = ``NM_STATE_CONNECTED_GLOBAL``) and tells a :class:`WakeHandler`. The match rules
  name the senders' well-known names, so the bus itself makes sure only logind and
  NetworkManager can trigger us. :class:`RefreshOnWake` renews the token on every resume
  (the wall clock jumped by an unknown amount and the first build should not wait on a
  renewal) and on a network coming up only when the token is due or the last renewal
  failed. Without a bus the watcher says so once and retries with a capped backoff, so a
  bus that starts later or restarts is picked up again.

The bus is jeepney's ``"SYSTEM"`` unless an address is passed: ``$DBUS_SYSTEM_BUS_ADDRESS``
when set (tests point it at a private ``dbus-daemon``), else
``unix:path=/var/run/dbus/system_bus_socket``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any, Protocol

import trio
from jeepney import (  # type: ignore[import-untyped]
    DBusAddress,
    HeaderFields,
    MatchRule,
    Message,
    MessageType,
    message_bus,
    new_method_call,
)
from jeepney.io.trio import DBusConnection, open_dbus_connection  # type: ignore[import-untyped]

from nixd.daemon.refresher import Refresher
from nixd.errors import AuthError, NixdError

log = logging.getLogger(__name__)

SYSTEM_BUS = "SYSTEM"
DEFAULT_SYSTEM_BUS_ADDRESS = "unix:path=/var/run/dbus/system_bus_socket"

SYSTEMD = DBusAddress(
    "/org/freedesktop/systemd1",
    bus_name="org.freedesktop.systemd1",
    interface="org.freedesktop.systemd1.Manager",
)
LOGIND_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_INTERFACE = "org.freedesktop.login1.Manager"
NM_NAME = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
NM_INTERFACE = "org.freedesktop.NetworkManager"
#: NetworkManager's NM_STATE_CONNECTED_GLOBAL: full connectivity
NM_STATE_CONNECTED_GLOBAL = 70

#: errors meaning "systemd is not on this bus" rather than "systemd said no"
_ABSENT_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
    }
)

#: how long one bus conversation (connect + call) may take
CALL_TIMEOUT = 10.0
#: reconnect backoff of the watcher: first delay and cap
RETRY_BASE = 1.0
RETRY_CAP = 300.0
#: on a network coming up, renew if the token expires within this many seconds
NEAR_EXPIRY = 300.0


class BusError(NixdError):
    """The system bus could not be reached, or a call on it failed.

    ``name`` is the D-Bus error name when the peer answered with an error, else None.
    """

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


def describe_bus(bus: str) -> str:
    """The address ``bus`` stands for, for log messages."""
    if bus == SYSTEM_BUS:
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS_ADDRESS
    return bus


_BUS_FAILURES: tuple[type[BaseException], ...] = (
    OSError,  # no socket, refused, reset
    ValueError,  # jeepney's AuthenticationError, malformed messages
    RuntimeError,  # jeepney: unsupported transport in the address
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.EndOfChannel,
    trio.TooSlowError,
)


@contextlib.contextmanager
def _bus_errors(bus: str, doing: str) -> Iterator[None]:
    """Translate socket, trio and jeepney failures into :class:`BusError`.

    jeepney's connect runs a short-lived router in a nursery, so the same failures may also
    arrive wrapped in an exception group.
    """
    where = describe_bus(bus)
    try:
        yield
    except _BUS_FAILURES as exc:
        raise BusError(f"system bus at {where}: {doing}: {_reason(exc)}") from exc
    except BaseExceptionGroup as group:
        matched, rest = group.split(_BUS_FAILURES)
        if rest is not None or matched is None:
            raise
        first = matched.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise BusError(f"system bus at {where}: {doing}: {_reason(first)}") from group


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time"
    if isinstance(exc, trio.EndOfChannel | trio.BrokenResourceError):
        return "the bus closed the connection"
    return str(exc) or type(exc).__name__


async def _connect(bus: str) -> DBusConnection:
    with _bus_errors(bus, "cannot connect"):
        return await open_dbus_connection(bus)


async def _call(conn: DBusConnection, bus: str, message: Message) -> tuple[Any, ...]:
    """Send a method call and return the reply's body; messages in between are dropped."""
    member = message.header.fields.get(HeaderFields.member, "?")
    with _bus_errors(bus, f"{member} failed"):
        serial = next(conn.outgoing_serial)
        await conn.send(message, serial=serial)
        while True:
            reply = await conn.receive()
            if reply.header.fields.get(HeaderFields.reply_serial) == serial:
                break
    if reply.header.message_type == MessageType.error:
        name = reply.header.fields.get(HeaderFields.error_name, "?")
        detail = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise BusError(f"{member}: {name}: {detail}".rstrip(": "), name=name)
    body: tuple[Any, ...] = tuple(reply.body)
    return body


async def try_restart_unit(unit: str, *, bus: str = SYSTEM_BUS) -> str:
    """Ask systemd to restart ``unit`` if it runs; returns the job's object path.

    Raises :class:`BusError` (``name`` in ``_ABSENT_ERRORS`` when systemd is not there).
    """
    message = new_method_call(SYSTEMD, "TryRestartUnit", "ss", (unit, "replace"))
    with trio.fail_after(CALL_TIMEOUT):
        conn = await _connect(bus)
        async with conn:
            (job,) = await _call(conn, bus, message)
    return str(job)


class UnitRestarter:
    """Restarts a systemd unit over the system bus; logs instead of raising."""

    def __init__(self, *, bus: str = SYSTEM_BUS) -> None:
        self.bus = bus
        self._said_absent = False
        #: systemd answered before: its absence now is a failure, not "not under systemd"
        self._seen_systemd = False
        self.last_error: str | None = None

    async def try_restart(self, unit: str) -> bool:
        """Request the restart; True if systemd queued it."""
        try:
            job = await try_restart_unit(unit, bus=self.bus)
        except BusError as exc:
            absent = exc.name is None or exc.name in _ABSENT_ERRORS
            if absent and not self._seen_systemd:
                # no bus, or no systemd on it: not running under systemd
                level = logging.DEBUG if self._said_absent else logging.INFO
                self._said_absent = True
                log.log(
                    level,
                    "not restarting %s: systemd is not reachable on the system bus (%s)",
                    unit,
                    exc,
                )
                return False
            self.last_error = f"could not restart {unit}: {exc}"
            log.warning("could not restart %s to load the new nix.conf: %s", unit, exc)
            return False
        self._said_absent = False
        self._seen_systemd = True
        self.last_error = None
        log.info("asked systemd to restart %s to load the new nix.conf (job %s)", unit, job)
        return True


class WakeHandler(Protocol):
    """What the watcher reports; called in their own tasks, may take their time."""

    async def resumed(self) -> None: ...

    async def network_online(self) -> None: ...


class RefreshOnWake:
    """Keeps the refresher's token usable across suspend and network changes."""

    def __init__(self, refresher: Refresher, *, near_expiry: float = NEAR_EXPIRY) -> None:
        self.refresher = refresher
        self.near_expiry = near_expiry

    async def resumed(self) -> None:
        if not self.refresher.logged_in:
            return
        log.info("resumed from suspend: renewing the access token")
        await self._renew()

    async def network_online(self) -> None:
        r = self.refresher
        if not r.logged_in:
            return
        token = r.token
        now = time.time()
        if r.last_error is not None:
            why = "the last renewal failed"
        elif token is None or token.expires_at - now < self.near_expiry:
            why = "the token is about to expire"
        elif r.next_refresh is not None and r.next_refresh <= now:
            why = "a renewal is due"
        else:
            log.debug("network connected; the token is fresh")
            return
        log.info("network connected and %s: renewing the access token", why)
        await self._renew()

    async def _renew(self) -> None:
        # passing the current token as stale forces an exchange even if it still looks valid
        with contextlib.suppress(AuthError):  # logged and retried by the refresher
            await self.refresher.refresh(self.refresher.token)


def _rules() -> list[MatchRule]:
    return [
        MatchRule(
            type="signal",
            sender=LOGIND_NAME,
            interface=LOGIND_INTERFACE,
            member="PrepareForSleep",
            path=LOGIND_PATH,
        ),
        MatchRule(
            type="signal",
            sender=NM_NAME,
            interface=NM_INTERFACE,
            member="StateChanged",
            path=NM_PATH,
        ),
    ]


class SystemBusWatcher:
    """Listens for resume and network signals; reconnects when the bus comes back."""

    def __init__(
        self,
        handler: WakeHandler,
        *,
        bus: str = SYSTEM_BUS,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
    ) -> None:
        self.handler = handler
        self.bus = bus
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.connected = False
        self._changed = trio.Event()

    async def wait_connected(self, connected: bool = True) -> None:
        """Wait until the subscriptions are (or are no longer) in place."""
        while self.connected != connected:
            await self._changed.wait()

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled; never raises for bus trouble."""
        task_status.started()
        said_unavailable = False
        delay = self.retry_base
        async with trio.open_nursery() as handlers:
            while True:
                try:
                    await self._watch(handlers)
                except BusError as exc:
                    if self.connected:
                        log.info("lost the system bus (%s); reconnecting", exc)
                        delay = self.retry_base
                    elif not said_unavailable:
                        log.info(
                            "no system bus (%s): not watching for resume or network changes",
                            exc,
                        )
                    else:
                        log.debug("system bus still unavailable: %s", exc)
                    said_unavailable = True
                finally:
                    if self.connected:
                        self._set_connected(False)
                await trio.sleep(delay)
                delay = min(self.retry_cap, delay * 2)

    async def _watch(self, handlers: trio.Nursery) -> None:
        with trio.fail_after(CALL_TIMEOUT):
            conn = await _connect(self.bus)
        async with conn:
            with trio.fail_after(CALL_TIMEOUT):
                for rule in _rules():
                    await _call(conn, self.bus, message_bus.AddMatch(rule))
            log.info(
                "watching the system bus at %s for resume and network changes",
                describe_bus(self.bus),
            )
            self._set_connected(True)
            while True:
                with _bus_errors(self.bus, "receiving"):
                    message = await conn.receive()
                self._dispatch(message, handlers)

    def _dispatch(self, message: Message, handlers: trio.Nursery) -> None:
        if message.header.message_type != MessageType.signal:
            return
        fields = message.header.fields
        key = (fields.get(HeaderFields.interface), fields.get(HeaderFields.member))
        body = message.body
        if key == (LOGIND_INTERFACE, "PrepareForSleep") and body and body[0] is False:
            handlers.start_soon(self._guarded, self.handler.resumed, "resume")
        elif key == (LOGIND_INTERFACE, "PrepareForSleep"):
            log.debug("going to sleep")
        elif key == (NM_INTERFACE, "StateChanged") and body:
            log.debug("NetworkManager state %s", body[0])
            if body[0] == NM_STATE_CONNECTED_GLOBAL:
                handlers.start_soon(self._guarded, self.handler.network_online, "network")

    @staticmethod
    async def _guarded(handler: Any, what: str) -> None:
        try:
            await handler()
        except (NixdError, OSError):
            log.exception("handling the %s event failed", what)
