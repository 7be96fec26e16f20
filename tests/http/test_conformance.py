"""One raw-socket conformance suite, run against both HTTP/1.1 fronts (proxy and server).

Each case sends bytes a hostile or broken client might send, checks the answer, and
then checks that the front still serves a well-formed request: a bad connection ends
only itself. Timeouts use small Limits; the only assertion about time is that a
connection is eventually closed (every wait is under a generous hang guard).
"""

from __future__ import annotations

import base64
import re
import socket
import tempfile
import time
from pathlib import Path

import h11
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixd.http import Limits
from tests.http.conftest import Front, StartFront, init_server_state
from tests.proxy.conftest import start_proxy
from tests.serverproc import start_server

LIMITS = Limits(
    max_head_bytes=16384,
    max_body_bytes=1 << 16,
    max_connections=8,
    max_connections_per_peer=4,
    head_timeout=30.0,
    body_idle_timeout=30.0,
    keepalive_timeout=30.0,
    linger=0.2,
)
GUARD = 60  # seconds: a hang guard only, never a performance bound

CL_DIGITS = b"Content-Length: " + b"9" * 5000

HOSTILE = [
    # (name, raw request, expected status)
    (
        "two-content-length",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
    ),
    (
        "te-and-cl",
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 3\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-alone",
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    ("cl-5000-digits", b"POST /x HTTP/1.1\r\nHost: x\r\n" + CL_DIGITS + b"\r\n\r\n", 413),
    ("cl-superscript", b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\nab", 400),
    ("cl-arabic-indic", b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: \xd9\xa3\r\n\r\n", 400),
    ("cl-negative", b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    ("bare-lf-inside", b"GET /x HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),
    ("bare-lf-only", b"GET /x HTTP/1.1\nHost: x\n\n", 400),
    ("no-host", b"GET /x HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET /x HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    ("control-in-target", b"GET /x\x01y HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("nul-in-value", b"GET /x HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
    ("obs-fold", b"GET /x HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400),
    ("space-before-colon", b"GET /x HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    ("huge-head-one-read", b"GET /x HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ("huge-head-unfinished", b"GET /x HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000, 431),
    ("too-many-fields", b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 120 + b"\r\n", 431),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
]


async def exchange(front: Front, raw: bytes, *, eof: bool = True) -> bytes:
    """Send ``raw`` on a new connection (then EOF) and read until the front closes it."""
    stream = await front.connect()
    async with stream:
        try:
            await stream.send_all(raw)
            if eof:
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the front refused and closed while we were still sending
        reply = b""
        try:
            while chunk := await stream.receive_some(65536):
                reply += chunk
        except trio.BrokenResourceError:
            pass  # a reset after the answer
    return reply


def statuses(reply: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]


async def assert_serving(front: Front) -> None:
    reply = await exchange(front, front.ok_request())
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


@pytest.mark.parametrize(("name", "raw", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_heads_are_refused_and_serving_goes_on(
    start_front: StartFront, name: str, raw: bytes, status: int
) -> None:
    with trio.fail_after(GUARD):
        front = await start_front(LIMITS)
        reply = await exchange(front, raw)
        assert statuses(reply) == [status], reply[:300]
        assert b"connection: close" in reply.lower()
        await assert_serving(front)


async def test_pipelining_in_order(start_front: StartFront) -> None:
    with trio.fail_after(GUARD):
        front = await start_front(LIMITS)
        one = front.ok_request(close=False)
        head = one.replace(b"GET ", b"HEAD ", 1)
        missing = b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n"
        # A small body the handler does not read is skipped to keep the pipeline in step.
        post = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        raw = one + head + missing + post + one + front.ok_request(close=True) + one
        reply = await exchange(front, raw, eof=False)
        got = statuses(reply)
        assert len(got) == 6, reply  # nothing after the one that asked to close
        assert got[0] == got[1] == got[4] == got[5] == 200
        assert got[2] in (401, 404) and got[3] in (401, 404, 405)
        assert reply.lower().count(b"connection: close") == 1


async def test_http10_closes_after_one_answer(start_front: StartFront) -> None:
    with trio.fail_after(GUARD):
        front = await start_front(LIMITS)
        raw = b"GET %s HTTP/1.0\r\n\r\n" % front.ok_path
        reply = await exchange(front, raw + front.ok_request(), eof=False)
        assert statuses(reply) == [200] and b"connection: close" in reply.lower()


async def test_half_close_still_gets_every_answer(start_front: StartFront) -> None:
    """The client sends its requests and shuts its write side: all are answered."""
    with trio.fail_after(GUARD):
        front = await start_front(LIMITS)
        reply = await exchange(front, front.ok_request(close=False) * 3, eof=True)
        assert statuses(reply) == [200, 200, 200]


async def test_split_reads_are_put_together(start_front: StartFront) -> None:
    with trio.fail_after(GUARD):
        front = await start_front(LIMITS)
        raw = front.ok_request()
        stream = await front.connect()
        async with stream:
            for i in range(0, len(raw), 5):
                await stream.send_all(raw[i : i + 5])
                await trio.sleep(0.01)
            reply = b""
            while chunk := await stream.receive_some(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 ")


async def _closed_by_front(stream: trio.SocketStream) -> None:
    """Returns once the front closed the connection (EOF or reset)."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


async def test_whole_head_deadline_cuts_a_dribbling_client(start_front: StartFront) -> None:
    """One byte every 50 ms never goes idle for long, but the whole head has 1 s."""
    limits = Limits(
        max_head_bytes=LIMITS.max_head_bytes,
        head_timeout=1.0,
        keepalive_timeout=60.0,
        body_idle_timeout=60.0,
        linger=0.2,
    )
    with trio.fail_after(GUARD):
        front = await start_front(limits)
        stream = await front.connect()
        async with stream, trio.open_nursery() as nursery:

            async def dribble() -> None:
                raw = b"GET /x HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 10000
                try:
                    for byte in raw:
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(0.05)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                raise AssertionError("the whole head was accepted byte by byte")

            nursery.start_soon(dribble)
            await _closed_by_front(stream)
            nursery.cancel_scope.cancel()
        await assert_serving(front)


async def test_body_idle_timeout(start_front: StartFront) -> None:
    """A body that stops arriving ends its connection."""
    limits = Limits(
        max_head_bytes=LIMITS.max_head_bytes,
        max_body_bytes=1 << 16,
        head_timeout=60.0,
        keepalive_timeout=60.0,
        body_idle_timeout=0.5,
        linger=0.2,
    )
    with trio.fail_after(GUARD):
        front = await start_front(limits)
        stream = await front.connect()
        async with stream:
            await stream.send_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
            await _closed_by_front(stream)
        await assert_serving(front)


async def test_a_trickled_unwanted_body_does_not_hold_the_connection(
    start_front: StartFront,
) -> None:
    """The handler answered without the body; dropping it has a deadline, not an idle timeout."""
    limits = Limits(
        max_head_bytes=LIMITS.max_head_bytes,
        head_timeout=1.0,
        keepalive_timeout=60.0,
        body_idle_timeout=60.0,
        linger=0.2,
    )
    with trio.fail_after(GUARD):
        front = await start_front(limits)
        stream = await front.connect()
        async with stream, trio.open_nursery() as nursery:
            await stream.send_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n")

            async def trickle() -> None:
                try:
                    for _ in range(60000):
                        await stream.send_all(b"a")
                        await trio.sleep(0.05)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

            nursery.start_soon(trickle)
            await _closed_by_front(stream)
            nursery.cancel_scope.cancel()
        await assert_serving(front)


async def test_idle_peers_do_not_lock_out_another(start_front: StartFront) -> None:
    """Connections held open without a request are closed to make room for new ones."""
    with trio.fail_after(GUARD):
        front = await start_front(LIMITS)
        idle = [await front.connect() for _ in range(LIMITS.max_connections * 2)]
        try:
            for _ in range(3):
                await assert_serving(front)
            # A kept-alive connection waiting between requests is just as evictable.
            kept = await front.connect()
            await kept.send_all(front.ok_request(close=False))
            got = b""
            while b"\r\n\r\n" not in got:
                got += await kept.receive_some(65536)
            idle.append(kept)
            await assert_serving(front)
            # The caps hold: all but the newest few waiting connections were closed.
            for stream in idle[: -LIMITS.max_connections_per_peer - 1]:
                await _closed_by_front(stream)
        finally:
            for stream in idle:
                await stream.aclose()


@pytest.mark.parametrize("case", ["cl-5000-digits", "cl-superscript", "two-content-length"])
async def test_a_real_server_process_stays_up(tmp_path: Path, case: str) -> None:
    """The process, not only the task: hostile heads, then the server still answers."""
    raw = dict((h[0], h[1]) for h in HOSTILE)[case]
    state = init_server_state(tmp_path / "server")
    running = await trio.to_thread.run_sync(start_server, state)
    try:
        with trio.fail_after(GUARD):
            front = Front("server", "127.0.0.1", running.port, b"/cache/nix-cache-info")
            for _ in range(3):
                reply = await exchange(front, raw)
                assert statuses(reply) and statuses(reply)[0] in (400, 413)
            await assert_serving(front)
            assert running.proc.poll() is None
    finally:
        running.stop()


async def test_proxy_range_with_5000_digits_ends_only_its_request(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """``Range: bytes=<5000 digits>-`` on a kept NAR, with the secret: the proxy serves on."""
    proxy = await start_proxy(nursery, tmp_path, ())
    data = b"nar bytes " * 100
    hash_part = "0" * 32
    key = f"{hash_part}-{'1' * 52}.nar"  # the store keeps what it is given (checked before)
    proxy.handle.store.admit_bytes(key, data, hash_part, b"StorePath: x\n")
    auth = b"Basic " + base64.b64encode(b"nixd:" + proxy.secret.encode())
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    front = Front("proxy", host, int(port), b"/nix-cache-info")
    with trio.fail_after(GUARD):
        ranged = b"GET /nar/%s HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nRange: bytes=%s-\r\n\r\n"
        reply = await exchange(front, ranged % (key.encode(), auth, b"9" * 5000))
        assert statuses(reply) and statuses(reply)[0] in (200, 500)
        plain = b"GET /nar/%s HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
        reply = await exchange(front, plain % (key.encode(), auth))
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(data)
        await assert_serving(front)


_PARTS = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"/nix-cache-info",
    b"/cache/nix-cache-info",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"\r\n",
    b"Host: x",
    b"Content-Length: 3",
    b"Content-Length: \xb2",
    b"Transfer-Encoding: chunked",
    b"Connection: close",
    b"Expect: 100-continue",
    b":",
    b" ",
    b"\n",
    b"\x00",
]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(st.one_of(st.sampled_from(_PARTS), st.binary(max_size=6)), max_size=30).map(
            b"".join
        ),
    )
)
async def test_random_bytes_never_break_a_front(start_front: StartFront, raw: bytes) -> None:
    """Whatever arrives, the answer is well-formed statuses or nothing, and serving goes on.

    Each example runs in a trio run of its own, so it starts its own front.
    """
    with trio.fail_after(GUARD), tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            starter = StartFront(start_front.kind, nursery, Path(tmp), start_front.monkeypatch)
            front = await starter(LIMITS)
            reply = await exchange(front, raw)
            if reply:
                assert re.match(rb"HTTP/1\.1 [1-5]\d\d [^\r\n]*\r\n", reply), reply[:200]
                assert all(100 <= s < 600 for s in statuses(reply))
            await assert_serving(front)
            nursery.cancel_scope.cancel()


def test_raw_socket_refusal_is_read_by_a_blocking_client(tmp_path: Path) -> None:
    """A plain blocking client that sends an oversized head gets the 431, not a reset."""
    running = start_server(init_server_state(tmp_path / "server"))
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=GUARD) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n")
            reply = b""
            deadline = time.monotonic() + GUARD
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
        assert running.proc.poll() is None
    finally:
        running.stop()


async def test_answers_parse_with_a_strict_client(start_front: StartFront) -> None:
    """Each answer head names every field once and reads the same with h11 as a client.

    curl forgives a repeated identical Content-Length; stricter clients (wrk's
    http-parser, h11 for differing values) close the connection instead.
    """
    with trio.fail_after(GUARD):
        front = await start_front(LIMITS)
        reply = await exchange(front, front.ok_request(close=True))
        head, _, body = reply.partition(b"\r\n\r\n")
        names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]
        assert len(names) == len(set(names)), head
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.receive_data(reply)
        event = client.next_event()
        assert isinstance(event, h11.Response) and event.status_code == 200
        data = client.next_event()
        assert isinstance(data, h11.Data) and bytes(data.data) == body
