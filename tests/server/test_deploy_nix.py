"""The real Nix 2.8 against the real server: a deploy-only token fetches exactly the closure
of a recorded output.

CI builds a closure and an unrelated path, publishes a release recording the closure's
top as ``packages.x86_64-linux.default`` (refused, naming it, before ``nix copy --to``
pushed it; published after), then a target machine given only a deploy
token (exchanged for an access token, as ``nixd login token`` does) copies the closure
from ``/cache/`` with ``nix copy --from``, and cannot fetch the unrelated path of the same
slice nor the flake's tarball.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nixd.server.http.flakes import RELEASE_TYPE
from tests.oidc_issuer import LocalIssuer, run_issuer
from tests.realnix import RealNix
from tests.server.conftest import BACKENDS, ServerState, audit_text
from tests.server.flakeenv import AUD, metadata, tarball
from tests.server.test_nix_e2e import (
    build_closure,
    closure,
    copy_from,
    copy_to,
    exchange,
    netrc,
)
from tests.serverproc import ServerProcess, running_server

OUTPUT = "packages.x86_64-linux.default"
UNRELATED = """derivation {
  name = "nixd-deploy-unrelated"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo SALT > $out" ];
}"""


@pytest.fixture
def served(server_state: ServerState) -> Iterator[tuple[ServerProcess, LocalIssuer]]:
    server_state.admin("project", "create", "acme/app")
    with run_issuer("github") as gh:
        with (server_state.path / "config.toml").open("a") as f:
            f.write(
                f'\n[[github]]\norg = "acme"\naudience = "{AUD}"\n'
                f'owner_ids = ["1001"]\nissuer = "{gh.url}"\n'
            )
        with running_server(server_state.path) as server:
            yield server, gh


def _publish(server: ServerProcess, gh: LocalIssuer, outputs: dict[str, str]) -> httpx.Response:
    r = httpx.post(
        f"{server.url}/api/v1/token/exchange",
        json={"kind": "github-action", "token": gh.github_token(audience=AUD)},
    )
    assert r.status_code == 200, r.text
    meta = json.dumps(metadata(outputs=outputs)).encode()
    return httpx.put(
        f"{server.url}/api/v1/flakes/acme/tool/releases/0.1.0",
        content=meta + tarball(),
        headers={
            "authorization": f"Bearer {r.json()['access_token']}",
            "content-type": RELEASE_TYPE,
            "x-nixd-metadata-length": str(len(meta)),
        },
    )


@pytest.mark.parametrize("metadata", BACKENDS, indirect=True)  # SQLite and PostgreSQL
def test_a_deploy_token_fetches_exactly_the_closure(
    server_state: ServerState,
    served: tuple[ServerProcess, LocalIssuer],
    real_nix: RealNix,
    tmp_path: Path,
) -> None:
    server, gh = served
    top = build_closure(real_nix)
    paths = closure(real_nix, top)
    unrelated = real_nix.build(UNRELATED.replace("SALT", os.urandom(4).hex()))
    _, member = server_state.token("acme", "ci", fast=True)
    push = netrc(tmp_path / "push-netrc", 0, member)

    r = _publish(server, gh, {OUTPUT: top})
    assert r.status_code == 409, r.text
    assert r.json()["missing"] == [top]  # not pushed: its references are not known yet
    for path in (top, unrelated):
        assert copy_to(real_nix, f"{server.url}/cache/acme/app", push, path).returncode == 0
    r = _publish(server, gh, {OUTPUT: top})
    assert r.status_code == 201, r.text

    out = server_state.admin(
        "token", "create", "--org", "acme", "--name", "kiosk", "--deploy", f"acme/tool#{OUTPUT}",
        "--json",
    )  # fmt: skip
    access = exchange(server.url, json.loads(out)["token"])
    target = netrc(tmp_path / "target-netrc", 0, access)
    r = httpx.get(
        f"{server.url}/api/v1/flakes/acme/tool/releases/0.*/outputs/{OUTPUT}",
        headers={"authorization": f"Bearer {access}"},
    )
    assert r.status_code == 200 and r.json()["store_path"] == top, r.text
    assert r.json()["closure"]["paths"] == len(paths) and r.json()["complete"] is True

    key = server_state.public_key
    dest = tmp_path / "target"
    got = copy_from(real_nix, f"{server.url}/cache/", target, key, dest, top)
    assert got.returncode == 0, got.stderr
    for path in paths:
        assert real_nix.real_path(path, dest).read_bytes() == real_nix.real_path(path).read_bytes()
    refused = copy_from(real_nix, f"{server.url}/cache/", target, key, dest, unrelated)
    assert refused.returncode != 0
    # As a path the cache never had: Nix says the same of both.
    ghost = f"/nix/store/{'0' * 31}9-nixd-deploy-unrelated"
    never = copy_from(real_nix, f"{server.url}/cache/", target, key, dest, ghost)
    assert never.returncode != 0
    assert refused.stderr.replace(unrelated.encode(), ghost.encode()) == never.stderr
    tar = httpx.get(
        f"{server.url}/f/acme/tool/0.1.0.tar.gz", headers={"authorization": f"Bearer {access}"}
    )
    assert tar.status_code == 404

    lines = [json.loads(x) for x in audit_text(server_state.path).splitlines() if x.strip()]
    reads = [e for e in lines if e["action"] == "deploy:read"]
    assert {e["path"] for e in reads if e["object"].endswith(".narinfo")} == set(paths)
    assert all(e["store_path"] == top and e["output"] == OUTPUT for e in reads)
    unrelated_hash = unrelated.removeprefix("/nix/store/")[:32]
    assert any(
        e["action"] == "cache:read"
        and e["decision"] == "deny"
        and e["rule"] == "deploy-only"
        and e.get("object") == f"{unrelated_hash}.narinfo"
        for e in lines
    )
