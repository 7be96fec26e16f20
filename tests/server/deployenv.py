"""The flake environment plus slices, closures and deploy tokens, for the deploy tests.

On top of :mod:`tests.server.flakeenv`: slices ``acme/app``, ``acme/lib``, ``other/app``
(private) and ``other/pub`` (public); acme trusts ``other/pub`` and ``other/app``. Deploy
tokens of acme: ``kiosk`` (``acme/tool#packages.x86_64-linux.default``), ``pinned`` (the
same at ``0.1.*``), ``blocked`` (the same; a deny rule takes ``deploy:read`` on acme/tool
from it) and ``prop`` (``acme/prop#out``, for the property test). Org ``other``'s tokens
read and write its slices; its token ``guest`` (role=guest) is granted ``deploy:read`` on
``acme/tool`` by a policy rule."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from nixd.nix import base32
from tests.server.appenv import make_nar, upload
from tests.server.conftest import ServerState, write_policy
from tests.server.flakeenv import FlakeEnv, metadata, tarball

OUTPUT = "packages.x86_64-linux.default"
DEPLOY_POLICY = """
[[rule]]
id = "other-members"
effect = "allow"
subjects = [{ kind = "token", org = "other" }]
actions = ["cache:read", "cache:write"]
resources = ["other/*"]

[[rule]]
id = "guest-deploys-tool"
effect = "allow"
subjects = [{ kind = "token", org = "other", role = "guest" }]
actions = ["deploy:read"]
resources = ["acme/tool"]

[[rule]]
id = "blocked-kiosk"
effect = "deny"
subjects = [{ kind = "token", org = "acme", name = "blocked" }]
actions = ["deploy:read"]
resources = ["acme/tool"]
"""
_counter = itertools.count(1)


def new_hash() -> str:
    """A fresh store path hash part (Nix base32), unique in this process."""
    return base32.encode(hashlib.sha256(f"deploy-{next(_counter)}".encode()).digest()[:20])


def path_of(hash_part: str) -> str:
    return f"/nix/store/{hash_part}-hello"


@dataclass
class DeployEnv:
    flake: FlakeEnv
    tokens: dict[str, str]
    tmp: Path
    scratch: dict[str, Any] = field(default_factory=dict)
    """What a property test keeps from one example to the next (the fixture is shared)."""

    async def put(self, slice_: str, hash_part: str, refs: tuple[str, ...] = ()) -> str:
        """Upload a path (its NAR's content unique to it) to ``slice_``; its FileHash."""
        nar = make_nar(self.tmp / hash_part, f"content of {hash_part}".encode())
        token = self.flake.member if slice_.startswith("acme/") else self.flake.other
        async with self.flake.client(token) as c:
            r = await upload(c, slice_, hash_part, nar, refs=tuple(f"{h}-hello" for h in refs))
            assert r.status_code == 200, r.text
            info = await c.get(f"/cache/{slice_}/{hash_part}.narinfo")
        assert info.status_code == 200, info.text
        url = next(line for line in info.text.splitlines() if line.startswith("URL: "))
        return url.removeprefix("URL: nar/").removesuffix(".nar.zst")

    async def publish(
        self, flake: str, version: str, outputs: dict[str, str], *, files: bytes = b""
    ) -> httpx.Response:
        ci = await self.flake.ci()
        body = tarball({"flake.nix": f"# {flake} {version}\n".encode() + files})
        return await self.flake.publish(
            ci, flake, version, body, metadata(outputs=outputs, ref=f"refs/tags/v{version}")
        )

    async def get(self, token: str | None, path: str, method: str = "GET") -> httpx.Response:
        async with self.flake.client(token) as c:
            return await c.request(method, path)


def deploy_token(state: ServerState, org: str, name: str, *args: str) -> str:
    out = state.admin("token", "create", "--org", org, "--name", name, *args, "--json")
    return str(json.loads(out)["token"])


@pytest.fixture
def deploy_env(flake_env: FlakeEnv, tmp_path: Path) -> Iterator[DeployEnv]:
    state = flake_env.state
    for slice_ in ("acme/app", "acme/lib", "other/app"):
        state.admin("project", "create", slice_)
    state.admin("project", "create", "--public", "other/pub")
    state.admin("org", "trust", "acme", "other/pub", "other/app")
    policy = state.path / "policy.toml"
    write_policy(policy, policy.read_text() + DEPLOY_POLICY)
    assert flake_env.services.policy.reload()  # in force now, not within a second
    grant = f"acme/tool#{OUTPUT}"
    tokens = {
        "kiosk": deploy_token(state, "acme", "kiosk", "--deploy", grant),
        "pinned": deploy_token(
            state, "acme", "pinned", "--deploy", grant, "--deploy-version", "0.1.*"
        ),
        "blocked": deploy_token(state, "acme", "blocked", "--deploy", grant),
        "prop": deploy_token(state, "acme", "prop", "--deploy", "acme/prop#out"),
        "guest": state.token("other", "guest", "role=guest", fast=True)[1],
    }
    yield DeployEnv(flake_env, tokens, tmp_path / "nars")


def answer(r: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Everything a client sees of an answer: status, headers, body."""
    return r.status_code, sorted(r.headers.items()), r.content
