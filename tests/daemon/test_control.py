"""The control socket holds against what any local user can send it: deep or large
bodies, broken heads, idle connections. Clients run as ``nobody`` (via runuser) where the
peer's uid matters; the server runs in this process, so a failure would end the test."""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from nixd.daemon import control
from nixd.daemon.control import (
    ControlServer,
    Peer,
    Route,
    open_control_listener,
    serve_control,
)

DEEP = b"[" * 30000 + b"]" * 30000


class Handlers:
    def __init__(self) -> None:
        self.bodies: list[Any] = []

    async def status(self, _peer: Peer | None, body: Any) -> dict[str, Any]:
        self.bodies.append(body)
        return {"ok": True}

    async def login(self, _peer: Peer | None, body: Any) -> dict[str, Any]:
        self.bodies.append(body)
        return {"logged_in": True}


@pytest.fixture
async def server(world_dir: Path) -> AsyncIterator[tuple[str, Handlers]]:
    handlers = Handlers()
    routes = {
        ("GET", "/status"): Route(handlers.status, privileged=False),
        ("POST", "/login"): Route(handlers.login, privileged=True, takes_body=True),
    }
    path = str(world_dir / "run" / "nixd.sock")
    (world_dir / "run").mkdir(mode=0o755)
    listener = await open_control_listener(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, ControlServer(routes, None), listener)
        yield path, handlers
        nursery.cancel_scope.cancel()


async def exchange(path: str, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``request`` raw and read the whole answer (the server closes after it)."""
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def get(path: bytes, body: bytes = b"", method: bytes = b"GET") -> bytes:
    return (
        method + b" " + path + b" HTTP/1.1\r\nHost: nixd\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


NOBODY_CLIENT = r"""
import socket, sys
path, mode = sys.argv[1], sys.argv[2]
def connect():
    s = socket.socket(socket.AF_UNIX); s.connect(path); return s
def answer(s):
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data.split(b" ", 2)[1].decode()
if mode == "deep":
    body = b"[" * 30000 + b"]" * 30000
    s = connect()
    s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    print(answer(s), flush=True)
else:
    idle = [connect() for _ in range(int(mode))]
    extra = connect()
    print(answer(extra), flush=True)
    sys.stdin.read()
"""


def as_nobody(*args: str) -> list[str]:
    return ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", NOBODY_CLIENT, *args]


async def test_deep_json_to_status_from_nobody_is_not_even_decoded(
    server: tuple[str, Handlers],
) -> None:
    path, handlers = server
    with trio.fail_after(60):
        result = await trio.run_process(as_nobody(path, "deep"), capture_stdout=True)
    assert result.stdout.decode().strip() == "200"
    assert handlers.bodies == [None]  # GET /status takes no body: it was never parsed
    assert (await exchange(path, get(b"/status")))[0] == 200


async def test_bodies_are_bounded_where_they_are_decoded(server: tuple[str, Handlers]) -> None:
    path, handlers = server
    status, answer = await exchange(path, get(b"/login", DEEP[:200] + DEEP[-200:], b"POST"))
    assert status == 400 and "nested deeper" in answer["message"]
    status, answer = await exchange(path, get(b"/login", b'{"method": "token"', b"POST"))
    assert status == 400 and "not valid JSON" in answer["message"]
    status, _ = await exchange(path, get(b"/login", b"x" * (control.MAX_BODY + 1), b"POST"))
    assert status == 413
    status, _ = await exchange(path, get(b"/login", b'{"method": "token"}', b"POST"))
    assert status == 200 and handlers.bodies == [{"method": "token"}]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x01\x02 nonsense\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (control.MAX_BODY + 10) + b"\r\n\r\n",
    ],
    ids=["5000-digits", "superscript-two", "huge-length", "non-ascii-target", "junk", "big-head"],
)
async def test_malformed_requests_end_only_their_connection(
    server: tuple[str, Handlers], request_bytes: bytes
) -> None:
    path, _ = server
    status, _ = await exchange(path, request_bytes)
    assert status in (400, 404, 413)
    assert (await exchange(path, get(b"/status")))[0] == 200


async def test_idle_connections_of_one_user_do_not_lock_out_root(
    server: tuple[str, Handlers],
) -> None:
    path, _ = server
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            functools.partial(
                trio.run_process,
                as_nobody(path, str(control.MAX_PER_USER)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        )
        with trio.fail_after(60):
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(100)
        assert line.strip() == b"503"  # nobody's connection past the cap is turned away
        for _ in range(control.MAX_PER_USER + 2):  # root (this process) still gets answers
            assert (await exchange(path, get(b"/status")))[0] == 200
        await process.stdin.aclose()


async def test_a_request_has_one_deadline_for_all_of_it(
    server: tuple[str, Handlers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client dribbling a byte at a time does not renew the deadline with each read."""
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.5)
    path, _ = server
    with trio.fail_after(30):  # a hang guard: a renewed deadline would never close it
        stream = await trio.open_unix_socket(path)
        async with stream, trio.open_nursery() as nursery:

            async def dribble() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(b"GET /status HTTP/1.1\r\nX-Slow: ")
                    while True:
                        await stream.send_all(b"a")
                        await trio.sleep(0.05)

            nursery.start_soon(dribble)
            assert await stream.receive_some(65536) == b""  # closed by the server
            nursery.cancel_scope.cancel()
