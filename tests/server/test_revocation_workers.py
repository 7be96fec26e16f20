"""Revocation, user disable and key rotation reach every worker on the next request.

A real ``nixd-server serve --workers 2``: the workers share the listening socket, so fresh
connections land on either. After each admin command, every one of many fresh
connections is refused — whichever worker it reached, whatever it asked for.
"""

from __future__ import annotations

import httpx

from tests.server.conftest import ServerState, audit_verify
from tests.serverproc import start_server

ROUNDS = 16
BOTH_BACKENDS = True  # workers on one SQLite file, and on one PostgreSQL


def _statuses(url: str, token: str, path: str) -> set[int]:
    seen = set()
    for _ in range(ROUNDS):  # a new connection each time
        r = httpx.get(f"{url}{path}", headers={"authorization": f"Bearer {token}"})
        seen.add(r.status_code)
    return seen


def test_revoke_and_rotate_reach_every_worker(server_state: ServerState) -> None:
    server_state.admin("project", "create", "acme/app")
    cred_id, api = server_state.token("acme", "laptop", fast=True)
    server = start_server(server_state.path, workers=2)
    try:
        access = httpx.post(
            f"{server.url}/api/v1/token/exchange", json={"kind": "token", "token": api}
        ).json()["access_token"]
        assert _statuses(server.url, access, "/api/v1/token/status") == {200}
        server_state.cli("token", "revoke", cred_id)
        assert _statuses(server.url, access, "/api/v1/token/status") == {401}
        assert _statuses(server.url, access, f"/cache/{'0' * 32}.narinfo") == {401}

        _, member = server_state.token("acme", "ci", fast=True)
        access = httpx.post(
            f"{server.url}/api/v1/token/exchange", json={"kind": "token", "token": member}
        ).json()["access_token"]
        assert _statuses(server.url, access, "/api/v1/token/status") == {200}
        server_state.cli("key", "rotate", "--tokens", "--grace", "0")
        assert _statuses(server.url, access, "/api/v1/token/status") == {401}
        fresh = httpx.post(
            f"{server.url}/api/v1/token/exchange", json={"kind": "token", "token": member}
        ).json()["access_token"]
        assert _statuses(server.url, fresh, "/api/v1/token/status") == {200}
    finally:
        assert server.stop() == 0
    assert audit_verify(server_state.path).ok
