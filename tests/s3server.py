"""moto's S3 server on a loopback port: the S3 endpoint of the tests.

The same boto3 client code that talks to AWS S3, R2, MinIO or Garage talks to it over
HTTP (``moto.server.ThreadedMotoServer``, in this process, on a free port). Dummy AWS
credentials are put in the environment for the session only (server processes the tests
start inherit them), and the shared config files and the instance metadata service are
pointed away, so nothing on the machine is asked for real ones.

``s3_server`` is the session's server; ``s3_bucket`` a fresh bucket per test;
:func:`use_s3` points a state directory's config at a bucket; :func:`unfinished` lists
what an upload may have left behind (temp files, open multipart uploads, temp objects),
which must be nothing once it is over.
"""

from __future__ import annotations

import itertools
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from nixd.server.storage.blobs import BlobStore, LocalBlobs
from nixd.server.storage.s3 import MIN_PART, S3Blobs

REGION = "us-east-1"
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_names = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """A running moto server: its URL and a client for the tests' own looks."""

    server: ThreadedMotoServer
    url: str

    def client(self) -> Any:
        return boto3.session.Session().client("s3", endpoint_url=self.url, region_name=REGION)

    def new_bucket(self) -> str:
        name = f"nixd-test-{next(_names)}"
        self.client().create_bucket(Bucket=name)
        return name


def start_moto() -> S3Server:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return S3Server(server, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _ENV.items():
            mp.setenv(key, value)
        running = start_moto()
        try:
            yield running
        finally:
            running.server.stop()


@dataclass
class S3Bucket:
    server: S3Server
    name: str
    prefix: str = "cache/"

    def blobs(self, *, part_size: int = MIN_PART) -> S3Blobs:
        return S3Blobs(
            self.name,
            self.prefix,
            endpoint_url=self.server.url,
            region=REGION,
            addressing_style="path",
            part_size=part_size,
        )

    def stored_keys(self) -> list[str]:
        found: list[str] = []
        pages = self.server.client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.name):
            found += [o["Key"] for o in page.get("Contents", ())]
        return sorted(found)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    return S3Bucket(s3_server, s3_server.new_bucket())


def use_s3(state: Path, bucket: S3Bucket, *, part_size: int = 8 << 20, extra: str = "") -> None:
    """Point the state directory's config at ``bucket`` (``[storage] blobs = "s3://..."``)."""
    config = state / "config.toml"
    text = config.read_text()
    text, n = re.subn(
        r'^blobs = ".*"$',
        f'blobs = "s3://{bucket.name}/{bucket.prefix}"',
        text,
        count=1,
        flags=re.MULTILINE,
    )
    assert n == 1
    text += (
        f'\n[storage.s3]\nendpoint_url = "{bucket.server.url}"\nregion = "{REGION}"\n'
        f'addressing_style = "path"\npart_size = {part_size}\n{extra}'
    )
    config.write_text(text)


def unfinished(blobs: BlobStore) -> list[str]:
    """Everything an upload in progress keeps: must be [] once every upload is over."""
    if isinstance(blobs, LocalBlobs):
        return sorted(p.name for p in blobs.tmp.iterdir())
    assert isinstance(blobs, S3Blobs)
    client = blobs.client
    tmp = f"{blobs.prefix}tmp/"
    uploads = client.list_multipart_uploads(Bucket=blobs.bucket, Prefix=tmp).get("Uploads", [])
    objects = client.list_objects_v2(Bucket=blobs.bucket, Prefix=tmp).get("Contents", [])
    return sorted([f"upload {u['Key']}" for u in uploads] + [o["Key"] for o in objects])
