"""NAR blobs in S3-compatible storage, against moto's S3 server (tests/s3server.py).

:class:`~nixd.server.storage.s3.S3Blobs` on its own (multipart past the part size, ranged
reads, paginated listing, deletes, sweeping unfinished uploads, failures as 503s), the
``[storage] blobs = "s3://..."`` config and its refusals, and the app serving and
receiving NARs through a bucket (full and ranged downloads, a bucket that goes away).
The store's own tests run on S3 too (tests/server/test_store.py, ``BOTH_BLOBS``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import httpx
import pytest
import zstandard

from nixd.errors import ConfigError
from nixd.nix import base32
from nixd.nix.nar import NarParser
from nixd.nix.narinfo import NarInfo
from nixd.server.config import ServerConfig
from nixd.server.errors import StorageUnavailable, answer_of
from nixd.server.storage.blobs import BlobMissing, blob_key
from nixd.server.storage.db import create_org, create_project, open_db
from nixd.server.storage.s3 import MIN_PART, S3Blobs
from nixd.server.storage.store import Store
from tests.s3server import REGION, S3Bucket, S3Server, free_port, unfinished
from tests.server.appenv import HASH_A, Env, make_nar, upload

KEY_A = blob_key("a" * 52)
KEY_B = blob_key("b" * 52)


def _put(blobs: S3Blobs, key: str, data: bytes) -> None:
    w = blobs.writer()
    w.write(data)
    w.commit(key)


def _read(blobs: S3Blobs, key: str, start: int, end: int) -> bytes:
    read = blobs.open_read(key, start, end)
    try:
        return b"".join(read)
    finally:
        read.close()


def _empty_and_delete(bucket: S3Bucket) -> None:
    client = bucket.server.client()
    for key in bucket.stored_keys():
        client.delete_object(Bucket=bucket.name, Key=key)
    for up in client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket.name, Key=up["Key"], UploadId=up["UploadId"])
    client.delete_bucket(Bucket=bucket.name)


# -- S3Blobs ------------------------------------------------------------------------------


def test_a_small_blob_is_one_put_under_its_final_key(s3_bucket: S3Bucket) -> None:
    blobs = s3_bucket.blobs()
    w = blobs.writer()
    w.write(b"hello ")
    w.write(b"world")
    assert s3_bucket.stored_keys() == []  # nothing at all before the commit
    w.commit(KEY_A)
    assert s3_bucket.stored_keys() == [f"cache/{KEY_A}"]
    assert blobs.exists(KEY_A) and blobs.size(KEY_A) == 11
    assert _read(blobs, KEY_A, 0, 11) == b"hello world"
    assert unfinished(blobs) == []


def test_a_blob_past_the_part_size_streams_as_multipart_and_appears_only_whole(
    s3_bucket: S3Bucket,
) -> None:
    """40 MiB in parts of 5 MiB: parts go out while it streams (an open multipart upload
    under tmp/), the final key appears only at commit, whole, and tmp/ is empty after."""
    blobs = s3_bucket.blobs(part_size=MIN_PART)
    data = os.urandom(40 << 20)
    w = blobs.writer()
    for i in range(0, len(data), 1 << 20):
        w.write(data[i : i + (1 << 20)])
        if i == 20 << 20:
            assert [u.startswith("upload cache/tmp/") for u in unfinished(blobs)] == [True]
            assert not blobs.exists(KEY_A)
            assert list(blobs.iter_blobs()) == []
    w.commit(KEY_A)
    assert unfinished(blobs) == []
    assert s3_bucket.stored_keys() == [f"cache/{KEY_A}"]
    assert blobs.size(KEY_A) == len(data)
    got = _read(blobs, KEY_A, 0, len(data))
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_a_large_nar_through_the_store_is_stored_whole(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """A 40 MiB NAR (incompressible, so its zstd blob is ~40 MiB: eight parts) uploaded
    through the store's ingest: verified, multipart, copied to its key, nothing left."""
    conn = open_db(tmp_path / "server.db")
    try:
        create_org(conn, "acme")
        project = create_project(conn, "acme", "app")
        store = Store.open(conn, s3_bucket.blobs(part_size=MIN_PART))
        nar = make_nar(tmp_path / "big", os.urandom(40 << 20))
        ingest = store.begin_nar("none", max_nar_size=1 << 30, checker=NarParser())
        for i in range(0, len(nar), 1 << 20):
            ingest.feed(nar[i : i + (1 << 20)])
        finished = ingest.finish()
        assert finished[3] > 7 * MIN_PART
        stored = store.commit_nar(ingest, finished, project, "nar/big.nar")
        assert unfinished(store.blobs) == []
        assert [b.file_hash for b in store.iter_blobs()] == [stored.file_hash]
        blob = b"".join(store.open_blob(stored.file_hash, 0, stored.file_size))
        assert base32.encode(hashlib.sha256(blob).digest()) == stored.file_hash
        assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) == nar
    finally:
        conn.close()


