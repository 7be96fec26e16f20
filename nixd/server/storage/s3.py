"""NAR blobs in S3-compatible object storage (``[storage] blobs = "s3://BUCKET/prefix"``).

One boto3 client (thread-safe; its calls block, so the HTTP app makes them in worker
threads) talks to AWS S3 or anything that speaks its API (R2, MinIO, Garage; the tests run
against moto's server). Credentials come only from boto3's default chain — the
environment, a shared profile, a container or instance role — never from the config file.

**Nothing partial under a final key.** A blob's key is its FileHash, known only after its
last byte; S3 fixes an object's key when an upload *starts*. So:

- a blob of at most one part (``part_size``, the common case) is kept in memory while it
  streams in and written with one ``PutObject`` under its final key at commit, when its
  hash is known and the NAR verified. A ``PutObject`` is atomic: the object appears whole
  or not at all.
- a larger blob streams as a multipart upload to a temporary key ``<prefix>tmp/upload-
  <random>`` (each part sent as soon as it is full, so memory stays at one part per
  upload, whatever the NAR's size). At commit the upload is completed under that key,
  copied server-side to the final key (a copy, too, appears whole or not at all; boto3's
  managed copy splits one past 5 GiB into part copies, still completed at once), and the
  temporary object deleted. A discarded or failed upload is aborted (or its temporary
  object deleted).

Completing the multipart upload directly under the final key would need the key before
the first part, i.e. the whole blob spooled somewhere first; the copy costs the bucket a
second write of large blobs, but no local disk and no second upload from the server.
Leftovers of a crash (an open multipart upload, a temporary object) are only under
``tmp/``, which listing blobs never shows; :meth:`S3Blobs.sweep_partial` removes the ones
older than a day when the server starts (a bucket lifecycle rule aborting incomplete
multipart uploads does the same on the bucket's side).

**Failures.** A bucket that does not answer, refuses the credentials or does not exist is
:class:`~nixd.server.errors.StorageUnavailable` (503, one WARNING, the message names the
bucket and the cause); a key that is simply absent is
:class:`~nixd.server.storage.blobs.BlobMissing`. A HEAD of an absent key cannot tell a
missing key from a missing bucket (it has no body), so that answer is confirmed with a
HEAD of the bucket before it is believed: a vanished bucket never looks like an empty one
(a GC must not take "missing" blobs for orphans' opposites).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import boto3  # type: ignore[import-untyped]
import botocore.config  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]
from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

from nixd.errors import NixdError
from nixd.server.errors import StorageUnavailable
from nixd.server.storage.blobs import (
    PARTIAL_MAX_AGE,
    READ_CHUNK,
    BlobEntry,
    BlobMissing,
    file_hash_of,
)

log = logging.getLogger(__name__)

MIN_PART = 5 << 20
"""S3's smallest part (every part but the last)."""
MAX_PART = 5 << 30
MAX_PARTS = 10_000
"""S3's most parts per multipart upload: ``part_size`` x this bounds a blob's size."""
_ABSENT = {"404", "NoSuchKey", "NotFound"}
_DENIED = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}
_NETWORK = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ResponseStreamingError,
)


