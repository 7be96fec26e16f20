"""The whole loop with real processes: ``nixd-server``, ``nixd daemon`` (proxy), real Nix.

One cache server state is built per session (org ``acme``, project ``acme/app``, a read
token, a few small input-addressed paths and one large random file pushed with ``nix copy
--to``); each test serves it on 127.0.0.2 with the access-token lifetime it needs and runs
its own daemon on 127.0.0.1 from ``tests.daemon.conftest``. A netrc is per host, which is
why the server and the proxy sit on different loopback addresses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from nixd.nix.narinfo import NarInfo
from tests.daemon.conftest import (  # noqa: F401 - fixtures re-exported for these tests
    STATUS_SHOWN,
    DaemonProcess,
    cli,
    daemon_factory,
    start_daemon,
    start_held,
    write_config,
)
from tests.realnix import RealNix, nix_available
from tests.serverproc import ServerProcess, running_server, server_cli, start_server

SERVER_HOST = "127.0.0.2"
#: paths in the session's cache: SMALL_PATHS distinct tiny ones, and one of BIG_BYTES
SMALL_PATHS = 8
BIG_BYTES = 96 * 1024 * 1024


@dataclass
class CacheState:
    """A ready server state directory and what is in it."""

    state: Path
    reader: str
    small: list[str]
    big: str
    big_file: Path


@dataclass
class Server:
    """A ``nixd-server serve`` process on the session's state (:mod:`tests.serverproc`);
    stopped and started again, it keeps its port."""

    cache: CacheState
    process: ServerProcess

    @property
    def url(self) -> str:
        return self.process.url

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()


def set_access_ttl(state: Path, seconds: int) -> None:
    config = state / "config.toml"
    text = re.sub(r"(?m)^access_ttl = \d+$", f"access_ttl = {seconds}", config.read_text())
    config.write_text(text)


@pytest.fixture(scope="session")
def cache_state() -> Iterator[CacheState]:
    if not nix_available():
        pytest.fail("the real `nix` is required (apt-get install nix-bin)")
    root = Path(tempfile.mkdtemp(prefix="nixd-it-cache-"))
    root.chmod(0o755)
    try:
        state = root / "server"
        server_cli("init", str(state), "--org", "acme")
        server_cli("project", "create", str(state), "acme/app")

        def token(name: str, role: str) -> str:
            out = server_cli(
                "token", "create", str(state), "--org", "acme", "--name", name,
                "--attr", f"role={role}", "--json",
            ).stdout  # fmt: skip
            value: str = json.loads(out)["token"]
            return value

        writer, reader = token("ci", "member"), token("machine", "reader")
        nix = RealNix.create(root / "src")
        drvs = " ".join(
            f'(derivation {{ name = "nixd-it-{i}"; system = builtins.currentSystem; '
            f'builder = "/bin/sh"; args = [ "-c" "echo path {i} > $out" ]; }})'
            for i in range(SMALL_PATHS)
        )
        built = nix.run(["nix-build", "--no-out-link", "-E", f"[ {drvs} ]"])
        small = built.stdout.decode().split()
        assert len(small) == SMALL_PATHS
        big_file = root / "nixd-it-big"
        with big_file.open("wb") as f:
            for _ in range(BIG_BYTES // (1 << 20)):
                f.write(os.urandom(1 << 20))
        big = nix.run(["nix-store", "--add", str(big_file)]).stdout.decode().strip()
        cache = CacheState(state, reader, small, big, big_file)
        log_path = root / "upload-server.log"
        with running_server(state, host=SERVER_HOST, log_path=log_path) as server:
            netrc = root / "push-netrc"
            netrc.write_text(f"machine {SERVER_HOST} login ci password {writer}\n")
            netrc.chmod(0o600)
            to = f"{server.url}/cache/acme/app?compression=zstd"
            nix.run(["nix", "copy", "--to", to, *small, big, "--netrc-file", str(netrc)])
        yield cache
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A temp dir every user can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="nixd-it-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def server_factory(cache_state: CacheState, world_dir: Path) -> Iterator[list[Server]]:
    """Start with :func:`serve`; every server is closed at teardown."""
    started: list[Server] = []
    yield started
    for s in started:
        s.process.close()


def serve(
    started: list[Server], cache: CacheState, root: Path, *, access_ttl: int, hold: bool = False
) -> Server:
    """The session's cache served on :data:`SERVER_HOST`, port 0, with ``access_ttl``.

    ``hold``: the port stays open across restarts (see :mod:`tests.serverproc`).
    """
    set_access_ttl(cache.state, access_ttl)
    process = start_server(cache.state, host=SERVER_HOST, log_path=root / "server.log", hold=hold)
    server = Server(cache, process)
    started.append(server)
    return server


@dataclass
class Loop:
    """A running server + logged-in daemon; ``proxy`` is its URL, ``secret`` the local one."""

    server: Server
    daemon: DaemonProcess
    proxy: str
    secret: str
    nix_conf_dir: Path
    stores: list[Path] = field(default_factory=list)

    async def status(self) -> dict[str, object]:
        result = await cli("status", "--json", "--socket", self.daemon.socket, check=STATUS_SHOWN)
        status: dict[str, object] = json.loads(result.stdout)
        return status

    def nix(self, root: Path) -> RealNix:
        """A single-user Nix reading only the nix.conf nixd manages (fresh cache dir)."""
        nix = RealNix.create(root)
        nix.env["NIX_CONF_DIR"] = str(self.nix_conf_dir)
        nix.env["NIX_USER_CONF_FILES"] = ""
        return nix

    async def narinfo(self, store_path: str) -> NarInfo:
        hash_part = Path(store_path).name.split("-", 1)[0]
        out = await curl(f"{self.proxy}/{hash_part}.narinfo", "-u", f"nixd:{self.secret}")
        return NarInfo.parse(out.stdout)


async def curl(url: str, *args: str, user: str | None = None) -> subprocess.CompletedProcess[bytes]:
    cmd = ["curl", "-sS", "--max-time", "120", *args, url]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    with trio.fail_after(130):
        return await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)


async def start_loop(
    root: Path,
    server: Server,
    daemons: list[DaemonProcess],
    *,
    shutdown_grace: float = 2,
    server_url: str | None = None,
    held: bool = False,
) -> Loop:
    """The daemon (temp config, proxy on 127.0.0.1) logged in to ``server``.

    ``server_url``: reach the server there instead (a relay in front of it). ``held``:
    run the daemon under a socket holder that restarts it as systemd would
    (:func:`tests.daemon.conftest.start_held`), the proxy on a port it keeps.
    """
    config = write_config(root, server_url=server_url or server.url)
    nix_conf_dir = root / "etc"
    (nix_conf_dir / "nix.conf").write_text(
        "build-users-group =\nsandbox = false\nexperimental-features = nix-command\n"
        "substituters =\nfsync-metadata = false\n"
    )
    config.write_text(
        config.read_text().replace("shutdown_grace = 2", f"shutdown_grace = {shutdown_grace}")
    )
    if held:
        daemon, _ = await start_held(root, config, daemons)
        await cli("status", "--socket", daemon.socket, check=STATUS_SHOWN)  # starts it
    else:
        daemon = await start_daemon(root, config)
        daemons.append(daemon)
    await daemon.wait_for("READY=1")
    login = await cli(
        "login", "token", "--socket", daemon.socket, stdin=server.cache.reader.encode()
    )
    assert login.returncode == 0, login.stderr.decode() + daemon.log()
    result = await cli("status", "--json", "--socket", daemon.socket, check=STATUS_SHOWN)
    proxy = json.loads(result.stdout)["proxy"]["url"].rstrip("/")
    netrc = (nix_conf_dir / "nixd-netrc").read_text()
    match = re.search(r"machine 127\.0\.0\.1 login nixd password (\S+)", netrc)
    assert match, "the managed netrc has no line for the proxy"
    return Loop(server, daemon, proxy, match.group(1), nix_conf_dir)
