"""AWS logins with moto's server playing STS (and IAM) on loopback.

moto is started with ``INITIAL_NO_AUTH_ACTION_COUNT`` so that, after the IAM setup calls,
it authenticates every request and verifies SigV4 signatures like STS does; that is what
catches a request changed after signing. Requests are signed by botocore's own SigV4
signer, as the client does. The app runs in-process on a real state directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from nixd.server.config import ServerConfig
from nixd.server.http.app import CacheApp, Services
from nixd.server.http.serve import open_services
from nixd.server.login.aws import AUDIENCE_HEADER, AwsExchanger
from tests.server.appenv import HASH_A, make_nar, upload
from tests.server.conftest import ServerState

AUD = "https://cache.test"
ACCOUNT = "123456789012"  # moto's default account
SETUP_ACTIONS = 5  # unauthenticated IAM calls in `moto`, before moto enforces auth
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/builder"
BODY = "Action=GetCallerIdentity&Version=2011-06-15"
MOTO = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "moto_server"


@dataclass
class Moto:
    url: str
    user: Credentials  # IAM user "ci"
    role: Credentials  # assumed role "builder", session "build-42"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)}
    proc = subprocess.Popen(
        [str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None, "moto_server exited"
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        session = botocore.session.get_session()
        common: dict[str, Any] = {"region_name": "us-east-1", "endpoint_url": url}
        iam = session.create_client(
            "iam", aws_access_key_id="AKIASETUP", aws_secret_access_key="s" * 40, **common
        )
        allow = json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        )
        trust = json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}
                ],
            }
        )
        iam.create_user(UserName="ci")
        iam.put_user_policy(UserName="ci", PolicyName="all", PolicyDocument=allow)
        key = iam.create_access_key(UserName="ci")["AccessKey"]
        iam.create_role(RoleName="builder", AssumeRolePolicyDocument=trust)
        iam.put_role_policy(RoleName="builder", PolicyName="all", PolicyDocument=allow)
        user = Credentials(key["AccessKeyId"], key["SecretAccessKey"])
        sts = session.create_client(
            "sts",
            aws_access_key_id=user.access_key,
            aws_secret_access_key=user.secret_key,
            **common,
        )
        c = sts.assume_role(RoleArn=ROLE_ARN, RoleSessionName="build-42")["Credentials"]
        role = Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])
        yield Moto(url, user, role)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def signed(
    creds: Credentials,
    url: str,
    *,
    audience: str | None = AUD,
    region: str = "us-east-1",
    body: str = BODY,
) -> dict[str, Any]:
    """A GetCallerIdentity request signed by botocore, as the exchange body carries it."""
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    if audience is not None:
        headers["X-Nixd-Server-Audience"] = audience
    request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    SigV4Auth(creds, "sts", region).add_auth(request)
    return {"method": "POST", "url": url, "headers": dict(request.headers), "body": body}


@dataclass
class Env:
    state: ServerState
    services: Services
    app: CacheApp
    moto: Moto

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        transport = httpx.ASGITransport(app=self.app, client=("127.0.0.1", 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://cache", headers=headers)

    async def exchange(self, request: dict[str, Any], **extra: Any) -> httpx.Response:
        async with self.client() as c:
            body = {"kind": "aws", "request": request, **extra}
            return await c.post("/api/v1/token/exchange", json=body)

    def last_audit(self, action: str = "token:exchange") -> dict[str, Any]:
        lines = self.state.path.joinpath("audit.log").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        return dict([e for e in events if e["action"] == action][-1])


@pytest.fixture
def env(server_state: ServerState, moto: Moto) -> Iterator[Env]:
    server_state.admin("project", "create", "acme/app")
    with server_state.path.joinpath("config.toml").open("a") as f:
        f.write(f"""
[[aws]]
org = "acme"
audience = "{AUD}"
accounts = ["{ACCOUNT}"]
sts_endpoint = "{moto.url}/"
region = "us-east-1"
""")
    with server_state.path.joinpath("policy.toml").open("a") as f:
        f.write(f"""
