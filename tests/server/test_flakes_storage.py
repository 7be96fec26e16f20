"""Where flakes are kept: both blob backends (a directory and S3), the cache's garbage
collector leaving them alone, and ``migrate --copy-from`` carrying them to PostgreSQL."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import zstandard

from nixd.nix.flaketarball import normalize
from nixd.nix.narinfo import NarInfo
from nixd.semver import parse_version
from nixd.server.config import CONFIG_NAME, ServerConfig
from nixd.server.flakes.metadata import ReleaseMetadata
from nixd.server.flakes.releases import FlakeStore
from nixd.server.http.serve import open_services
from nixd.server.storage.gc import collect
from tests.server.conftest import init_state
from tests.server.flakeenv import FlakeEnv, flake_env, tarball
from tests.serverproc import running_server, server_cli

BOTH_BLOBS = True
__all__ = ["flake_env"]


async def test_releases_live_in_either_blob_store(flake_env: FlakeEnv) -> None:
    env = flake_env
    body = tarball({"flake.nix": b"{ }\n", "lib/a.nix": b"1\n" * 5000})
    source = normalize(body)
    r = await env.publish(await env.ci(), "acme/tool", "1.0.0", body)
    assert r.status_code == 201, r.text
    # The cache's GC (no retention rules, no grace) names no flake blob and removes none.
    report = collect(env.services.store, (), grace=0.0)
    assert report.orphan_blobs == [] and report.nars == []
    async with env.client(env.member) as c:
        got = await c.get("/f/acme/tool/1.0.0.tar.gz")
        info = NarInfo.parse((await c.get(f"/cache/{source.store_path.hash_part}.narinfo")).content)
        whole = await c.get(f"/cache/{info.url}")
        part = await c.get(f"/cache/{info.url}", headers={"range": "bytes=10-99"})
        head = await c.head(f"/cache/{info.url}")
    assert got.status_code == 200 and got.content == source.tarball
    assert whole.status_code == 200
    assert zstandard.ZstdDecompressor().decompressobj().decompress(whole.content) == (
        source.nar_bytes()
    )
    assert info.file_hash is not None
    assert hashlib.sha256(whole.content).digest() == info.file_hash.digest
    assert part.status_code == 206 and part.content == whole.content[10:100]
    assert head.status_code == 200 and head.headers["content-length"] == str(len(whole.content))


def test_migrate_copy_from_carries_flakes(tmp_path: Path, pg_database: str) -> None:
    old = init_state(tmp_path / "old")
    _, member = old.token("acme", "ci", fast=True)
    body = tarball({"flake.nix": b"# moved\n"})
    source = normalize(body)
    with open_services(ServerConfig.load(old.path)) as services:
        flakes = services.flakes
        assert isinstance(flakes, FlakeStore)
        blobs = flakes.store_blobs(source)
        for version in ("0.1.0", "0.2.0-rc.1"):
            published, _ = flakes.record(
                "acme",
                "tool",
                parse_version(version),
                meta=ReleaseMetadata(visibility="private", description="moved"),
                source=source,
                blobs=blobs,
                published_by="github:repo:acme/tool:ref:refs/tags/v0.1.0",
            )
            assert published
    auth = {"authorization": f"Bearer {member}"}
    config = old.path / CONFIG_NAME
    config.write_text(config.read_text().replace('"server.db"', f'"{pg_database}"'))
    out = server_cli("migrate", str(old.path), "--copy-from", str(old.path / "server.db")).stdout
    assert "flakes               1" in out and "flake_releases       2" in out, out
    with running_server(old.path) as server:
        listed = httpx.get(f"{server.url}/api/v1/flakes/acme/tool", headers=auth)
        got = httpx.get(f"{server.url}/f/acme/tool/0.*.tar.gz", headers=auth, follow_redirects=True)
        narinfo = httpx.get(
            f"{server.url}/cache/{source.store_path.hash_part}.narinfo", headers=auth
        )
    assert listed.status_code == 200, listed.text
    assert [r["version"] for r in listed.json()["releases"]] == ["0.2.0-rc.1", "0.1.0"]
    assert got.status_code == 200 and got.content == source.tarball
    assert narinfo.status_code == 200 and NarInfo.parse(narinfo.content).nar_hash == source.nar_hash