class S3Blobs:
    """Blobs as objects ``<prefix><ab>/<filehash>.nar.zst`` in one bucket.

    ``prefix`` is ``""`` or ends in ``/``. ``part_size`` is both the largest blob sent in
    one ``PutObject`` and the multipart part size, so it is also what one upload holds in
    memory at most.
    """

    remote = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str = "",
        region: str = "",
        addressing_style: str = "auto",
        part_size: int = 16 << 20,
        redirect_ttl: int | None = None,
    ) -> None:
        if not MIN_PART <= part_size <= MAX_PART:
            raise ValueError(f"part_size must be between {MIN_PART} and {MAX_PART}")
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = part_size
        self.endpoint_url = endpoint_url
        self.redirect_ttl = redirect_ttl
        self.list_page_size = 1000
        config = botocore.config.Config(
            s3={"addressing_style": addressing_style},
            signature_version="s3v4",  # presigned URLs too (R2 and newer regions need v4)
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            # trio's default thread limit is 40: one connection per thread that may ask
            max_pool_connections=40,
        )
        self.client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            config=config,
        )
        self._copy_config = TransferConfig(
            multipart_threshold=MAX_PART,
            multipart_chunksize=max(part_size, 64 << 20),
            use_threads=False,
        )

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    # -- errors ---------------------------------------------------------------------------

    def unavailable(self, exc: BaseException, doing: str) -> StorageUnavailable:
        """The 503 for ``exc``: which store, what it was doing, and the cause."""
        if isinstance(exc, botocore.exceptions.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket" or code in _ABSENT:  # an absent *key* is BlobMissing
                cause = "the bucket does not exist"
            elif code in _DENIED:
                cause = f"access denied ({code}) with the server's AWS credentials"
            else:
                cause = f"it answered {code or 'an error'}"
        elif isinstance(exc, botocore.exceptions.NoCredentialsError):
            cause = "no AWS credentials found (environment, shared profile or instance role)"
        elif isinstance(exc, _NETWORK):
            cause = f"it does not answer ({exc})"
        else:
            cause = str(exc) or type(exc).__name__
        return StorageUnavailable(f"the blob store {self.describe()} failed {doing}: {cause}")

    @contextlib.contextmanager
    def _calls(self, doing: str, key: str | None = None) -> Iterator[None]:
        """botocore's errors as this module's: absent key, or the store unavailable."""
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if key is not None and code in _ABSENT:
                raise BlobMissing(f"no blob {key} in {self.describe()}") from exc
            raise self.unavailable(exc, doing) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self.unavailable(exc, doing) from exc

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    # -- the interface --------------------------------------------------------------------

    def writer(self) -> _S3Writer:
        return _S3Writer(self)

    def _confirm_absent(self, key: str) -> None:
        """A HEAD said 404: raise unless the bucket itself answers (see the docstring)."""
        with self._calls("to look up the bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in _ABSENT:
                    raise botocore.exceptions.ClientError(
                        {"Error": {"Code": "NoSuchBucket"}}, "HeadBucket"
                    ) from exc
                raise

    def size(self, key: str) -> int:
        try:
            with self._calls(f"to look up {key}", key):
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except BlobMissing:
            self._confirm_absent(key)
            raise
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobMissing:
            return False
        return True

    def open_read(self, key: str, start: int, end: int) -> _S3Read:
        if end <= start:
            self.size(key)  # absent still answers absent
            return _S3Read(self, key, None, 0)
        with self._calls(f"to read {key}", key):
            answer = self.client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}"
            )
        return _S3Read(self, key, answer["Body"], end - start)

    def local_path(self, key: str) -> None:
        return None

    def download_url(self, key: str) -> str | None:
        """A presigned GET of ``key``, good for ``redirect_ttl`` seconds (None: no redirects).

        Signing is local, but finding the credentials may ask an instance's metadata
        service the first time, so this is called in a worker thread like the rest.
        """
        if self.redirect_ttl is None:
            return None
        with self._calls(f"to sign a download of {key}"):
            return str(
                self.client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": self._key(key)},
                    ExpiresIn=self.redirect_ttl,
                )
            )

    def delete(self, key: str) -> None:
        with self._calls(f"to delete {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def iter_blobs(self) -> Iterator[BlobEntry]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=self.prefix,
            PaginationConfig={"PageSize": self.list_page_size},
        )
        with self._calls("to list the blobs"):
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(self.prefix) :]
                    if file_hash_of(key) is not None:
                        yield BlobEntry(key, int(obj["Size"]), obj["LastModified"].timestamp())

    def free_bytes(self) -> None:
        return None

    def sweep_partial(self, older_than: float = PARTIAL_MAX_AGE) -> None:
        cutoff = time.time() - older_than
        tmp = self._key("tmp/")
        with self._calls("to sweep unfinished uploads"):
            uploads = self.client.get_paginator("list_multipart_uploads")
            for page in uploads.paginate(Bucket=self.bucket, Prefix=tmp):
                for up in page.get("Uploads", ()):
                    if up["Initiated"].timestamp() < cutoff:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                        )
            objects = self.client.get_paginator("list_objects_v2")
            for page in objects.paginate(Bucket=self.bucket, Prefix=tmp):
                for obj in page.get("Contents", ()):
                    if obj["LastModified"].timestamp() < cutoff:
                        self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])

    def check(self) -> str | None:
        """The bucket answers a HEAD (it exists, and these credentials may use it)."""
        try:
            with self._calls("its check"):
                self.client.head_bucket(Bucket=self.bucket)
        except StorageUnavailable as exc:
            return str(exc)
        return None


