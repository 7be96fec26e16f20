"""One ``nixd-server`` that trusts every identity provider, for end-to-end login tests.

The server (a real process on 127.0.0.2 from :mod:`tests.serverproc`, short access
tokens) trusts the local OIDC issuers (GitHub and GitLab roles,
:mod:`tests.oidc_issuer`), moto's STS and its own local accounts
(interactive login). Its policy lets those ``acme`` identities read ``acme/*`` only; the
cache holds private paths in ``acme/app`` and one in ``globex/secret``, another org's
slice they must never see. Everything is built once per module; each test runs its own
daemon against it.

The browser side of the interactive login is played by plain HTTP requests doing what a
browser does with the server's forms: keep the session cookie, send the CSRF field back.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.integration.conftest import SERVER_HOST
from tests.oidc_issuer import LocalIssuer, run_issuer
from tests.realnix import RealNix
from tests.server.test_aws import ACCOUNT, ROLE_ARN, Moto
from tests.serverproc import ServerProcess, server_cli, start_server

#: the servers' access-token lifetime: short, so a test spans several
ACCESS_TTL = 15
AUDIENCE = "https://cache.acme.test"
PASSWORD = "correct horse battery staple"
#: private paths in acme/app (each round of a test fetches a different one)
PATHS = 10

POLICY = f"""
[[rule]]
id = "acme-identities"
effect = "allow"
subjects = [
  {{ kind = "github", org = "acme", repository_owner_id = "1001", repository_id = "5001" }},
  {{ kind = "gitlab", org = "acme", namespace_id = "72", project_id = "9001" }},
  {{ kind = "aws", subject = "{ROLE_ARN}", account = "{ACCOUNT}" }},
  {{ kind = "user", org = "acme" }},
]
actions = ["cache:read"]
resources = ["acme/*"]

[[rule]]
id = "globex-members"
effect = "allow"
subjects = [{{ kind = "token", org = "globex" }}]
actions = ["cache:read", "cache:write"]
resources = ["globex/*"]
"""


def _run(*args: str, stdin: str | None = None) -> str:
    return server_cli(*args, stdin=stdin).stdout


@dataclass
class IdentityServer:
    """The running server and what it holds."""

    root: Path
    url: str
    github: LocalIssuer
    gitlab: LocalIssuer
    moto: Moto
    private: list[str]  # in acme/app
    foreign: str  # in globex/secret
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _token(state: Path, org: str) -> str:
    out = _run("token", "create", str(state), "--org", org, "--name", "push",
               "--attr", "role=member", "--json")  # fmt: skip
    value: str = json.loads(out)["token"]
    return value


def _push(nix: RealNix, root: Path, url: str, slice_: str, token: str, paths: list[str]) -> None:
    netrc = root / f"push-netrc-{slice_.replace('/', '-')}"
    netrc.write_text(f"machine {SERVER_HOST} login push password {token}\n")
    netrc.chmod(0o600)
    nix.run(["nix", "copy", "--to", f"{url}/cache/{slice_}", *paths,
             "--netrc-file", str(netrc)])  # fmt: skip


@contextlib.contextmanager
def identity_server(moto: Moto) -> Iterator[IdentityServer]:
    """Build the state, start issuers and server, push the paths; stop everything after."""
    root = Path(tempfile.mkdtemp(prefix="nixd-id-e2e-"))
    root.chmod(0o755)
    server: ServerProcess | None = None
    try:
        with run_issuer("github") as gh, run_issuer("gitlab") as gl:
            state = root / "server"
            _run("init", str(state), "--org", "acme")
            _run("org", "create", str(state), "globex")
            _run("project", "create", str(state), "acme/app")
            _run("project", "create", str(state), "globex/secret")
            _run("user", "add", str(state), "acme", "alice", stdin=f"{PASSWORD}\n")
            config = state / "config.toml"
            text = re.sub(r"(?m)^access_ttl = \d+$", f"access_ttl = {ACCESS_TTL}",
                          config.read_text())  # fmt: skip
            config.write_text(
                text
                + f"""
[device]
code_ttl = 120
interval = 1

[[github]]
org = "acme"
audience = "{AUDIENCE}"
owner_ids = ["1001"]
issuer = "{gh.url}"

[[gitlab]]
org = "acme"
audience = "{AUDIENCE}"
owner_ids = ["72"]
issuer = "{gl.url}"

[[aws]]
org = "acme"
audience = "{AUDIENCE}"
accounts = ["{ACCOUNT}"]
sts_endpoint = "{moto.url}/"
region = "us-east-1"
"""
            )
            with (state / "policy.toml").open("a") as f:
                f.write(POLICY)
            acme, globex = _token(state, "acme"), _token(state, "globex")

            nix = RealNix.create(root / "src")
            drvs = " ".join(
                f'(derivation {{ name = "nixd-id-{i}"; system = builtins.currentSystem; '
                f'builder = "/bin/sh"; args = [ "-c" "echo private {i} > $out" ]; }})'
                for i in range(PATHS + 1)
            )
            built = nix.run(["nix-build", "--no-out-link", "-E", f"[ {drvs} ]"])
            paths = built.stdout.decode().split()
            assert len(paths) == PATHS + 1

            log_path = root / "server.log"
            server = start_server(state, host=SERVER_HOST, log_path=log_path)
            url = server.url
            _push(nix, root, url, "acme/app", acme, paths[:PATHS])
            _push(nix, root, url, "globex/secret", globex, paths[PATHS:])
            yield IdentityServer(root, url, gh, gl, moto, paths[:PATHS], paths[PATHS], log_path)
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(root, ignore_errors=True)


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _csrf(page: httpx.Response) -> str:
    match = _CSRF.search(page.text)
    assert match, f"no CSRF field on {page.url} ({page.status_code}):\n{page.text}"
    return match.group(1)


async def approve_in_browser(verification_uri_complete: str, user: str, password: str) -> str:
    """Sign in and approve a code like a browser would; the result page's heading.

    GET the link from the terminal (sign-in form), POST the form with its CSRF field and
    the session cookie, follow the redirect to the decision page, POST "approve" with that
    page's (new session's) CSRF field.
    """
    base = str(httpx.URL(verification_uri_complete).copy_with(path="/", query=None))
    async with httpx.AsyncClient(base_url=base, timeout=20, follow_redirects=True) as browser:
        signin = await browser.get(verification_uri_complete)
        assert signin.status_code == 200, signin.text
        code = httpx.URL(verification_uri_complete).params["user_code"]
        decision = await browser.post(
            "/device/signin",
            data={"csrf": _csrf(signin), "user_code": code, "username": user,
                  "password": password},
        )  # fmt: skip
        assert decision.status_code == 200 and 'id="approve"' in decision.text, decision.text
        done = await browser.post(
            "/device/decide",
            data={"csrf": _csrf(decision), "user_code": code, "decision": "approve"},
        )
        assert done.status_code == 200, done.text
        match = re.search(r'<h1 id="result">([^<]*)</h1>', done.text)
        assert match, done.text
        return match.group(1)


def nix_for(root: Path, nix_conf_dir: Path) -> RealNix:
    """A single-user Nix (fresh store and cache) reading only the nix.conf nixd manages."""
    nix = RealNix.create(root)
    nix.env["NIX_CONF_DIR"] = str(nix_conf_dir)
    nix.env["NIX_USER_CONF_FILES"] = ""
    return nix


__all__ = [
    "ACCESS_TTL",
    "AUDIENCE",
    "PASSWORD",
    "IdentityServer",
    "approve_in_browser",
    "identity_server",
    "nix_for",
]
