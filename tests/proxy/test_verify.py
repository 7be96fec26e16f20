"""One-pass verification of NARs and streaming through a store that cannot hold them.

A streamed NAR is decompressed and hashed as it arrives; its last byte reaches the client
only once the *signed* NarHash/NarSize matched, whatever the compression. The upstream
here is :class:`FakeCache` over a directory these tests write: NAR files made with the
libraries directly and narinfos signed by a test key, some of them lying.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import hashlib
import logging
import lzma
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import brotli
import httpx
import pytest
import trio
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from nixd.errors import IntegrityError
from nixd.nix import base32
from nixd.nix.hashes import Hash
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import SecretKey
from nixd.nix.storepath import StorePath
from nixd.proxy.config import UpstreamConfig
from nixd.proxy.localstore import SMALL, LocalStore
from nixd.proxy.metrics import Metrics
from nixd.proxy.server import serve_proxy
from nixd.proxy.verify import EXTENSIONS, NarVerifier
from tests.proxy.conftest import Caches, ProxyEnv, nix_copy, proxy_config, upstream_for
from tests.proxy.fakecache import FakeCache, Fault
from tests.proxy.test_realnix import assert_closure_copied
from tests.realnix import RealNix
from tests.smallfs import small_filesystem

MiB = 1 << 20
KEY = SecretKey.generate("verify-test-1")


def compress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if compression == "xz":
        return lzma.compress(data)
    if compression == "bzip2":
        return bz2.compress(data)
    if compression == "br":
        return bytes(brotli.compress(data))
    assert compression == "none"
    return data


def decompress(data: bytes, compression: str) -> bytes | None:
    """The oracle: the libraries' decoders, over whole data (None: not a valid stream).

    Concatenated streams are one stream; anything else after the last one is invalid.
    """
    try:
        if compression == "zstd":  # every frame complete, nothing after the last one
            out = b""
            while data:
                frame = zstandard.ZstdDecompressor().decompressobj()
                out += frame.decompress(data)
                if not frame.eof:
                    return None
                data = frame.unused_data
            return out
        if compression in ("xz", "bzip2"):  # the same, where the stdlib's one-shot
            out = b""  # decoders would ignore junk after the first stream
            while data:
                stream = lzma.LZMADecompressor() if compression == "xz" else bz2.BZ2Decompressor()
                out += stream.decompress(data)
                if not stream.eof:
                    return None
                data = stream.unused_data
            return out
        if compression == "br":
            stream = brotli.Decompressor()
            out = stream.process(data)
            return out if stream.is_finished() else None
    except (zstandard.ZstdError, lzma.LZMAError, brotli.error, OSError, ValueError, EOFError):
        return None
    return data


def narinfo_for(
    name: str,
    file: bytes,
    nar: bytes,
    compression: str,
    *,
    nar_size: int | None = None,
    file_hash: bool = True,
) -> NarInfo:
    """A narinfo signed by :data:`KEY` naming ``file`` and claiming ``nar`` as its NAR."""
    path = StorePath.from_basename(
        f"{base32.encode(hashlib.sha256(name.encode()).digest()[:20])}-{name}"
    )
    digest = hashlib.sha256(file).digest()
    return NarInfo(
        store_path=path,
        url=f"nar/{base32.encode(digest)}.nar{EXTENSIONS[compression]}",
        compression=compression,
        file_hash=Hash("sha256", digest) if file_hash else None,
        file_size=len(file) if file_hash else None,
        nar_hash=Hash("sha256", hashlib.sha256(nar).digest()),
        nar_size=len(nar) if nar_size is None else nar_size,
        references=(),
        deriver=None,
        system=None,
        sigs=(),
        ca=None,
    ).signed(KEY)


def publish(root: Path, info: NarInfo, file: bytes) -> None:
    """Put the NAR file and its narinfo where a binary cache has them."""
    (root / "nar").mkdir(parents=True, exist_ok=True)
    (root / info.url).write_bytes(file)
    (root / f"{info.store_path.hash_part}.narinfo").write_bytes(info.render().encode())


# -- the verifier alone ----------------------------------------------------------------


def feed_all(info: NarInfo, file: bytes, cuts: list[int]) -> bool:
    verifier = NarVerifier(info, "k")
    try:
        last = 0
        for cut in [*sorted(c % (len(file) + 1) for c in cuts), len(file)]:
            verifier.feed(file[last:cut])
            last = max(last, cut)
        verifier.finish()
    except IntegrityError:
        return False
    return True


@settings(max_examples=150, deadline=None)
@given(
    nar=st.binary(min_size=2, max_size=3000),
    zeros=st.sampled_from([0, 50000]),
    compression=st.sampled_from(["zstd", "xz", "bzip2", "br", "none"]),
    damage=st.sampled_from(["none", "flip", "truncate", "append", "nar-hash", "nar-size"]),
    where=st.integers(min_value=0),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    file_hash=st.booleans(),
)
def test_any_chunking_accepts_exactly_the_signed_nar(
    nar: bytes,
    zeros: int,
    compression: str,
    damage: str,
    where: int,
    cuts: list[int],
    file_hash: bool,
) -> None:
    """Whatever the chunking, the verifier accepts exactly the files that decompress to
    the signed NarHash/NarSize (the FileHash here is always the file's own: only the
    signed part can refuse it)."""
    nar += b"\0" * zeros  # compresses well: decompressed output spans several blocks
    file = compress(nar, compression)
    claimed, nar_size = nar, None
    if damage == "flip":
        i = where % len(file)
        file = file[:i] + bytes([file[i] ^ 0x55]) + file[i + 1 :]
    elif damage == "truncate":
        file = file[: where % len(file)]
    elif damage == "append":
        file += b"\x28\xb5\x2f\xfd junk"
    elif damage == "nar-hash":
        claimed = nar[:-1] + bytes([nar[-1] ^ 1])
    elif damage == "nar-size":
        nar_size = len(nar) - 1 if where % 2 else len(nar) + 1
    info = narinfo_for("prop", file, claimed, compression, nar_size=nar_size, file_hash=file_hash)
    out = decompress(file, compression)
    expected = out is not None and out == claimed and len(out) == info.nar_size
    assert feed_all(info, file, cuts) == expected


def test_a_decompression_bomb_is_cut_at_nar_size() -> None:
    """256 MiB of zeros in a few KiB of zstd claims to be a 100 KiB NAR: the verifier
    stops within a block past NarSize instead of expanding it."""
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (256 * MiB))
    info = narinfo_for("bomb", bomb, b"\0" * (100 << 10), "zstd")
    verifier = NarVerifier(info, "k")
    with pytest.raises(IntegrityError, match="more than the signed NarSize"):
        verifier.feed(bomb)


# -- through the proxy -----------------------------------------------------------------


@asynccontextmanager
async def proxy_over(
    tmp_path: Path, cache: Path, store_dir: Path | None = None, **kw: object
) -> AsyncIterator[tuple[ProxyEnv, httpx.AsyncClient, FakeCache]]:
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(FakeCache(cache).serve)
        upstream = UpstreamConfig(
            url=fake.url, trusted_keys=(KEY.public().render(),), auth="none", timeout=10.0
        )
        config, secret, netrc = proxy_config(tmp_path, (upstream,), negative_ttl=0.0, **kw)
        if store_dir is not None:
            config = dataclasses.replace(config, store_dir=str(store_dir))
        handle = await nursery.start(serve_proxy, config, None)
        env = ProxyEnv(handle, secret, netrc, Path(config.store_dir), config)
        async with httpx.AsyncClient(
            base_url=handle.url, auth=("nixd", secret), timeout=60
        ) as client:
            yield env, client, fake
        nursery.cancel_scope.cancel()


async def get_nar(client: httpx.AsyncClient, info: NarInfo) -> tuple[int | None, bytes, bool]:
    """(Content-Length, the bytes received, whether the body was complete)."""
    r = await client.get(f"/{info.store_path.hash_part}.narinfo")
    assert r.status_code == 200, r.text
    url = NarInfo.parse(r.content).url
    received = bytearray()
    async with client.stream("GET", f"/{url}") as response:
        assert response.status_code == 200
        length = response.headers.get("content-length")
        try:
            async for chunk in response.aiter_raw():
                received += chunk
        except httpx.RemoteProtocolError:
            return int(length) if length else None, bytes(received), False
    return int(length) if length else None, bytes(received), True


def payload(size: int, seed: bytes = b"") -> bytes:
    """Incompressible bytes (a NAR whose compressed file is about as large)."""
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("compression", ["zstd", "xz"])
async def test_a_file_that_does_not_decompress_to_the_signed_nar_is_cut(
    tmp_path: Path, compression: str
) -> None:
    """FileHash/FileSize are right (they are not signed), the signed NarHash is not: the
    reader gets the Content-Length and all but the last byte, and nothing is kept."""
    nar = payload(3 * MiB, compression.encode())
    file = compress(nar, compression)
    assert len(file) > SMALL
    lying = narinfo_for("lying-" + compression, file, nar[:-1] + b"?", compression)
    publish(tmp_path / "cache", lying, file)
    with trio.fail_after(60):
        async with proxy_over(tmp_path, tmp_path / "cache") as (proxy, client, _):
            length, got, complete = await get_nar(client, lying)
            await proxy.handle.downloads_settled()
            assert length == len(file)
            assert not complete
            assert len(got) < len(file)
            assert got == file[: len(got)]
            assert proxy.handle.store.nar_keys() == []
            assert os.listdir(proxy.store_dir / "tmp") == []
            assert proxy.handle.metrics.total("nixd_proxy_verification_failures_total") == 1


async def test_a_decompression_bomb_is_cut_before_its_last_byte(tmp_path: Path) -> None:
    # Incompressible first (so the file is larger than SMALL and streams), then zeros.
    nar = payload(512 << 10, b"bomb") + b"\0" * (128 * MiB)
    file = compress(nar, "zstd")
    assert SMALL < len(file) < 2 * MiB
    bomb = narinfo_for("bomb", file, nar[: 600 << 10], "zstd")
    publish(tmp_path / "cache", bomb, file)
    with trio.fail_after(60):
        async with proxy_over(tmp_path, tmp_path / "cache") as (proxy, client, _):
            length, got, complete = await get_nar(client, bomb)
            await proxy.handle.downloads_settled()
            assert length == len(file)
            assert not complete and len(got) < len(file)
            assert proxy.handle.store.nar_keys() == []


async def test_a_correct_nar_streams_and_is_kept_after_one_pass(tmp_path: Path) -> None:
    """The file is hashed and decompressed once, as it arrives: the verifier saw each of
    its bytes exactly once, and the store admitted it without reading it again."""
    nar = payload(6 * MiB, b"good")
    file = compress(nar, "zstd")
    info = narinfo_for("good", file, nar, "zstd")
    publish(tmp_path / "cache", info, file)
    with trio.fail_after(60):
        async with proxy_over(tmp_path, tmp_path / "cache") as (proxy, client, fake):
            length, got, complete = await get_nar(client, info)
            await proxy.handle.downloads_settled()
            assert complete and length == len(file) and got == file
            metrics = proxy.handle.metrics
            assert metrics.total("nixd_proxy_verified_bytes_total") == len(file)
            (key,) = proxy.handle.store.nar_keys()
            found = proxy.handle.store.nar(key, touch=False)
            assert found is not None and found[0].read_bytes() == file
            # Served again from the store, not the upstream, with nothing verified again.
            _, again, complete = await get_nar(client, info)
            assert complete and again == file
            assert fake.count(".nar.zst") == 1
            assert metrics.total("nixd_proxy_verified_bytes_total") == len(file)


# -- a store that cannot hold the NAR ----------------------------------------------------


async def test_a_nar_larger_than_the_cap_streams_through_to_every_reader(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nar = payload(3 * MiB, b"big")
    file = compress(nar, "zstd")
    info = narinfo_for("big", file, nar, "zstd")
    publish(tmp_path / "cache", info, file)
    results: list[tuple[int | None, bytes, bool]] = []
    with trio.fail_after(60), caplog.at_level(logging.WARNING, "nixd.proxy"):
        async with proxy_over(tmp_path, tmp_path / "cache", store_max_bytes=MiB) as (
            proxy,
            client,
            fake,
        ):

            async def read() -> None:
                results.append(await get_nar(client, info))

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(read)
            assert results == [(len(file), file, True)] * 3
            assert proxy.handle.store.nar_keys() == []
            status = proxy.handle.status()
            assert status["passthrough_total"] == 3
            assert status["passthrough_in_flight"] == 0
            assert fake.count(".nar.zst") == 3  # one fetch per reader (see _pass_through)
    warnings = [r for r in caplog.records if "streaming it through" in r.getMessage()]
    assert len(warnings) == 1


async def test_a_corrupt_nar_streamed_through_is_cut(tmp_path: Path) -> None:
    nar = payload(3 * MiB, b"big-lying")
    file = compress(nar, "xz")
    lying = narinfo_for("big-lying", file, nar[:-1] + b"?", "xz")
    publish(tmp_path / "cache", lying, file)
    with trio.fail_after(60):
        async with proxy_over(tmp_path, tmp_path / "cache", store_max_bytes=MiB) as (
            proxy,
            client,
            _,
        ):
            length, got, complete = await get_nar(client, lying)
            assert length == len(file) and not complete and got == file[: len(got)]
            assert len(got) == len(file) - 1  # everything but the byte held for the verdict
            assert proxy.handle.status()["passthrough_total"] == 1


async def test_a_full_filesystem_streams_through_and_evicts_to_make_room(tmp_path: Path) -> None:
    """On an 8 MiB filesystem: a 12 MiB NAR streams through (verified, not kept), two
    5 MiB NARs fetched at once both reach their readers, and asked for one after the
    other each is kept by evicting the other."""
    cache = tmp_path / "cache"
    infos: dict[str, tuple[NarInfo, bytes]] = {}
    for name, size in (("huge", 12 * MiB), ("five-a", 5 * MiB), ("five-b", 5 * MiB)):
        nar = payload(size, name.encode())
        file = compress(nar, "zstd")
        info = narinfo_for(name, file, nar, "zstd")
        publish(cache, info, file)
        infos[name] = info, file
    with small_filesystem(tmp_path / "small", "8m") as small, trio.fail_after(60):
        async with proxy_over(tmp_path, cache, store_dir=small / "store") as (proxy, client, _):
            info, file = infos["huge"]
            assert await get_nar(client, info) == (len(file), file, True)
            assert proxy.handle.store.nar_keys() == []
            assert proxy.handle.status()["passthrough_total"] == 1

            results: dict[str, tuple[int | None, bytes, bool]] = {}

            async def read(name: str) -> None:
                results[name] = await get_nar(client, infos[name][0])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, "five-a")
                nursery.start_soon(read, "five-b")
            await proxy.handle.downloads_settled()
            for name in ("five-a", "five-b"):
                _, file = infos[name]
                assert results[name] == (len(file), file, True), name
            # Both do not fit: one found the disk full and either evicted the other (kept
            # meanwhile) or was streamed through.
            assert len(proxy.handle.store.nar_keys()) <= 1
            passed = proxy.handle.status()["passthrough_total"] - 1
            evicted = proxy.handle.metrics.total("nixd_proxy_store_evictions_total")
            assert passed + evicted >= 1
            assert os.listdir(small / "store" / "tmp") == []
            evicted_before = evicted

            # Asked for one after the other, each is kept, evicting the other to make room.
            for name in ("five-a", "five-b", "five-a"):
                info, file = infos[name]
                assert await get_nar(client, info) == (len(file), file, True)
                await proxy.handle.downloads_settled()
                (now,) = proxy.handle.store.nar_keys()
                assert now.startswith(info.store_path.hash_part)
            evictions = proxy.handle.metrics.total("nixd_proxy_store_evictions_total")
            assert evictions - evicted_before >= 2


@pytest.mark.parametrize("compression", ["zstd", "xz"])
async def test_real_nix_gets_a_nar_larger_than_the_free_space(
    real_nix: RealNix, caches: Caches, tmp_path: Path, compression: str
) -> None:
    """The proxy's store is on a 2 MiB filesystem; the closure's 3 MB blob reaches Nix
    anyway (streamed through, verified), and the small paths are kept."""
    cache = FakeCache(caches.dirs[compression])
    with small_filesystem(tmp_path / "small", "2m") as small, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.serve)
            upstreams = (upstream_for(cache, caches),)
            config, secret, netrc = proxy_config(tmp_path, upstreams)
            config = dataclasses.replace(config, store_dir=str(small / "store"))
            handle = await nursery.start(serve_proxy, config, None)
            proxy = ProxyEnv(handle, secret, netrc, Path(config.store_dir), config)
            await nix_copy(
                real_nix, proxy, caches, caches.top,
                store=tmp_path / "s", cache_home=tmp_path / "c",
            )  # fmt: skip
            assert_closure_copied(caches, real_nix, tmp_path / "s")
            await handle.downloads_settled()
            kept = handle.store.nar_keys()
            blob = caches.blob.rsplit("/", 1)[-1][:32]
            assert not any(k.startswith(blob) for k in kept)
            assert len(kept) == len(caches.closure) - 1, (kept, caches.closure, handle.status())
            assert handle.status()["passthrough_total"] >= 1
            assert handle.metrics.total("nixd_proxy_verification_failures_total") == 0
            nursery.cancel_scope.cancel()


async def test_a_pass_through_cut_by_the_upstream_resumes(tmp_path: Path) -> None:
    """The upstream cuts the body half-way, twice: the pass-through asks again from the
    byte it lacks (Range), its verifier carries on, and the reader gets the whole file."""
    nar = payload(3 * MiB, b"cut")
    file = compress(nar, "zstd")
    info = narinfo_for("cut", file, nar, "zstd")
    publish(tmp_path / "cache", info, file)
    with trio.fail_after(60):
        async with proxy_over(
            tmp_path, tmp_path / "cache", store_max_bytes=MiB, resume_delay=0.01
        ) as (proxy, client, fake):
            fake.faults.append(Fault("truncate", match=".nar.zst", times=2))
            assert await get_nar(client, info) == (len(file), file, True)
            assert proxy.handle.metrics.total("nixd_proxy_upstream_resumes_total") == 2
            offsets = [int(r.removeprefix("bytes=").rstrip("-")) for r in fake.ranges_asked]
            assert len(offsets) == 2 and 0 < offsets[0] < offsets[1] < len(file)
            assert proxy.handle.metrics.total("nixd_proxy_verified_bytes_total") == len(file)


async def test_no_inode_left_for_a_temp_file_streams_through(tmp_path: Path) -> None:
    """Seven inodes: enough for the store's directories and its index, none for a
    download's temp file (ENOSPC from open): the NAR streams through all the same."""
    nar = payload(MiB, b"inodes")
    file = compress(nar, "zstd")
    info = narinfo_for("inodes", file, nar, "zstd")
    publish(tmp_path / "cache", info, file)
    with small_filesystem(tmp_path / "small", "8m", ",nr_inodes=7") as small, trio.fail_after(60):
        async with proxy_over(tmp_path, tmp_path / "cache", store_dir=small / "store") as (
            proxy,
            client,
            _,
        ):
            assert await get_nar(client, info) == (len(file), file, True)
            assert proxy.handle.status()["passthrough_total"] == 1
            assert proxy.handle.store.nar_keys() == []


