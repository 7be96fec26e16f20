"""The daemon logs in with CI and cloud identities against the real ``nixd-server``.

A real server (subprocess) trusts the local OIDC issuer (GitHub and GitLab roles) and
moto's STS; the real daemon is driven by the real CLI over the control socket, with the
credentials only in the CLI's (GitHub, GitLab) or the daemon's (AWS) environment.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.daemon.conftest import NIXD, REPO, DaemonProcess, start_daemon, write_config
from tests.oidc_issuer import LocalIssuer, run_issuer
from tests.server.test_aws import ACCOUNT, ROLE_ARN, Moto, moto  # noqa: F401 - a fixture
from tests.serverproc import server_cli, start_server

ACCESS_TTL = 20
#: a hang guard only: renewals are counted, however long the machine takes for them
RENEWALS_GUARD = 10 * ACCESS_TTL

POLICY = f"""
[[rule]]
id = "acme-ci"
effect = "allow"
subjects = [
  {{ kind = "github", org = "acme", repository_owner_id = "1001", repository_id = "5001" }},
  {{ kind = "gitlab", org = "acme", namespace_id = "72", project_id = "9001" }},
  {{ kind = "aws", subject = "{ROLE_ARN}", account = "{ACCOUNT}" }},
]
actions = ["cache:read"]
resources = ["acme/*"]
"""


@dataclass
class World:
    root: Path
    url: str
    audience: str
    github: LocalIssuer
    gitlab: LocalIssuer


@pytest.fixture
def issuers() -> Iterator[tuple[LocalIssuer, LocalIssuer]]:
    with run_issuer("github") as gh, run_issuer("gitlab") as gl:
        yield gh, gl


async def _run(*args: str) -> str:
    result = await trio.to_thread.run_sync(functools.partial(server_cli, *args))
    return result.stdout


@pytest.fixture
async def world(
    world_dir: Path,
    issuers: tuple[LocalIssuer, LocalIssuer],
    moto: Moto,  # noqa: F811
) -> AsyncIterator[World]:
    gh, gl = issuers
    state = world_dir / "server"
    await _run("init", str(state), "--org", "acme")
    await _run("project", "create", str(state), "acme/app")
    # the audience is the URL the daemon will use; the port is known only once serving, so
    # the audience is set explicitly on both sides
    audience = "https://cache.acme.test"
    config = state / "config.toml"
    text = re.sub(r"access_ttl = \d+", f"access_ttl = {ACCESS_TTL}", config.read_text())
    config.write_text(
        text
        + f"""
[[github]]
org = "acme"
audience = "{audience}"
owner_ids = ["1001"]
issuer = "{gh.url}"

[[gitlab]]
org = "acme"
audience = "{audience}"
owner_ids = ["72"]
issuer = "{gl.url}"

