"""``aws``: botocore's chain in this process, a SigV4-signed GetCallerIdentity per exchange."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import httpx
import pytest

from nixd.auth.aws import AUDIENCE_HEADER, GET_CALLER_IDENTITY, AwsLogin
from nixd.errors import AuthError

AKID = "AKIDEXAMPLE0000000001"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fixed credentials from the environment; no config files, no instance metadata."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AKID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")


def _recompute(request: dict[str, object]) -> str:
    """The signature botocore computes for the request as sent, at its X-Amz-Date."""
    headers = dict(request["headers"])  # type: ignore[call-overload]
    unsigned = {k: v for k, v in headers.items() if k not in ("Authorization",)}
    again = botocore.awsrequest.AWSRequest(
        method="POST", url=str(request["url"]), data=str(request["body"]), headers=unsigned
    )
    again.context["timestamp"] = headers["X-Amz-Date"]
    creds = botocore.credentials.ReadOnlyCredentials(AKID, SECRET, "session-token")
    signer = botocore.auth.SigV4Auth(creds, "sts", "eu-central-1")
    canonical = signer.canonical_request(again)
    return str(signer.signature(signer.string_to_sign(again, canonical), again))


@pytest.mark.usefixtures("aws_env")
async def test_exchange_body_is_a_signed_get_caller_identity() -> None:
    method = AwsLogin.from_params(
        {"region": "eu-central-1", "audience": "https://cache.example.com"}, "https://x"
    )
    async with httpx.AsyncClient() as client:
        body = await method.exchange_body(client)
    assert body["kind"] == "aws"
    request = body["request"]
    assert request["method"] == "POST"
    assert request["url"] == "https://sts.eu-central-1.amazonaws.com/"
    assert request["body"] == GET_CALLER_IDENTITY
    headers = request["headers"]
    assert headers[AUDIENCE_HEADER] == "https://cache.example.com"
    assert headers["Host"] == "sts.eu-central-1.amazonaws.com"
    assert headers["X-Amz-Security-Token"] == "session-token"
    auth = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=([^,]+), SignedHeaders=([^,]+), Signature=([0-9a-f]{64})",
        headers["Authorization"],
    )
    assert auth, headers["Authorization"]
    date = headers["X-Amz-Date"][:8]
    assert auth.group(1) == f"{AKID}/{date}/eu-central-1/sts/aws4_request"
    signed = auth.group(2).split(";")
    assert {"host", "x-amz-date", AUDIENCE_HEADER.lower(), "x-amz-security-token"} <= set(signed)
    assert auth.group(3) == _recompute(request)
    # no secret in the body: only the access key id (public) and the session token (as AWS
    # requires it beside the signature)
    assert SECRET not in str(body)
    # a tampered audience no longer matches the signature
    tampered = dict(request, headers={**headers, AUDIENCE_HEADER: "https://other.example"})
    assert _recompute(tampered) != auth.group(3)


@pytest.mark.usefixtures("aws_env")
async def test_every_exchange_is_signed_anew_and_nothing_secret_persists() -> None:
    method = AwsLogin.from_params({"endpoint": "http://127.0.0.1:9/"}, "https://cache.example")
    assert method.region == "us-east-1" and method.audience == "https://cache.example"
    assert method.to_state() == {
        "audience": "https://cache.example",
        "region": "us-east-1",
        "endpoint": "http://127.0.0.1:9/",
        "profile": None,
    }
    async with httpx.AsyncClient() as client:
        first = await method.exchange_body(client)
        second = await method.exchange_body(client)
    assert first["request"]["url"] == "http://127.0.0.1:9/"
    assert first["request"]["headers"]["Host"] == "127.0.0.1:9"
    assert "Authorization" in second["request"]["headers"]


async def test_no_credentials_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "c"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "s"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    method = AwsLogin(audience="a", region="us-east-1", endpoint="https://sts.amazonaws.com")
    async with httpx.AsyncClient() as client:
        with pytest.raises(AuthError, match="no AWS credentials found for the nixd daemon"):
            await method.exchange_body(client)


def test_without_botocore_aws_login_says_what_to_install() -> None:
    """botocore is the nixd[aws] extra: without it the daemon still starts and loads every
    method, `nixd login aws` (and a restored AWS login) gets one clear message, and the
    server's [[aws]] exchanger needs no botocore at all."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["botocore"] = None  # not installed: every botocore import fails
        from nixd.auth import methods
        methods.load_builtin_methods()
        from nixd.auth.aws import AwsLogin
        import nixd.server.login.aws  # the server side forwards to STS without botocore
        for attempt in (
            lambda: AwsLogin.from_params({}, "https://cache.example.org"),
            lambda: AwsLogin.from_state(
                {"audience": "a", "region": "us-east-1", "endpoint": "https://sts.x"}
            ).signed_request(),
        ):
            try:
                attempt()
            except Exception as exc:
                print(type(exc).__name__, exc)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr
    for line in lines:
        assert line.startswith("NixdError AWS login needs botocore")
        assert "pip install 'nixd[aws]'" in line
