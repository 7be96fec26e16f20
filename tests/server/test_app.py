"""The cache server's HTTP app in-process (httpx ASGI transport): protocol details and auth.

The state directory is made by the real ``nixd-server init``; the app runs on the real
store, policy, credentials, tokens and audit log. The wire itself and the real Nix client
are tested in test_nix_e2e.py.
"""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import zstandard

from nixd.nix import base32
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey
from tests.server.appenv import HASH_A, HASH_B, Env, client_narinfo, make_nar, upload
from tests.server.conftest import audit_text, audit_verify, write_policy

BOTH_BACKENDS = True  # metadata on SQLite and on PostgreSQL (tests/server/conftest.py)
BOTH_BLOBS = True  # blobs in a local directory and in an S3 bucket (moto)


@pytest.fixture
async def uploaded(env: Env, tmp_path: Path) -> AsyncIterator[bytes]:
    nar = make_nar(tmp_path / "a", b"hello\n" * 10_000)
    async with env.client(auth=env.member, basic=True) as c:
        r = await upload(c, "acme/app", HASH_A, nar)
    assert r.status_code == 200, r.text
    yield nar


async def test_cache_info_is_public(env: Env) -> None:
    async with env.client() as c:
        for path in ("/cache/nix-cache-info", "/cache/acme/app/nix-cache-info"):
            r = await c.get(path)
            assert r.status_code == 200
            assert "StoreDir: /nix/store\n" in r.text


async def test_anonymous_gets_401_with_www_authenticate(env: Env, uploaded: bytes) -> None:
    async with env.client() as c:
        for path in (f"/cache/{HASH_A}.narinfo", f"/cache/{HASH_B}.narinfo"):
            r = await c.get(path)
            assert r.status_code == 401
            assert "Basic" in r.headers["www-authenticate"]
            assert "Bearer" in r.headers["www-authenticate"]


async def test_upload_then_read_signed_by_server(env: Env, uploaded: bytes) -> None:
    token = await env.access(env.member)
    async with env.client(auth=token) as c:
        keys = (await c.get("/api/v1/cache/keys")).json()
        r = await c.get(f"/cache/{HASH_A}.narinfo")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/x-nix-narinfo")
        info = NarInfo.parse(r.text)
        assert info.compression == "zstd"
        assert info.url.startswith("nar/") and info.url.endswith(".nar.zst")
        assert info.nar_hash.digest == hashlib.sha256(uploaded).digest()
        assert info.system == "x86_64-linux"
        # The client's signature is gone; the server's verifies with the published key.
        assert not any(s.startswith("client-key:") for s in info.sigs)
        current = PublicKey.parse(keys["current"])
        assert info.verify([current]) == [current.name]
        head = await c.head(f"/cache/{HASH_A}.narinfo")
        assert head.status_code == 200 and head.content == b""

        nar = await c.get(f"/cache/{info.url}")
        assert nar.status_code == 200
        assert nar.headers["accept-ranges"] == "bytes"
        assert "content-encoding" not in nar.headers
        assert int(nar.headers["content-length"]) == info.file_size == len(nar.content)
        assert hashlib.sha256(nar.content).digest() == info.file_hash.digest  # type: ignore[union-attr]
        assert zstandard.ZstdDecompressor().decompressobj().decompress(nar.content) == uploaded

        head = await c.head(f"/cache/{info.url}")
        assert head.headers["content-length"] == str(info.file_size)

        part = await c.get(f"/cache/{info.url}", headers={"range": "bytes=10-"})
        assert part.status_code == 206
        assert part.content == nar.content[10:]
        assert (
            part.headers["content-range"] == f"bytes 10-{len(nar.content) - 1}/{len(nar.content)}"
        )
        tail = await c.get(f"/cache/{info.url}", headers={"range": "bytes=-5"})
        assert tail.status_code == 206 and tail.content == nar.content[-5:]
        # A range it does not serve (past the end, malformed, huge) is the whole file.
        for bad_range in (f"bytes={len(nar.content)}-", "bytes=x-", "bytes=" + "9" * 5000 + "-"):
            bad = await c.get(f"/cache/{info.url}", headers={"range": bad_range})
            assert bad.status_code == 200 and bad.content == nar.content

        # The slice URL shows the same path; another slice of the same org does not.
        assert (await c.get(f"/cache/acme/app/{HASH_A}.narinfo")).status_code == 200
        assert (await c.get(f"/cache/acme/lib/{HASH_A}.narinfo")).status_code == 404