[[rule]]
id = "acme-builders"
effect = "allow"
subjects = [{{ kind = "aws", subject = "{ROLE_ARN}", account = "{ACCOUNT}" }}]
actions = ["cache:read"]
resources = ["acme/*"]
""")
    with open_services(ServerConfig.load(server_state.path)) as services:
        yield Env(server_state, services, CacheApp(services), moto)


@pytest.fixture
async def uploaded(env: Env, tmp_path: Path) -> AsyncIterator[None]:
    _, member = env.state.token("acme", "uploader", fast=True)
    nar = make_nar(tmp_path / "a", b"built on ec2\n" * 1000)
    async with env.client(member) as c:
        assert (await upload(c, "acme/app", HASH_A, nar)).status_code == 200
    yield


async def test_assumed_role_gets_access_by_role(env: Env, uploaded: None) -> None:
    request = signed(env.moto.role, env.moto.url + "/")
    request["headers"]["X-Claimed-Arn"] = f"arn:aws:iam::{ACCOUNT}:role/admin"  # unsigned
    r = await env.exchange(request, arn=f"arn:aws:iam::{ACCOUNT}:role/admin")
    assert r.status_code == 200, r.text
    assert r.json()["identity"] == f"aws:{ROLE_ARN}"
    async with env.client(r.json()["access_token"]) as c:
        status = (await c.get("/api/v1/token/status")).json()
        assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 200
    attrs = status["attributes"]
    assert attrs["role"] == "builder" and attrs["session"] == "build-42"
    assert attrs["arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/builder/build-42"
    assert attrs["account"] == ACCOUNT and attrs["org"] == "acme"
    assert attrs["user_id"].endswith(":build-42")
    last = env.last_audit()
    assert (last["decision"], last["rule"], last["identity"]) == ("allow", "aws", f"aws:{ROLE_ARN}")


async def test_principal_the_policy_does_not_know_gets_no_access(env: Env, uploaded: None) -> None:
    r = await env.exchange(signed(env.moto.user, env.moto.url + "/"))
    assert r.status_code == 200, r.text
    assert r.json()["identity"] == f"aws:arn:aws:iam::{ACCOUNT}:user/ci"
    async with env.client(r.json()["access_token"]) as c:
        assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 404
        assert (await c.get(f"/cache/acme/app/{HASH_A}.narinfo")).status_code == 404


def _swap_audience(moto: Moto) -> dict[str, Any]:
    """Signed for another server, then relabelled for this one: STS refuses it."""
    request = signed(moto.role, moto.url + "/", audience="https://other.test")
    request["headers"]["X-Nixd-Server-Audience"] = AUD
    return request


def _reordered_body(moto: Moto) -> dict[str, Any]:
    """The signed body was different bytes; what is sent passes the checks here."""
    request = signed(moto.role, moto.url + "/", body="Version=2011-06-15&Action=GetCallerIdentity")
    request["body"] = BODY
    return request


def _extra_param(moto: Moto) -> dict[str, Any]:
    request = signed(moto.role, moto.url + "/")
    request["body"] = BODY + "&RoleArn=x"
    return request


def _signed_for(url: str, *, host: str | None = None, region: str = "us-east-1") -> Any:
    def make(moto: Moto) -> dict[str, Any]:
        request = signed(moto.role, url.replace("MOTO", moto.url), region=region)
        if host:
            request["headers"]["Host"] = host
        return request

    return make


def _unsigned_audience(moto: Moto) -> dict[str, Any]:
    request = signed(moto.role, moto.url + "/", audience=None)
    request["headers"]["X-Nixd-Server-Audience"] = AUD
    return request


REJECTIONS: dict[str, tuple[Any, int, str, str]] = {
    "tampered_audience": (_swap_audience, 401, "sts_rejected", "SignatureDoesNotMatch"),
    "tampered_body": (_reordered_body, 401, "sts_rejected", "SignatureDoesNotMatch"),
    "extra_body_parameter": (_extra_param, 401, "invalid_request", "body must be exactly"),
    "other_endpoint": (
        _signed_for("https://sts.amazonaws.com/"),
        401,
        "wrong_endpoint",
        "not this server's STS endpoint",
    ),
    "other_path": (_signed_for("MOTO/evil"), 401, "wrong_endpoint", "STS endpoint"),
    "other_host_header": (
        _signed_for("MOTO/", host="sts.amazonaws.com"),
        401,
        "wrong_endpoint",
        "Host header",
    ),
    "other_region": (
        _signed_for("MOTO/", region="eu-west-1"),
        401,
        "wrong_endpoint",
        "region 'eu-west-1'",
    ),
    "wrong_audience": (
        lambda moto: signed(moto.role, moto.url + "/", audience="https://other.test"),
        401,
        "wrong_audience",
        "audience 'https://other.test'",
    ),
    "audience_not_signed": (
        _unsigned_audience,
        401,
        "invalid_signature",
        AUDIENCE_HEADER,
    ),
    "not_signed_at_all": (
        lambda moto: {"method": "POST", "url": moto.url + "/", "headers": {}, "body": BODY},
        401,
        "invalid_signature",
        "no AWS4-HMAC-SHA256",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
async def test_rejections(env: Env, case: str) -> None:
    make, status, code, fragment = REJECTIONS[case]
    r = await env.exchange(make(env.moto))
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert fragment in r.json()["message"]
    last = env.last_audit()
    assert (last["action"], last["decision"], last["rule"]) == ("token:exchange", "deny", code)
    assert last["kind"] == "aws" and last["reason"]


async def test_old_request_is_refused(env: Env) -> None:
    config = ServerConfig.load(env.state.path)
    env.services.exchangers["aws"] = AwsExchanger(config.aws, clock=lambda: time.time() + 1000)
    r = await env.exchange(signed(env.moto.role, env.moto.url + "/"))
    assert r.status_code == 401 and r.json()["error"] == "stale_request"
    assert "sign a fresh one" in r.json()["message"]
    assert env.last_audit()["rule"] == "stale_request"


async def test_account_no_entry_lists_is_refused(env: Env) -> None:
    config = ServerConfig.load(env.state.path)
    only_other = [a.__class__(**{**_fields(a), "accounts": ("111111111111",)}) for a in config.aws]
    env.services.exchangers["aws"] = AwsExchanger(only_other)
    r = await env.exchange(signed(env.moto.role, env.moto.url + "/"))
    assert r.status_code == 403 and r.json()["error"] == "unknown_account"
    assert ACCOUNT in r.json()["message"]
    assert env.last_audit()["reason"] == f"arn=arn:aws:sts::{ACCOUNT}:assumed-role/builder/build-42"


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}