def test_a_discarded_multipart_upload_is_aborted(s3_bucket: S3Bucket) -> None:
    blobs = s3_bucket.blobs()
    w = blobs.writer()
    w.write(os.urandom(MIN_PART + 1))
    assert len(unfinished(blobs)) == 1
    w.discard()
    w.discard()  # idempotent
    assert unfinished(blobs) == [] and s3_bucket.stored_keys() == []


def test_ranged_reads(s3_bucket: S3Bucket) -> None:
    blobs = s3_bucket.blobs()
    data = os.urandom(3 << 20)  # more than one read chunk
    _put(blobs, KEY_A, data)
    assert _read(blobs, KEY_A, 0, len(data)) == data
    assert _read(blobs, KEY_A, 100, 200) == data[100:200]
    assert _read(blobs, KEY_A, len(data) - 1, len(data)) == data[-1:]
    assert _read(blobs, KEY_A, (1 << 20) - 5, (2 << 20) + 5) == data[(1 << 20) - 5 : (2 << 20) + 5]
    chunks = list(blobs.open_read(KEY_A, 0, len(data)))
    assert max(len(c) for c in chunks) <= 1 << 20


def test_an_absent_key_is_missing_not_unavailable(s3_bucket: S3Bucket) -> None:
    blobs = s3_bucket.blobs()
    assert not blobs.exists(KEY_A)
    with pytest.raises(BlobMissing):
        blobs.size(KEY_A)
    with pytest.raises(BlobMissing):
        blobs.open_read(KEY_A, 0, 10)
    blobs.delete(KEY_A)  # absent is fine


def test_delete(s3_bucket: S3Bucket) -> None:
    blobs = s3_bucket.blobs()
    _put(blobs, KEY_A, b"a")
    _put(blobs, KEY_B, b"b")
    blobs.delete(KEY_A)
    assert not blobs.exists(KEY_A) and blobs.exists(KEY_B)
    assert s3_bucket.stored_keys() == [f"cache/{KEY_B}"]


def test_listing_pages_through_every_blob_and_only_blobs(s3_bucket: S3Bucket) -> None:
    blobs = s3_bucket.blobs()
    blobs.list_page_size = 2  # five blobs: three pages
    keys = [blob_key(c * 52) for c in "abcde"]
    for n, key in enumerate(keys):
        _put(blobs, key, b"x" * (n + 1))
    client = s3_bucket.server.client()
    client.put_object(Bucket=s3_bucket.name, Key="cache/tmp/upload-leftover", Body=b"t")
    client.put_object(Bucket=s3_bucket.name, Key="cache/README", Body=b"not a blob")
    client.put_object(Bucket=s3_bucket.name, Key=f"elsewhere/{keys[0]}", Body=b"other prefix")
    listed = sorted(blobs.iter_blobs())
    assert [(e.key, e.size) for e in listed] == [(k, n + 1) for n, k in enumerate(keys)]
    assert all(e.mtime > 0 for e in listed)


def test_the_sweep_removes_old_unfinished_uploads_only(s3_bucket: S3Bucket) -> None:
    """What a crash leaves: an open multipart upload, or a completed temporary object
    not yet copied. (moto dates every multipart upload 2010-11-10, so that one counts as
    old at once; the temporary object has its real date.)"""
    blobs = s3_bucket.blobs()
    w = blobs.writer()
    w.write(os.urandom(MIN_PART))  # an open multipart upload
    client = s3_bucket.server.client()
    client.put_object(Bucket=s3_bucket.name, Key="cache/tmp/upload-crashed", Body=b"t")
    _put(blobs, KEY_A, b"kept")
    assert len(unfinished(blobs)) == 2
    blobs.sweep_partial()
    assert unfinished(blobs) == ["cache/tmp/upload-crashed"]  # young: another may own it
    blobs.sweep_partial(older_than=-60)  # everything counts as old
    assert unfinished(blobs) == []
    assert blobs.exists(KEY_A)


