"""Each login method end to end: identity → access token → proxy → real ``nix``, kept fresh.

One real ``nixd-server`` (access tokens of :data:`ACCESS_TTL` seconds) serves the module;
each test runs a real daemon, logs it in with one method through the real CLI — a GitHub
Actions job, a GitLab CI job, an AWS role (moto's STS), a person approving a device code —
and then substitutes private paths of ``acme/app`` with the real Nix into fresh chroot
stores until the daemon has renewed the token twice (rounds are counted against
renewals, not seconds): every request must succeed while the daemon renews the token
underneath, and another org's path must stay out of reach.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from nixd import exitcodes
from tests.daemon.conftest import (
    NIXD,
    REPO,
    STATUS_SHOWN,
    DaemonProcess,
    start_daemon,
    write_config,
)
from tests.integration.conftest import curl
from tests.integration.identity_fixtures import (
    ACCESS_TTL,
    AUDIENCE,
    PASSWORD,
    IdentityServer,
    approve_in_browser,
    identity_server,
    nix_for,
)
from tests.server.test_aws import ROLE_ARN, Moto, moto  # noqa: F401 - a fixture

pytestmark = pytest.mark.realnix

NIX_CONF = (
    "build-users-group =\nsandbox = false\nexperimental-features = nix-command\n"
    "substituters =\nfsync-metadata = false\n"
)
#: seconds between two rounds of substitution
ROUND_GAP = 2.5
#: a hang guard only: the rounds run until the daemon has renewed twice
RENEWALS_GUARD = 20 * ACCESS_TTL


@pytest.fixture(scope="module")
def server(moto: Moto) -> Iterator[IdentityServer]:  # noqa: F811
    with identity_server(moto) as running:
        yield running


@dataclass
class Machine:
    """A daemon (not yet logged in) and the Nix config directory it manages."""

    root: Path
    daemon: DaemonProcess
    nix_conf_dir: Path

    async def nixd(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """The real CLI against this daemon, with exactly ``env`` added to a clean environment."""
        with trio.fail_after(60):
            result = await trio.run_process(
                [*NIXD, *args, "--socket", self.daemon.socket],
                env={**_clean_env(), **(env or {})},
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=str(REPO),
            )
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    async def status(self) -> dict[str, Any]:
        code, out, err = await self.nixd("status", "--json")
        assert code in STATUS_SHOWN, err  # 3: not logged in
        loaded: dict[str, Any] = json.loads(out)
        return loaded


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACTIONS_", "AWS_")) and k != "NIXD_ID_TOKEN"
    }


async def start_machine(
    server: IdentityServer,
    root: Path,
    factory: list[DaemonProcess],
    env: dict[str, str] | None = None,
) -> Machine:
    config = write_config(root, server_url=server.url)
    (root / "etc" / "nix.conf").write_text(NIX_CONF)
    daemon = await start_daemon(root, config, env=env)
    factory.append(daemon)
    await daemon.wait_for("READY=1")
    return Machine(root, daemon, root / "etc")


# -- the logins ----------------------------------------------------------------------------


async def login_github(server: IdentityServer, m: Machine) -> str:
    env = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": server.github.id_token_request_url,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": server.github.request_token,
    }
    code, out, err = await m.nixd("login", "github-action", "--audience", AUDIENCE, env=env)
    assert code == 0, err + m.daemon.log()
    return out


async def login_gitlab(server: IdentityServer, m: Machine) -> str:
    token = server.gitlab.gitlab_token(audience=AUDIENCE, lifetime=600)
    code, out, err = await m.nixd("login", "gitlab-pipeline", env={"NIXD_ID_TOKEN": token})
    assert code == 0, err + m.daemon.log()
    return out


async def login_aws(server: IdentityServer, m: Machine) -> str:
    code, out, err = await m.nixd(
        "login", "aws", "--sts-endpoint", server.moto.url + "/", "--audience", AUDIENCE
    )
    assert code == 0, err + m.daemon.log()
    return out


async def login_device(server: IdentityServer, m: Machine) -> str:
    """``nixd login`` waits with a code; a "browser" signs in as alice and approves it."""
    process = await trio.lowlevel.open_process(
        [*NIXD, "login", "--server", server.url, "--socket", m.daemon.socket],
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(REPO),
    )
    assert process.stdout is not None and process.stderr is not None
    shown = b""
    try:
        with trio.fail_after(60):
            while b"Waiting for approval" not in shown:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"nixd login ended early: {shown.decode()}"
                shown += chunk
            text = shown.decode()
            uri = re.search(r"open (\S+)", text)
            code = re.search(r"enter the code:\s+(\S+)", text)
            assert uri and code, text
            link = f"{uri.group(1)}?user_code={code.group(1)}"
            assert await approve_in_browser(link, "alice", PASSWORD) == "Approved"
            rest = b""
            while chunk := await process.stdout.receive_some(4096):
                rest += chunk
            err = b""
            while chunk := await process.stderr.receive_some(4096):
                err += chunk
            returncode = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert returncode == 0, err.decode() + m.daemon.log()
    return rest.decode()


LOGINS = {
    "github-action": (login_github, "github:acme/app@refs/heads/main"),
    "gitlab-pipeline": (login_gitlab, "gitlab:acme/app@main"),
    "aws": (login_aws, f"aws:{ROLE_ARN}"),
    "device": (login_device, "user:alice"),
}


# -- the tests -----------------------------------------------------------------------------


async def _substitute(m: Machine, root: Path, path: str, how: str) -> None:
    nix = nix_for(root, m.nix_conf_dir)  # a fresh store and cache: real requests every time
    if how == "realise":
        args = ["nix-store", "--realise", path]
    else:
        proxy = (await m.status())["proxy"]["url"].rstrip("/")
        args = ["nix", "copy", "--from", proxy, path]
    with trio.fail_after(60):
        result = await trio.to_thread.run_sync(functools.partial(nix.run, args, check=False))
    assert result.returncode == 0, f"{how} {path}: {result.stderr.decode()}\n{m.daemon.log()}"
    # no failed or retried request on the way (Nix warns about those)
    problems = [
        line
        for line in result.stderr.decode().splitlines()
        if ("warning" in line or "error" in line) and "--add-root" not in line
    ]
    assert problems == [], result.stderr.decode()
    assert nix.real_path(path).read_text().startswith("private ")


@pytest.mark.parametrize("method", list(LOGINS))
async def test_login_substitutes_private_paths_across_token_lifetimes(
    method: str,
    server: IdentityServer,
    world_dir: Path,
    daemon_factory: list[DaemonProcess],
) -> None:
    login, identity = LOGINS[method]
    env = None
    if method == "aws":  # the daemon itself holds the AWS credentials (its chain)
        role = server.moto.role
        env = {
            "AWS_ACCESS_KEY_ID": role.access_key,
            "AWS_SECRET_ACCESS_KEY": role.secret_key,
            "AWS_SESSION_TOKEN": role.token or "",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(world_dir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(world_dir / "no-aws-credentials"),
        }
    m = await start_machine(server, world_dir, daemon_factory, env=env)
    id_tokens_before = server.github.id_token_requests
    out = await login(server, m)
    assert f"logged in as {identity}" in out, out
    first = await m.status()
    assert first["identity"] == identity and first["method"] == method, first
    assert first["token_valid"] is True and first["renewals"] == 0, first

    # the path is private: the server refuses it without a token
    hash_part = Path(server.private[0]).name.split("-", 1)[0]
    anonymous = await curl(f"{server.url}/cache/{hash_part}.narinfo", "-w", "\n%{http_code}")
    assert anonymous.stdout.decode().rpartition("\n")[2] == "401", anonymous

    # rounds until one has run after the second renewal: counted, not timed, so a slow
    # machine makes fewer rounds per lifetime but the same checks
    rounds = 0
    with trio.fail_after(RENEWALS_GUARD):
        while True:
            renewed = (await m.status())["renewals"]
            path = server.private[rounds % len(server.private)]
            how = "realise" if rounds % 2 == 0 else "copy"
            await _substitute(m, world_dir / f"nix-{rounds}", path, how)
            rounds += 1
            if renewed >= 2:
                break
            await trio.sleep(ROUND_GAP)
    assert rounds >= 3

    later = await m.status()
    assert later["token_valid"] is True and later["last_error"] is None, later
    assert later["renewals"] >= 2, later
    assert later["identity"] == identity
    assert float(later["token_expires_at"]) >= float(first["token_expires_at"]) + ACCESS_TTL
    assert m.daemon.log().count("token renewal failed") == 0, m.daemon.log()
    if method == "github-action":  # every renewal asked GitHub for a new ID token
        assert server.github.id_token_requests - id_tokens_before >= 1 + later["renewals"]

    # another org's private path stays out of reach of this identity
    nix = nix_for(world_dir / "nix-foreign", m.nix_conf_dir)
    with trio.fail_after(60):
        foreign = await trio.to_thread.run_sync(
            functools.partial(nix.run, ["nix-store", "--realise", server.foreign], check=False)
        )
    assert foreign.returncode != 0
    assert not nix.real_path(server.foreign).exists()
    assert await m.daemon.stop() == 0


async def test_github_job_of_an_unlisted_owner_is_refused(
    server: IdentityServer, world_dir: Path, daemon_factory: list[DaemonProcess]
) -> None:
    m = await start_machine(server, world_dir, daemon_factory)
    nix_conf = m.nix_conf_dir / "nix.conf"
    before = nix_conf.read_text()
    env = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": server.github.id_token_request_url,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": server.github.request_token,
    }
    server.github.actions_claims = {
        "repository": "evil/app",
        "repository_id": "7777",
        "repository_owner": "evil",
        "repository_owner_id": "6666",
        "sub": "repo:evil/app:ref:refs/heads/main",
    }
    try:
        code, out, err = await m.nixd("login", "github-action", "--audience", AUDIENCE, env=env)
    finally:
        server.github.actions_claims = {}
    assert code == exitcodes.DENIED, out
    assert (
        "GitHub tokens of repository_owner 'evil' (repository_owner_id 6666) are not accepted here"
        in err
    ), err
    assert "Traceback" not in err
    assert nix_conf.read_text() == before
    assert not (m.nix_conf_dir / "nixd.conf").exists()
    assert not (m.nix_conf_dir / "nixd-netrc").exists()
    shown = await m.status()
    assert shown["logged_in"] is False and shown["identity"] is None
    audit = (server.root / "server" / "audit.log").read_text()
    assert "unknown_owner" in audit and "repository_owner_id=6666" in audit
    assert await m.daemon.stop() == 0