async def test_other_org_sees_nothing(env: Env, uploaded: bytes) -> None:
    async with env.client(auth=env.member) as c:
        url = NarInfo.parse((await c.get(f"/cache/{HASH_A}.narinfo")).text).url
    async with env.client(auth=env.other, basic=True) as c:
        absent = await c.get(f"/cache/{HASH_B}.narinfo")
        hidden = await c.get(f"/cache/{HASH_A}.narinfo")
        assert hidden.status_code == absent.status_code == 404
        assert hidden.content == absent.content
        assert (await c.get(f"/cache/{url}")).status_code == 404
        assert (await c.get(f"/cache/acme/app/{HASH_A}.narinfo")).status_code == 404


async def test_reader_cannot_upload(env: Env, tmp_path: Path) -> None:
    nar = make_nar(tmp_path / "r", b"r")
    async with env.client(auth=env.reader, basic=True) as c:
        r = await c.put(f"/cache/acme/app/nar/{'1' * 52}.nar", content=nar)
        assert r.status_code == 403
        assert "token:acme/viewer may not upload to acme/app" in r.text
        assert "acme-readers-read-only" not in r.text  # the rule is for the audit log only


async def test_anonymous_upload_is_401(env: Env) -> None:
    async with env.client() as c:
        r = await c.put(f"/cache/acme/app/{HASH_A}.narinfo", content=b"x")
        assert r.status_code == 401


async def test_mismatched_narinfo_is_refused_and_nothing_served(env: Env, tmp_path: Path) -> None:
    nar = make_nar(tmp_path / "m", b"the real bytes")
    async with env.client(auth=env.member, basic=True) as c:
        r = await upload(c, "acme/app", HASH_B, nar, nar_hash=hashlib.sha256(b"other").digest())
        assert r.status_code == 400
        assert "NAR mismatch" in r.text
        assert f"NarHash sha256:{base32.encode(hashlib.sha256(nar).digest())}" in r.text
        assert (await c.get(f"/cache/{HASH_B}.narinfo")).status_code == 404
        assert (await c.get(f"/cache/acme/app/{HASH_B}.narinfo")).status_code == 404
    assert env.services.store.stats()["nars"] == 0
    assert not list(env.services.store.iter_blobs())


async def test_corrupt_nar_upload_is_refused(env: Env, tmp_path: Path) -> None:
    nar = make_nar(tmp_path / "c", b"c" * 1000)
    async with env.client(auth=env.member, basic=True) as c:
        r = await c.put(
            f"/cache/acme/app/nar/{'2' * 52}.nar.xz",
            content=lzma.compress(nar[:-16] + bytes(8) + b"garbage!"),
        )
        assert r.status_code == 400
        assert "malformed" in r.text
        r = await c.put(f"/cache/acme/app/nar/{'2' * 52}.nar.xz", content=b"not xz at all")
        assert r.status_code == 400
        assert "not valid xz" in r.text
        r = await c.put(f"/cache/acme/app/nar/{'2' * 52}.nar.br", content=b"x")
        assert r.status_code == 400
        assert "brotli" in r.text
        # Unix compress is named .nar by Nix: refused for what it is, not as a bad NAR.
        r = await c.put(f"/cache/acme/app/nar/{'2' * 52}.nar", content=b"\x1f\x9d\x90" + nar)
        assert r.status_code == 415
        assert "compress (.Z, LZW)" in r.text


async def test_head_of_own_upload_lets_nix_skip_it(env: Env, tmp_path: Path) -> None:
    nar = make_nar(tmp_path / "h", b"h")
    compressed = lzma.compress(nar)
    url, _ = client_narinfo(HASH_B, nar, compressed)
    async with env.client(auth=env.member, basic=True) as c:
        assert (await c.head(f"/cache/acme/app/{url}")).status_code == 404
        assert (await c.put(f"/cache/acme/app/{url}", content=compressed)).status_code == 200
        assert (await c.head(f"/cache/acme/app/{url}")).status_code == 200
        # The alias is the uploader's business only: not a readable file anywhere.
        assert (await c.get(f"/cache/{url}")).status_code == 404


async def test_public_project_is_readable_anonymously(env: Env, tmp_path: Path) -> None:
    env.state.cli("project", "create", "acme/oss", "--public")
    nar = make_nar(tmp_path / "p", b"p")
    async with env.client(auth=env.member, basic=True) as c:
        assert (await upload(c, "acme/oss", HASH_B, nar)).status_code == 200
    async with env.client() as c:
        # Anonymous callers have no org of their own: they read an org's view.
        r = await c.get(f"/cache/acme/{HASH_B}.narinfo")
        assert r.status_code == 200
        assert (await c.get(f"/cache/acme/{NarInfo.parse(r.text).url}")).status_code == 200
        assert (await c.get(f"/cache/acme/{HASH_A}.narinfo")).status_code == 401
        assert (await c.get(f"/cache/{HASH_B}.narinfo")).status_code == 401