def test_a_missing_bucket_is_unavailable_never_empty(s3_server: S3Server) -> None:
    blobs = S3Blobs(
        "nixd-never-created",
        endpoint_url=s3_server.url,
        region=REGION,
        addressing_style="path",
        part_size=MIN_PART,
    )
    with pytest.raises(StorageUnavailable, match="the bucket does not exist") as caught:
        blobs.exists(KEY_A)  # a GC must never take this for "no such blob"
    assert answer_of(caught.value) == (503, "storage_unavailable")
    assert "s3://nixd-never-created/" in str(caught.value)
    with pytest.raises(StorageUnavailable, match="does not exist"):
        _put(blobs, KEY_A, b"x")
    with pytest.raises(StorageUnavailable):
        list(blobs.iter_blobs())
    reason = blobs.check()
    assert reason is not None and "does not exist" in reason


def test_an_endpoint_that_does_not_answer_is_unavailable(s3_server: S3Server) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    blobs = S3Blobs("nixd-test", endpoint_url=dead, region=REGION, part_size=MIN_PART)
    with pytest.raises(StorageUnavailable, match="does not answer") as caught:
        blobs.open_read(KEY_A, 0, 1)
    assert answer_of(caught.value) == (503, "storage_unavailable")
    w = blobs.writer()
    w.write(b"x")
    with pytest.raises(StorageUnavailable):
        w.commit(KEY_A)
    assert blobs.check() is not None


# -- config -------------------------------------------------------------------------------

GOOD = """
[storage]
blobs = "s3://nixd-cache/teams/acme/"
[storage.s3]
endpoint_url = "http://127.0.0.1:9000"
region = "us-east-1"
addressing_style = "path"
part_size = 8388608
"""


def test_an_s3_config_is_read(tmp_path: Path) -> None:
    config = ServerConfig.from_toml(GOOD, state_dir=tmp_path)
    assert config.blobs_s3 == ("nixd-cache", "teams/acme/")
    assert config.storage.s3.endpoint_url == "http://127.0.0.1:9000"
    assert config.storage.s3.part_size == 8 << 20
    plain = ServerConfig.from_toml('[storage]\nblobs = "s3://nixd-cache"\n', state_dir=tmp_path)
    assert plain.blobs_s3 == ("nixd-cache", "")
    assert ServerConfig.from_toml("", state_dir=tmp_path).blobs_s3 is None


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        ('blobs = "s3://AKIA:secret@bucket/x"', "storage.blobs", "credentials"),
        ('blobs = "s3://bucket/x?token=1"', "storage.blobs", "credentials"),
        ('blobs = "s3://Bad_Bucket/x"', "storage.blobs", "not a valid bucket name"),
        ('blobs = "gs://bucket/x"', "storage.blobs", "s3://BUCKET"),
        ('blobs = "s3://bucket/a b"', "storage.blobs", "key prefix"),
        ('[storage.s3]\naddressing_style = "dns"', "storage.s3.addressing_style", "one of"),
        ("[storage.s3]\npart_size = 1024", "storage.s3.part_size", "5 MiB"),
        ('[storage.s3]\nendpoint_url = "ftp://x"', "storage.s3.endpoint_url", "http(s)"),
        (
            '[storage.s3]\nendpoint_url = "https://key:secret@r2.example"',
            "storage.s3.endpoint_url",
            "credentials do not belong",
        ),
        ('[storage.s3]\naccess_key = "AKIA"', "storage.s3.access_key", "unknown key"),
        ("s3 = 1", "storage.s3", "must be a table"),
    ],
)
def test_bad_s3_config_is_refused_naming_the_key(
    tmp_path: Path, text: str, where: str, says: str
) -> None:
    if text.startswith("[storage.s3]"):
        body = f'[storage]\nblobs = "s3://bucket/x"\n{text}\n'
    else:
        body = f"[storage]\n{text}\n"
    with pytest.raises(ConfigError, match=r"config.toml:" + where.replace(".", r"\.")) as caught:
        ServerConfig.from_toml(body, state_dir=tmp_path)
    assert says in str(caught.value)


