"""A minimal stand-in for the nixd server's token API, served for real on loopback.

Implements ``POST /api/v1/token/exchange`` (kind "token") and ``GET /api/v1/cache/keys``
as CONTRACTS.md describes, so the daemon process can log in and renew over HTTP.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nixd.nix.signing import SecretKey

SIGNING_KEY = SecretKey.generate("test-cache-1")
KEYS = [SIGNING_KEY.public().render()]


@dataclass
class TokenServer:
    api_token: str = field(default_factory=lambda: "nixd_test_" + secrets.token_urlsafe(16))
    lifetime: float = 3600.0
    url: str = ""
    exchanges: int = 0
    issued: list[str] = field(default_factory=list)
    fail_with: int | None = None

    async def exchange(self, request: Request) -> JSONResponse:
        body = await request.json()
        if self.fail_with is not None:
            return JSONResponse({"error": "unavailable", "message": "down"}, self.fail_with)
        if body.get("kind") != "token" or body.get("token") != self.api_token:
            return JSONResponse({"error": "invalid_token", "message": "unknown API token"}, 401)
        self.exchanges += 1
        now = time.time()
        value = "jwt." + secrets.token_urlsafe(24)
        self.issued.append(value)
        return JSONResponse(
            {
                "access_token": value,
                "token_type": "Bearer",
                "expires_in": self.lifetime,
                "expires_at": now + self.lifetime,
                "identity": "token:ci-bot",
            }
        )

    async def keys(self, _request: Request) -> JSONResponse:
        return JSONResponse({"keys": KEYS, "current": KEYS[0]})

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/v1/token/exchange", self.exchange, methods=["POST"]),
                Route("/api/v1/cache/keys", self.keys, methods=["GET"]),
            ]
        )

    async def serve(self, *, task_status: trio.TaskStatus[TokenServer]) -> None:
        config = HypercornConfig()
        # 127.0.0.2: a host other than the proxy's, as a real server would be (netrc is per host)
        config.bind = ["127.0.0.2:0"]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, self.app(), config)
            self.url = binds[0]
            task_status.started(self)
