"""The login-method registry, identity rendering and the expiry warning on a fake clock."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
import trio.testing

from nixd.auth import methods
from nixd.auth.github_action import GitHubActionLogin
from nixd.auth.gitlab_pipeline import GitLabPipelineLogin
from nixd.auth.token import TokenMethod
from nixd.errors import LoginFailed
from tests.auth.jwts import unsigned_jwt


def test_registry_builds_each_builtin_method_and_round_trips_its_state() -> None:
    assert {"token", "github-action", "gitlab-pipeline", "aws"} <= set(methods.names())
    server = "https://cache.example.com:8443/"
    built: list[methods.LoginMethod] = [
        methods.from_params("token", {"token": "nixd_x"}, server),
        methods.from_params(
            "github-action",
            {"request_url": "https://gh.example/idtoken?api-version=2.0", "request_token": "r"},
            server,
        ),
        methods.from_params(
            "gitlab-pipeline", {"id_token": unsigned_jwt({"exp": time.time() + 3600})}, server
        ),
        methods.from_params("aws", {"region": "eu-west-1"}, server),
    ]
    for method in built:
        assert isinstance(method, methods.LoginMethod)
        again = methods.from_state(method.name, method.to_state())
        assert again.to_state() == method.to_state()
        assert method.describe()
    github = built[1]
    assert isinstance(github, GitHubActionLogin)
    assert github.audience == "https://cache.example.com:8443"  # the default audience
    assert built[3].to_state()["endpoint"] == "https://sts.eu-west-1.amazonaws.com"


def test_secrets_stay_out_of_reprs() -> None:
    assert "s3cret" not in repr(TokenMethod("s3cret"))
    gh = GitHubActionLogin("https://gh.example/t?x=1", "s3cret", "aud")
    assert "s3cret" not in repr(gh) and "s3cret" not in gh.describe()


def test_bad_params_say_which() -> None:
    with pytest.raises(LoginFailed, match="unknown login method 'nope'"):
        methods.from_params("nope", {}, "https://c")
    with pytest.raises(LoginFailed, match="'request_token' is missing"):
        methods.from_params("github-action", {"request_url": "https://gh"}, "https://c")
    with pytest.raises(LoginFailed, match="'token' must be a string"):
        methods.from_params("token", {"token": 5}, "https://c")
    with pytest.raises(LoginFailed, match="not a JWT"):
        methods.from_params("gitlab-pipeline", {"id_token": "garbage"}, "https://c")
    with pytest.raises(LoginFailed, match="already expired"):
        methods.from_params(
            "gitlab-pipeline", {"id_token": unsigned_jwt({"exp": time.time() - 1})}, "https://c"
        )


@pytest.mark.parametrize(
    ("status", "shown"),
    [
        (
            {
                "kind": "github",
                "subject": "repo:acme/app:ref:refs/heads/main",
                "attributes": {"repository": "acme/app", "ref": "refs/heads/main"},
            },
            "github:acme/app@refs/heads/main",
        ),
        (
            {
                "kind": "gitlab",
                "subject": "project_path:acme/app:ref_type:branch:ref:main",
                "attributes": {"project_path": "acme/app", "ref": "main"},
            },
            "gitlab:acme/app@main",
        ),
        (
            {"kind": "aws", "subject": "arn:aws:iam::123456789012:role/ci", "attributes": {}},
            "aws:arn:aws:iam::123456789012:role/ci",
        ),
        ({"kind": "user", "subject": "alice"}, "user:alice"),
        ({"identity": "x"}, None),
    ],
)
def test_render_identity(status: dict[str, Any], shown: str | None) -> None:
    assert methods.render_identity(status) == shown


async def test_gitlab_expiry_is_announced_ahead_on_a_fake_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    base = time.time()

    def clock() -> float:
        return base + trio.current_time()

    method = GitLabPipelineLogin(unsigned_jwt({"exp": base + 3600}))
    assert methods.expiry_warning(method, base) is None
    warnings: list[tuple[float, str]] = []
    start = trio.current_time()
    with trio.fail_after(7200):
        await methods.warn_before_expiry(
            method, lambda m: warnings.append((trio.current_time() - start, m)), clock=clock
        )
    assert [round(t) for t, _ in warnings] == [3600 - 600, 3600]
    assert "expires at" in warnings[0][1] and "cannot be renewed" in warnings[0][1]
    assert "in 600s" in warnings[0][1]
    assert "expired at" in warnings[1][1] and "nixd login gitlab-pipeline" in warnings[1][1]
    # the same words reach `nixd status`
    assert methods.expiry_warning(method, base + 3000) == warnings[0][1]


async def test_no_warning_for_methods_that_renew_forever() -> None:
    called: list[str] = []
    with trio.fail_after(1):
        await methods.warn_before_expiry(TokenMethod("t"), called.append)
    assert called == [] and methods.expiry_warning(TokenMethod("t")) is None
