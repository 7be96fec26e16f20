"""The daemon stops renewing a GitLab login whose ID token expired, and says so in status."""

from __future__ import annotations

import base64
import dataclasses
import time
from pathlib import Path

import httpx
import pytest
import trio

from nixd.auth.gitlab_pipeline import GitLabPipelineLogin
from nixd.auth.model import AccessToken
from nixd.daemon.config import Config, DaemonSection
from nixd.daemon.main import Daemon
from nixd.daemon.state import LoginState, save_state
from nixd.errors import AuthError
from tests.auth.jwts import unsigned_jwt

KEY = "cache-1:" + base64.b64encode(bytes(32)).decode()


async def test_restored_login_with_an_expired_id_token_is_not_renewed(tmp_path: Path) -> None:
    now = time.time()
    method = GitLabPipelineLogin(unsigned_jwt({"exp": int(now) - 60}))
    token = AccessToken("old", now - 10, "gitlab:project_path:acme/app", issued_at=now - 310)
    config = Config(daemon=dataclasses.replace(DaemonSection(), state_dir=str(tmp_path)))
    save_state(config.state_file, LoginState("http://127.0.0.1:9", method, (KEY,), token))
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(500)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        daemon = Daemon(config, http)
        daemon.restore_login()
        assert daemon.login_state is not None
        restored = daemon.login_state.method
        bodies: list[float] = []
        real_body = restored.exchange_body

        async def counted(client: httpx.AsyncClient) -> dict[str, object]:
            bodies.append(time.time())
            return await real_body(client)

        restored.exchange_body = counted  # type: ignore[method-assign]
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.refresher.run)
                await trio.sleep(0.2)
                status = await daemon.status(None, None)
                with pytest.raises(AuthError, match="nixd login gitlab-pipeline"):
                    await daemon.refresher.get()
                nursery.cancel_scope.cancel()
    assert bodies == [] and requests == []  # not one exchange attempted
    assert status["logged_in"] and status["next_refresh"] is None
    error = str(status["last_error"])
    assert "gitlab-pipeline credential expired at" in error
    assert "run `nixd login gitlab-pipeline` again" in error
