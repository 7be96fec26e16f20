"""A scriptable hostile upstream: raw bytes on loopback, exactly as a test writes them.

:class:`FakeCache` speaks correct HTTP through h11, which is what makes it unable to send
the answers a hostile upstream would (a ``Content-Length: ²``, a 400 MiB "narinfo").
Here each path maps to a script, ``async (stream) -> None``, that writes whatever it
likes; the connection is closed after it. Bodies of any size are generated from one
reused buffer, so the test process (which also runs the proxy whose memory the tests
measure) never holds them.

``requests`` records ``(path, headers)`` of every request, so tests can see what reached
the upstream and with which ``Authorization``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from nixd.nix import base32, nar
from nixd.nix.hashes import Hash
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import SecretKey
from nixd.nix.storepath import StorePath

Script = Callable[[trio.SocketStream], Awaitable[None]]
MiB = 1 << 20
_FILL = b"x" * MiB


def response(status: int, headers: list[tuple[str, str]], body: bytes = b"") -> Script:
    """A script sending one fixed answer; ``headers`` are sent as given (nothing added)."""
    head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    data = head.encode("latin-1") + body

    async def script(stream: trio.SocketStream) -> None:
        await stream.send_all(data)

    return script


def ok(body: bytes) -> Script:
    return response(200, [("Content-Length", str(len(body))), ("Connection", "close")], body)


def endless(size: int, *, announce: bool, prefix: bytes = b"") -> Script:
    """A 200 with ``size`` body bytes, with or without a Content-Length announcing them."""
    headers = [("Connection", "close")]
    if announce:
        headers.append(("Content-Length", str(size)))
    head = response(200, headers)

    async def script(stream: trio.SocketStream) -> None:
        await head(stream)
        await stream.send_all(prefix)
        sent = len(prefix)
        while sent < size:
            chunk = _FILL[: min(MiB, size - sent)]
            await stream.send_all(chunk)
            sent += len(chunk)

    return script


@dataclass
class Signed:
    """A store path with a small uncompressed NAR and a narinfo signed by ``key``."""

    key: SecretKey
    info: NarInfo
    nar: bytes

    @property
    def hash_part(self) -> str:
        return self.info.store_path.hash_part

    def narinfo(self, **changes: object) -> bytes:
        """The narinfo text, optionally with fields replaced (``url=...``); still signed."""
        return dataclasses.replace(self.info, **changes).render().encode()  # type: ignore[arg-type]


def signed_path(tmp: Path, name: str = "hostile", content: bytes = b"hello\n") -> Signed:
    """A one-file store path, its NAR (a few hundred bytes) and its signed narinfo."""
    file = tmp / f"{name}-content"
    file.write_bytes(content)
    data = b"".join(nar.dump(file))
    digest = hashlib.sha256(data).digest()
    key = SecretKey.generate("hostile-test-1")
    path = StorePath.from_basename(
        f"{base32.encode(hashlib.sha256(name.encode()).digest()[:20])}-{name}"
    )
    info = NarInfo(
        store_path=path,
        url=f"nar/{path.hash_part}.nar",
        compression="none",
        file_hash=Hash("sha256", digest),
        file_size=len(data),
        nar_hash=Hash("sha256", digest),
        nar_size=len(data),
        references=(),
        deriver=None,
        system=None,
        sigs=(),
        ca=None,
    ).signed(key)
    return Signed(key, info, data)


@dataclass
class Hostile:
    """The server: ``routes`` by exact path (query dropped), 404 for the rest."""

    routes: dict[str, Script] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    async def serve(
        self, *, task_status: trio.TaskStatus[Hostile] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._connection, listeners)
            task_status.started(self)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            lines = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1].split("?")[0]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.requests.append((path, headers))
            script = self.routes.get(path) or response(
                404, [("Content-Length", "0"), ("Connection", "close")]
            )
            await script(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the proxy hung up on us: that is usually the point
        finally:
            await stream.aclose()
