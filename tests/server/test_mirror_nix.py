"""Closure completion with the real Nix: an upstream cache made by ``nix copy --to file://``
(signed with its own key) on loopback, a real ``nixd-server serve`` that completes a
closure of which only the top was uploaded, then the upstream stopped and the whole
closure copied out of the server by ``nix copy --from`` into a fresh store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey
from tests.realnix import RealNix
from tests.server.conftest import BACKENDS, ServerState
from tests.server.mirrorenv import StandIn, make_upstream, stand_in
from tests.server.test_nix_e2e import copy_from, exchange, netrc
from tests.serverproc import start_server


def add_mirror(state: Path, url: str, key: str, **extra: object) -> None:
    keys: dict[str, object] = {
        "name": "up",
        "url": url,
        "public_keys": [key],
        "slices": ["acme/app"],
        "timeout": 5.0,
        "requests_per_second": 0,
        **extra,
    }
    lines = ["\n[[mirror]]", *(f"{k} = {json.dumps(v)}" for k, v in keys.items())]
    with (state / "config.toml").open("a") as f:
        f.write("\n".join(lines) + "\n")


def upload_from_cache(server_url: str, slice_: str, token: str, cache: Path, path: str) -> None:
    """PUT one path's NAR and narinfo, as found in a file:// cache, to a slice."""
    hash_part = path.rsplit("/", maxsplit=1)[-1][:32]
    text = (cache / f"{hash_part}.narinfo").read_bytes()
    ni = NarInfo.parse(text)
    auth = {"authorization": f"Bearer {token}"}
    base = f"{server_url}/cache/{slice_}"
    r = httpx.put(f"{base}/{ni.url}", content=(cache / ni.url).read_bytes(), headers=auth)
    assert r.status_code == 200, r.text
    r = httpx.put(f"{base}/{hash_part}.narinfo", content=text, headers=auth)
    assert r.status_code == 200, r.text


def status(state: ServerState, slice_: str) -> dict[str, object]:
    out = state.cli("mirror", "status", slice_, "--json").stdout
    (found,) = json.loads(out)
    assert isinstance(found, dict)
    return found


def wait_complete(state: ServerState, slice_: str) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while True:
        s = status(state, slice_)
        roots = s["roots"]
        assert isinstance(roots, dict)
        if roots["pending"] == 0 and (roots["complete"] or roots["incomplete"]):
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.2)


@pytest.mark.parametrize("metadata", BACKENDS, indirect=True)  # SQLite and PostgreSQL
def test_upload_of_the_top_completes_the_closure_from_a_stopped_upstream(
    server_state: ServerState, real_nix: RealNix, tmp_path: Path
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    state.admin("project", "create", "acme/lib")  # no [[mirror]] lists it
    cache = tmp_path / "upstream"
    top, paths, up_key = make_upstream(real_nix, cache, n=6)
    assert len(paths) == 6
    upstream: StandIn
    with stand_in(cache) as upstream:
        add_mirror(state.path, upstream.url, up_key)
        server = start_server(state.path)
        try:
            _, writer = state.token("acme", "ci", fast=True)
            upload_from_cache(server.url, "acme/app", writer, cache, top)
            done = wait_complete(state, "acme/app")
            assert done["mirrored"] == 5, done
            assert done["roots"] == {"pending": 0, "complete": 1, "incomplete": 0}
            assert done["missing"] == [] and done["failures"] == []
            # Each path's narinfo and NAR were fetched once.
            narinfos = {p: n for p, n in upstream.requests.items() if p.endswith(".narinfo")}
            assert len(narinfos) == 5 and set(narinfos.values()) == {1}, upstream.requests

            # A slice no mirror lists never makes the server ask the upstream.
            before = upstream.total
            below = next(p for p in paths if p != top)
            upload_from_cache(server.url, "acme/lib", writer, cache, top)
            r = httpx.get(
                f"{server.url}/cache/acme/lib/{below.rsplit('/', 1)[-1][:32]}.narinfo",
                headers={"authorization": f"Bearer {writer}"},
            )
            assert r.status_code == 404
            assert json.loads(state.cli("mirror", "status", "acme/lib", "--json").stdout) == [
                {
                    "slice": "acme/lib",
                    "mirrored": 0,
                    "roots": {"pending": 0, "complete": 0, "incomplete": 0},
                    "missing": [],
                    "failures": [],
                }
            ]
            assert upstream.total == before

            upstream.stop()  # from here on, only the server has the closure
            key = httpx.get(f"{server.url}/api/v1/cache/keys").json()["current"]
            jwt = exchange(server.url, writer)
            dest = tmp_path / "dest"
            r2 = copy_from(
                real_nix, f"{server.url}/cache/", netrc(tmp_path / "n", server.port, jwt),
                key, dest, top,
            )  # fmt: skip
            assert r2.returncode == 0, r2.stderr.decode()
            for p in paths:
                assert (
                    real_nix.real_path(p, dest).read_bytes() == real_nix.real_path(p).read_bytes()
                )

            # A mirrored path's narinfo carries the upstream's Sig next to the server's.
            mirrored = next(p for p in paths if p != top)
            text = httpx.get(
                f"{server.url}/cache/acme/app/{mirrored.split('/')[-1][:32]}.narinfo",
                headers={"authorization": f"Bearer {writer}"},
            ).content
            ni = NarInfo.parse(text)
            assert len(ni.sigs) == 2, text
            assert ni.verify([PublicKey.parse(up_key)]) == ["up-1"]
            assert ni.verify([PublicKey.parse(key)]) == [key.split(":")[0]]
            # The uploaded top is signed by the server only (client signatures are dropped).
            top_ni = NarInfo.parse(
                httpx.get(
                    f"{server.url}/cache/acme/app/{top.split('/')[-1][:32]}.narinfo",
                    headers={"authorization": f"Bearer {writer}"},
                ).content
            )
            assert len(top_ni.sigs) == 1

            # verify re-checks the upstream signatures and the stored NARs.
            checked = json.loads(state.cli("mirror", "verify", "--json").stdout)
            assert checked == {"checked": 5, "bad": []}
        finally:
            server.close()
