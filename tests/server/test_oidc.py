"""GitHub Actions and GitLab CI logins against a local OIDC issuer (tests/oidc_issuer.py).

The app runs in-process on a real state directory (store, policy, audit log); the issuers
are real HTTP servers on loopback, so discovery, JWKS fetching and refetching go over the
wire. Every refusal must say why to the client and leave a ``deny`` line in the audit log.

A token from a repository whose owner no ``[[github]]`` entry lists is refused at the
exchange (403 ``unknown_owner``); a token of an owner mapped to another org gets a token
whose identity the policy does not let read this org's slices (404).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from nixd.errors import ConfigError
from nixd.server.config import OidcSection, ServerConfig
from nixd.server.http.app import CacheApp, Services
from nixd.server.http.serve import open_services
from nixd.server.login.exchange import ExchangeRejected
from nixd.server.login.oidc import GITHUB, OidcExchanger
from tests.oidc_issuer import LocalIssuer, run_issuer
from tests.server.appenv import HASH_A, make_nar, upload
from tests.server.conftest import ServerState

AUD = "https://cache.test"

POLICY = """
[[rule]]
id = "acme-ci"
effect = "allow"
subjects = [
  { kind = "github", org = "acme", repository_owner_id = "1001", repository_id = "5001" },
  { kind = "gitlab", org = "acme", namespace_id = "72", project_id = "9001" },
]
actions = ["cache:read", "cache:write"]
resources = ["acme/*"]

[[rule]]
id = "other-ci"
effect = "allow"
subjects = [{ kind = "github", org = "other" }]
actions = ["cache:read"]
resources = ["other/*"]
"""


@dataclass
class Env:
    state: ServerState
    services: Services
    app: CacheApp
    github: LocalIssuer
    gitlab: LocalIssuer

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        transport = httpx.ASGITransport(app=self.app, client=("127.0.0.1", 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://cache", headers=headers)

    async def exchange(self, kind: str, token: str) -> httpx.Response:
        async with self.client() as c:
            return await c.post("/api/v1/token/exchange", json={"kind": kind, "token": token})

    def audit(self) -> list[dict[str, Any]]:
        lines = self.state.path.joinpath("audit.log").read_text().splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture
def env(server_state: ServerState) -> Iterator[Env]:
    server_state.admin("org", "create", "other")
    server_state.admin("project", "create", "acme/app")
    server_state.admin("project", "create", "other/app")
    with run_issuer("github") as gh, run_issuer("gitlab") as gl:
        with server_state.path.joinpath("config.toml").open("a") as f:
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
        with server_state.path.joinpath("policy.toml").open("a") as f:
            f.write(POLICY)
        with open_services(ServerConfig.load(server_state.path)) as services:
            yield Env(server_state, services, CacheApp(services), gh, gl)


@pytest.fixture
async def uploaded(env: Env, tmp_path: Path) -> AsyncIterator[None]:
    _, member = env.state.token("acme", "uploader", fast=True)
    nar = make_nar(tmp_path / "a", b"built by ci\n" * 1000)
    async with env.client(member) as c:
        r = await upload(c, "acme/app", HASH_A, nar)
    assert r.status_code == 200, r.text
    yield


async def test_github_token_gives_access(env: Env, uploaded: None) -> None:
    token = env.github.github_token(audience=AUD)
    r = await env.exchange("github-action", token)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["identity"] == "github:repo:acme/app:ref:refs/heads/main"
    async with env.client(body["access_token"]) as c:
        status = (await c.get("/api/v1/token/status")).json()
        narinfo = await c.get(f"/cache/{HASH_A}.narinfo")
    assert status["kind"] == "github"
    assert status["subject"] == "repo:acme/app:ref:refs/heads/main"
    attrs = status["attributes"]
    assert attrs["org"] == "acme"
    assert attrs["repository"] == "acme/app"
    assert (attrs["repository_id"], attrs["repository_owner_id"]) == ("5001", "1001")
    assert attrs["ref"] == "refs/heads/main"
    assert attrs["workflow_ref"].startswith("acme/app/.github/workflows/ci.yml@")
    assert attrs["iss"] == env.github.url
    assert "exp" not in attrs and "aud" not in attrs
    assert narinfo.status_code == 200
    good = [e for e in env.audit() if e["action"] == "token:exchange"]
    assert good[-1]["decision"] == "allow"
    assert good[-1]["identity"] == body["identity"]
    assert good[-1]["rule"] == "github-action"
    assert not any(token in line for line in map(json.dumps, env.audit()))


async def test_gitlab_es256_token_gives_access(env: Env, uploaded: None) -> None:
    token = env.gitlab.gitlab_token(audience=AUD, kid="ec-1")
    r = await env.exchange("gitlab-pipeline", token)
    assert r.status_code == 200, r.text
    assert r.json()["identity"] == "gitlab:project_path:acme/app:ref_type:branch:ref:main"
    async with env.client(r.json()["access_token"]) as c:
        attrs = (await c.get("/api/v1/token/status")).json()["attributes"]
        assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 200
    assert (attrs["namespace_id"], attrs["project_id"], attrs["org"]) == ("72", "9001", "acme")
    assert attrs["ref_protected"] == "true"
    assert attrs["runner_id"] == "7"  # numbers become strings policies can match


async def test_owner_mapped_to_another_org_gets_nothing_here(env: Env, uploaded: None) -> None:
    token = env.github.github_token(audience=AUD, owner="other", owner_id="2002", repo_id="6001")
    r = await env.exchange("github-action", token)
    assert r.status_code == 200, r.text
    async with env.client(r.json()["access_token"]) as c:
        assert (await c.get("/api/v1/token/status")).json()["attributes"]["org"] == "other"
        assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 404
        assert (await c.get(f"/cache/acme/app/{HASH_A}.narinfo")).status_code == 404


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_with_public_key(issuer: LocalIssuer, claims: dict[str, Any]) -> str:
    """The classic confusion attack: HMAC keyed with the issuer's public key PEM."""
    pem = issuer.rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _alg_none(claims: dict[str, Any]) -> str:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
    return f"{head}.{_b64(json.dumps(claims).encode())}."


