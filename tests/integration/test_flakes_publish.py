"""``nixd publish`` against a real ``nixd-server``, as a GitHub Actions job played by the
local OIDC issuer; then the release read back through the API, ``/f/``, and a real
proxy serving it to a caller without the local secret.

What must hold: a CI identity of a configured repository publishes; publishing the same
content again is a no-op, other content under the same version is refused (versions are
immutable); an API token, and a job of a repository the server does not know, may not
publish; the tarball served is the one published (same NAR hash as the commit's tree).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import httpx
import trio

from nixd import exitcodes
from nixd.auth.model import AccessToken
from nixd.errors import AuthError
from nixd.nix.flaketarball import normalize
from nixd.proxy.config import FlakesConfig
from nixd.proxy.server import serve_proxy
from tests.daemon.conftest import NIXD
from tests.integration.conftest import SERVER_HOST
from tests.integration.flake_fixtures import (
    AUDIENCE,
    MAX_TARBALL,
    FlakeServer,
    access_token,
    clean_env,
    flake_server,  # noqa: F401 - a fixture
    nix_env,
    publish,
    tool_flake,
)
from tests.proxy.conftest import proxy_config
from tests.serverproc import server_cli
from tests.test_cli_publish import FLAKE, git, make_repo


def test_a_ci_job_publishes_and_versions_are_immutable(
    flake_server: FlakeServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    fs = flake_server
    repo = make_repo(tmp_path / "tool", {"flake.nix": FLAKE, "pkg.nix": "1\n"}, tag="v0.1.0")
    first = publish(fs, repo, "--json")
    assert first.returncode == 0, first.stderr + fs.server.log()
    release = json.loads(first.stdout)
    assert release["published"] is True and release["version"] == "0.1.0"
    assert release["commit"] == git(repo, "rev-parse", "HEAD")
    assert release["nar_hash"].startswith("sha256-")

    again = publish(fs, repo)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "acme/tool 0.1.0 is already published with this content"

    (repo / "pkg.nix").write_text("2\n")
    git(repo, "commit", "-qam", "other content")
    git(repo, "tag", "-f", "v0.1.0")
    moved = publish(fs, repo)
    assert moved.returncode == exitcodes.FAILURE
    assert "already published with other content" in moved.stderr
    assert "versions are immutable" in moved.stderr

    git(repo, "tag", "v0.2.0")
    second = publish(fs, repo, "--version", "0.2.0")
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("published acme/tool 0.2.0 (sha256-")

    # read back as a member of the organization: the newest release first
    token = access_token(fs, fs.member_token)
    shown = subprocess.run(
        [*NIXD, "flake", "show", "acme/tool", "--server", fs.url, "--json"],
        env=clean_env({}), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == exitcodes.NOT_LOGGED_IN  # anonymous: private needs a login
    assert "--token-file" in json.loads(shown.stdout)["error"]["message"]
    headers = {"Authorization": f"Bearer {token}"}
    detail = httpx.get(f"{fs.url}/api/v1/flakes/acme/tool", headers=headers, timeout=30).json()
    assert [r["version"] for r in detail["releases"]] == ["0.2.0", "0.1.0"]
    redirect = httpx.get(f"{fs.url}/f/acme/tool/0.*.tar.gz", headers=headers, timeout=30)
    assert redirect.status_code == 302
    assert redirect.headers["location"].endswith("/f/acme/tool/0.2.0.tar.gz")
    tarball = httpx.get(redirect.headers["location"], headers=headers, timeout=30)
    assert tarball.status_code == 200
    assert normalize(tarball.content).nar_hash.encode("sri") == second_nar_hash(second)


def second_nar_hash(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout.strip().rsplit("(", 1)[1].rstrip(")")


def test_who_may_not_publish_is_told_so(
    flake_server: FlakeServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    fs = flake_server
    repo = make_repo(tmp_path / "lib", {"flake.nix": FLAKE}, tag="v1.0.0")
    token_file = tmp_path / "token"
    token_file.write_text(fs.member_token)
    as_token = publish(fs, repo, "--login", "token", "--token-file", str(token_file), env={})
    assert as_token.returncode == exitcodes.DENIED, as_token.stderr
    assert "may not publish acme/lib" in as_token.stderr

    fs.github.actions_claims = {"repository_owner_id": "6666", "repository_owner": "evil"}
    try:
        stranger = publish(fs, repo)
    finally:
        fs.github.actions_claims = {}
    assert stranger.returncode in (exitcodes.DENIED, exitcodes.NOT_LOGGED_IN), stranger.stderr
    assert "rejected the credential" in stranger.stderr or "may not publish" in stranger.stderr

    nowhere = publish(fs, repo, env={})
    assert nowhere.returncode == exitcodes.DENIED
    assert "no CI identity here" in nowhere.stderr

    other_org = publish(fs, repo, "--org", "globex")
    assert other_org.returncode == exitcodes.DENIED, other_org.stderr

    token = access_token(fs, fs.member_token)
    listed = httpx.get(
        f"{fs.url}/api/v1/flakes", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).json()
    assert "lib" not in [f["name"] for f in listed["flakes"]]  # nothing was stored


class _Fixed:
    """A TokenSource holding one real access token from the server."""

    def __init__(self, value: str) -> None:
        self.token = AccessToken(value, expires_at=2e9, identity="token:acme/member")

    async def get(self) -> AccessToken:
        return self.token

    async def refresh(self, stale: AccessToken | None) -> AccessToken:
        raise AuthError("no renewal here")


async def test_the_proxy_serves_a_published_release_without_the_secret(
    flake_server: FlakeServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    fs = flake_server
    repo = make_repo(tmp_path / "served", {"flake.nix": FLAKE, "a.nix": "a\n"}, tag="v3.1.4")
    done = await trio.to_thread.run_sync(lambda: publish(fs, repo))
    assert done.returncode == 0, done.stderr
    token = await trio.to_thread.run_sync(access_token, fs, fs.member_token)
    flakes = FlakesConfig(server_url=fs.url, token_wait=0.0)
    pconfig, _, _ = proxy_config(tmp_path, (), flakes=flakes)
    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(serve_proxy, pconfig, _Fixed(token))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as anyone:
            got = await anyone.get("/f/acme/served/%5E3.1.tar.gz")
            assert got.status_code == 302
            assert got.headers["location"] == f"{proxy.url}/f/acme/served/3.1.4.tar.gz"
            tarball = await anyone.get(got.headers["location"])
            assert tarball.status_code == 200
            assert f"<{proxy.url}/f/acme/served/3.1.4.tar.gz>" in tarball.headers["link"]
            source = normalize(io.BytesIO(tarball.content))
            assert source.nar_hash.encode("sri") == second_nar_hash(done)
            assert (await anyone.get("/f/acme/missing/1.tar.gz")).status_code == 404
            listing = await anyone.get("/api/v1/flakes", params={"org": "acme"})
            assert "served" in [f["name"] for f in listing.json()["flakes"]]
        nursery.cancel_scope.cancel()


def test_a_gitlab_job_publishes_with_its_outputs_and_description(
    flake_server: FlakeServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    fs = flake_server
    repo = make_repo(tmp_path / "widget", {"flake.nix": tool_flake("2.0.0")}, tag="v2.0.0")
    id_token = fs.gitlab.gitlab_token(audience=AUDIENCE, lifetime=600)
    attr = "packages.x86_64-linux.default"
    # Recording an output whose closure is not in the cache is refused, naming it.
    early = publish(fs, repo, "--include-output", attr, env={"NIXD_ID_TOKEN": id_token})
    assert early.returncode == exitcodes.FAILURE, early.stderr
    assert "not complete" in early.stderr and "-tool-2.0.0" in early.stderr, early.stderr
    # The job builds it and pushes the closure first, as the README's workflow does.
    env = clean_env(nix_env(repo.parent / f"{repo.name}-nix"))
    # a chroot store builds in a chroot: bring /bin/sh in (see tests.realnix)
    env["NIX_CONFIG"] += "\nsandbox-paths = /bin /usr /lib /lib64"
    built = subprocess.run(
        ["nix", "build", "--no-link", "--json", f"{repo}#default"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    server_cli("project", "create", str(fs.server.state_dir), "acme/widgets")
    netrc = tmp_path / "push-netrc"
    netrc.write_text(f"machine {SERVER_HOST} login ci password {fs.member_token}\n")
    netrc.chmod(0o600)
    pushed = subprocess.run(
        ["nix", "copy", "--to", f"{fs.url}/cache/acme/widgets", "--netrc-file", str(netrc),
         json.loads(built.stdout)[0]["outputs"]["out"]],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    done = publish(fs, repo, "--include-output", attr, "--json",
                   env={"NIXD_ID_TOKEN": id_token})  # fmt: skip
    assert done.returncode == 0, done.stderr + fs.server.log()[-3000:]
    release = json.loads(done.stdout)
    assert release["published_by"].startswith("gitlab:")
    assert release["ref"] == "refs/tags/v2.0.0"
    (out,) = release["outputs"].values()
    assert list(release["outputs"]) == [attr] and out.endswith("-tool-2.0.0")
    token = access_token(fs, fs.member_token)
    listed = httpx.get(
        f"{fs.url}/api/v1/flakes", params={"org": "acme"},
        headers={"Authorization": f"Bearer {token}"}, timeout=30,
    ).json()  # fmt: skip
    (widget,) = [f for f in listed["flakes"] if f["name"] == "widget"]
    assert widget["description"] == "a tool" and widget["visibility"] == "private"

    bad = publish(fs, repo, "--include-output", "packages.x86_64-linux.nope", "--version",
                  "2.0.1", env={"NIXD_ID_TOKEN": id_token})  # fmt: skip
    assert bad.returncode == exitcodes.FAILURE and "cannot evaluate" in bad.stderr


def test_an_oversized_release_is_refused_and_nothing_stored(
    flake_server: FlakeServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    fs = flake_server
    repo = make_repo(tmp_path / "big", {"flake.nix": FLAKE}, tag=None)
    (repo / "blob").write_bytes(os.urandom(2 * MAX_TARBALL))  # incompressible
    git(repo, "add", "blob")
    git(repo, "commit", "-qm", "blob")
    git(repo, "tag", "v1.0.0")
    done = publish(fs, repo)
    assert done.returncode == exitcodes.FAILURE, done.stderr
    assert "HTTP 413" in done.stderr and "max_tarball_bytes" in done.stderr
    token = access_token(fs, fs.member_token)
    answer = httpx.get(
        f"{fs.url}/api/v1/flakes/acme/big", headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 404
