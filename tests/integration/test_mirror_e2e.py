"""Complete closures end to end: an upstream stand-in for cache.nixos.org served by nginx,
a real ``nixd-server`` that completes a slice's closure from it, then the upstream
**stopped**, and the real Nix on a logged-in machine substituting the whole closure
through the daemon's proxy alone (no other substituter configured).

The stand-in is a static binary cache made by the real ``nix copy --to file://`` and
signed with its own key; only the upper half of the closure is uploaded to the slice
(the lower half exists only upstream), as a CI job would push what it built.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.daemon.conftest import (
    REPO,
    STATUS_SHOWN,
    DaemonProcess,
    cli,
    start_daemon,
    write_config,
)
from tests.integration.identity_fixtures import nix_for
from tests.realnix import RealNix
from tests.server.mirrorenv import make_upstream
from tests.server.test_mirror_nix import add_mirror, upload_from_cache
from tests.serverproc import server_cli, start_server

sys.path.insert(0, str(REPO / "bench"))  # the bench's modules import each other by name
from benchproc import Nginx  # the nginx the benchmarks use as a reference

pytestmark = pytest.mark.realnix

SERVER_HOST = "127.0.0.3"
#: paths in the stand-in's closure; the upper half is uploaded, the lower half is not
CLOSURE = 12


def _token(state: Path, name: str, role: str) -> str:
    out = server_cli(
        "token", "create", str(state), "--org", "acme", "--name", name,
        "--attr", f"role={role}", "--json",
    ).stdout  # fmt: skip
    value: str = json.loads(out)["token"]
    return value


def _mirror_status(state: Path) -> dict[str, object]:
    (found,) = json.loads(server_cli("mirror", "status", str(state), "acme/app", "--json").stdout)
    assert isinstance(found, dict)
    return found


async def test_a_closure_completed_from_a_stopped_upstream_is_substituted_through_the_proxy(
    world_dir: Path, daemon_factory: list[DaemonProcess]
) -> None:
    nix = RealNix.create(world_dir / "build")
    cache = world_dir / "upstream"
    top, paths, up_key = make_upstream(nix, cache, n=CLOSURE)
    assert len(paths) == CLOSURE
    # The chain's lower half (by position in the chain) exists only upstream.
    order = sorted(paths, key=lambda p: int(p.rsplit("-", 1)[-1]))
    upper = order[CLOSURE // 2 :]
    nginx = Nginx(world_dir / "nginx", root=cache)
    state = world_dir / "server"
    server_cli("init", str(state), "--org", "acme")
    server_cli("project", "create", str(state), "acme/app")
    writer, reader = _token(state, "ci", "member"), _token(state, "machine", "reader")
    add_mirror(state, nginx.url, up_key)
    server = start_server(state, host=SERVER_HOST, log_path=world_dir / "server.log")
    try:
        for path in upper:
            upload_from_cache(server.url, "acme/app", writer, cache, path)
        deadline = time.monotonic() + 180  # a hang guard only
        while True:
            status = _mirror_status(state)
            roots = status["roots"]
            assert isinstance(roots, dict)
            if roots["pending"] == 0:
                break
            assert time.monotonic() < deadline, status
            await trio.sleep(0.3)
        assert status["missing"] == [] and status["failures"] == [], status
        assert status["mirrored"] == CLOSURE - len(upper), status
        assert nginx.requests() > 0  # the server fetched the lower half from it
        nginx.stop()  # from here on, only the server has the lower half

        # A machine logged in with nixd, with no substituter but the daemon's proxy.
        root = world_dir / "machine"
        root.mkdir()
        config = write_config(root, server_url=server.url)
        conf_dir = root / "etc"
        (conf_dir / "nix.conf").write_text(
            "build-users-group =\nsandbox = false\nexperimental-features = nix-command\n"
            "substituters =\nfsync-metadata = false\n"
        )
        daemon = await start_daemon(root, config)
        daemon_factory.append(daemon)
        await daemon.wait_for("READY=1")
        login = await cli("login", "token", "--socket", daemon.socket, stdin=reader.encode())
        assert login.returncode == 0, login.stderr.decode() + daemon.log()
        shown = await cli("status", "--json", "--socket", daemon.socket, check=STATUS_SHOWN)
        proxy = json.loads(shown.stdout)["proxy"]["url"].rstrip("/")
        fresh = nix_for(world_dir / "fresh", conf_dir)
        shown_conf = fresh.run(["nix", "show-config"], store=None).stdout.decode()
        (subs,) = re.findall(r"(?m)^substituters = (.*)$", shown_conf)
        assert subs.split() == [proxy + "/"] or subs.split() == [proxy], shown_conf
        done = fresh.run(["nix-store", "--realise", top], check=False)
        assert done.returncode == 0, done.stderr.decode() + daemon.log()
        got = set(fresh.run(["nix-store", "-qR", top]).stdout.decode().split())
        assert got == set(paths)
        for path in paths:
            assert fresh.real_path(path).read_bytes() == nix.real_path(path).read_bytes()
    finally:
        server.close()
        nginx.stop()
