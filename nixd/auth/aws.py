"""``aws``: log in as the AWS principal the daemon runs as, without sending credentials.

The daemon (not the CLI: this works unattended at boot from the systemd unit) resolves
AWS credentials with botocore's usual chain — environment, shared config/credentials
profile, container credentials, EC2 instance metadata (IMDSv2) — and signs an
``sts:GetCallerIdentity`` request with SigV4. The exchange body carries the *signed
request* (method, URL, headers, body), never the keys: the server checks that it is meant
for its STS endpoint and its audience, forwards it to STS itself and takes the ARN STS
answers with. The audience travels in the signed header :data:`AUDIENCE_HEADER`, so a
request signed for one nixd server cannot be replayed at another; ``X-Amz-Date`` limits
its life to minutes.

Every renewal re-signs (botocore refreshes temporary credentials by itself); nothing but
the settings (profile, region, endpoint, audience) is persisted.

botocore (32 MB) is the optional extra ``nixd[aws]``: without it this module still
imports (the daemon loads every method at start), and ``nixd login aws`` — or a saved
AWS login restored at start — fails with :data:`MISSING_BOTOCORE`, which says what to
install. The server's ``[[aws]]`` never needs botocore: it only forwards the signed
request to STS.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from nixd.auth.methods import SimpleMethod, default_audience, param, register
from nixd.errors import AuthError, LoginFailed, NixdError

try:
    import botocore.auth  # type: ignore[import-untyped]
    import botocore.awsrequest  # type: ignore[import-untyped]
    import botocore.credentials  # type: ignore[import-untyped]
    import botocore.exceptions  # type: ignore[import-untyped]
    import botocore.session  # type: ignore[import-untyped]
except ImportError:  # the nixd[aws] extra is not installed
    HAVE_BOTOCORE = False
else:
    HAVE_BOTOCORE = True

MISSING_BOTOCORE = (
    "AWS login needs botocore, which is not installed where the nixd daemon runs: "
    "install the extra with `pip install 'nixd[aws]'` (or `pip install botocore`) into "
    "the daemon's environment and restart it"
)


def require_botocore() -> None:
    """Raise the one clear error when the ``nixd[aws]`` extra is missing."""
    if not HAVE_BOTOCORE:
        raise NixdError(MISSING_BOTOCORE)


AUDIENCE_HEADER = "X-Nixd-Server-Audience"
DEFAULT_REGION = "us-east-1"
GLOBAL_ENDPOINT = "https://sts.amazonaws.com"
GET_CALLER_IDENTITY = "Action=GetCallerIdentity&Version=2011-06-15"


def default_endpoint(region: str) -> str:
    """STS's regional endpoint; the global one for us-east-1 (what the server defaults to)."""
    return GLOBAL_ENDPOINT if region == DEFAULT_REGION else f"https://sts.{region}.amazonaws.com"


def sign_get_caller_identity(
    credentials: botocore.credentials.ReadOnlyCredentials,
    *,
    endpoint: str,
    region: str,
    audience: str,
) -> dict[str, Any]:
    """A SigV4-signed ``sts:GetCallerIdentity`` as ``{"method","url","headers","body"}``.

    Signed headers: ``host``, ``x-amz-date``, the audience header and the content type
    (and ``x-amz-security-token`` for temporary credentials).
    """
    require_botocore()
    url = endpoint.rstrip("/") + "/"
    host = urlsplit(url).netloc
    request = botocore.awsrequest.AWSRequest(
        method="POST",
        url=url,
        data=GET_CALLER_IDENTITY,
        headers={
            "Host": host,
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
            AUDIENCE_HEADER: audience,
        },
    )
    botocore.auth.SigV4Auth(credentials, "sts", region).add_auth(request)
    return {
        "method": "POST",
        "url": url,
        "headers": {k: str(v) for k, v in request.headers.items()},
        "body": GET_CALLER_IDENTITY,
    }


@register
class AwsLogin(SimpleMethod):
    """Re-signs ``sts:GetCallerIdentity`` for every exchange; see the module docstring."""

    name = "aws"

    def __init__(
        self, *, audience: str, region: str, endpoint: str, profile: str | None = None
    ) -> None:
        self.audience = audience
        self.region = region
        self.endpoint = endpoint
        self.profile = profile
        self._credentials: botocore.credentials.Credentials | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        source = f"profile {self.profile!r}" if self.profile else "the default credential chain"
        return (
            f"signs a new sts:GetCallerIdentity ({self.endpoint}, {self.region}) with AWS "
            f"credentials from {source} before the access token expires"
        )

    def _frozen_credentials(self) -> botocore.credentials.ReadOnlyCredentials:
        """Resolve (once) and refresh (as botocore sees fit) the daemon's AWS credentials."""
        require_botocore()
        with self._lock:
            try:
                if self._credentials is None:
                    session = botocore.session.Session(profile=self.profile)
                    self._credentials = session.get_credentials()
                if self._credentials is None:
                    raise AuthError(
                        "no AWS credentials found for the nixd daemon (environment, "
                        f"{'profile ' + repr(self.profile) if self.profile else 'config files'}"
                        ", container or instance metadata)"
                    )
                return self._credentials.get_frozen_credentials()
            except botocore.exceptions.ProfileNotFound as exc:
                raise LoginFailed(f"AWS profile {self.profile!r} does not exist") from exc
            except botocore.exceptions.BotoCoreError as exc:
                self._credentials = None
                raise AuthError(f"cannot get AWS credentials: {exc}") from exc

    def signed_request(self) -> dict[str, Any]:
        """Blocking (metadata services may be asked): run in a thread."""
        return sign_get_caller_identity(
            self._frozen_credentials(),
            endpoint=self.endpoint,
            region=self.region,
            audience=self.audience,
        )

    async def exchange_body(self, client: httpx.AsyncClient) -> dict[str, Any]:
        request = await trio.to_thread.run_sync(self.signed_request)
        return {"kind": "aws", "request": request}

    def to_state(self) -> dict[str, Any]:
        return {
            "audience": self.audience,
            "region": self.region,
            "endpoint": self.endpoint,
            "profile": self.profile,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any], server_url: str) -> AwsLogin:
        require_botocore()
        profile = param(params, "profile", required=False)
        region = param(params, "region", required=False)
        if region is None:
            try:
                configured = botocore.session.Session(profile=profile).get_config_variable("region")
            except botocore.exceptions.BotoCoreError as exc:
                raise LoginFailed(f"AWS configuration: {exc}") from exc
            region = configured if isinstance(configured, str) and configured else DEFAULT_REGION
        endpoint = param(params, "endpoint", required=False) or default_endpoint(region)
        if not endpoint.startswith(("https://", "http://")):
            raise LoginFailed(f"the STS endpoint {endpoint!r} is not an http(s) URL")
        audience = param(params, "audience", required=False) or default_audience(server_url)
        return cls(audience=audience, region=region, endpoint=endpoint, profile=profile)

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> AwsLogin:
        profile = data.get("profile")
        return cls(
            audience=str(data["audience"]),
            region=str(data["region"]),
            endpoint=str(data["endpoint"]),
            profile=str(profile) if profile else None,
        )
