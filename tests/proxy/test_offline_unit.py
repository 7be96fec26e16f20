"""An unreachable upstream: counted, then answered at once, probed again, and forgiven by
its first answer. What Nix gets for it is decided in nixd.proxy.errors."""

from __future__ import annotations

import functools
import socket

import pytest
import trio

from nixd.errors import UpstreamError, UpstreamTimeout
from nixd.proxy.config import UpstreamConfig
from nixd.proxy.errors import NotFound, UpstreamUnreachable, status_for, worst_error
from nixd.proxy.metrics import Metrics
from nixd.proxy.upstream import Upstream


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _upstream(url: str, **kw: object) -> tuple[Upstream, Metrics]:
    metrics = Metrics()
    config = UpstreamConfig(url=url, **kw)  # type: ignore[arg-type]
    return Upstream(config, 0, None, trio.Lock(), metrics), metrics


async def test_refused_upstream_goes_offline_then_is_probed() -> None:
    port = _closed_port()
    upstream, metrics = _upstream(f"http://127.0.0.1:{port}", offline_after=2, offline_probe=60)
    connects = 0
    real = trio.open_tcp_stream

    async def counting(host: str, p: int) -> trio.SocketStream:
        nonlocal connects
        connects += 1
        return await real(host, p)

    trio.open_tcp_stream = counting  # type: ignore[assignment]
    try:
        for _ in range(2):
            with pytest.raises(UpstreamUnreachable, match="cannot connect"):
                await upstream.fetch_narinfo("a" * 32)
        assert upstream.offline and connects == 2
        for _ in range(5):  # offline: answered without a connect attempt
            with pytest.raises(UpstreamUnreachable, match="trying again in"):
                await upstream.fetch_narinfo("a" * 32)
        assert connects == 2
        with pytest.raises(UpstreamUnreachable) as offline:
            await upstream.fetch_narinfo("a" * 32)
        assert str(offline.value).count("cannot connect") == 1  # no message nesting
        assert str(offline.value).startswith(upstream.name)
        key = ("nixd_proxy_upstream_requests_total", upstream.name)
        assert metrics.get(key[0], upstream=key[1], outcome="unreachable") == 8
        assert upstream.status()["offline"] is True
        assert upstream.status()["healthy"] is False

        upstream._offline_until = 0.0  # the probe interval has passed
        with pytest.raises(UpstreamUnreachable, match="cannot connect"):
            await upstream.fetch_narinfo("a" * 32)
        assert connects == 3  # exactly one probe, and it failed: offline again
        with pytest.raises(UpstreamUnreachable, match="trying again in"):
            await upstream.fetch_narinfo("a" * 32)
        assert connects == 3
    finally:
        trio.open_tcp_stream = real  # type: ignore[assignment]
        await upstream.aclose()


async def test_an_answer_ends_the_offline_state() -> None:
    async def answer_404(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, answer_404, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        upstream, _ = _upstream(f"http://127.0.0.1:{port}", offline_after=1, offline_probe=60)
        upstream._failures, upstream._offline_until = 1, 0.0  # offline, probe due
        assert upstream.offline
        assert await upstream.fetch_narinfo("a" * 32) is None  # the probe got an answer
        assert not upstream.offline
        await upstream.aclose()
        nursery.cancel_scope.cancel()


async def test_unresolvable_name_is_unreachable_through_httpx_too() -> None:
    upstream, _ = _upstream("https://nixd-test.invalid", offline_after=1, offline_probe=60)
    with pytest.raises(UpstreamUnreachable):
        await upstream.fetch_narinfo("a" * 32)  # https: through httpx
    assert upstream.offline
    with pytest.raises(UpstreamUnreachable, match="trying again in"):
        await upstream.fetch_narinfo("a" * 32)
    await upstream.aclose()


def test_statuses_for_offline_and_mixed_failures() -> None:
    assert status_for(UpstreamUnreachable("u: refused"))[0] == 404
    assert status_for(UpstreamTimeout("u: slow"))[0] == 503
    offline = UpstreamUnreachable("a")
    transient = UpstreamError("b: 502")
    assert worst_error([offline, transient]) is transient
    assert worst_error([offline]) is offline
    assert not isinstance(worst_error([offline, NotFound("x")]), UpstreamUnreachable)
