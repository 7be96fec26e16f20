"""A NAR download the upstream cuts mid-body resumes with ``Range``; Nix never notices.

The fake upstream cuts (``truncate``), refuses (``reset``) or corrupts chosen answers for
the large NAR of the closure; the proxy must resume from the bytes it has, hash on, and
still refuse a file whose bytes, all of them, do not match the signed FileHash.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
import trio

from nixd.errors import UpstreamError
from nixd.nix.narinfo import NarInfo
from nixd.proxy.upstream import resumed_start
from tests.proxy.conftest import Caches, nix_copy, start_proxy, upstream_for
from tests.proxy.fakecache import FakeCache, Fault
from tests.proxy.test_faults import assert_local_store_verified, hash_part
from tests.proxy.test_realnix import assert_closure_copied
from tests.realnix import RealNix


def blob_nar(caches: Caches) -> str:
    """The upstream file name of the closure's one large NAR (the one that streams)."""
    text = (caches.dirs["zstd"] / f"{hash_part(caches.blob)}.narinfo").read_bytes()
    return NarInfo.parse(text).url


async def get_raw(base: str, path: str, secret: str, *headers: str) -> trio.SocketStream:
    """A GET sent over a fresh connection, for reading the answer bit by bit."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    auth = base64.b64encode(f"nixd:{secret}".encode()).decode()
    stream = await trio.open_tcp_stream(host, int(port))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", f"Authorization: Basic {auth}", *headers]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    return stream


async def read_then_drop(base: str, path: str, secret: str, at_least: int) -> bytes:
    """GET ``path``, read ``at_least`` body bytes, drop the connection: the body so far."""
    got = b""
    async with await get_raw(base, path, secret) as stream:
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < at_least:
            data = await stream.receive_some(65536)
            assert data, got[:200]
            got += data
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body


def nix_warnings(stderr: bytes) -> list[str]:
    """What Nix warns about: a failed or retried transfer would show here."""
    return [
        line
        for line in stderr.decode(errors="replace").splitlines()
        if "warning" in line or "error" in line
    ]


@pytest.mark.parametrize(
    ("faults", "ranges", "resumes"),
    [
        ([Fault("truncate")], True, 1),
        ([Fault("truncate")], False, 1),  # an upstream that ignores Range: the start is skipped
        ([Fault("truncate"), Fault("reset", times=3)], True, 4),  # away for a while
        ([Fault("truncate", times=3)], True, 3),  # cut again after each resume
    ],
    ids=["cut-once", "no-range-support", "gone-then-back", "cut-thrice"],
)
async def test_cut_download_resumes_and_nix_does_not_notice(
    real_nix: RealNix,
    caches: Caches,
    tmp_path: Path,
    fake_upstream: FakeCache,
    faults: list[Fault],
    ranges: bool,
    resumes: int,
) -> None:
    name = blob_nar(caches)
    for fault in faults:
        fault.match = name
    fake_upstream.faults.extend(faults)
    fake_upstream.ranges = ranges
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(
                nursery, tmp_path, (upstream_for(fake_upstream, caches),), resume_delay=0.01
            )
            proc = await nix_copy(
                real_nix, proxy, caches, caches.top,
                store=tmp_path / "s", cache_home=tmp_path / "c",
            )  # fmt: skip
            await proxy.handle.downloads_settled()
            assert nix_warnings(proc.stderr) == []
            assert_closure_copied(caches, real_nix, tmp_path / "s")
            metrics = proxy.handle.metrics
            assert metrics.total("nixd_proxy_upstream_resumes_total") == resumes
            assert fake_upstream.count(name) == 1 + resumes  # one download, resumed
            offsets = [
                int(r.removeprefix("bytes=").rstrip("-")) for r in fake_upstream.ranges_asked
            ]
            assert len(offsets) == resumes and all(o > 0 for o in offsets)
            assert offsets == sorted(offsets)
            assert_local_store_verified(proxy)
            assert any(k.startswith(hash_part(caches.blob)) for k in proxy.handle.store.nar_keys())
            nursery.cancel_scope.cancel()


async def test_a_resumed_answer_is_verified_with_the_rest(
    real_nix: RealNix, caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    """The resumed part is corrupt: the file fails its FileHash and nothing is kept."""
    name = blob_nar(caches)
    fake_upstream.faults += [Fault("truncate", match=name), Fault("corrupt", match=name)]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(
                nursery, tmp_path, (upstream_for(fake_upstream, caches),), resume_delay=0.01
            )
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                narinfo = NarInfo.parse((await c.get(f"/{hash_part(caches.blob)}.narinfo")).content)
                with pytest.raises(httpx.HTTPError):  # cut before the last byte
                    await c.get(f"/{narinfo.url}")
            await proxy.handle.downloads_settled()
            metrics = proxy.handle.metrics
            assert metrics.total("nixd_proxy_upstream_resumes_total") == 1
            assert metrics.get("nixd_proxy_verification_failures_total", stage="file") == 1
            assert not any(
                k.startswith(hash_part(caches.blob)) for k in proxy.handle.store.nar_keys()
            )
            # the faults are spent: Nix's own retry (a new download) gets the good file
            proc = await nix_copy(
                real_nix, proxy, caches, caches.top,
                store=tmp_path / "s", cache_home=tmp_path / "c",
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr.decode()
            assert_closure_copied(caches, real_nix, tmp_path / "s")
            assert_local_store_verified(proxy)
            nursery.cancel_scope.cancel()


async def test_resumes_are_bounded(
    caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    name = blob_nar(caches)
    fake_upstream.faults.append(Fault("truncate", match=name, times=-1))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(
                nursery,
                tmp_path,
                (upstream_for(fake_upstream, caches),),
                resumes=2,
                resume_delay=0.01,
            )
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                narinfo = NarInfo.parse((await c.get(f"/{hash_part(caches.blob)}.narinfo")).content)
                with pytest.raises(httpx.HTTPError):
                    await c.get(f"/{narinfo.url}")
            await proxy.handle.downloads_settled()
            assert proxy.handle.metrics.total("nixd_proxy_upstream_resumes_total") == 2
            assert fake_upstream.count(name) == 3
            assert proxy.handle.store.nar_keys() == []
            nursery.cancel_scope.cancel()


async def test_a_range_retry_is_served_from_what_the_proxy_has(
    caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    """A client that lost its connection asks again with ``Range`` from what it has: the
    proxy answers from its download (in flight or kept), without asking the upstream again."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, tmp_path, (upstream_for(fake_upstream, caches),))
            auth = ("nixd", proxy.secret)
            async with httpx.AsyncClient(base_url=proxy.url, auth=auth) as c:
                narinfo = NarInfo.parse((await c.get(f"/{hash_part(caches.blob)}.narinfo")).content)
            first = await read_then_drop(proxy.url, f"/{narinfo.url}", proxy.secret, 1 << 20)
            async with httpx.AsyncClient(base_url=proxy.url, auth=auth) as c:
                r = await c.get(f"/{narinfo.url}", headers={"Range": f"bytes={len(first)}-"})
            assert r.status_code == 206
            assert r.headers["content-range"] == (
                f"bytes {len(first)}-{narinfo.file_size - 1}/{narinfo.file_size}"  # type: ignore[operator]
            )
            whole = (caches.dirs["zstd"] / blob_nar(caches)).read_bytes()
            assert first + r.content == whole
            assert fake_upstream.count(blob_nar(caches)) == 1
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("status", "content_range", "offset", "start"),
    [
        (200, None, 0, 0),
        (200, None, 500, 0),  # Range ignored: the whole file
        (206, "bytes 500-999/1000", 500, 500),
        (206, "bytes  500-999/*", 500, 500),
    ],
)
def test_resumed_start(status: int, content_range: str | None, offset: int, start: int) -> None:
    assert resumed_start(status, content_range, offset, "u") == start


