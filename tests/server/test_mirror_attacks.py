"""Attacks on the mirror. An upstream that drips: a NAR sent a byte at a time, each byte
just within the timeout, holds a fetch (a completion worker, a pull-through reader) for
as long as the upstream likes unless the download must keep a minimum rate. And one
slice's mirrored copy must not change another slice's answer for the same path."""

from __future__ import annotations

import lzma
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import trio

from nixd.server.cli.mirror import status_of
from nixd.server.config import ServerConfig
from nixd.server.errors import UpstreamUnavailable
from nixd.server.http.app import CacheApp
from nixd.server.http.serve import open_services
from nixd.server.mirror.service import MirrorService
from nixd.server.storage.store import Store
from tests.server.appenv import make_nar, upload
from tests.server.flakeenv import FlakeEnv, flake_env
from tests.server.mirrorenv import send, stand_in
from tests.server.test_mirror_hostile import KEY, Upstream, fresh, mirror, project, store

__all__ = ["flake_env", "store"]


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


async def test_an_upstreams_signature_is_served_only_with_the_record_it_came_with(
    flake_env: FlakeEnv, tmp_path: Path
) -> None:
    """The same path mirrored into ``acme/app`` and uploaded by a writer into ``acme/lib``:
    the upload's narinfo carries the server's signature only — what another slice mirrored
    changes nothing in this slice's answers."""
    env = flake_env
    env.state.admin("project", "create", "acme/app")
    env.state.admin("project", "create", "acme/lib")
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        hp = fresh()
        content = b"shared between slices\n"
        up.publish("hello", content, hp=hp)
        with (env.state.path / "config.toml").open("a") as f:
            f.write(f"""
[[mirror]]
name = "up"
url = "{s.url}"
public_keys = ["{KEY.public().render()}"]
slices = ["acme/app"]
timeout = 5.0
""")
        with open_services(ServerConfig.load(env.state.path)) as services:
            assert services.mirror is not None
            app = CacheApp(services)
            env.app = app
            mirrored = await services.mirror.fetch(project(services.store, "app"), hp, "hello")
            assert mirrored.uploader == "mirror:up"
            async with env.client(env.member) as c:
                r = await upload(c, "acme/lib", hp, make_nar(tmp_path / "n", content))
                assert r.status_code == 200, r.text
                lib = (await c.get(f"/cache/acme/lib/{hp}.narinfo")).text
                mine = (await c.get(f"/cache/acme/app/{hp}.narinfo")).text
            await services.mirror.aclose()
    lib_sigs = [line for line in lib.splitlines() if line.startswith("Sig: ")]
    app_sigs = [line for line in mine.splitlines() if line.startswith("Sig: ")]
    assert any(line.startswith("Sig: up-1:") for line in app_sigs), mine
    assert not any(line.startswith("Sig: up-1:") for line in lib_sigs), lib
    assert len(lib_sigs) == len(app_sigs) - 1


@pytest.mark.parametrize("status", [301, 302, 400, 401, 407, 418])
async def test_an_upstream_that_answers_oddly_is_unavailable_not_absent(
    store: Store, tmp_path: Path, status: int
) -> None:
    """Only 404/403/410 say "not here": a redirect the mirror does not follow, an
    authentication the upstream wants, any other status is a failure to answer, so a
    pull-through reader gets a 503 (retried) and never a 404 Nix would remember."""
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        path = up.publish("odd", b"odd")
        good = s.answers[f"/{path[:32]}.narinfo"]
        s.answers[f"/{path[:32]}.narinfo"] = lambda h: send(h, status, b"no\n")
        service = MirrorService((mirror(s.url, pull_through=True),), store, max_nar_size=1 << 20)
        app = project(store)
        try:
            with pytest.raises(UpstreamUnavailable):
                await service.pull(app, path[:32])
            s.answers[f"/{path[:32]}.narinfo"] = good
            info = await service.pull(app, path[:32])
        finally:
            await service.aclose()
        assert info is not None and info.basename == path


class _Endless(dict):  # type: ignore[type-arg]
    """Answers that sign a new path for every narinfo asked, each with three fresh
    references: an upstream (holding the trusted key) whose closure never ends."""

    up: Upstream

    def get(self, path: str, default: object = None) -> object:
        if path.endswith(".narinfo") and not dict.__contains__(self, path):
            hp = path[1:33]
            self.up.publish("gen", hp.encode(), tuple(f"{fresh()}-gen" for _ in range(3)), hp=hp)
        return dict.get(self, path, default)


async def test_an_endless_signed_closure_stops_at_the_bound(store: Store, tmp_path: Path) -> None:
    with stand_in() as s:
        answers = _Endless()
        s.answers = answers
        up = answers.up = Upstream(s, tmp_path)
        root = up.publish("root", b"root", (f"{fresh()}-gen", f"{fresh()}-gen"))
        service = MirrorService((mirror(s.url),), store, max_nar_size=1 << 20)
        service.max_closure = 40
        app = project(store)
        try:
            # Only a guard against the hang this test is about; nothing here is timed.
            with trio.fail_after(300):
                result = await service.complete(app, root[:32], "root")
        finally:
            await service.aclose()
    assert 30 <= result.fetched <= 40 and result.missing
    (st,) = status_of(store.conn, app)
    assert st["roots"] == {"pending": 0, "complete": 0, "incomplete": 1}