class _S3Read:
    """A ranged GET's body, read in chunks of at most :data:`READ_CHUNK`."""

    def __init__(self, blobs: S3Blobs, key: str, body: Any, length: int) -> None:
        self._blobs, self._key, self._body, self._length = blobs, key, body, length

    def __iter__(self) -> Iterator[bytes]:
        if self._body is None:
            return
        got = 0
        with self._blobs._calls(f"while {self._key} was read"):
            for chunk in self._body.iter_chunks(READ_CHUNK):
                got += len(chunk)
                yield chunk
        if got != self._length:
            raise NixdError(f"stored NAR {self._key}: {got} of {self._length} bytes were read")

    def close(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None


class _S3Writer:
    """One blob streaming in: a buffer of up to one part, then a multipart upload."""

    def __init__(self, blobs: S3Blobs) -> None:
        self._s3 = blobs
        self._buf = bytearray()
        self._tmp_key = blobs._key(f"tmp/upload-{secrets.token_hex(16)}")
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._completed = False
        self._done = False

    def write(self, data: bytes) -> int:
        self._buf += data
        part = self._s3.part_size
        while len(self._buf) >= part:
            self._send_part(bytes(self._buf[:part]))
            del self._buf[:part]
        return len(data)

    def _send_part(self, body: bytes) -> None:
        client, bucket = self._s3.client, self._s3.bucket
        with self._s3._calls("to store an upload"):
            if self._upload_id is None:
                started = client.create_multipart_upload(Bucket=bucket, Key=self._tmp_key)
                self._upload_id = str(started["UploadId"])
            number = len(self._parts) + 1
            if number > MAX_PARTS:
                raise StorageUnavailable(
                    f"the upload needs more than {MAX_PARTS} parts of {self._s3.part_size} "
                    "bytes; raise storage.s3.part_size"
                )
            sent = client.upload_part(
                Bucket=bucket,
                Key=self._tmp_key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
            self._parts.append({"ETag": sent["ETag"], "PartNumber": number})

    def commit(self, key: str) -> None:
        client, bucket, final = self._s3.client, self._s3.bucket, self._s3._key(key)
        try:
            if self._upload_id is None:
                with self._s3._calls(f"to store {key}"):
                    client.put_object(Bucket=bucket, Key=final, Body=bytes(self._buf))
            else:
                if self._buf:
                    self._send_part(bytes(self._buf))
                with self._s3._calls(f"to store {key}"):
                    client.complete_multipart_upload(
                        Bucket=bucket,
                        Key=self._tmp_key,
                        UploadId=self._upload_id,
                        MultipartUpload={"Parts": self._parts},
                    )
                    self._completed = True
                    client.copy(
                        {"Bucket": bucket, "Key": self._tmp_key},
                        bucket,
                        final,
                        Config=self._s3._copy_config,
                    )
            self._buf = bytearray()
        finally:
            self.discard()

    def discard(self) -> None:
        """Abort the multipart upload, or delete its temporary object once completed."""
        if self._done:
            return
        self._done = True
        self._buf = bytearray()
        if self._upload_id is None:
            return
        client, bucket = self._s3.client, self._s3.bucket
        try:
            if self._completed:
                client.delete_object(Bucket=bucket, Key=self._tmp_key)
            else:
                client.abort_multipart_upload(
                    Bucket=bucket, Key=self._tmp_key, UploadId=self._upload_id
                )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            # never visible (tmp/ is not a blob); the sweep at the next start removes it
            log.info("could not remove an unfinished upload %s: %s", self._tmp_key, exc)