[[aws]]
org = "acme"
audience = "{audience}"
accounts = ["{ACCOUNT}"]
sts_endpoint = "{moto.url}/"
region = "us-east-1"
"""
    )
    with (state / "policy.toml").open("a") as f:
        f.write(POLICY)
    server = await trio.to_thread.run_sync(
        functools.partial(start_server, state, host="127.0.0.2", log_path=world_dir / "server.log")
    )
    try:
        yield World(world_dir, server.url, audience, gh, gl)
    finally:
        await trio.to_thread.run_sync(server.close)


async def nixd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The real CLI with exactly ``env`` added to a clean environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ACTIONS_", "AWS_"))}
    base.pop("NIXD_ID_TOKEN", None)
    with trio.fail_after(60):
        result = await trio.run_process(
            [*NIXD, *args],
            env={**base, **(env or {})},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(REPO),
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def status(daemon: DaemonProcess) -> dict[str, object]:
    code, out, err = await nixd("status", "--json", "--socket", daemon.socket)
    assert code == 0, err
    loaded: dict[str, object] = json.loads(out)
    return loaded


async def daemon_for(
    world: World, factory: list[DaemonProcess], env: dict[str, str] | None = None
) -> DaemonProcess:
    config = write_config(world.root, server_url=world.url)
    daemon = await start_daemon(world.root, config, env=env)
    factory.append(daemon)
    await daemon.wait_for("READY=1")
    return daemon


async def test_github_action_login_renews_with_new_id_tokens(
    world: World, daemon_factory: list[DaemonProcess]
) -> None:
    daemon = await daemon_for(world, daemon_factory)
    gh = world.github
    env = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": gh.id_token_request_url,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": gh.request_token,
    }
    code, out, err = await nixd(
        "login", "github-action", "--audience", world.audience, "--socket", daemon.socket, env=env
    )
    assert code == 0, err + daemon.log()
    assert "logged in as github:acme/app@refs/heads/main" in out
    first = await status(daemon)
    assert first["identity"] == "github:acme/app@refs/heads/main"
    assert first["method"] == "github-action" and first["token_valid"] is True
    assert "new GitHub Actions ID token" in str(first["renewal"])
    assert gh.id_token_requests == 1
    # two renewals: each asks GitHub for a new ID token
    with trio.fail_after(RENEWALS_GUARD):
        while gh.id_token_requests < 3:  # noqa: ASYNC110 - another process
            await trio.sleep(0.5)
    later = await status(daemon)
    assert later["token_valid"] is True and later["last_error"] is None
    assert float(later["token_expires_at"]) > float(first["token_expires_at"]) + ACCESS_TTL  # type: ignore[arg-type]
    code, out, _ = await nixd("status", "--socket", daemon.socket)
    assert "login method:   github-action" in out
    assert gh.request_token not in daemon.log()
    assert await daemon.stop() == 0
    # a restart carries the login on from the 0600 state
    state_file = world.root / "state" / "state.json"
    assert state_file.stat().st_mode & 0o777 == 0o600
    daemon = await daemon_for(world, daemon_factory)
    assert (await status(daemon))["identity"] == "github:acme/app@refs/heads/main"
    assert await daemon.stop() == 0


async def test_gitlab_pipeline_login_warns_before_the_id_token_expires(
    world: World, daemon_factory: list[DaemonProcess]
) -> None:
    daemon = await daemon_for(world, daemon_factory)
    token = world.gitlab.gitlab_token(audience=world.audience, lifetime=300)
    code, out, err = await nixd(
        "login", "gitlab-pipeline", "--socket", daemon.socket, env={"NIXD_ID_TOKEN": token}
    )
    assert code == 0, err + daemon.log()
    assert "logged in as gitlab:acme/app@main" in out
    assert "cannot be renewed" in err  # the ID token lives 5 min: warned at once
    shown = await status(daemon)
    assert shown["identity"] == "gitlab:acme/app@main"
    assert "cannot be renewed" in str(shown["warning"])
    await daemon.wait_log("cannot be renewed")
    assert token not in daemon.log()
    code, _, err = await nixd("login", "gitlab-pipeline", "--socket", daemon.socket)
    assert code != 0 and "declare it in .gitlab-ci.yml" in err
    assert await daemon.stop() == 0


async def test_aws_login_in_the_daemon_against_moto_sts(
    world: World,
    daemon_factory: list[DaemonProcess],
    moto: Moto,  # noqa: F811
) -> None:
    role = moto.role
    aws_env = {
        "AWS_ACCESS_KEY_ID": role.access_key,
        "AWS_SECRET_ACCESS_KEY": role.secret_key,
        "AWS_SESSION_TOKEN": role.token or "",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(world.root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(world.root / "no-aws-credentials"),
    }
    daemon = await daemon_for(world, daemon_factory, env=aws_env)
    code, out, err = await nixd(
        "login", "aws", "--sts-endpoint", moto.url + "/", "--audience", world.audience,
        "--socket", daemon.socket,
    )  # fmt: skip
    assert code == 0, err + daemon.log()
    assert f"logged in as aws:{ROLE_ARN}" in out
    shown = await status(daemon)
    assert shown["identity"] == f"aws:{ROLE_ARN}" and shown["method"] == "aws"
    assert "sts:GetCallerIdentity" in str(shown["renewal"])
    assert role.secret_key not in (world.root / "state" / "state.json").read_text()
    assert await daemon.stop() == 0
