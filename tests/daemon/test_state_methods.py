"""The login state file: every login method persists, and version-1 files still load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nixd.auth.github_action import GitHubActionLogin
from nixd.auth.model import AccessToken
from nixd.auth.token import TokenMethod
from nixd.daemon.state import LoginState, load_state, save_state
from nixd.errors import ConfigError


def test_a_version_1_token_login_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "server_url": "http://cache",
                "credential": {"kind": "token", "secret": "nixd_old"},
                "pinned_keys": ["k:AAAA"],
                "logged_in_at": 5.0,
                "token": {"value": "jwt", "expires_at": 9.0, "identity": "token:x", "issued_at": 1},
            }
        )
    )
    state = load_state(str(path))
    assert state is not None and isinstance(state.method, TokenMethod)
    assert state.method.to_state() == {"token": "nixd_old"}
    assert state.token is not None and state.token.identity == "token:x"
    save_state(str(path), state)  # written back as version 2
    again = json.loads(path.read_text())
    assert again["version"] == 2 and again["method"]["name"] == "token"


def test_a_method_login_round_trips_0600(tmp_path: Path) -> None:
    path = tmp_path / "d" / "state.json"
    method = GitHubActionLogin("https://gh/idtoken?api-version=2.0", "req-secret", "aud")
    token = AccessToken("jwt", 100.0, "github:repo:acme/app:ref:refs/heads/main", 40.0)
    state = LoginState("http://cache", method, ("k:AAAA",), token, 1.0, "github:acme/app@main")
    save_state(str(path), state)
    assert os.stat(path).st_mode & 0o777 == 0o600
    loaded = load_state(str(path))
    assert loaded is not None and isinstance(loaded.method, GitHubActionLogin)
    assert loaded.method.to_state() == method.to_state()
    assert loaded.display_identity == "github:acme/app@main"
    assert "req-secret" not in repr(loaded)


@pytest.mark.parametrize(
    "data",
    [
        {"version": 3},
        {"version": 2, "server_url": "x", "method": {"name": "nope", "state": {}}},
        {"version": 1, "server_url": "x", "credential": {"kind": "weird", "secret": "s"}},
    ],
)
def test_damaged_or_unknown_state_says_log_in_again(tmp_path: Path, data: object) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="log in again"):
        load_state(str(path))
