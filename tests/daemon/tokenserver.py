"""A minimal stand-in for the nixd server's token API, served for real on loopback.

Implements ``POST /api/v1/token/exchange`` (kind "token") and ``GET /api/v1/cache/keys``
as CONTRACTS.md describes, so the daemon process can log in and renew over HTTP. It runs
on nixd's own HTTP/1.1 layer (:mod:`nixd.http.serve`), as the real server does.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from nixd.http.serve import Request, Responder, serve_http
from nixd.nix.signing import SecretKey

SIGNING_KEY = SecretKey.generate("test-cache-1")
KEYS = [SIGNING_KEY.public().render()]
JSON = [(b"content-type", b"application/json")]


@dataclass
class TokenServer:
    api_token: str = field(default_factory=lambda: "nixd_test_" + secrets.token_urlsafe(16))
    lifetime: float = 3600.0
    url: str = ""
    exchanges: int = 0
    issued: list[str] = field(default_factory=list)
    fail_with: int | None = None

    def exchange(self, body: Any) -> tuple[int, dict[str, Any]]:
        if self.fail_with is not None:
            return self.fail_with, {"error": "unavailable", "message": "down"}
        if not isinstance(body, dict) or body.get("kind") != "token":
            return 401, {"error": "invalid_token", "message": "unknown API token"}
        if body.get("token") != self.api_token:
            return 401, {"error": "invalid_token", "message": "unknown API token"}
        self.exchanges += 1
        now = time.time()
        value = "jwt." + secrets.token_urlsafe(24)
        self.issued.append(value)
        return 200, {
            "access_token": value,
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "expires_at": now + self.lifetime,
            "identity": "token:ci-bot",
        }

    async def handle(self, request: Request, resp: Responder) -> None:
        if request.path == b"/api/v1/token/exchange" and request.method == b"POST":
            raw = b""
            while chunk := await request.receive_body():
                raw += chunk
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            status, answer = self.exchange(body)
        elif request.path == b"/api/v1/cache/keys" and request.method == b"GET":
            status, answer = 200, {"keys": KEYS, "current": KEYS[0]}
        else:
            status, answer = 404, {"error": "not_found", "message": "no such route"}
        await resp.simple(status, json.dumps(answer).encode(), JSON)

    async def serve(self, *, task_status: trio.TaskStatus[TokenServer]) -> None:
        # 127.0.0.2: a host other than the proxy's, as a real server would be (netrc is per host)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.2")
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_http, listeners, self.handle)
            self.url = server.urls[0]
            task_status.started(self)
