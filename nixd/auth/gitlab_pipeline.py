"""``gitlab-pipeline``: log in as the GitLab CI job the machine is part of.

GitLab hands a job its OIDC ID token in a variable declared in ``.gitlab-ci.yml``; the
``aud`` must be the audience the cache server is configured with (``[[gitlab]]
audience``)::

    build:
      id_tokens:
        NIXD_ID_TOKEN:
          aud: https://cache.example.com
      script:
        - nixd login gitlab-pipeline --server https://cache.example.com
        - nix build ...

The CLI reads the token from the variable (``--variable``, default ``NIXD_ID_TOKEN``) or
a file (``--token-file``) and hands it to the daemon over the control socket. Unlike
GitHub's, a GitLab job cannot ask for a new ID token: the daemon renews the access token
by exchanging the *same* ID token while it is valid, and from :data:`WARN_BEFORE
<nixd.auth.methods.WARN_BEFORE>` before its ``exp`` it says in ``nixd status`` and in its
log that it cannot renew after that (:func:`nixd.auth.methods.expiry_warning`). A job
that outlives its token should declare a longer ``id_tokens`` lifetime or log in again.

The token's claims are read without verifying the signature — only to know its ``exp``;
the server verifies it.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping
from typing import Any

import httpx

from nixd.auth.methods import SimpleMethod, param, register
from nixd.errors import LoginFailed

DEFAULT_VARIABLE = "NIXD_ID_TOKEN"


def unverified_claims(jwt: str) -> dict[str, Any]:
    """The payload of a JWT, *not* verified: for display and expiry only."""
    try:
        payload = jwt.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise LoginFailed("the ID token is not a JWT") from exc
    if not isinstance(data, dict):
        raise LoginFailed("the ID token's payload is not a JSON object")
    return data


@register
class GitLabPipelineLogin(SimpleMethod):
    """Exchanges the same job ID token until it expires; see the module docstring."""

    name = "gitlab-pipeline"

    def __init__(self, id_token: str) -> None:
        claims = unverified_claims(id_token)
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            raise LoginFailed("the GitLab ID token has no `exp` claim")
        self._id_token = id_token
        self.expires_at = float(exp)

    @property
    def renewable_until(self) -> float | None:
        return self.expires_at

    def describe(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.expires_at))
        return (
            f"exchanges the same GitLab job ID token until it expires at {stamp}; "
            "it cannot be renewed after that"
        )

    async def exchange_body(self, client: httpx.AsyncClient) -> dict[str, Any]:
        if time.time() >= self.expires_at:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.expires_at))
            raise LoginFailed(
                f"the GitLab job ID token expired at {stamp} and cannot be renewed: run "
                "`nixd login gitlab-pipeline` again with a fresh one (or declare a longer "
                "id_tokens lifetime)"
            )
        return {"kind": "gitlab-pipeline", "token": self._id_token}

    def to_state(self) -> dict[str, Any]:
        return {"id_token": self._id_token}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], server_url: str) -> GitLabPipelineLogin:
        token = (param(params, "id_token") or "").strip()
        method = cls(token)
        if time.time() >= method.expires_at:
            raise LoginFailed("the GitLab ID token has already expired")
        return method

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> GitLabPipelineLogin:
        try:
            return cls(str(data["id_token"]))
        except LoginFailed as exc:
            raise ValueError(str(exc)) from exc
