"""A local OIDC issuer on 127.0.0.1 that plays GitHub Actions or GitLab CI in tests.

It serves what a verifier fetches — ``/.well-known/openid-configuration`` (with
``issuer`` = the base URL and ``jwks_uri``) and ``/.well-known/jwks`` — and mints ID
tokens shaped like the providers' documented ones, signed with its own RSA (RS256) and
P-256 (ES256) keys. An extra key is kept unpublished until :meth:`LocalIssuer.publish`, to
test unknown ``kid`` handling and key rotation.

It also answers like GitHub's ``ACTIONS_ID_TOKEN_REQUEST_URL``: ``GET /idtoken?api-version=
2.0&audience=X`` with ``Authorization: bearer <request_token>`` returns ``{"value": jwt}``
minted from :attr:`LocalIssuer.actions_claims` for audience X (default: the base URL).

It is a plain threaded ``http.server`` so both sync tests and trio tests (and subprocesses)
can reach it; :func:`run_issuer` stops it on exit. Usage::

    with run_issuer("github") as gh:
        token = gh.github_token(audience="https://cache.example")
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class SigningKey:
    kid: str
    alg: str  # "RS256" or "ES256"
    private: PrivateKey
    published: bool = True

    def public_jwk(self) -> dict[str, Any]:
        if isinstance(self.private, rsa.RSAPrivateKey):
            jwk = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        else:
            jwk = json.loads(ECAlgorithm.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}


def _new_key(alg: str, kid: str, *, published: bool = True) -> SigningKey:
    private: PrivateKey
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    return SigningKey(kid=kid, alg=alg, private=private, published=published)


@dataclass
class LocalIssuer:
    """One issuer: base URL (= ``iss``), keys, counters; see the module docstring."""

    url: str = ""
    keys: dict[str, SigningKey] = field(default_factory=dict)
    request_token: str = field(default_factory=lambda: uuid.uuid4().hex)
    actions_claims: dict[str, Any] = field(default_factory=dict)
    id_token_lifetime: int = 300
    discovery_requests: int = 0
    jwks_requests: int = 0
    id_token_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for key in (
            _new_key("RS256", "rsa-1"),
            _new_key("ES256", "ec-1"),
            _new_key("RS256", "rsa-next", published=False),
        ):
            self.keys[key.kid] = key

    # -- keys ---------------------------------------------------------------------------

    @property
    def rsa_key(self) -> SigningKey:
        return self.keys["rsa-1"]

    def publish(self, kid: str) -> None:
        """Add an unpublished key (e.g. ``rsa-next``) to the JWKS: a key rotation."""
        self.keys[kid].published = True

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys.values() if k.published]}

    @property
    def id_token_request_url(self) -> str:
        """Like ``ACTIONS_ID_TOKEN_REQUEST_URL``: the client appends ``&audience=...``."""
        return f"{self.url}/idtoken?api-version=2.0"

    # -- tokens -------------------------------------------------------------------------

    def mint(
        self,
        claims: dict[str, Any],
        *,
        kid: str = "rsa-1",
        headers: dict[str, Any] | None = None,
    ) -> str:
        """Sign ``claims`` as they are with key ``kid`` (its algorithm)."""
        key = self.keys[kid]
        return jwt.encode(
            claims, key.private, algorithm=key.alg, headers={"kid": kid, **(headers or {})}
        )

    def _times(self, lifetime: int, now: float | None) -> dict[str, int]:
        t = int(time.time() if now is None else now)
        return {"iat": t, "nbf": t, "exp": t + lifetime}

    def github_claims(
        self,
        *,
        audience: str,
        owner: str = "acme",
        owner_id: str = "1001",
        repo: str = "app",
        repo_id: str = "5001",
        ref: str = "refs/heads/main",
        environment: str | None = None,
        lifetime: int = 300,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Claims as GitHub documents its Actions ID tokens (a push to ``ref``)."""
        repository = f"{owner}/{repo}"
        workflow = f"{repository}/.github/workflows/ci.yml@{ref}"
        claims: dict[str, Any] = {
            "jti": uuid.uuid4().hex,
            "sub": f"repo:{repository}:"
            + (f"environment:{environment}" if environment else f"ref:{ref}"),
            "aud": audience,
            "ref": ref,
            "sha": "d" * 40,
            "repository": repository,
            "repository_id": repo_id,
            "repository_owner": owner,
            "repository_owner_id": owner_id,
            "repository_visibility": "private",
            "run_id": "4242",
            "run_number": "7",
            "run_attempt": "1",
            "runner_environment": "github-hosted",
            "actor": "octocat",
            "actor_id": "583231",
            "workflow": "CI",
            "workflow_ref": workflow,
            "workflow_sha": "d" * 40,
            "job_workflow_ref": workflow,
            "job_workflow_sha": "d" * 40,
            "head_ref": "",
            "base_ref": "",
            "event_name": "push",
            "ref_type": "tag" if ref.startswith("refs/tags/") else "branch",
            "ref_protected": "true",
            "iss": self.url,
            **self._times(lifetime, now),
        }
        if environment:
            claims["environment"] = environment
        return claims

    def github_token(self, *, kid: str = "rsa-1", **kw: Any) -> str:
        return self.mint(self.github_claims(**kw), kid=kid)

    def gitlab_claims(
        self,
        *,
        audience: str,
        namespace_path: str = "acme",
        namespace_id: str = "72",
        project: str = "app",
        project_id: str = "9001",
        ref: str = "main",
        ref_protected: bool = True,
        lifetime: int = 300,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Claims as GitLab documents a job's ``id_tokens`` (a branch pipeline)."""
        project_path = f"{namespace_path}/{project}"
        return {
            "namespace_id": namespace_id,
            "namespace_path": namespace_path,
            "project_id": project_id,
            "project_path": project_path,
            "user_id": "42",
            "user_login": "alice",
            "user_email": "alice@example.com",
            "user_access_level": "developer",
            "pipeline_id": "1212",
            "pipeline_source": "push",
            "job_id": "3434",
            "ref": ref,
            "ref_type": "branch",
            "ref_path": f"refs/heads/{ref}",
            "ref_protected": "true" if ref_protected else "false",
            "runner_id": 7,
            "runner_environment": "gitlab-hosted",
            "sha": "e" * 40,
            "project_visibility": "private",
            "ci_config_ref_uri": f"gitlab.example/{project_path}//.gitlab-ci.yml@refs/heads/{ref}",
            "ci_config_sha": "e" * 40,
            "jti": str(uuid.uuid4()),
            "iss": self.url,
            "aud": audience,
            "sub": f"project_path:{project_path}:ref_type:branch:ref:{ref}",
            **self._times(lifetime, now),
        }

    def gitlab_token(self, *, kid: str = "rsa-1", **kw: Any) -> str:
        return self.mint(self.gitlab_claims(**kw), kid=kid)

    # -- HTTP ---------------------------------------------------------------------------

    def _answer(self, method: str, target: str, headers: Any) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(target)
        if method != "GET":
            return 405, {"message": "method not allowed"}
        if parts.path == "/.well-known/openid-configuration":
            with self._lock:
                self.discovery_requests += 1
            return 200, {
                "issuer": self.url,
                "jwks_uri": f"{self.url}/.well-known/jwks",
                "subject_types_supported": ["public", "pairwise"],
                "response_types_supported": ["id_token"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                "claims_supported": sorted(self.github_claims(audience="x")),
                "scopes_supported": ["openid"],
            }
        if parts.path == "/.well-known/jwks":
            with self._lock:
                self.jwks_requests += 1
            return 200, self.jwks()
        if parts.path == "/idtoken":
            auth = headers.get("Authorization", "")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or value.strip() != self.request_token:
                return 401, {"message": "bad request token"}
            query = parse_qs(parts.query)
            audience = query.get("audience", [self.url])[0]
            with self._lock:
                self.id_token_requests += 1
            claims = self.github_claims(audience=audience, lifetime=self.id_token_lifetime)
            claims.update(self.actions_claims)
            claims["aud"] = audience
            return 200, {"count": 1, "value": self.mint(claims)}
        return 404, {"message": "not found"}


def _handler(issuer: LocalIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self) -> None:
            status, body = issuer._answer(self.command, self.path, self.headers)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = _reply
        do_POST = _reply

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def run_issuer(name: str = "issuer") -> Iterator[LocalIssuer]:
    """Serve a :class:`LocalIssuer` on a free loopback port (its URL is the issuer).

    ``name`` only labels the server thread.
    """
    issuer = LocalIssuer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(issuer))
    server.daemon_threads = True
    issuer.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name=f"oidc-{name}", daemon=True)
    thread.start()
    try:
        yield issuer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
