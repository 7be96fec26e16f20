"""Fixtures for running the real daemon process with everything inside a temp dir."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from nixd import exitcodes
from tests.daemon.tokenserver import TokenServer

REPO = Path(__file__).resolve().parents[2]
NIXD = [sys.executable, "-m", "nixd.cli"]
#: a socket holder in the part systemd plays for a socket-activated service: it keeps the
#: sockets it was given and starts the daemon again whenever it exits, passing them the
#: way systemd does (LISTEN_PID is set by the shell that then execs the daemon)
HOLDER = r"""
trap 'kill -TERM $child 2>/dev/null; wait $child; exit 0' TERM INT
while :; do
  sh -c 'export LISTEN_PID=$$; exec "$@"' daemon "$@" &
  child=$!
  wait $child
done
"""


@pytest.fixture
async def token_server() -> AsyncIterator[TokenServer]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(TokenServer().serve)
        yield server
        nursery.cancel_scope.cancel()


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A temp dir every user can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="nixd-test-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def write_config(root: Path, *, server_url: str | None = None, extra: str = "") -> Path:
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "nix.conf").touch()
    config = root / "config.toml"
    server = f'[server]\nurl = "{server_url}"\n' if server_url else ""
    config.write_text(
        f"""
[daemon]
control_socket = "{root}/run/nixd.sock"
state_dir = "{root}/state"
shutdown_grace = 2
{server}
[proxy]
listen = "127.0.0.1:0"
store_dir = "{root}/store"

[nix]
nix_conf = "{root}/etc/nix.conf"
fragment = "{root}/etc/nixd.conf"
netrc = "{root}/etc/nixd-netrc"
restart_nix_daemon = false
{extra}"""
    )
    return config


@dataclass
class DaemonProcess:
    process: trio.Process
    root: Path
    config: Path
    notify: trio.socket.SocketType
    log_path: Path
    notifications: list[str] = field(default_factory=list)

    @property
    def socket(self) -> str:
        return str(self.root / "run" / "nixd.sock")

    async def wait_for(self, line: str, within: float = 20.0) -> None:
        with trio.fail_after(within):
            while not any(line in n.split("\n") for n in self.notifications):
                data = await self.notify.recv(4096)
                self.notifications.append(data.decode())

    async def wait_log(self, text: str, count: int = 1, within: float = 15.0) -> None:
        try:
            with trio.fail_after(within):
                while self.log().count(text) < count:  # noqa: ASYNC110 - another process
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            raise AssertionError(f"{text!r} not logged; daemon log:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, sig: int = signal.SIGTERM, within: float = 15.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.fail_after(within):
            return await self.process.wait()


async def start_daemon(
    root: Path,
    config: Path,
    *,
    command: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> DaemonProcess:
    notify_path = str(root / f"notify-{os.urandom(3).hex()}")
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(notify_path)
    log_path = root / "daemon.log"
    full_env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONUNBUFFERED="1")
    full_env.pop("JOURNAL_STREAM", None)
    full_env.update(env or {})
    with open(log_path, "ab") as log:  # noqa: ASYNC230 - a local file, opened once
        process = await trio.lowlevel.open_process(
            list(command or [*NIXD, "-v", "daemon", "--config", str(config)]),
            env=full_env,
            stdout=log,
            stderr=log,
            cwd=str(REPO),
            pass_fds=pass_fds,
        )
    return DaemonProcess(process, root, config, notify, log_path)


async def start_held(
    root: Path, config: Path, factory: list[DaemonProcess]
) -> tuple[DaemonProcess, int]:
    """The daemon under a socket holder (:data:`HOLDER`), its sockets bound by the real
    ``systemd-socket-activate``; the daemon starts at the first connection to either.

    Returns the holder (``stop()`` ends holder and daemon) and the proxy's port.
    """
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is required (apt-get install systemd)"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    (root / "run").mkdir(exist_ok=True)
    command = [
        activate,
        "-l", str(root / "run" / "nixd.sock"),
        "-l", f"127.0.0.1:{port}",
        "--fdname=control:proxy",
        "-E", "NOTIFY_SOCKET", "-E", "PYTHONUNBUFFERED",
        "/bin/sh", "-c", HOLDER, "holder",
        *NIXD, "-v", "daemon", "--config", str(config),
    ]  # fmt: skip
    daemon = await start_daemon(root, config, command=command)
    factory.append(daemon)
    with trio.fail_after(20):
        while not (root / "run" / "nixd.sock").exists():  # noqa: ASYNC110 - another process
            await trio.sleep(0.05)
    return daemon, port


@pytest.fixture
async def daemon_factory() -> AsyncIterator[list[DaemonProcess]]:
    """Collects started daemons and kills whatever is still running at teardown."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        if d.process.returncode is None:
            d.process.kill()
            with trio.move_on_after(10):
                await d.process.wait()
        d.notify.close()


STATUS_SHOWN = (exitcodes.OK, exitcodes.NOT_LOGGED_IN)
"""The exit codes of a `nixd status` that printed the status (logged in or not)."""


async def cli(
    *args: str,
    stdin: bytes | None = None,
    user: str | None = None,
    check: bool | tuple[int, ...] = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run the real `nixd` CLI (as ``user`` via runuser) and capture its output.

    ``check`` raises unless the exit code is 0 (True) or one of the given codes.
    """
    if user is None:
        argv = [*NIXD, *args]
        env = None
    else:
        # /root (where the venv's interpreter lives) is 0700 here: run the system Python
        # 3.11 on the venv's packages instead, as the unprivileged user.
        site = next((REPO / ".venv" / "lib").glob("python3.*/site-packages"))
        argv = [
            "runuser", "-u", user, "--", "env", f"PYTHONPATH={REPO}:{site}",
            "/usr/bin/python3", "-m", "nixd.cli", *args,
        ]  # fmt: skip
        env = None
    with trio.fail_after(60):
        result = await trio.run_process(
            argv,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
            cwd="/tmp",
        )
    allowed = (0,) if check is True else check or ()
    if allowed and result.returncode not in allowed:
        raise AssertionError(f"nixd {args} failed ({result.returncode}): {result.stderr.decode()}")
    return result
