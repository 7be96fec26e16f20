"""A real ``nixd-server`` for the flake tests: GitHub Actions and GitLab CI jobs of ``acme``
(played by the local OIDC issuers) publish and read ``acme/*`` flakes, tokens of ``acme``
read them — by the default policy ``nixd-server init`` writes, nothing added.

Built once per module; :func:`publish` runs the real ``nixd publish`` as such a job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.daemon.conftest import NIXD, REPO
from tests.integration.conftest import SERVER_HOST
from tests.oidc_issuer import LocalIssuer, run_issuer
from tests.serverproc import ServerProcess, server_cli, start_server
from tests.test_cli_publish import GIT_ENV

AUDIENCE = "https://cache.acme.test"
MAX_TARBALL = 64 << 10
"""The server's [flakes] max_tarball_bytes here: small, so a test can exceed it."""


@dataclass
class FlakeServer:
    server: ServerProcess
    github: LocalIssuer
    gitlab: LocalIssuer
    member_token: str
    root: Path

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def flake_server() -> Iterator[FlakeServer]:
    with (
        tempfile.TemporaryDirectory(prefix="nixd-flakes-") as tmp,
        run_issuer("github") as gh,
        run_issuer("gitlab") as gl,
    ):
        root = Path(tmp)
        state = root / "server"
        server_cli("init", str(state), "--org", "acme")
        server_cli("org", "create", str(state), "globex")
        config = state / "config.toml"
        text = re.sub(
            r"(?m)^max_tarball_bytes = \d+",
            f"max_tarball_bytes = {MAX_TARBALL}",
            config.read_text(),
        )
        config.write_text(
            text
            + f'\n[[github]]\norg = "acme"\naudience = "{AUDIENCE}"\n'
            + f'owner_ids = ["1001"]\nissuer = "{gh.url}"\n'
            + f'\n[[gitlab]]\norg = "acme"\naudience = "{AUDIENCE}"\n'
            + f'owner_ids = ["72"]\nissuer = "{gl.url}"\n'
        )
        created = server_cli("token", "create", str(state), "--org", "acme", "--name", "member",
                             "--json").stdout  # fmt: skip
        server = start_server(state, host=SERVER_HOST, log_path=root / "server.log")
        try:
            yield FlakeServer(server, gh, gl, json.loads(created)["token"], root)
        finally:
            server.close()


SYSTEM = "x86_64-linux"


def tool_flake(version: str) -> str:
    """A flake whose package is a plain derivation (no nixpkgs) writing ``tool VERSION``."""
    return (
        '{ description = "a tool";\n'
        "  outputs = { self }: {\n"
        f"    packages.{SYSTEM}.default = derivation {{\n"
        f'      name = "tool-{version}"; system = "{SYSTEM}"; builder = "/bin/sh";\n'
        f'      args = [ "-c" "echo tool {version} > $out" ];\n'
        "    };\n  };\n}\n"
    )


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without CI variables, plus git's identity and ``extra``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACTIONS_", "GITHUB_", "CI_")) and k != "NIXD_ID_TOKEN"
    }
    return {**base, **GIT_ENV, "PYTHONPATH": str(REPO), **extra}


def nix_env(root: Path) -> dict[str, str]:
    """For ``nixd publish``'s own ``nix`` calls: a chroot store and cache of its own, so
    the machine's /nix/store is not written."""
    (root / "home").mkdir(parents=True, exist_ok=True)
    return {
        "NIX_CONFIG": f"store = {root}/store\nexperimental-features = nix-command flakes\n"
        "flake-registry =\nsubstituters =\nbuild-users-group =\nsandbox = false",
        "NIX_USER_CONF_FILES": "",
        "XDG_CACHE_HOME": str(root / "cache"),
        "HOME": str(root / "home"),
        "NIX_REMOTE": "",
    }


def job_env(fs: FlakeServer) -> dict[str, str]:
    """What a GitHub Actions job with ``permissions: id-token: write`` has."""
    return {
        "ACTIONS_ID_TOKEN_REQUEST_URL": fs.github.id_token_request_url,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": fs.github.request_token,
    }


def publish(
    fs: FlakeServer, repo: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``nixd publish`` in ``repo`` as a job of acme (``env``: instead of the job's)."""
    job = job_env(fs) if env is None else env
    return subprocess.run(
        [*NIXD, "publish", "--server", fs.url, "--org", "acme", "--audience", AUDIENCE, *args],
        cwd=repo,
        env=clean_env({**nix_env(repo.parent / f"{repo.name}-nix"), **job}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def access_token(fs: FlakeServer, api_token: str) -> str:
    answer = httpx.post(
        f"{fs.url}/api/v1/token/exchange", json={"kind": "token", "token": api_token}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    value: str = answer.json()["access_token"]
    return value
