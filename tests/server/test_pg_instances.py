"""Two ``nixd-server serve`` instances on one PostgreSQL: what one changes, the other
applies on its very next request.

Each instance has its own state directory (its address file; the audit log is the
database's table, see test_pg_audit_instances.py) with the same config and keys (copied,
as a deployment would ship them); both use one database and one blob directory. An API
token revoked through instance A's admin command is refused by instance B on the next
request, both used directly and as the credential behind an exchanged access token;
an upload to A is served by B; the real Nix copies a closure to A and from B.
"""

from __future__ import annotations

import lzma
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import zstandard

from nixd.nix.narinfo import NarInfo
from nixd.server.config import CONFIG_NAME
from nixd.server.storage import db
from tests.realnix import RealNix
from tests.server.appenv import HASH_A, client_narinfo, make_nar
from tests.server.conftest import ServerState, init_state
from tests.server.test_nix_e2e import build_closure, closure, copy_from, copy_to, exchange, netrc
from tests.serverproc import running_server

ROUNDS = 8


def _statuses(url: str, headers: dict[str, str], path: str) -> set[int]:
    return {httpx.get(f"{url}{path}", headers=headers).status_code for _ in range(ROUNDS)}


def _twins(tmp_path: Path, pg_database: str) -> tuple[ServerState, ServerState]:
    a = init_state(tmp_path / "a", pg_database)
    shutil.copytree(
        a.path, tmp_path / "b", ignore=shutil.ignore_patterns("run", "audit.log*", "blobs")
    )
    # Blobs are shared too (here one directory; in a deployment, the bucket).
    config = tmp_path / "b" / CONFIG_NAME
    text = config.read_text()
    assert 'blobs = "blobs"' in text
    config.write_text(text.replace('blobs = "blobs"', f'blobs = "{a.path / "blobs"}"'))
    return a, ServerState(tmp_path / "b", a.admin_token, a.public_key)


def test_a_revocation_on_one_instance_is_refused_by_the_other(
    tmp_path: Path, pg_database: str
) -> None:
    a, b = _twins(tmp_path, pg_database)
    a.admin("project", "create", "acme/app")
    cred_id, api = a.token("acme", "laptop", fast=True)
    with running_server(a.path) as server_a, running_server(b.path) as server_b:
        access = httpx.post(
            f"{server_a.url}/api/v1/token/exchange", json={"kind": "token", "token": api}
        ).json()["access_token"]
        bearer = {"authorization": f"Bearer {access}"}
        direct = {"authorization": f"Bearer {api}"}
        missing = f"/cache/{'0' * 32}.narinfo"
        assert _statuses(server_b.url, bearer, "/api/v1/token/status") == {200}
        assert _statuses(server_b.url, direct, missing) == {404}  # allowed, not there
        a.cli("token", "revoke", cred_id)
        assert _statuses(server_b.url, bearer, "/api/v1/token/status") == {401}
        assert _statuses(server_b.url, direct, missing) == {401}
        assert _statuses(server_a.url, bearer, "/api/v1/token/status") == {401}


def test_an_upload_to_one_instance_is_served_by_the_other(tmp_path: Path, pg_database: str) -> None:
    a, b = _twins(tmp_path, pg_database)
    a.admin("project", "create", "acme/app")
    _, member = a.token("acme", "ci", fast=True)
    nar = make_nar(tmp_path / "nar", b"shared by two instances\n")
    compressed = lzma.compress(nar)
    url, text = client_narinfo(HASH_A, nar, compressed)
    auth = {"authorization": f"Bearer {member}"}
    with running_server(a.path) as server_a, running_server(b.path) as server_b:
        # B has seen the path missing (and may cache that) before A gets it.
        assert httpx.get(f"{server_b.url}/cache/{HASH_A}.narinfo", headers=auth).status_code == 404
        r = httpx.put(f"{server_a.url}/cache/acme/app/{url}", content=compressed, headers=auth)
        assert r.status_code == 200, r.text
        r = httpx.put(
            f"{server_a.url}/cache/acme/app/{HASH_A}.narinfo", content=text.encode(), headers=auth
        )
        assert r.status_code == 200, r.text
        got = httpx.get(f"{server_b.url}/cache/{HASH_A}.narinfo", headers=auth)
        assert got.status_code == 200, got.text
        served = NarInfo.parse(got.text)
        nar_got = httpx.get(f"{server_b.url}/cache/{served.url}", headers=auth)
        assert nar_got.status_code == 200
        assert zstandard.ZstdDecompressor().decompressobj().decompress(nar_got.content) == nar


def test_nix_copies_to_one_instance_and_from_the_other(
    tmp_path: Path, pg_database: str, real_nix: RealNix
) -> None:
    a, b = _twins(tmp_path, pg_database)
    a.admin("project", "create", "acme/app")
    _, writer = a.token("acme", "ci", fast=True)
    with running_server(a.path) as server_a, running_server(b.path) as server_b:
        top = build_closure(real_nix)
        paths = closure(real_nix, top)
        up = copy_to(
            real_nix, f"{server_a.url}/cache/acme/app", netrc(tmp_path / "netrc-w", 0, writer), top
        )
        assert up.returncode == 0, up.stderr
        access = exchange(server_b.url, writer)
        dest = tmp_path / "dest"
        down = copy_from(
            real_nix,
            f"{server_b.url}/cache/",
            netrc(tmp_path / "netrc-r", 0, access),
            a.public_key,
            dest,
            top,
        )
        assert down.returncode == 0, down.stderr
        for p in paths:
            assert real_nix.real_path(p, dest).read_bytes() == real_nix.real_path(p).read_bytes()


def test_the_same_uploads_racing_on_two_instances_end_as_one(
    tmp_path: Path, pg_database: str
) -> None:
    """Each path PUT to both instances at the same moment (NAR, then narinfo): every PUT
    succeeds, and there is one NAR record, one blob file and one slice record per path."""
    a, b = _twins(tmp_path, pg_database)
    a.admin("project", "create", "acme/app")
    _, member = a.token("acme", "ci", fast=True)
    auth = {"authorization": f"Bearer {member}"}
    count = 6
    uploads = []
    for n in range(count):
        nar = make_nar(tmp_path / f"nar{n}", f"raced {n}\n".encode() * 1000)
        compressed = lzma.compress(nar)
        hash_part = f"{n:032d}".replace("0", "a")
        uploads.append((hash_part, compressed, *client_narinfo(hash_part, nar, compressed)))
    with running_server(a.path) as server_a, running_server(b.path) as server_b:

        def put(target: tuple[str, str, bytes]) -> int:
            base, path, body = target
            return httpx.put(f"{base}{path}", content=body, headers=auth, timeout=60).status_code

        with ThreadPoolExecutor(max_workers=2) as pool:
            for hash_part, compressed, url, text in uploads:
                nar_put = (f"/cache/acme/app/{url}", compressed)
                info_put = (f"/cache/acme/app/{hash_part}.narinfo", text.encode())
                for path, body in (nar_put, info_put):
                    both = [(server_a.url, path, body), (server_b.url, path, body)]
                    statuses = list(pool.map(put, both))
                    assert statuses == [200, 200], (path, statuses)
    conn = db.open_db(pg_database)
    try:
        nars = conn.execute("SELECT count(*) FROM nars").fetchone()[0]
        records = conn.execute("SELECT count(*) FROM slice_records").fetchone()[0]
    finally:
        conn.close()
    assert (nars, records) == (count, count)
    assert len(list((a.path / "blobs").glob("*/*.nar.zst"))) == count
    assert not list((a.path / "blobs" / "tmp").iterdir())
