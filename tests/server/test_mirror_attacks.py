"""The mirror against an upstream that drips: a NAR sent a byte at a time, each byte just
within the timeout, holds a fetch (a completion worker, a pull-through reader) for as
long as the upstream likes unless the download must keep a minimum rate."""

from __future__ import annotations

import lzma
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from nixd.server.errors import UpstreamUnavailable
from nixd.server.mirror.service import MirrorService
from nixd.server.storage.store import Store
from tests.server.mirrorenv import stand_in
from tests.server.test_mirror_hostile import Upstream, mirror, project, store

__all__ = ["store"]


def dripping(payload: bytes, pause: float) -> object:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("content-length", str(len(payload)))
        h.end_headers()
        try:
            for i in range(len(payload)):
                h.wfile.write(payload[i : i + 1])
                h.wfile.flush()
                time.sleep(pause)
        except OSError:
            return

    return answer


async def test_a_dripping_nar_is_unavailable_and_stores_nothing(
    store: Store, tmp_path: Path
) -> None:
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        content = b"drip" * 64
        path = up.publish("drip", content)
        hp = path[:32]
        good = s.answers[f"/nar/{hp}.nar.xz"]
        payload = lzma.compress(up.nar(content))
        s.answers[f"/nar/{hp}.nar.xz"] = dripping(payload, 0.05)  # type: ignore[assignment]
        section = mirror(s.url, pull_through=True, timeout=0.5, min_rate=1024)
        service = MirrorService((section,), store, max_nar_size=64 << 20)
        app = project(store)
        try:
            with pytest.raises(UpstreamUnavailable):
                await service.pull(app, hp)
            assert store.in_slice(app, hp) is None
            s.answers[f"/nar/{hp}.nar.xz"] = good
            info = await service.pull(app, hp)  # a slow upstream left nothing negative
        finally:
            await service.aclose()
        assert info is not None and info.basename == path


def test_min_rate_is_checked_in_the_config() -> None:
    from nixd.errors import ConfigError  # noqa: PLC0415
    from nixd.nix.signing import SecretKey  # noqa: PLC0415
    from nixd.server.config import _mirrors  # noqa: PLC0415

    key = SecretKey.generate("up-1").public().render()
    entry = {"name": "up", "url": "http://127.0.0.1:1", "public_keys": [key]}
    assert _mirrors([entry], "config.toml")[0].min_rate == 65536
    with pytest.raises(ConfigError, match="min_rate"):
        _mirrors([{**entry, "min_rate": -1}], "config.toml")
