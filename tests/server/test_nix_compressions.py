"""Every upload compression Nix 2.8 offers, round-tripped with the real client.

``nix copy --to '<slice>?compression=X'`` uploads a path compressed with X (under the
file name Nix gives it: gzip, lzma and compress are all ``.nar``); the server decodes,
checks and recompresses it as zstd; ``nix copy --from`` the unified URL into a fresh
store gets the same bytes back, verified against the server's signature. ``compress``
is refused with a 415 that says why and what to use instead (lzop, lrzip and grzip
need external programs Nix shells out to, which are not installed here; they are
refused the same way, see tests/server/test_store.py).
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.realnix import RealNix
from tests.server.conftest import ServerState
from tests.server.test_nix_e2e import copy_from, copy_to, netrc
from tests.serverproc import running_server

ACCEPTED = ("none", "xz", "bzip2", "zstd", "br", "gzip", "lz4", "lzip", "lzma")


def test_every_compression_round_trips(
    server_state: ServerState, real_nix: RealNix, tmp_path: Path
) -> None:
    server_state.admin("project", "create", "acme/app")
    _, writer = server_state.token("acme", "ci", fast=True)
    with running_server(server_state.path) as server:
        net = netrc(tmp_path / "netrc", server.port, writer)
        key = httpx.get(f"{server.url}/api/v1/cache/keys").json()["current"]
        paths = {}
        for method in (*ACCEPTED, "compress"):
            source = tmp_path / f"payload-{method}"
            source.write_bytes(f"compressed with {method}\n".encode() * 5000)
            added = real_nix.run(["nix-store", "--add", str(source)]).stdout.decode().strip()
            paths[method] = added
            r = copy_to(real_nix, f"{server.url}/cache/acme/app?compression={method}", net, added)
            if method == "compress":
                err = r.stderr.decode()
                assert r.returncode != 0
                assert "415" in err, err
                assert "compress (.Z, LZW)" in err, err
                assert "expected the NAR magic" not in err, err
                continue
            assert r.returncode == 0, f"{method}: {r.stderr.decode()}"

        dest = tmp_path / "fresh"
        for method in ACCEPTED:
            r = copy_from(real_nix, f"{server.url}/cache/", net, key, dest, paths[method])
            assert r.returncode == 0, f"{method}: {r.stderr.decode()}"
            got = real_nix.real_path(paths[method], dest).read_bytes()
            assert got == f"compressed with {method}\n".encode() * 5000, method
        assert not real_nix.real_path(paths["compress"], dest).exists()