def _tampered(issuer: LocalIssuer) -> str:
    head, _, sig = issuer.github_token(audience=AUD).split(".")
    claims = issuer.github_claims(audience=AUD, owner_id="1001", repo_id="5002")
    return f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"


REJECTIONS: dict[str, tuple[Any, int, str, str]] = {
    # name: (make token from the github issuer, status, code, message fragment)
    "wrong_aud": (
        lambda gh: gh.github_token(audience="https://elsewhere.test"),
        401,
        "wrong_audience",
        "audience is not this server",
    ),
    "wrong_iss": (
        lambda gh: gh.mint(
            {**gh.github_claims(audience=AUD), "iss": "https://token.actions.githubusercontent.com"}
        ),
        401,
        "wrong_issuer",
        "is not trusted by this server",
    ),
    "expired": (
        lambda gh: gh.github_token(audience=AUD, now=time.time() - 3600),
        401,
        "token_expired",
        "expired",
    ),
    "not_yet_valid": (
        lambda gh: gh.github_token(audience=AUD, now=time.time() + 900),
        401,
        "token_not_yet_valid",
        "not valid for another",
    ),
    "alg_none": (
        lambda gh: _alg_none(gh.github_claims(audience=AUD)),
        401,
        "wrong_algorithm",
        "'none' is not accepted",
    ),
    "hs256_public_key": (
        lambda gh: _hs256_with_public_key(gh, gh.github_claims(audience=AUD)),
        401,
        "wrong_algorithm",
        "'HS256' is not accepted",
    ),
    "es256_header_rsa_key": (
        lambda gh: gh.mint(gh.github_claims(audience=AUD), kid="ec-1", headers={"kid": "rsa-1"}),
        401,
        "wrong_algorithm",
        "is not a EC key",
    ),
    "tampered_claims": (_tampered, 401, "invalid_token", "signature does not verify"),
    "other_org_repository": (
        lambda gh: gh.github_token(audience=AUD, owner="evil", owner_id="3003"),
        403,
        "unknown_owner",
        "repository_owner 'evil' (repository_owner_id 3003) are not accepted",
    ),
    "garbage": (lambda gh: "not.a.jwt", 401, "invalid_token", "not a well-formed JWT"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
async def test_github_rejections(env: Env, case: str) -> None:
    make, status, code, fragment = REJECTIONS[case]
    r = await env.exchange("github-action", make(env.github))
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert fragment in r.json()["message"]
    last = env.audit()[-1]
    assert (last["action"], last["decision"], last["rule"]) == ("token:exchange", "deny", code)
    assert last["kind"] == "github-action" and last["reason"]


async def test_unknown_kid_refetches_once_then_rejects(env: Env) -> None:
    offset = [0.0]
    config = ServerConfig.load(env.state.path)
    env.services.exchangers["github-action"] = OidcExchanger(
        GITHUB, config.github, clock=lambda: time.time() + offset[0]
    )
    assert (await env.exchange("github-action", env.github.github_token(audience=AUD))).is_success
    assert env.github.jwks_requests == 1
    unknown = env.github.github_token(audience=AUD, kid="rsa-next")
    r = await env.exchange("github-action", unknown)
    assert r.json()["error"] == "unknown_key"
    assert env.github.jwks_requests == 1  # fetched a moment ago: not again so soon
    offset[0] = 61.0
    r = await env.exchange("github-action", unknown)
    assert r.status_code == 401 and r.json()["error"] == "unknown_key"
    assert "'rsa-next'" in r.json()["message"]
    assert env.github.jwks_requests == 2  # one refetch for the unknown kid
    r = await env.exchange("github-action", unknown)
    assert r.json()["error"] == "unknown_key"
    assert env.github.jwks_requests == 2  # rate-limited: no second refetch
    assert [e["rule"] for e in env.audit()[-2:]] == ["unknown_key", "unknown_key"]


async def test_key_rotation_is_picked_up_on_unknown_kid(env: Env) -> None:
    offset = [0.0]
    exchanger = OidcExchanger(
        GITHUB,
        [OidcSection(org="acme", audience=AUD, owner_ids=("1001",), issuer=env.github.url)],
        clock=lambda: time.time() + offset[0],
    )
    ident = await exchanger.identify({"token": env.github.github_token(audience=AUD)}, None)
    assert ident.attributes["org"] == "acme"
    env.github.publish("rsa-next")
    rotated = {"token": env.github.github_token(audience=AUD, kid="rsa-next")}
    offset[0] = 30.0  # within the refetch rate limit: the new key is not fetched yet
    with pytest.raises(ExchangeRejected) as info:
        await exchanger.identify(rotated, None)
    assert info.value.code == "unknown_key"
    offset[0] = 61.0
    assert (await exchanger.identify(rotated, None)).subject.startswith("repo:acme/app:")
    assert env.github.jwks_requests == 2


async def test_unreachable_issuer_is_502_and_audited(env: Env) -> None:
    exchanger = OidcExchanger(
        GITHUB,
        [OidcSection(org="acme", audience=AUD, owner_ids=("1001",), issuer="http://127.0.0.1:9")],
    )
    env.services.exchangers["github-action"] = exchanger
    claims = {**env.github.github_claims(audience=AUD), "iss": "http://127.0.0.1:9"}
    r = await env.exchange("github-action", env.github.mint(claims))
    assert r.status_code == 502 and r.json()["error"] == "issuer_unavailable"
    assert env.audit()[-1]["rule"] == "issuer_unavailable"


async def test_unsupported_kind_is_refused_and_audited(env: Env) -> None:
    r = await env.exchange("kerberos", "x")
    assert r.status_code == 400 and r.json()["error"] == "unsupported_kind"
    assert "github-action" in r.json()["message"]
    assert env.audit()[-1]["kind"] == "kerberos"


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ('org = "acme"\nowner_ids = ["1"]', "needs `org` and `audience`"),
        (f'org = "acme"\naudience = "{AUD}"', "owner_ids"),
        (
            f'org = "acme"\naudience = "{AUD}"\nowner_ids = ["1"]\nissuer = "http://gitlab.test"',
            "must be an https:// URL",
        ),
        (f'org = "acme"\naudience = "{AUD}"\nowner_ids = [1]', "must be a list of strings"),
    ],
)
def test_config_errors(tmp_path: Path, entry: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="gitlab") as info:
        ServerConfig.from_toml(f"[[gitlab]]\n{entry}\n", state_dir=tmp_path, source="c.toml")
    assert fragment in str(info.value)


def test_config_defaults_to_public_issuers(tmp_path: Path) -> None:
    text = f'[[github]]\norg = "a"\naudience = "{AUD}"\nowner_ids = ["*"]\n'
    text += f'[gitlab]\norg = "a"\naudience = "{AUD}"\nowner_ids = ["*"]\n'
    config = ServerConfig.from_toml(text, state_dir=tmp_path)
    assert config.github[0].issuer == "https://token.actions.githubusercontent.com"
    assert config.gitlab[0].issuer == "https://gitlab.com"


async def test_actions_id_token_request_endpoint_gives_exchangeable_tokens(env: Env) -> None:
    url = env.github.id_token_request_url + "&audience=" + AUD
    async with httpx.AsyncClient(timeout=10) as c:
        refused = await c.get(url, headers={"authorization": "bearer wrong"})
        r = await c.get(url, headers={"authorization": f"bearer {env.github.request_token}"})
    assert refused.status_code == 401
    assert r.status_code == 200 and env.github.id_token_requests == 1
    exchanged = await env.exchange("github-action", r.json()["value"])
    assert exchanged.status_code == 200, exchanged.text
    assert exchanged.json()["identity"] == "github:repo:acme/app:ref:refs/heads/main"
