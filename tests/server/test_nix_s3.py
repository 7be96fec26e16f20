"""The real Nix 2.8 client against ``nixd-server serve`` on PostgreSQL + S3 (moto).

``nix copy --to`` the slice URL puts every NAR into the bucket (and nothing else: no
unfinished upload left, no local blob directory used); ``nix copy --from`` the unified URL
then substitutes the closure from it, verifying the server's signatures, with every byte
streamed from the bucket.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from nixd.server.config import CONFIG_NAME, ServerConfig
from nixd.server.storage.blobs import file_hash_of
from nixd.server.storage.db import open_db
from tests.realnix import RealNix
from tests.s3server import S3Bucket
from tests.server.conftest import ServerState
from tests.server.test_nix_e2e import build_closure, closure, copy_from, copy_to, exchange, netrc
from tests.serverproc import running_server


@pytest.mark.parametrize("metadata", ["postgresql"], indirect=True)
@pytest.mark.parametrize("blobs", ["s3"], indirect=True)
@pytest.mark.parametrize("redirect", [False, True], ids=["streamed", "redirected"])
def test_nix_copies_to_and_from_a_server_on_postgresql_and_s3(
    server_state: ServerState,
    s3_bucket: S3Bucket,
    real_nix: RealNix,
    tmp_path: Path,
    redirect: bool,
) -> None:
    """Downloads streamed by the server, or (``[storage.s3] redirect = true``) answered
    302 to a presigned URL that Nix follows to the bucket."""
    if redirect:
        config_file = server_state.path / CONFIG_NAME
        config_file.write_text(config_file.read_text() + "redirect = true\n")  # [storage.s3]
    config = ServerConfig.load(server_state.path)
    assert config.storage.s3.redirect is redirect
    assert config.blobs_s3 == (s3_bucket.name, s3_bucket.prefix)
    assert str(config.database).startswith("postgresql")
    server_state.admin("project", "create", "acme/app")
    _, writer = server_state.token("acme", "ci", fast=True)
    with running_server(server_state.path) as server:
        top = build_closure(real_nix)
        paths = closure(real_nix, top)
        up = copy_to(
            real_nix, f"{server.url}/cache/acme/app", netrc(tmp_path / "w", 0, writer), top
        )
        assert up.returncode == 0, up.stderr.decode()
        keys = s3_bucket.stored_keys()
        assert len(keys) == len(paths)  # one blob per NAR, nothing under tmp/
        assert all(file_hash_of(k.removeprefix(s3_bucket.prefix)) for k in keys), keys
        assert not config.blobs_path.exists()  # no local blob directory was made

        key = httpx.get(f"{server.url}/api/v1/cache/keys").json()["current"]
        dest = tmp_path / "dest"
        down = copy_from(
            real_nix,
            f"{server.url}/cache/",
            netrc(tmp_path / "r", 0, exchange(server.url, writer)),
            key,
            dest,
            top,
        )
        assert down.returncode == 0, down.stderr.decode()
        for p in paths:
            assert real_nix.real_path(p, dest).read_bytes() == real_nix.real_path(p).read_bytes()
    log = server.log_path.read_text() if server.log_path else ""
    nar_gets = [line for line in log.splitlines() if "GET /cache/nar/" in line]
    assert len(nar_gets) == len(paths), nar_gets
    assert all((" 302 " in line) is redirect for line in nar_gets), nar_gets


@pytest.mark.parametrize("blobs", ["s3"], indirect=True)
def test_nix_copy_to_a_bucket_that_went_away_says_503_and_keeps_nothing(
    server_state: ServerState, s3_bucket: S3Bucket, real_nix: RealNix, tmp_path: Path
) -> None:
    """Every attempt of Nix's is refused before its body (Nix 2.8 does not rewind a retried
    upload, so a refusal after the body would make the retry look like bad bytes), with
    the bucket and the cause in Nix's output; one WARNING per refusal, no traceback, and
    nothing recorded."""
    server_state.admin("project", "create", "acme/app")
    _, writer = server_state.token("acme", "ci", fast=True)
    source = tmp_path / "payload"
    source.write_bytes(b"never stored\n" * 1000)
    path = real_nix.run(["nix-store", "--add", str(source)]).stdout.decode().strip()
    client = s3_bucket.server.client()
    client.delete_bucket(Bucket=s3_bucket.name)
    with running_server(server_state.path) as server:
        r = copy_to(
            real_nix, f"{server.url}/cache/acme/app", netrc(tmp_path / "w", 0, writer), path
        )
        err = r.stderr.decode(errors="replace")
        assert r.returncode != 0, err
        attempts = err.count("HTTP error 503")
        assert attempts >= 2, err  # Nix retried, refused the same way each time
        assert f"s3://{s3_bucket.name}/" in err and "the bucket does not exist" in err, err
        assert "not valid" not in err, err
        log = server.log()
        assert "Traceback" not in log, log
        refusals = [line for line in log.splitlines() if "WARNING" in line and "request" in line]
        assert len(refusals) == attempts, log  # one WARNING per refusal
        assert all("the bucket does not exist" in line for line in refusals), log
        assert not any(" ERROR: " in line for line in log.splitlines()), log
    assert server_state.admin("project", "list").count("acme/app") == 1
    conn = open_db(ServerConfig.load(server_state.path).database)
    try:
        assert [
            conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("nars", "upload_aliases", "slice_records")
        ] == [0, 0, 0]
    finally:
        conn.close()
