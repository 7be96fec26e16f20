"""Both HTTP/1.1 fronts, started for real on loopback, behind one interface.

``start_front(limits)`` starts the proxy (``serve_proxy``, no upstreams) or the cache
server (``nixd.server.http.serve.serve`` over an initialized state directory) in the test's
nursery with the given :class:`~nixd.http.Limits` in place of the front's own, and hands
back a :class:`Front`: where it listens and a request it answers 200 without a secret.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from nixd.http import Limits
from nixd.proxy import front as proxy_front
from nixd.server.cli import main as server_cli
from nixd.server.config import ServerConfig
from nixd.server.http import serve as server_serve
from tests.proxy.conftest import ProxyEnv, start_proxy


@dataclass
class Front:
    kind: str
    host: str
    port: int
    ok_path: bytes
    """A GET this front answers 200 to, without credentials."""
    proxy: ProxyEnv | None = None

    def ok_request(self, *, close: bool = True) -> bytes:
        extra = b"Connection: close\r\n" if close else b""
        return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (self.ok_path, extra)

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.host, self.port)


def init_server_state(path: Path) -> Path:
    """``nixd-server init`` into ``path`` (quietly); the state directory."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert server_cli(["init", str(path), "--org", "acme", "--listen", "127.0.0.1:0"]) == 0
    return path


class StartFront:
    """Starts a front of one kind in a nursery (the test's, unless given another)."""

    def __init__(
        self, kind: str, nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.kind = kind
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch

    async def __call__(self, limits: Limits) -> Front:
        if self.kind == "proxy":
            self.monkeypatch.setattr(proxy_front, "LIMITS", limits)
            proxy = await start_proxy(self.nursery, self.tmp_path, ())
            host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
            return Front(self.kind, host, int(port), b"/nix-cache-info", proxy)
        self.monkeypatch.setattr(server_serve, "LIMITS", limits)
        config = ServerConfig.load(init_server_state(self.tmp_path / "server"))
        urls = await self.nursery.start(
            partial(server_serve.serve, config, listen=["127.0.0.1:0"], write_address=False)
        )
        host, port = urls[0].removeprefix("http://").rsplit(":", 1)
        return Front(self.kind, host, int(port), b"/cache/nix-cache-info")


@pytest.fixture(params=["proxy", "server"])
def start_front(
    request: pytest.FixtureRequest,
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> StartFront:
    return StartFront(str(request.param), nursery, tmp_path, monkeypatch)