def test_the_part_size_must_hold_the_largest_upload(tmp_path: Path) -> None:
    body = (
        '[storage]\nblobs = "s3://bucket"\nmax_upload_bytes = 107374182400\n'
        "[storage.s3]\npart_size = 5242880\n"
    )
    with pytest.raises(ConfigError, match=r"storage\.s3\.part_size: .*10000 parts") as caught:
        ServerConfig.from_toml(body, state_dir=tmp_path)
    assert "at least 10737419" in str(caught.value)


# -- the app on a bucket ------------------------------------------------------------------

ON_S3 = pytest.mark.parametrize("blobs", ["s3"], indirect=True)


async def _uploaded(env: Env, tmp_path: Path, content: bytes) -> tuple[bytes, NarInfo, str]:
    nar = make_nar(tmp_path / "a", content)
    async with env.client(auth=env.member, basic=True) as c:
        r = await upload(c, "acme/app", HASH_A, nar)
        assert r.status_code == 200, r.text
    token = await env.access(env.member)
    async with env.client(auth=token) as c:
        info = NarInfo.parse((await c.get(f"/cache/{HASH_A}.narinfo")).text)
    return nar, info, token


@ON_S3
async def test_nars_are_served_from_the_bucket_whole_and_ranged(env: Env, tmp_path: Path) -> None:
    nar, info, token = await _uploaded(env, tmp_path, os.urandom(3 << 20))
    store = env.services.store
    assert isinstance(store.blobs, S3Blobs)
    assert store.blob_local_path(info.url[4:-8]) is None  # streamed, not sendfile
    async with env.client(auth=token) as c:
        whole = await c.get(f"/cache/{info.url}")
        assert whole.status_code == 200
        assert whole.headers["accept-ranges"] == "bytes"
        assert int(whole.headers["content-length"]) == info.file_size == len(whole.content)
        assert hashlib.sha256(whole.content).digest() == info.file_hash.digest  # type: ignore[union-attr]
        assert zstandard.ZstdDecompressor().decompressobj().decompress(whole.content) == nar
        part = await c.get(f"/cache/{info.url}", headers={"range": "bytes=1000-1500000"})
        assert part.status_code == 206
        assert part.content == whole.content[1000:1500001]
        assert part.headers["content-range"] == f"bytes 1000-1500000/{info.file_size}"
        tail = await c.get(f"/cache/{info.url}", headers={"range": "bytes=-100"})
        assert tail.status_code == 206 and tail.content == whole.content[-100:]
        head = await c.head(f"/cache/{info.url}")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == info.file_size


@ON_S3
async def test_a_bucket_that_went_away_answers_503_and_keeps_nothing(
    env: Env, tmp_path: Path, s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    """Uploads and downloads answer 503 with a message naming the bucket and the cause,
    logged as one WARNING without a traceback; nothing is recorded; /readyz says blobs."""
    _, info, token = await _uploaded(env, tmp_path, b"stored before the bucket went\n")
    _empty_and_delete(s3_bucket)
    caplog.clear()
    nar = make_nar(tmp_path / "b", b"refused\n" * 1000)
    before = env.services.store.stats()
    async with env.client(auth=env.member, basic=True) as c:
        r = await c.put("/cache/acme/app/nar/refused.nar", content=nar)
    assert r.status_code == 503, r.text
    assert f"s3://{s3_bucket.name}/cache/" in r.text
    assert "the bucket does not exist" in r.text
    assert env.services.store.stats() == before  # no NAR record, no alias, no path
    warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].exc_info is None
    async with env.client(auth=token) as c:
        got = await c.get(f"/cache/{info.url}")
        assert got.status_code == 503 and "does not exist" in got.text
        ready = await c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["failed"] == ["blobs"]
        assert s3_bucket.name not in ready.text  # the cause is logged, not answered
        scrape = (await c.get("/metrics")).text
    unavailable = re.search(
        r'^nixd_server_storage_errors_total\{backend="blobs",error="unavailable"\} (\S+)$',
        scrape,
        re.MULTILINE,
    )
    assert unavailable and float(unavailable.group(1)) >= 2, scrape  # the PUT and the GET


