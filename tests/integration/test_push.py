"""``nixd push``, ``watch-store`` and the post-build hook as a CI job would use them.

Real processes: a ``nixd-server`` with slice ``acme/app``, the daemon logged in with the
CI's API token (its own identity: the CLI never sees a token), and the real Nix 2.8 whose
chroot store holds what is pushed. Checked: the closure arrives and substitutes into a
fresh store verified by the server's key; a second push skips everything; a path signed
by an upstream's key is not pushed (upstream filter); the hook returns at once and the
daemon drains its queue; watch-store pushes a path built while it runs; a user who may
not administer the daemon is refused.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import trio

from nixd.nix.signing import SecretKey
from tests.daemon.conftest import NIXD, REPO, DaemonProcess, cli, start_daemon, write_config
from tests.realnix import RealNix
from tests.server.conftest import init_state
from tests.server.test_nix_e2e import copy_from, netrc
from tests.serverproc import running_server

CLOSURE = """
let
  mk = name: script: derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
  };
  leaf = mk "nixd-push-leaf-SALT" "echo leaf > $out";
  mid = mk "nixd-push-mid-SALT" "echo ${leaf} > $out";
in mk "nixd-push-top-SALT" "echo ${mid} > $out"
"""


def narinfo_status(server: str, token: str, path: str) -> int:
    hash_part = Path(path).name[:32]
    r = httpx.get(
        f"{server}/cache/acme/app/{hash_part}.narinfo",
        headers={"authorization": f"Bearer {token}"},
    )
    return r.status_code


async def wait_pushed(server: str, token: str, path: str, daemon: DaemonProcess) -> None:
    try:
        with trio.fail_after(120):  # a hang guard, not a timing assertion
            while await trio.to_thread.run_sync(narinfo_status, server, token, path) != 200:  # noqa: ASYNC110
                await trio.sleep(0.2)
    except trio.TooSlowError:
        raise AssertionError(f"{path} never arrived; daemon log:\n{daemon.log()}") from None


async def test_push_watch_store_and_hook_from_a_ci_job(
    real_nix: RealNix, tmp_path: Path, world_dir: Path, daemon_factory: list[DaemonProcess]
) -> None:
    state = init_state(tmp_path / "server")
    state.admin("project", "create", "acme/app")
    _, writer = state.token("acme", "ci", fast=True)
    upstream_key = SecretKey.generate("upstream-cache-1")
    salt = os.urandom(4).hex()
    top = real_nix.build(CLOSURE.replace("SALT", salt))
    closure = real_nix.run(["nix-store", "-qR", top]).stdout.decode().split()
    assert len(closure) == 3
    # A path "from an upstream": signed locally by a key the config trusts for an upstream.
    source = tmp_path / f"from-upstream-{salt}"
    source.write_text("substituted from an upstream cache\n")
    foreign = real_nix.run(["nix-store", "--add", str(source)]).stdout.decode().strip()
    key_file = tmp_path / "upstream.sk"
    key_file.write_text(upstream_key.render())
    real_nix.run(["nix", "store", "sign", "--key-file", str(key_file), foreign])

    with running_server(state.path) as server:
        config = write_config(
            world_dir,
            server_url=server.url,
            extra=(
                f'\n[push]\nto = "acme/app"\nstore = "{real_nix.store}"\njobs = 2\n'
                f'upstream_keys = ["{upstream_key.public().render()}"]\n'
            ),
        )
        daemon = await start_daemon(world_dir, config, env=real_nix.env)
        daemon_factory.append(daemon)
        await daemon.wait_for("READY=1")
        sock = daemon.socket
        login = await cli("login", "token", "--socket", sock, stdin=writer.encode())
        assert login.returncode == 0, login.stderr.decode() + daemon.log()

        # Refused for a user who may not administer the daemon: no push, no token.
        denied = await cli("push", "--socket", sock, "--config", str(config), top, user="nobody")
        assert denied.returncode != 0
        assert b"needs root" in denied.stderr, denied.stderr

        # The closure, plus the upstream's path, pushed with the daemon's identity.
        r = await cli("push", "--json", "--socket", sock, "--config", str(config), top, foreign)
        assert r.returncode == 0, r.stderr.decode() + daemon.log()
        summary = json.loads(r.stdout)
        assert summary["state"] == "done", summary
        assert (summary["total"], summary["pushed"], summary["skipped_upstream"]) == (4, 3, 1)
        assert summary["failed"] == 0 and summary["bytes"] > 0
        assert writer not in r.stdout.decode() + r.stderr.decode()
        for path in closure:
            assert narinfo_status(server.url, writer, path) == 200, path
        assert narinfo_status(server.url, writer, foreign) == 404

        # Again: everything is there already, nothing is uploaded.
        r = await cli("push", "--json", "--socket", sock, "--config", str(config), top)
        again = json.loads(r.stdout)
        assert (again["pushed"], again["skipped_present"], again["bytes"]) == (0, 3, 0), again

        # What was pushed substitutes into a fresh store, verified by the server's key.
        async with httpx.AsyncClient() as c:
            key = (await c.get(f"{server.url}/api/v1/cache/keys")).json()["current"]
        got = copy_from(
            real_nix, f"{server.url}/cache/", netrc(tmp_path / "n", server.port, writer), key,
            tmp_path / "fresh", top,
        )  # fmt: skip
        assert got.returncode == 0, got.stderr.decode()
        for path in closure:
            fresh = real_nix.real_path(path, tmp_path / "fresh").read_bytes()
            assert fresh == real_nix.real_path(path).read_bytes()

        # The post-build hook only queues: it returns (0) without waiting for the upload,
        # and the daemon drains the queue.
        hooked = real_nix.build(CLOSURE.replace("SALT", salt + "-hook"))
        hook = await trio.run_process(
            [*NIXD, "post-build-hook", "--config", str(config)],
            env={**os.environ, "OUT_PATHS": hooked, "DRV_PATH": "/nix/store/x.drv"},
            capture_stdout=True, capture_stderr=True, check=False, cwd=str(REPO),
        )  # fmt: skip
        assert hook.returncode == 0, hook.stderr.decode()
        await wait_pushed(server.url, writer, hooked, daemon)
        # A hook that cannot queue still never fails the build.
        broken = await trio.run_process(
            [*NIXD, "post-build-hook", "--config", str(tmp_path / "absent.toml")],
            env={**os.environ, "OUT_PATHS": hooked},
            capture_stdout=True, capture_stderr=True, check=False, cwd=str(REPO),
        )  # fmt: skip
        assert broken.returncode == 0
        assert b"not queued" in broken.stderr

        # watch-store pushes what is built while it runs, then exits with a summary.
        errors, output = tmp_path / "watch.err", tmp_path / "watch.out"
        with errors.open("wb") as err, output.open("wb") as out:
            watcher = await trio.lowlevel.open_process(
                [*NIXD, "watch-store", "--json", "--socket", sock, "--config", str(config)],
                stdout=out, stderr=err, cwd=str(REPO),
            )  # fmt: skip
        try:
            with trio.fail_after(60):  # hang guard: the watch is set up
                while b"watching" not in errors.read_bytes():
                    assert watcher.poll() is None, errors.read_text()
                    await trio.sleep(0.1)
            watched = real_nix.build(CLOSURE.replace("SALT", salt + "-watch"))
            await wait_pushed(server.url, writer, watched, daemon)
            watcher.send_signal(signal.SIGTERM)
            with trio.fail_after(120):
                await watcher.wait()
        finally:
            if watcher.poll() is None:
                watcher.kill()
                await watcher.wait()
        assert watcher.returncode == 0, errors.read_text()
        summary = json.loads(output.read_text())
        assert summary["pushed"] >= 1 and summary["failed"] == 0, summary

        listed = await cli("status", "--json", "--socket", sock)
        assert writer not in listed.stdout.decode()
