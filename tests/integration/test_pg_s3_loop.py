"""Two cache server instances on one PostgreSQL and one S3 bucket, and the whole loop.

Instance A and instance B share nothing but the database and the bucket (B's state
directory holds only A's ``config.toml``: keys, policy, tokens and the audit chain are
rows). The real Nix pushes a closure with a multipart-sized path to A; a daemon logged in
to B serves it to the real Nix through its verifying proxy; a token revoked through A is
refused by B at once; and the audit chain both wrote verifies.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import trio

from nixd.server.access.audit_db import verify_database
from tests.daemon.conftest import DaemonProcess
from tests.integration.conftest import SERVER_HOST, CacheState, Server, start_loop
from tests.realnix import RealNix
from tests.s3server import S3Bucket, s3_bucket, s3_server, use_s3  # noqa: F401 - fixtures
from tests.serverproc import ServerProcess, server_cli, start_server

pytestmark = pytest.mark.realnix

BIG = 20 << 20  # more than one 8 MiB part: a multipart upload to the bucket


def _token(state: Path, name: str, role: str) -> tuple[str, str]:
    out = server_cli(
        "token", "create", str(state), "--org", "acme", "--name", name,
        "--attr", f"role={role}", "--json",
    ).stdout  # fmt: skip
    made = json.loads(out)
    return str(made["id"]), str(made["token"])


def _set_up(root: Path, database: str, bucket: S3Bucket) -> tuple[CacheState, Path, str, str]:
    """State A (initialised on PostgreSQL + S3), state B (its config only), a pushed closure."""
    a, b = root / "a", root / "b"
    server_cli("init", str(a), "--org", "acme", "--database", database)
    use_s3(a, bucket)
    server_cli("project", "create", str(a), "acme/app")
    _, writer = _token(a, "ci", "member")
    reader_id, reader = _token(a, "machine", "reader")
    b.mkdir(mode=0o700)
    shutil.copy2(a / "config.toml", b / "config.toml")
    nix = RealNix.create(root / "src")
    drvs = " ".join(
        f'(derivation {{ name = "nixd-pgs3-{i}"; system = builtins.currentSystem; '
        f'builder = "/bin/sh"; args = [ "-c" "echo pg s3 path {i} > $out" ]; }})'
        for i in range(3)
    )
    small = nix.run(["nix-build", "--no-out-link", "-E", f"[ {drvs} ]"]).stdout.decode().split()
    big_file = root / "nixd-pgs3-big"
    big_file.write_bytes(os.urandom(BIG))
    big = nix.run(["nix-store", "--add", str(big_file)]).stdout.decode().strip()
    return CacheState(b, reader, small, big, big_file), a, writer, reader_id


async def test_push_to_one_instance_substitute_through_the_proxy_from_the_other(
    world_dir: Path,
    pg_database: str,
    s3_bucket: S3Bucket,  # noqa: F811 - the fixture
    daemon_factory: list[DaemonProcess],
) -> None:
    cache, state_a, writer, reader_id = await trio.to_thread.run_sync(
        _set_up, world_dir, pg_database, s3_bucket
    )
    assert not (cache.state / "keys").exists() and not (cache.state / "policy.toml").exists()
    started: list[ServerProcess] = []
    try:
        for state in (state_a, cache.state):
            log = world_dir / f"{state.name}.log"
            started.append(await trio.to_thread.run_sync(
                lambda s=state, lp=log: start_server(s, host=SERVER_HOST, log_path=lp)
            ))  # fmt: skip
        server_a, server_b = started
        netrc = world_dir / "push-netrc"
        netrc.write_text(f"machine {SERVER_HOST} login ci password {writer}\n")
        netrc.chmod(0o600)
        src = RealNix.create(world_dir / "src")
        pushed = await trio.to_thread.run_sync(lambda: src.run(
            ["nix", "copy", "--to", f"{server_a.url}/cache/acme/app?compression=zstd",
             *cache.small, cache.big, "--netrc-file", str(netrc)], check=False,
        ))  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr.decode()
        assert any(k.endswith(".nar.zst") for k in s3_bucket.stored_keys())

        loop = await start_loop(world_dir, Server(cache, server_b), daemon_factory)
        nix = loop.nix(world_dir / "dest")
        got = await trio.to_thread.run_sync(
            lambda: nix.run(["nix-store", "--realise", cache.big, *cache.small], check=False)
        )
        assert got.returncode == 0, got.stderr.decode() + loop.daemon.log()
        assert nix.real_path(cache.big).read_bytes() == cache.big_file.read_bytes()
        status = await loop.status()
        assert status["token_valid"] is True

        # revoked through A's admin command: B refuses the token on its next request
        await trio.to_thread.run_sync(
            lambda: server_cli("token", "revoke", str(state_a), reader_id)
        )
        refused = await trio.to_thread.run_sync(
            lambda: httpx.post(
                f"{server_b.url}/api/v1/token/exchange",
                json={"kind": "token", "token": cache.reader},
            )
        )
        assert refused.status_code == 401 and refused.json()["error"] == "revoked_credential"
    finally:
        for process in started:
            process.close()
    verified = await trio.to_thread.run_sync(verify_database, pg_database)
    assert verified.ok, verified.describe()
