"""Private flakes end to end with the real Nix 2.8: published from "CI", fetched by a
machine logged in with ``nixd login``, through its proxy.

A small flake (a package built from a plain derivation, no nixpkgs) is published as
0.1.0 and 0.2.0 by a GitHub Actions job (the local OIDC issuer); a machine whose daemon
is logged in as another job of the organization then runs ``nix flake metadata`` and
``nix build`` on ``http://127.0.0.1:PORT/f/acme/tool/0.*.tar.gz``, and a consumer flake
with that URL as its input is locked to 0.2.0 and keeps building 0.2.0 from its
``flake.lock`` after 0.3.0 is published — on a fresh store too (Nix substitutes the
locked source tree from the cache) — until ``nix flake update`` moves it to 0.3.0.
A machine that is not logged in fails clearly.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.daemon.conftest import (
    NIXD,
    REPO,
    STATUS_SHOWN,
    DaemonProcess,
    start_daemon,
    write_config,
)
from tests.integration.flake_fixtures import (
    AUDIENCE,
    SYSTEM,
    FlakeServer,
    clean_env,
    flake_server,  # noqa: F401 - a fixture
    job_env,
    publish,
    tool_flake,
)
from tests.integration.identity_fixtures import nix_for
from tests.realnix import RealNix
from tests.test_cli_publish import git, make_repo

pytestmark = pytest.mark.realnix

NIX_CONF = (
    "build-users-group =\nsandbox = false\nexperimental-features = nix-command flakes\n"
    "substituters =\nfsync-metadata = false\nsandbox-paths = /bin /usr /lib /lib64\n"
    "tarball-ttl = 0\nflake-registry =\n"
)
NOBODY = pwd.getpwnam("nobody").pw_uid


def consumer_flake(url: str) -> str:
    return (
        "{ inputs.tool.url = " + json.dumps(url) + ";\n"
        "  outputs = { self, tool }: {\n"
        f"    packages.{SYSTEM}.default = tool.packages.{SYSTEM}.default;\n"
        "  };\n}\n"
    )


async def nixd(daemon: DaemonProcess, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    with trio.fail_after(120):
        done = await trio.run_process(
            [*NIXD, *args, "--socket", daemon.socket],
            env=clean_env(env), capture_stdout=True, capture_stderr=True, check=False,
            cwd=str(REPO),
        )  # fmt: skip
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def status(daemon: DaemonProcess) -> dict[str, Any]:
    code, out, err = await nixd(daemon, "status", "--json", env={})
    assert code in STATUS_SHOWN, err
    loaded: dict[str, Any] = json.loads(out)
    return loaded


async def run_nix(
    nix: RealNix, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    def go() -> subprocess.CompletedProcess[bytes]:
        if cwd is None:
            return nix.run(list(args), check=False)
        return subprocess.run(
            [args[0], "--store", str(nix.store), *args[1:]], cwd=cwd, env=nix.env,
            capture_output=True, timeout=300, check=False,
        )  # fmt: skip

    with trio.fail_after(300):
        return await trio.to_thread.run_sync(go)


def _ok(done: subprocess.CompletedProcess[bytes], daemon: DaemonProcess, fs: FlakeServer) -> str:
    assert done.returncode == 0, (
        done.stderr.decode(errors="replace") + "\n--- daemon\n" + daemon.log()[-4000:]
        + "\n--- server\n" + fs.server.log()[-4000:]
    )  # fmt: skip
    return done.stdout.decode()


def built_text(nix: RealNix, out: str) -> str:
    """The content of the one output ``nix build --json`` printed."""
    path = json.loads(out)[0]["outputs"]["out"]
    return nix.real_path(path).read_text().strip()


async def release(fs: FlakeServer, repo: Path, version: str) -> None:
    (repo / "flake.nix").write_text(tool_flake(version))
    git(repo, "commit", "-qam", f"release {version}")
    git(repo, "tag", f"v{version}")
    done = await trio.to_thread.run_sync(functools.partial(publish, fs, repo))
    assert done.returncode == 0, done.stderr + fs.server.log()[-4000:]


async def test_a_consumer_locks_builds_and_keeps_its_release(
    flake_server: FlakeServer,  # noqa: F811
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
) -> None:
    fs = flake_server
    repo = make_repo(tmp_path / "tool", {"flake.nix": tool_flake("0.1.0")}, tag="v0.1.0")
    done = await trio.to_thread.run_sync(functools.partial(publish, fs, repo))
    assert done.returncode == 0, done.stderr
    await release(fs, repo, "0.2.0")

    machine = tmp_path / "machine"
    machine.mkdir()
    config = write_config(machine, server_url=fs.url)
    (machine / "etc" / "nix.conf").write_text(NIX_CONF)
    daemon = await start_daemon(machine, config)
    daemon_factory.append(daemon)
    await daemon.wait_for("READY=1")
    proxy = (await status(daemon))["proxy"]["url"].rstrip("/")
    url = f"{proxy}/f/acme/tool/0.*.tar.gz"

    # not logged in yet: a clear failure, nothing remembered
    nix = nix_for(tmp_path / "n0", machine / "etc")
    refused = await run_nix(nix, "nix", "flake", "metadata", "--json", url)
    assert refused.returncode != 0
    assert b"503" in refused.stderr or b"not logged in" in refused.stderr

    code, out, err = await nixd(daemon, "login", "github-action", "--audience", AUDIENCE,
                                env=job_env(fs))  # fmt: skip
    assert code == 0, err + daemon.log()

    # discovery through the daemon's proxy, as this machine's login
    code, out, err = await nixd(daemon, "flake", "list", "acme", env={})
    assert code == 0, err
    assert ["acme/tool", "private", "0.2.0", "a", "tool"] in [r.split() for r in out.splitlines()]
    code, out, err = await nixd(daemon, "flake", "show", "acme/tool", "--json", env={})
    assert code == 0, err
    assert [r["version"] for r in json.loads(out)["releases"]] == ["0.2.0", "0.1.0"]

    nix = nix_for(tmp_path / "n1", machine / "etc")
    meta = json.loads(_ok(await run_nix(nix, "nix", "flake", "metadata", "--json", url),
                          daemon, fs))  # fmt: skip
    assert meta["description"] == "a tool"
    assert meta["locked"]["url"] == url and meta["locked"]["narHash"].startswith("sha256-")
    out = _ok(await run_nix(nix, "nix", "build", "--no-link", "--json",
                            f"{url}#default"), daemon, fs)  # fmt: skip
    assert built_text(nix, out) == "tool 0.2.0"

    consumer = tmp_path / "consumer"
    consumer.mkdir()
    (consumer / "flake.nix").write_text(consumer_flake(url))
    _ok(await run_nix(nix, "nix", "flake", "lock", cwd=consumer), daemon, fs)
    lock = json.loads((consumer / "flake.lock").read_text())
    locked = lock["nodes"]["tool"]["locked"]
    assert locked["type"] == "tarball" and locked["url"] == url
    build = ("nix", "build", "--no-link", "--json", ".#default")
    assert built_text(nix, _ok(await run_nix(nix, *build, cwd=consumer), daemon, fs)) == (
        "tool 0.2.0"
    )

    await release(fs, repo, "0.3.0")  # a newer match for 0.*
    assert built_text(nix, _ok(await run_nix(nix, *build, cwd=consumer), daemon, fs)) == (
        "tool 0.2.0"
    )
    # a fresh machine store with the same lock: still the locked release
    fresh = nix_for(tmp_path / "n2", machine / "etc")
    copy = tmp_path / "consumer2"
    shutil.copytree(consumer, copy)
    assert built_text(fresh, _ok(await run_nix(fresh, *build, cwd=copy), daemon, fs)) == (
        "tool 0.2.0"
    )
    _ok(await run_nix(fresh, "nix", "flake", "update", cwd=copy), daemon, fs)
    assert json.loads((copy / "flake.lock").read_text())["nodes"]["tool"]["locked"] != locked
    assert built_text(fresh, _ok(await run_nix(fresh, *build, cwd=copy), daemon, fs)) == (
        "tool 0.3.0"
    )


def _shared_dir() -> Path:
    """A temp dir that ``nobody`` may traverse (pytest's are root-only)."""
    root = Path(tempfile.mkdtemp(prefix="nixd-nobody-"))
    root.chmod(0o755)
    return root


def _nobody_env(root: Path, socket: Path) -> list[str]:
    """The whole environment of ``nobody``'s nix: its own home and config, the daemon's
    socket (and where the daemon's chroot store is, so the client can read store paths)."""
    home, conf = root / "nobody", root / "nobody-etc"
    home.mkdir()
    conf.mkdir()
    (conf / "nix.conf").write_text(
        "experimental-features = nix-command flakes\ntarball-ttl = 0\nflake-registry =\n"
    )
    os.chown(home, NOBODY, -1)
    return [
        f"PATH={os.environ['PATH']}",
        f"HOME={home}",
        f"XDG_CACHE_HOME={home}/cache",
        f"NIX_CONF_DIR={conf}",
        "NIX_USER_CONF_FILES=",
        f"NIX_REMOTE=unix://{socket}?root={root}/store",
    ]


async def test_nobody_builds_the_private_flake_and_gets_no_token(
    flake_server: FlakeServer,  # noqa: F811
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
) -> None:
    """An unprivileged user of a logged-in machine, with a real ``nix-daemon``: their own
    ``nix`` fetches the tarball through the proxy (no secret, no netrc), the build runs in
    the daemon; nothing they can read or receive holds a token usable anywhere else."""
    fs = flake_server
    repo = make_repo(tmp_path / "tool", {"flake.nix": tool_flake("1.0.0")}, tag="v1.0.0")
    done = await trio.to_thread.run_sync(functools.partial(publish, fs, repo, "--name", "ntool"))
    assert done.returncode == 0, done.stderr

    root = _shared_dir()
    try:
        machine = root / "machine"
        machine.mkdir()
        config = write_config(machine, server_url=fs.url)
        (machine / "etc" / "nix.conf").write_text(NIX_CONF + f"store = {root}/store\n")
        daemon = await start_daemon(machine, config)
        daemon_factory.append(daemon)
        await daemon.wait_for("READY=1")
        code, _, err = await nixd(daemon, "login", "github-action", "--audience", AUDIENCE,
                                  env=job_env(fs))  # fmt: skip
        assert code == 0, err + daemon.log()
        proxy = (await status(daemon))["proxy"]["url"].rstrip("/")
        netrc = (machine / "etc" / "nixd-netrc").read_text()
        token = next(w for line in netrc.splitlines() if fs.server.host in line
                     for w in [line.split()[-1]])  # fmt: skip
        assert len(token) > 20

        socket = root / "nix-daemon.sock"
        nix_daemon = await trio.lowlevel.open_process(
            ["nix-daemon"],
            env={"PATH": os.environ["PATH"], "NIX_CONF_DIR": str(machine / "etc"),
                 "NIX_DAEMON_SOCKET_PATH": str(socket)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with trio.fail_after(30):
                while not await trio.Path(socket).exists():  # noqa: ASYNC110 - a file
                    await trio.sleep(0.05)
            env = _nobody_env(root, socket)

            async def as_nobody(*args: str) -> subprocess.CompletedProcess[bytes]:
                with trio.fail_after(300):
                    return await trio.run_process(
                        ["runuser", "-u", "nobody", "--", "env", "-i", *env, *args],
                        capture_stdout=True, capture_stderr=True, check=False,
                    )  # fmt: skip

            url = f"{proxy}/f/acme/ntool/1.*.tar.gz"
            built = await as_nobody("nix", "build", "--no-link", "--json", f"{url}#default")
            assert built.returncode == 0, built.stderr.decode() + daemon.log()[-3000:]
            out = json.loads(built.stdout)[0]["outputs"]["out"]
            assert (root / "store" / out.lstrip("/")).read_text().strip() == "tool 1.0.0"

            # what nobody can read or be sent holds no token
            assert (await as_nobody("cat", str(machine / "etc" / "nixd-netrc"))).returncode != 0
            answers = [
                await as_nobody("curl", "-sS", "-i", "--unix-socket", daemon.socket,
                                "http://nixd/status"),
                await as_nobody("curl", "-sS", "-i", url.replace("*", "%2A")),
                await as_nobody("curl", "-sS", "-i", f"{proxy}/f/acme/ntool/1.0.0.tar.gz"),
                await as_nobody("curl", "-sS", "-i", f"{proxy}/api/v1/flakes/acme/ntool"),
            ]  # fmt: skip
            for answer in answers:
                assert answer.returncode == 0, answer.stderr
                assert token.encode() not in answer.stdout
            assert b"ntool" in answers[3].stdout
            # other routes of the proxy still need the secret; the server wants a login
            narinfo = await as_nobody("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                      f"{proxy}/{'a' * 32}.narinfo")  # fmt: skip
            assert narinfo.stdout == b"401"
            direct = await as_nobody("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                     f"{fs.url}/f/acme/ntool/1.0.0.tar.gz")  # fmt: skip
            assert direct.stdout == b"401"
        finally:
            nix_daemon.terminate()
            with trio.move_on_after(10):
                await nix_daemon.wait()
            if nix_daemon.returncode is None:
                nix_daemon.kill()
                await nix_daemon.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)
