"""Two ``nixd-server serve`` instances on one PostgreSQL and one bucket (moto).

Each instance has its own state directory, with the same config (pointing at one bucket
and one database) and keys, as a deployment ships them. A NAR uploaded to A is served by
B from the bucket; the same uploads racing on both end as one blob per NAR in the bucket,
one record each, and nothing unfinished (no open multipart upload, no temporary object).
A NAR larger than the part size takes the multipart path on both at once.
"""

from __future__ import annotations

import lzma
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import zstandard

from nixd.nix.narinfo import NarInfo
from nixd.server.storage import db
from nixd.server.storage.blobs import file_hash_of
from tests.s3server import S3Bucket, use_s3
from tests.server.appenv import client_narinfo, make_nar
from tests.server.conftest import ServerState, init_state
from tests.serverproc import running_server

PART = 8 << 20


def _twins(tmp_path: Path, pg_database: str, bucket: S3Bucket) -> tuple[ServerState, ServerState]:
    a = init_state(tmp_path / "a", pg_database)
    use_s3(a.path, bucket, part_size=PART)
    shutil.copytree(a.path, tmp_path / "b", ignore=shutil.ignore_patterns("run", "audit.log*"))
    return a, ServerState(tmp_path / "b", a.admin_token, a.public_key)


def test_uploads_racing_on_two_instances_end_as_one_blob_each(
    tmp_path: Path, pg_database: str, s3_bucket: S3Bucket
) -> None:
    a, b = _twins(tmp_path, pg_database, s3_bucket)
    a.admin("project", "create", "acme/app")
    _, member = a.token("acme", "ci", fast=True)
    auth = {"authorization": f"Bearer {member}"}
    uploads = []
    for n in range(4):
        # the last is incompressible and past the part size: multipart on both instances
        content = os.urandom(PART + (1 << 20)) if n == 3 else f"raced {n}\n".encode() * 1000
        nar = make_nar(tmp_path / f"nar{n}", content)
        compressed = lzma.compress(nar, preset=0)
        hash_part = f"{n:032d}".replace("0", "a")
        uploads.append((hash_part, nar, compressed, *client_narinfo(hash_part, nar, compressed)))
    with running_server(a.path) as server_a, running_server(b.path) as server_b:

        def put(target: tuple[str, str, bytes]) -> int:
            base, path, body = target
            return httpx.put(f"{base}{path}", content=body, headers=auth, timeout=120).status_code

        with ThreadPoolExecutor(max_workers=2) as pool:
            for hash_part, _, compressed, url, text in uploads:
                nar_put = (f"/cache/acme/app/{url}", compressed)
                info_put = (f"/cache/acme/app/{hash_part}.narinfo", text.encode())
                for path, body in (nar_put, info_put):
                    both = [(server_a.url, path, body), (server_b.url, path, body)]
                    statuses = list(pool.map(put, both))
                    assert statuses == [200, 200], (path, statuses)
        # what A stored, B serves from the bucket
        for hash_part, nar, *_ in uploads:
            got = httpx.get(f"{server_b.url}/cache/{hash_part}.narinfo", headers=auth)
            assert got.status_code == 200, got.text
            served = NarInfo.parse(got.text)
            blob = httpx.get(f"{server_b.url}/cache/{served.url}", headers=auth, timeout=60)
            assert blob.status_code == 200
            assert zstandard.ZstdDecompressor().decompressobj().decompress(blob.content) == nar
    conn = db.open_db(pg_database)
    try:
        nars = conn.execute("SELECT count(*) FROM nars").fetchone()[0]
        records = conn.execute("SELECT count(*) FROM slice_records").fetchone()[0]
    finally:
        conn.close()
    assert (nars, records) == (len(uploads), len(uploads))
    keys = s3_bucket.stored_keys()
    assert len(keys) == len(uploads), keys  # one blob each, nothing under tmp/
    assert all(file_hash_of(k.removeprefix(s3_bucket.prefix)) for k in keys), keys
    client = s3_bucket.server.client()
    assert not client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads")