@pytest.mark.parametrize(
    ("content_range", "offset"),
    [
        (None, 500),  # 206 without Content-Range
        ("bytes 0-999/1000", 500),  # another start
        ("bytes 400-999/1000", 500),
        ("bytes 500-999", 500),  # no size part
        ("items 500-999/1000", 500),
        ("bytes " + "9" * 5000 + "-/1000", 500),  # a number no int() should see
        ("bytes ²-999/1000", 500),
        ("bytes 500-999/1000", 0),  # a 206 nobody asked for
    ],
)
def test_resumed_start_refuses(content_range: str | None, offset: int) -> None:
    with pytest.raises(UpstreamError):
        resumed_start(206, content_range, offset, "u")


async def test_a_range_retry_is_served_while_the_download_waits_to_resume(
    caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    """The upstream cut the download and is down: a Range retry from an offset the proxy
    has gets those bytes at once (not a 503), and the rest once the upstream is back."""
    name = blob_nar(caches)
    back = trio.Event()
    fake_upstream.faults += [
        Fault("truncate", match=name),
        Fault("wait", match=name, release=back),
    ]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(
                nursery, tmp_path, (upstream_for(fake_upstream, caches),), resume_delay=0.01
            )
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                narinfo = NarInfo.parse((await c.get(f"/{hash_part(caches.blob)}.narinfo")).content)
            whole = (caches.dirs["zstd"] / blob_nar(caches)).read_bytes()
            first = await get_raw(proxy.url, f"/{narinfo.url}", proxy.secret)
            while fake_upstream.count(name) < 2:  # noqa: ASYNC110 - cut, and asking again
                await trio.sleep(0.01)
            offset = 1000
            sent = len(whole) // 2  # what the cut answer brought (the proxy has most of it)
            retry = await get_raw(
                proxy.url, f"/{narinfo.url}", proxy.secret, f"Range: bytes={offset}-"
            )
            got = b""
            while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < sent // 2:
                data = await retry.receive_some(1 << 20)
                assert data, got[:300]
                got += data
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 206 "), head
            assert f"content-range: bytes {offset}-{len(whole) - 1}/{len(whole)}".encode() in head
            assert body == whole[offset : offset + len(body)]  # all before the upstream is back
            back.set()
            while len(body) < len(whole) - offset:
                data = await retry.receive_some(1 << 20)
                assert data, len(body)
                body += data
            assert body == whole[offset:]
            await retry.aclose()
            await first.aclose()
            await proxy.handle.downloads_settled()
            assert proxy.handle.metrics.total("nixd_proxy_upstream_resumes_total") == 1
            (asked,) = fake_upstream.ranges_asked
            assert sent // 2 < int(asked.removeprefix("bytes=").rstrip("-")) <= sent
            nursery.cancel_scope.cancel()
