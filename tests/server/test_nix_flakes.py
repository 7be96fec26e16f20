"""The real Nix 2.8 against the real server: a consumer flake locks a tarball input by
constraint (``0.*``), and its ``flake.lock`` keeps building the locked release on a fresh
machine after ``0.2.0`` appears — because the server serves the release's source tree as
the content-addressed store path Nix substitutes first — until ``nix flake update``.

Nix authenticates with a netrc line holding an API token of acme (the default policy
lets acme's tokens read acme's flakes); the releases are published by a GitHub Actions
identity from the local OIDC issuer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nixd.nix.flaketarball import normalize
from nixd.server.http.flakes import RELEASE_TYPE
from tests.oidc_issuer import LocalIssuer, run_issuer
from tests.realnix import RealNix
from tests.server.conftest import BACKENDS, ServerState, audit_text
from tests.server.flakeenv import AUD, metadata, tarball
from tests.serverproc import ServerProcess, running_server

TOOL = """{
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "tool";
      system = "x86_64-linux";
      builder = "/bin/sh";
      args = [ "-c" "echo VERSION > $out" ];
    };
  };
}
"""
CONSUMER = """{
  inputs.tool.url = "URL/f/acme/tool/0.*.tar.gz";
  outputs = { self, tool }: {
    packages.x86_64-linux.default = tool.packages.x86_64-linux.default;
  };
}
"""


@pytest.fixture
def served(server_state: ServerState) -> Iterator[tuple[ServerProcess, LocalIssuer]]:
    with run_issuer("github") as gh:
        with (server_state.path / "config.toml").open("a") as f:
            f.write(
                f'\n[[github]]\norg = "acme"\naudience = "{AUD}"\n'
                f'owner_ids = ["1001"]\nissuer = "{gh.url}"\n'
            )
        with running_server(server_state.path) as server:
            yield server, gh


def _publish(server: ServerProcess, gh: LocalIssuer, version: str) -> dict[str, str]:
    r = httpx.post(
        f"{server.url}/api/v1/token/exchange",
        json={"kind": "github-action", "token": gh.github_token(audience=AUD)},
    )
    assert r.status_code == 200, r.text
    body = tarball({"flake.nix": TOOL.replace("VERSION", version).encode()})
    meta = json.dumps(metadata(ref=f"refs/tags/v{version}")).encode()
    r = httpx.put(
        f"{server.url}/api/v1/flakes/acme/tool/releases/{version}",
        content=meta + body,
        headers={
            "authorization": f"Bearer {r.json()['access_token']}",
            "content-type": RELEASE_TYPE,
            "x-nixd-metadata-length": str(len(meta)),
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["nar_hash"] == normalize(body).nar_hash.encode("sri")
    return dict(r.json())


def _machine(root: Path, server: ServerProcess, key: str, netrc: Path) -> RealNix:
    return RealNix.create(
        root,
        "experimental-features = nix-command flakes\n"
        f"substituters = {server.url}/cache/\n"
        f"trusted-public-keys = {key}\n"
        f"netrc-file = {netrc}\n"
        "tarball-ttl = 0\n"
        "narinfo-cache-negative-ttl = 0\n",
    )


def _build(nix: RealNix, flake: Path) -> str:
    proc = nix.run(["nix", "build", "--no-link", "--json", f"path:{flake}#default"])
    out = json.loads(proc.stdout)[0]["outputs"]["out"]
    return nix.real_path(out).read_text().strip()


@pytest.mark.parametrize("metadata", BACKENDS, indirect=True)  # SQLite and PostgreSQL
def test_a_lock_made_with_a_constraint_stays_reproducible(
    server_state: ServerState,
    served: tuple[ServerProcess, LocalIssuer],
    real_nix: RealNix,
    tmp_path: Path,
) -> None:
    server, gh = served
    _, member = server_state.token("acme", "laptop", fast=True)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login nixd password {member}\n")
    netrc.chmod(0o600)
    first = _publish(server, gh, "0.1.0")
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    (consumer / "flake.nix").write_text(CONSUMER.replace("URL", server.url))

    machine = _machine(tmp_path / "one", server, server_state.public_key, netrc)
    meta = machine.run(
        ["nix", "flake", "metadata", "--json", f"{server.url}/f/acme/tool/0.*.tar.gz"]
    )
    assert json.loads(meta.stdout)["locked"]["narHash"] == first["nar_hash"]
    machine.run(["nix", "flake", "lock", f"path:{consumer}"])
    lock = json.loads((consumer / "flake.lock").read_text())
    locked = lock["nodes"]["tool"]["locked"]
    assert locked["type"] == "tarball"
    assert locked["url"] == f"{server.url}/f/acme/tool/0.*.tar.gz"  # 2.8 keeps the URL as written
    assert locked["narHash"] == first["nar_hash"]
    assert _build(machine, consumer) == "0.1.0"

    second = _publish(server, gh, "0.2.0")
    assert second["nar_hash"] != first["nar_hash"]
    # A fresh machine builds the locked release: the source path is substituted from the
    # cache, not downloaded again from the constraint URL (which now means 0.2.0).
    fresh = _machine(tmp_path / "two", server, server_state.public_key, netrc)
    assert _build(fresh, consumer) == "0.1.0"
    hash_part = first["store_path"].removeprefix("/nix/store/")[:32]
    lines = [json.loads(line) for line in audit_text(server_state.path).splitlines()]
    assert any(
        e["action"] == "flake:read"
        and e["decision"] == "allow"
        and e.get("object") == f"{hash_part}.narinfo"
        for e in lines
    )
    # Until the lock is updated.
    fresh.run(["nix", "flake", "update", f"path:{consumer}"])
    lock = json.loads((consumer / "flake.lock").read_text())
    assert lock["nodes"]["tool"]["locked"]["narHash"] == second["nar_hash"]
    assert _build(fresh, consumer) == "0.2.0"

    # A machine that is not logged in cannot fetch it, and is told so.
    outside = _machine(tmp_path / "three", server, server_state.public_key, Path("/dev/null"))
    proc = outside.run(
        ["nix", "flake", "metadata", f"{server.url}/f/acme/tool/0.*.tar.gz"], check=False
    )
    assert proc.returncode != 0
    assert b"401" in proc.stderr, proc.stderr
