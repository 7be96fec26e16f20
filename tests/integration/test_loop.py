"""End to end: real nixd-server, real daemon and proxy, real Nix (and nix-daemon)."""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from nixd.nix import base32
from tests.daemon.conftest import DaemonProcess
from tests.integration.conftest import CacheState, Loop, Server, curl, serve, start_loop

pytestmark = pytest.mark.realnix


def _sha256_ok(data_path: Path, file_hash: str) -> bool:
    digest = hashlib.sha256()
    with data_path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{base32.encode(digest.digest())}" == file_hash


async def test_nix_daemon_with_an_unprivileged_client(
    cache_state: CacheState,
    world_dir: Path,
    server_factory: list[Server],
    daemon_factory: list[DaemonProcess],
) -> None:
    server = serve(server_factory, cache_state, world_dir, access_ttl=3600)
    loop = await start_loop(world_dir, server, daemon_factory)
    conf = loop.nix_conf_dir / "nix.conf"
    store = world_dir / "daemon-store"
    # the nix-daemon's own store (a chroot store), in the conf dir nixd manages the include of
    conf.write_text(f"store = {store}\n" + conf.read_text())
    assert "nixd.conf" in conf.read_text(), conf.read_text()
    sock = world_dir / "nix-daemon.sock"
    env = {
        "PATH": os.environ["PATH"],
        "NIX_CONF_DIR": str(loop.nix_conf_dir),
        "NIX_USER_CONF_FILES": "",
        "NIX_DAEMON_SOCKET_PATH": str(sock),
        "HOME": str(world_dir),
        "XDG_CACHE_HOME": str(world_dir / "daemon-cache"),
    }
    log = (world_dir / "nix-daemon.log").open("wb")
    nix_daemon = subprocess.Popen(  # noqa: ASYNC220 - stopped in finally, like the fixtures
        ["nix-daemon"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        with trio.fail_after(20):
            while not sock.exists():  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)
        client_home = world_dir / "nobody"
        client_home.mkdir()
        os.chown(client_home, 65534, 65534)
        path = cache_state.small[0]
        with trio.fail_after(120):
            result = await trio.run_process(
                ["runuser", "-u", "nobody", "--", "env", f"NIX_REMOTE=unix://{sock}",
                 f"HOME={client_home}", f"XDG_CACHE_HOME={client_home}/cache",
                 f"NIX_CONF_DIR={client_home}", "NIX_USER_CONF_FILES=",
                 "nix-store", "--realise", path],
                capture_stdout=True, capture_stderr=True, check=False, cwd="/tmp",
            )  # fmt: skip
        assert result.returncode == 0, (
            result.stderr.decode() + (world_dir / "nix-daemon.log").read_text()
        )
        assert result.stdout.decode().strip() == path
        assert (store / path.lstrip("/")).read_text() == "path 0\n"

        # a local user without the secret gets a 401 and nothing else from the proxy
        hash_part = Path(path).name.split("-", 1)[0]
        for auth in ([], ["-u", "nixd:wrong"]):
            got = await curl(
                f"{loop.proxy}/{hash_part}.narinfo", *auth, "-w", "\n%{http_code}", user="nobody"
            )
            body, _, code = got.stdout.decode().rpartition("\n")
            assert code == "401", got
            assert "StorePath" not in body and "NarHash" not in body
        narinfo = await loop.narinfo(path)  # with the secret: served
        assert narinfo.store_path.path() == path
    finally:
        nix_daemon.send_signal(signal.SIGTERM)
        try:
            nix_daemon.wait(10)
        except subprocess.TimeoutExpired:
            nix_daemon.kill()
            nix_daemon.wait()
        log.close()


async def _download(
    loop: Loop, url: str, dest: Path, rate: str
) -> subprocess.CompletedProcess[bytes]:
    return await curl(
        url, "-u", f"nixd:{loop.secret}", "--limit-rate", rate, "-o", str(dest),
        "-w", "%{http_code}",
    )  # fmt: skip


async def test_token_expiring_mid_download_does_not_break_it(
    cache_state: CacheState,
    world_dir: Path,
    server_factory: list[Server],
    daemon_factory: list[DaemonProcess],
) -> None:
    server = serve(server_factory, cache_state, world_dir, access_ttl=5)
    loop = await start_loop(world_dir, server, daemon_factory)
    narinfo = await loop.narinfo(cache_state.big)
    status: dict[str, Any] = await loop.status()
    expires_at = float(status["token_expires_at"])
    dest = world_dir / "big.nar"
    # at most 12 MiB/s: at least 8 s, longer than the token lives (and renewals are at
    # least 10 s apart): the token the download started with expires before it ends,
    # however slow the machine (a slow set-up only moves the expiry earlier)
    got = await _download(loop, f"{loop.proxy}/{narinfo.url}", dest, "12M")
    finished = time.time()
    assert got.returncode == 0 and got.stdout == b"200", got
    assert expires_at < finished, "the download did not outlive the token"
    assert narinfo.file_hash is not None and narinfo.file_size == dest.stat().st_size
    assert _sha256_ok(dest, narinfo.file_hash.encode())
    # the renewed token keeps working: a real nix substitutes the big path afterwards
    nix = loop.nix(world_dir / "nix")
    nix.run(["nix-store", "--realise", cache_state.big])
    assert nix.real_path(cache_state.big).read_bytes() == cache_state.big_file.read_bytes()


async def test_thirty_second_tokens_over_a_long_run(
    cache_state: CacheState,
    world_dir: Path,
    server_factory: list[Server],
    daemon_factory: list[DaemonProcess],
) -> None:
    server = serve(server_factory, cache_state, world_dir, access_ttl=30)
    loop = await start_loop(world_dir, server, daemon_factory)
    login_at = time.time()
    # rounds until one has run after the second renewal: counted against renewals, not
    # seconds, so a slow machine makes fewer rounds but the same checks
    rounds = 0
    with trio.fail_after(20 * 30):  # a hang guard only
        while True:
            renewed = (await loop.status())["renewals"]
            path = cache_state.small[2 + rounds % (len(cache_state.small) - 2)]
            nix = loop.nix(world_dir / f"nix-{rounds}")  # fresh store and cache: real requests
            result = await trio.to_thread.run_sync(
                functools.partial(nix.run, ["nix-store", "--realise", path], check=False)
            )
            assert result.returncode == 0, result.stderr.decode() + loop.daemon.log()
            # no failed or retried request on the way (Nix warns about those)
            problems = [
                line
                for line in result.stderr.decode().splitlines()
                if ("warning" in line or "error" in line) and "--add-root" not in line
            ]
            assert problems == [], result.stderr.decode()
            rounds += 1
            if isinstance(renewed, int) and renewed >= 2:
                break
            await trio.sleep(8)
    assert rounds >= 3
    assert loop.daemon.log().count("access token renewed") >= 2, loop.daemon.log()
    status: dict[str, Any] = await loop.status()
    assert status["token_valid"] and status["last_error"] is None
    assert float(status["last_refresh"]) > login_at


async def test_path_unreachable_while_token_expired_is_fetched_after_refresh(
    cache_state: CacheState,
    world_dir: Path,
    server_factory: list[Server],
    daemon_factory: list[DaemonProcess],
) -> None:
    server = serve(server_factory, cache_state, world_dir, access_ttl=12)
    loop = await start_loop(world_dir, server, daemon_factory)
    server.stop()  # the renewal at ~10 s fails; the token expires at 12 s
    status: dict[str, Any] = await loop.status()
    with trio.fail_after(30):
        while time.time() < float(status["token_expires_at"]) + 0.5:  # noqa: ASYNC110
            await trio.sleep(0.2)
    path = cache_state.small[1]
    hash_part = Path(path).name.split("-", 1)[0]
    got = await curl(
        f"{loop.proxy}/{hash_part}.narinfo", "-u", f"nixd:{loop.secret}", "-w", "\n%{http_code}"
    )
    assert got.stdout.decode().rpartition("\n")[2].startswith("5"), got  # not 401/403/404
    nix = loop.nix(world_dir / "nix")
    failed = await trio.to_thread.run_sync(
        lambda: nix.run(["nix-store", "--realise", path], check=False)
    )
    assert failed.returncode != 0
    server.start()  # same port: the refresher's next attempt (or the next request) renews
    result = await trio.to_thread.run_sync(
        lambda: nix.run(["nix-store", "--realise", path], check=False)  # no --refresh
    )
    assert result.returncode == 0, result.stderr.decode() + loop.daemon.log()
    assert nix.real_path(path).read_text() == "path 1\n"


async def test_sigterm_lets_an_in_flight_download_finish(
    cache_state: CacheState,
    world_dir: Path,
    server_factory: list[Server],
    daemon_factory: list[DaemonProcess],
) -> None:
    server = serve(server_factory, cache_state, world_dir, access_ttl=3600)
    loop = await start_loop(world_dir, server, daemon_factory, shutdown_grace=20)
    narinfo = await loop.narinfo(cache_state.big)
    dest = world_dir / "big.nar"
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def download() -> None:
        results.append(await _download(loop, f"{loop.proxy}/{narinfo.url}", dest, "24M"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(download)
        with trio.fail_after(10):
            while not dest.exists() or dest.stat().st_size < 8 << 20:  # noqa: ASYNC110
                await trio.sleep(0.05)
        code = await loop.daemon.stop(within=30)  # SIGTERM mid-download
    assert code == 0, loop.daemon.log()
    (got,) = results
    assert got.returncode == 0 and got.stdout == b"200", got
    assert narinfo.file_hash is not None
    assert _sha256_ok(dest, narinfo.file_hash.encode())
    # the proxy's local store holds only complete, verified NARs; nothing in flight
    store = world_dir / "store"
    assert not any((store / "tmp").iterdir()) if (store / "tmp").exists() else True
    for nar in (store / "nar").iterdir() if (store / "nar").exists() else ():
        assert nar.stat().st_size == narinfo.file_size, nar
