"""Releases, pins and GC with the real Nix 2.8: what `nix copy --to` pushes is what counts.

Each ``nix copy --to`` of a closure is one release (its top path is the one no other path
of the slice references). With ``releases = 1`` and a pin on the first release, a GC keeps
the pinned closure and the latest one whole, removes the release in between, and the real
client still substitutes every kept closure, signature checked, from the unified view.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.realnix import RealNix
from tests.server.conftest import ServerState
from tests.server.test_gc_online import configure
from tests.server.test_nix_e2e import build_closure, closure, copy_from, copy_to, exchange, netrc
from tests.serverproc import running_server, server_cli

BOTH_BACKENDS = True


def test_pinned_and_latest_releases_survive_gc_and_substitute(
    server_state: ServerState, real_nix: RealNix, tmp_path: Path
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    configure(state, 'slice = "acme/app"\nreleases = 1')
    _, writer = state.token("acme", "ci", fast=True)
    with running_server(state.path) as server:
        upload = f"{server.url}/cache/acme/app"
        net = netrc(tmp_path / "w", server.port, writer)
        releases = []
        for _ in range(3):
            top = build_closure(real_nix)
            proc = copy_to(real_nix, upload, net, top)
            assert proc.returncode == 0, proc.stderr.decode()
            releases.append((top, closure(real_nix, top)))
            if len(releases) == 1:
                state.admin("pin", "add", "acme/app", top, "--note", "first")
        (v1, c1), (v2, c2), (v3, c3) = releases
        assert not set(c1) & set(c2) and not set(c2) & set(c3)  # salted: nothing shared
        report = json.loads(server_cli("gc", str(state.path), "--grace", "0", "--json").stdout)
        assert sorted(report["paths"]["acme/app"]) == c2
        jwt = exchange(server.url, writer)
        read = netrc(tmp_path / "r", server.port, jwt)
        for top, paths in ((v1, c1), (v3, c3)):
            dest = tmp_path / f"dest-{top[11:19]}"
            proc = copy_from(real_nix, f"{server.url}/cache/", read, state.public_key, dest, top)
            assert proc.returncode == 0, proc.stderr.decode()
            for path in paths:
                assert real_nix.real_path(path, dest).exists()
        proc = copy_from(
            real_nix, f"{server.url}/cache/", read, state.public_key, tmp_path / "gone", v2
        )
        assert proc.returncode != 0