async def test_tokens_exchange_status_jwks_revocation(env: Env) -> None:
    cred_id, api = env.state.token("acme", "laptop", "team=infra", expires="1h")
    async with env.client() as c:
        r = await c.post("/api/v1/token/exchange", json={"kind": "token", "token": api})
        assert r.status_code == 200
        body = r.json()
        assert body["token_type"] == "Bearer" and body["identity"] == "token:acme/laptop"
        assert 0 < body["expires_in"] <= 3600
        jwks = (await c.get("/.well-known/jwks.json")).json()
        assert jwks["keys"][0]["kty"] == "OKP" and jwks["keys"][0]["crv"] == "Ed25519"
        st = await c.get(
            "/api/v1/token/status", headers={"authorization": f"Bearer {body['access_token']}"}
        )
        assert st.status_code == 200
        status = st.json()
        assert status["identity"] == "token:acme/laptop"
        assert status["attributes"]["team"] == "infra" and status["attributes"]["org"] == "acme"
        assert status["expires_at"] == body["expires_at"]
        assert (await c.get("/api/v1/token/status")).status_code == 401

        env.state.cli("token", "revoke", cred_id)
        r = await c.post("/api/v1/token/exchange", json={"kind": "token", "token": api})
        assert r.status_code == 401
        assert r.json()["error"] == "revoked_credential"
        # Used directly (netrc), a revoked token is refused at once too.
        r = await c.get(f"/cache/{HASH_A}.narinfo", auth=("nixd", api))
        assert r.status_code == 401
        bad = await c.post("/api/v1/token/exchange", json={"kind": "token", "token": "nixd_x"})
        assert bad.status_code == 401
        assert (await c.post("/api/v1/token/exchange", content=b"{")).status_code == 400


async def test_source_ip_condition(env: Env, uploaded: bytes) -> None:
    policy = env.state.path / "policy.toml"
    write_policy(
        policy,
        policy.read_text()
        + """
[[rule]]
id = "acme-app-from-loopback-1-only"
effect = "deny"
subjects = [{ kind = "*" }]
actions = ["*"]
resources = ["acme/app"]
conditions = { source_ips = ["127.0.0.2/32"] }
""",
    )
    env.services.policy.reload()
    async with env.client(auth=env.member, basic=True) as c:
        assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 200
    async with env.client(auth=env.member, basic=True, ip="127.0.0.2") as c:
        assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 404


async def test_audit_log_records_decisions_and_verifies(env: Env, uploaded: bytes) -> None:
    async with env.client(auth=env.other, basic=True) as c:
        await c.get(f"/cache/{HASH_A}.narinfo")
    lines = audit_text(env.state.path).splitlines()
    assert any('"cache:write"' in line and '"allow"' in line for line in lines)
    assert any('"token:other/ci"' in line and '"deny"' in line for line in lines)
    assert not any(env.member in line or env.other in line for line in lines)
    assert audit_verify(env.state.path).ok


async def test_key_rotation_co_signs_and_publishes_both(env: Env, uploaded: bytes) -> None:
    async with env.client(auth=env.member, basic=True) as c:
        before = NarInfo.parse((await c.get(f"/cache/{HASH_A}.narinfo")).text)
        env.state.admin("key", "rotate")
        await trio.sleep(1.1)  # the server looks at the key files at most once a second
        keys = (await c.get("/api/v1/cache/keys")).json()
        after = NarInfo.parse((await c.get(f"/cache/{HASH_A}.narinfo")).text)
    assert len(before.sigs) == 1 and len(after.sigs) == 2
    assert keys["current"].startswith("acme-cache-2:") and len(keys["keys"]) == 2
    published = [PublicKey.parse(k) for k in keys["keys"]]
    assert sorted(after.verify(published)) == ["acme-cache-1", "acme-cache-2"]


async def test_build_logs(env: Env, uploaded: bytes) -> None:
    drv = f"{HASH_B}-hello.drv"
    async with env.client(auth=env.member, basic=True) as c:
        assert (await c.put(f"/cache/acme/app/log/{drv}", content=b"building\n")).status_code == 200
        assert (await c.get(f"/cache/log/{drv}")).content == b"building\n"
        assert (await c.get(f"/cache/acme/app/log/{drv}")).status_code == 200
        assert (await c.get(f"/cache/acme/lib/log/{drv}")).status_code == 404
    async with env.client(auth=env.other, basic=True) as c:
        assert (await c.get(f"/cache/log/{drv}")).status_code == 404
