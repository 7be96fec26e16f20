"""``github-action``: log in as the GitHub Actions workflow run the machine is part of.

A job with ``permissions: id-token: write`` gets ``ACTIONS_ID_TOKEN_REQUEST_URL`` and
``ACTIONS_ID_TOKEN_REQUEST_TOKEN`` in its environment; ``GET <url>&audience=<aud>`` with
``Authorization: bearer <request token>`` returns ``{"value": <ID token JWT>}``, signed by
GitHub, for the cache server's audience. The CLI reads both variables from *its*
environment and hands them to the daemon over the control socket (never a command line,
never a log line); the daemon keeps them (0600) for the job's lifetime.

GitHub's ID tokens live only minutes, so a renewal never reuses one: each
:meth:`GitHubActionLogin.exchange_body` requests a new ID token and exchanges that. The
request token stops working when the job ends, and so does renewal — which is what a CI
login should do. The workflow::

    permissions:
      id-token: write
      contents: read
    steps:
      - run: sudo -E nixd login github-action --server https://cache.example.com
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from nixd.auth.methods import SimpleMethod, default_audience, param, register
from nixd.errors import AuthError, LoginFailed, UpstreamError

URL_VAR = "ACTIONS_ID_TOKEN_REQUEST_URL"
TOKEN_VAR = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"  # noqa: S105 - a variable name


@register
class GitHubActionLogin(SimpleMethod):
    """Requests a new GitHub ID token for every exchange; see the module docstring."""

    name = "github-action"

    def __init__(self, request_url: str, request_token: str, audience: str) -> None:
        self.request_url = request_url
        self._request_token = request_token
        self.audience = audience

    def describe(self) -> str:
        return (
            f"requests a new GitHub Actions ID token (audience {self.audience!r}) before the "
            "access token expires; works while the job runs"
        )

    def id_token_url(self) -> str:
        sep = "&" if "?" in self.request_url else "?"
        return f"{self.request_url}{sep}audience={quote(self.audience, safe='')}"

    async def id_token(self, client: httpx.AsyncClient) -> str:
        """A fresh ID token from the job's token endpoint."""
        where = urlsplit(self.request_url)
        endpoint = f"{where.scheme}://{where.netloc}{where.path}"  # no query: it may be secret
        try:
            response = await client.get(
                self.id_token_url(),
                headers={
                    "Authorization": f"bearer {self._request_token}",
                    "Accept": "application/json; api-version=2.0",
                },
            )
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"cannot request a GitHub ID token from {endpoint}: {type(exc).__name__}"
            ) from exc
        if response.status_code in (401, 403):
            raise LoginFailed(
                f"{endpoint} refused the ID token request (HTTP {response.status_code}): the "
                "job has ended or lacks `permissions: id-token: write`"
            )
        if response.status_code != 200:
            raise UpstreamError(
                f"GitHub ID token request at {endpoint}: HTTP {response.status_code}"
            )
        try:
            value = response.json()["value"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise AuthError(f"{endpoint}: malformed ID token answer") from exc
        if not isinstance(value, str) or value.count(".") != 2:
            raise AuthError(f"{endpoint}: the answer holds no JWT")
        return value

    async def exchange_body(self, client: httpx.AsyncClient) -> dict[str, Any]:
        return {"kind": "github-action", "token": await self.id_token(client)}

    def to_state(self) -> dict[str, Any]:
        return {
            "request_url": self.request_url,
            "request_token": self._request_token,
            "audience": self.audience,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any], server_url: str) -> GitHubActionLogin:
        url = param(params, "request_url")
        token = param(params, "request_token")
        assert url is not None and token is not None
        if not url.startswith(("https://", "http://")):
            raise LoginFailed(f"{URL_VAR} is not an http(s) URL")
        audience = param(params, "audience", required=False) or default_audience(server_url)
        return cls(url, token, audience)

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> GitHubActionLogin:
        return cls(str(data["request_url"]), str(data["request_token"]), str(data["audience"]))