@ON_S3
async def test_with_redirect_a_nar_get_is_a_302_to_a_presigned_url(
    env: Env, tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    """The decision is the server's (an outsider gets 404, not a URL); the bytes, ranges
    included, come from the bucket through the presigned URL alone (no credentials)."""
    nar, info, token = await _uploaded(env, tmp_path, os.urandom(1 << 20))
    store = env.services.store
    assert isinstance(store.blobs, S3Blobs)
    store.blobs.redirect_ttl = 60  # as [storage.s3] redirect = true, redirect_ttl = 60
    async with env.client(auth=token) as c:
        r = await c.get(f"/cache/{info.url}")
        assert r.status_code == 302, r.text
        assert r.headers["cache-control"] == "no-store"
        location = r.headers["location"]
        assert location.startswith(f"{s3_bucket.server.url}/{s3_bucket.name}/cache/")
        assert "X-Amz-Signature=" in location and "X-Amz-Expires=60" in location
        head = await c.head(f"/cache/{info.url}")  # a presigned GET cannot answer a HEAD
        assert head.status_code == 200
        assert int(head.headers["content-length"]) == info.file_size
    async with env.client(auth=env.other) as c:
        assert (await c.get(f"/cache/acme/{info.url}")).status_code == 404
    async with httpx.AsyncClient() as plain:
        whole = await plain.get(location)
        assert whole.status_code == 200
        assert zstandard.ZstdDecompressor().decompressobj().decompress(whole.content) == nar
        part = await plain.get(location, headers={"range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == whole.content[10:20]


def test_redirect_is_configured_and_bounded(tmp_path: Path) -> None:
    body = '[storage]\nblobs = "s3://bucket"\n[storage.s3]\nredirect = true\nredirect_ttl = 120\n'
    config = ServerConfig.from_toml(body, state_dir=tmp_path)
    assert config.storage.s3.redirect and config.storage.s3.redirect_ttl == 120
    with pytest.raises(ConfigError, match=r"storage\.s3\.redirect_ttl: must be between"):
        ServerConfig.from_toml(body.replace("120", "0"), state_dir=tmp_path)


def test_a_blob_directory_copied_into_a_bucket_is_served_as_is(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    """The README's move of a single box to S3 is a plain copy of ``blobs/`` (minus
    ``tmp/``) under the prefix — ``aws s3 sync`` does that; here boto3's upload_file per
    file, as it would: the keys are the same, so every record finds its blob."""
    conn = open_db(tmp_path / "server.db")
    try:
        create_org(conn, "acme")
        project = create_project(conn, "acme", "app")
        local = Store.open(conn, tmp_path / "blobs")
        stored = []
        for n in range(3):
            ingest = local.begin_nar("none", max_nar_size=1 << 20, checker=None)
            ingest.feed(make_nar(tmp_path / f"n{n}", f"moved {n}\n".encode()))
            stored.append(local.commit_nar(ingest, ingest.finish(), project, f"nar/{n}.nar"))
        (tmp_path / "blobs" / "tmp" / "upload-leftover").write_bytes(b"partial")
        client = s3_bucket.server.client()
        for f in (tmp_path / "blobs").rglob("*"):
            rel = f.relative_to(tmp_path / "blobs").as_posix()
            if f.is_file() and not rel.startswith("tmp/"):  # aws s3 sync --exclude 'tmp/*'
                client.upload_file(str(f), s3_bucket.name, f"{s3_bucket.prefix}{rel}")
        remote = Store.open(conn, s3_bucket.blobs())
        assert sorted(remote.iter_blobs())[0][:2] == sorted(local.iter_blobs())[0][:2]
        assert {(b.file_hash, b.size) for b in remote.iter_blobs()} == {
            (b.file_hash, b.size) for b in local.iter_blobs()
        }
        for nar in stored:
            assert remote.blob_exists(nar.file_hash)
            got = b"".join(remote.open_blob(nar.file_hash, 0, nar.file_size))
            assert base32.encode(hashlib.sha256(got).digest()) == nar.file_hash
    finally:
        conn.close()
