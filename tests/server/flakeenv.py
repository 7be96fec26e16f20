"""The in-process app with flakes, CI identities and the default policy, for the flake tests.

The state directory is ``init``'s (org ``acme``, its default policy, which lets the org's
GitHub/GitLab CI publish), plus org ``other``; the local OIDC issuers play GitHub Actions
(owner 1001 belongs to acme, 2002 to other) and GitLab CI (namespace 72: acme). Two deny
rules are added: acme's tokens may not read ``acme/secret``, and nobody anonymous may read
``acme/closed`` (public or not). ``[flakes] max_tarball_bytes`` is 64 KiB so an oversized
upload is cheap to make.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from nixd.server.config import ServerConfig
from nixd.server.flakes.releases import FlakeStore
from nixd.server.http.app import CacheApp, Services
from nixd.server.http.flakes import RELEASE_TYPE
from nixd.server.http.serve import open_services
from nixd.server.login.device import GRANT_TYPE
from tests.oidc_issuer import LocalIssuer, run_issuer
from tests.server.conftest import ServerState, audit_text, write_policy

AUD = "https://cache.test"
MAX_TARBALL = 65536
PASSWORD = "correct horse battery staple"
MTIME = 1_700_000_000

EXTRA_POLICY = """
[[rule]]
id = "hide-secret"
effect = "deny"
subjects = [{ kind = "token", org = "acme" }]
actions = ["flake:read"]
resources = ["acme/secret"]

[[rule]]
id = "closed-to-anonymous"
effect = "deny"
subjects = [{ kind = "anonymous" }]
actions = ["flake:read"]
resources = ["acme/closed"]
"""


def tarball(
    files: dict[str, bytes] | None = None,
    *,
    top: str = "tool-src",
    mtime: int = MTIME,
    extra: list[tuple[tarfile.TarInfo, bytes | None]] | None = None,
) -> bytes:
    """A .tar.gz of one top directory holding ``files`` (as ``git archive`` makes them)."""
    files = files if files is not None else {"flake.nix": b"{ outputs = _: { }; }\n"}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo(top)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, mtime
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra or []:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def metadata(**fields: Any) -> dict[str, Any]:
    return {
        "visibility": "private",
        "description": "a tool",
        "commit": "a" * 40,
        "ref": "refs/tags/v0.1.0",
        "lock": {"nodes": {"root": {}}, "root": "root", "version": 7},
        "outputs": {},
        **fields,
    }


@dataclass
class FlakeEnv:
    state: ServerState
    services: Services
    app: CacheApp
    github: LocalIssuer
    gitlab: LocalIssuer
    member: str  # API token of acme
    other: str  # API token of other

    @property
    def flakes(self) -> FlakeStore:
        assert self.services.flakes is not None
        return self.services.flakes

    def client(self, token: str | None = None, *, base: str = "http://cache") -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        transport = httpx.ASGITransport(app=self.app, client=("127.0.0.1", 40000))
        return httpx.AsyncClient(transport=transport, base_url=base, headers=headers)

    async def exchange(self, kind: str, token: str) -> httpx.Response:
        async with self.client() as c:
            return await c.post("/api/v1/token/exchange", json={"kind": kind, "token": token})

    async def ci(self, **claims: Any) -> str:
        """An access token of a GitHub Actions job (acme's repository unless told)."""
        r = await self.exchange("github-action", self.github.github_token(audience=AUD, **claims))
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])

    async def gitlab_ci(self) -> str:
        token = self.gitlab.gitlab_token(audience=AUD)
        r = await self.exchange("gitlab-pipeline", token)
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])

    async def person(self) -> str:
        """An access token of a person's device login (``nixd login``), approved by alice."""
        device = self.services.device
        assert device is not None
        if device.accounts.get("alice") is None:
            device.accounts.create("acme", "alice", PASSWORD)
        alice = device.accounts.get("alice")
        assert alice is not None
        async with self.client() as c:
            auth = (await c.post("/api/v1/device/authorize", data={"client_id": "nixd-cli"})).json()
            assert await device.decide(str(auth["user_code"]), alice, approve=True, source_ip="x")
            r = await c.post(
                "/api/v1/device/token",
                data={
                    "grant_type": GRANT_TYPE,
                    "device_code": auth["device_code"],
                    "client_id": "nixd-cli",
                },
            )
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])

    async def publish(
        self,
        token: str | None,
        flake: str,
        version: str,
        body: bytes,
        meta: dict[str, Any] | None = None,
        *,
        raw_meta: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """``PUT /api/v1/flakes/<flake>/releases/<version>`` as ``nixd publish`` sends it."""
        text = raw_meta if raw_meta is not None else json.dumps(meta or metadata()).encode()
        sent = {
            "content-type": RELEASE_TYPE,
            "x-nixd-metadata-length": str(len(text)),
            **(headers or {}),
        }
        async with self.client(token) as c:
            return await c.put(
                f"/api/v1/flakes/{flake}/releases/{version}", content=text + body, headers=sent
            )

    def stored(self) -> tuple[int, int, list[str]]:
        """(flakes rows, release rows, blob files under flakes/ and tmp/): what a refused
        publish must leave as it found it."""
        counts = self.flakes.counts()
        root = self.state.path / "blobs"
        files = sorted(
            str(p.relative_to(root))
            for sub in ("flakes", "tmp")
            if (root / sub).is_dir()
            for p in (root / sub).iterdir()
        )
        return counts["flakes"], counts["releases"], files

    def audit(self) -> list[dict[str, Any]]:
        text = audit_text(self.state.path)
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def flake_env(server_state: ServerState) -> Iterator[FlakeEnv]:
    server_state.admin("org", "create", "other")
    _, member = server_state.token("acme", "ci", fast=True)
    _, other = server_state.token("other", "ci", fast=True)
    config = server_state.path / "config.toml"
    text = config.read_text()
    assert "max_tarball_bytes = 268435456" in text
    config.write_text(
        text.replace("max_tarball_bytes = 268435456", f"max_tarball_bytes = {MAX_TARBALL}")
    )
    policy = server_state.path / "policy.toml"
    write_policy(policy, policy.read_text() + EXTRA_POLICY)
    with run_issuer("github") as gh, run_issuer("gitlab") as gl:
        with config.open("a") as f:
            f.write(f"""
[[github]]
org = "acme"
audience = "{AUD}"
owner_ids = ["1001"]
issuer = "{gh.url}"

[[github]]
org = "other"
audience = "{AUD}"
owner_ids = ["2002"]
issuer = "{gh.url}"

[[gitlab]]
org = "acme"
audience = "{AUD}"
owner_ids = ["72"]
issuer = "{gl.url}"
""")
        with open_services(ServerConfig.load(server_state.path)) as services:
            yield FlakeEnv(server_state, services, CacheApp(services), gh, gl, member, other)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root