def test_a_full_disk_fails_no_store_operation(tmp_path: Path) -> None:
    """SQLite cannot write on a full disk (SQLITE_FULL): a hit's access time stays in
    memory, and eviction still removes the file (which is what frees the room)."""
    with small_filesystem(tmp_path / "small", "4m") as small:
        store = LocalStore(small / "store", 1 << 30, Metrics())
        key = f"{'a' * 32}-{'1' * 52}.nar.zst"
        temp = store.new_temp()
        temp.write_bytes(b"x" * (3 * MiB // 2))
        assert store.admit(key, temp, key[:32], b"narinfo")
        with open(small / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 65536)
        assert store.free_bytes() < 65536
        assert store.nar(key) is not None  # a hit
        store.flush()  # may fail to write: must not raise
        assert store.make_room(100_000)  # evicts the NAR: its file goes first
        assert not (store.nar_dir / key).exists()
        assert store.nar(key) is None and store.total_bytes == 0
        store.close()


async def test_a_disk_filling_up_mid_download_streams_the_rest_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No FileSize in the narinfo, so nothing says in advance that 5 MiB will not fit on
    a 4 MiB filesystem: the write fails with ENOSPC, nothing can be evicted, and the
    reader carries on from where it was with a fetch of its own, verified from the
    first byte; the client sees one whole, correct body."""
    nar = payload(5 * MiB, b"unsized")
    file = compress(nar, "zstd")
    info = narinfo_for("unsized", file, nar, "zstd", file_hash=False)
    assert info.file_size is None
    publish(tmp_path / "cache", info, file)
    with (
        small_filesystem(tmp_path / "small", "4m") as small,
        trio.fail_after(60),
        caplog.at_level(logging.WARNING, "nixd.proxy"),
    ):
        async with proxy_over(tmp_path, tmp_path / "cache", store_dir=small / "store") as (
            proxy,
            client,
            fake,
        ):
            length, got, complete = await get_nar(client, info)
            await proxy.handle.downloads_settled()
            assert (length, complete) == (None, True)
            assert got == file
            assert proxy.handle.store.nar_keys() == []
            assert proxy.handle.status()["passthrough_total"] == 1
            assert fake.count(".nar.zst") == 2  # the download, then the reader's own fetch
            assert os.listdir(small / "store" / "tmp") == []
    assert any("filled up while downloading" in r.getMessage() for r in caplog.records)
