"""``nixd flake list`` / ``nixd flake show`` against a scripted server, directly and
through a real proxy (as a local user without the secret asks it).

The server's answers are literal JSON shaped as the server API documents them; the CLI
runs in a worker thread (it starts its own trio run), the servers in the test's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from nixd import exitcodes
from nixd.cli import main
from nixd.proxy.config import FlakesConfig
from nixd.proxy.server import serve_proxy
from tests.proxy.conftest import proxy_config
from tests.proxy.hostile import Hostile, response
from tests.proxy.test_hostile import BEARER, Tokens

LISTING = {
    "flakes": [
        {"org": "acme", "name": "tool", "visibility": "private", "description": "a tool",
         "latest": "0.2.0"},
        {"org": "acme", "name": "lib", "visibility": "public", "description": "x\x1b[31my",
         "latest": None},
    ]
}  # fmt: skip
SHOW = {
    "org": "acme",
    "name": "tool",
    "visibility": "private",
    "description": "a tool",
    "releases": [
        {"version": "0.2.0", "commit": "b" * 40, "ref": "refs/tags/v0.2.0",
         "published_at": 1704164645, "nar_hash": "sha256-BBB=",
         "store_path": "/nix/store/" + "b" * 32 + "-source",
         "outputs": {"packages.x86_64-linux.default": "/nix/store/" + "c" * 32 + "-tool"}},
        {"version": "0.1.0", "commit": "a" * 40, "ref": "refs/tags/v0.1.0",
         "published_at": 1704000000, "nar_hash": "sha256-AAA=", "store_path": None,
         "outputs": {}},
    ],
}  # fmt: skip


def _json(status: int, body: object) -> object:
    data = json.dumps(body).encode()
    return response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        data,
    )


def scripted_server() -> Hostile:
    server = Hostile()
    server.routes.update(
        {
            "/api/v1/flakes": _json(200, LISTING),  # type: ignore[dict-item]
            "/api/v1/flakes/acme/tool": _json(200, SHOW),  # type: ignore[dict-item]
            "/api/v1/token/exchange": _json(  # type: ignore[dict-item]
                200, {"access_token": "own-token", "expires_at": 2e9, "identity": "token:me"}
            ),
        }
    )
    return server


async def cli(*args: str) -> int:
    code: int = await trio.to_thread.run_sync(main, list(args))
    return code


async def test_list_and_show_directly(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(scripted_server().serve)
        assert await cli("flake", "list", "--server", server.url) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["FLAKE", "VISIBILITY", "LATEST", "DESCRIPTION"]
        assert out[1].split() == ["acme/tool", "private", "0.2.0", "a", "tool"]
        assert out[2].split() == ["acme/lib", "public", "-", "x", "[31my"]  # no escapes printed
        assert server.requests[-1][1].get("authorization") is None  # anonymous

        assert await cli("flake", "list", "acme", "--server", server.url, "--json") == 0
        assert json.loads(capsys.readouterr().out) == LISTING

        token = tmp_path / "token"
        token.write_text("api-token\n")
        assert await cli("flake", "show", "acme/tool", "--server", server.url,
                         "--token-file", str(token)) == 0  # fmt: skip
        text = capsys.readouterr().out
        assert "flake:        acme/tool" in text and "releases:     2" in text
        rows = [line.split() for line in text.splitlines()]
        assert ["0.2.0", "2024-01-02", "03:04", "bbbbbbbbbbbb", "refs/tags/v0.2.0",
                "sha256-BBB="] in rows  # fmt: skip
        assert "packages.x86_64-linux.default: /nix/store/" + "c" * 32 + "-tool" in text
        assert server.requests[-1][1].get("authorization") == "Bearer own-token"

        assert await cli("flake", "show", "acme/nope", "--server", server.url) == exitcodes.FAILURE
        assert "no flake acme/nope" in capsys.readouterr().err
        assert await cli("flake", "show", "acme/nope", "--server", server.url, "--json") == 1
        assert json.loads(capsys.readouterr().out)["error"]["kind"] == "failure"
        assert await cli("flake", "show", "not-a-flake", "--server", server.url) == 1
        nursery.cancel_scope.cancel()


async def test_list_through_the_proxy_as_the_machine(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(scripted_server().serve)
        flakes = FlakesConfig(server_url=server.url, token_wait=0.0)
        pconfig, _, _ = proxy_config(tmp_path, (), flakes=flakes)
        proxy = await nursery.start(serve_proxy, pconfig, Tokens())
        assert await cli("flake", "list", "--server", proxy.url) == 0  # no secret, no token
        assert "acme/tool" in capsys.readouterr().out
        assert server.requests[-1][1].get("authorization") == BEARER  # the machine's

        proxy.update_flakes(FlakesConfig(server_url=None))
        assert await cli("flake", "list", "--server", proxy.url) == exitcodes.UNREACHABLE
        assert "not logged in (nixd login)" in capsys.readouterr().err
        nursery.cancel_scope.cancel()


async def test_an_unreachable_daemon_or_server_is_exit_6(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = await cli("flake", "list", "--socket", str(tmp_path / "none.sock"))
    assert code == exitcodes.UNREACHABLE
    assert "cannot reach the nixd daemon" in capsys.readouterr().err
    assert await cli("flake", "list", "--server", "http://127.0.0.1:9") == exitcodes.UNREACHABLE
