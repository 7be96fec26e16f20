"""Attacks on the flake routes: spellings of a name that a deny rule does not name, another
org's CI, and what error bodies say."""

from __future__ import annotations

from tests.server.flakeenv import FlakeEnv, flake_env, metadata, tarball

__all__ = ["flake_env"]


async def test_a_deny_rule_holds_for_every_spelling_of_the_name(flake_env: FlakeEnv) -> None:
    """Names are one flake ignoring case, so a deny rule on ``acme/secret`` holds for a
    flake published as ``acme/Secret`` too, whichever spelling the reader asks for."""
    env = flake_env
    ci = await env.ci()
    r = await env.publish(ci, "acme/Secret", "1.0.0", tarball(), metadata())
    assert r.status_code == 201, r.text
    async with env.client(env.member) as c:
        absent = await c.get("/f/acme/ghost/1.0.0.tar.gz")
        assert absent.status_code == 404
        for name in ("secret", "Secret", "SECRET"):
            for path in (
                f"/f/acme/{name}/1.0.0.tar.gz",
                f"/f/acme/{name}/1.*.tar.gz",
                f"/api/v1/flakes/acme/{name}",
                f"/api/v1/flakes/acme/{name}/releases/1.0.0",
            ):
                got = await c.get(path)
                assert got.status_code == 404, (path, got.text)
                assert got.content == absent.content
        listed = (await c.get("/api/v1/flakes?org=acme")).json()["flakes"]
        assert [f["name"] for f in listed] == []
    # The CI that may read acme/* still reads it, under any spelling.
    async with env.client(ci) as c:
        assert (await c.get("/f/acme/secret/1.0.0.tar.gz")).status_code == 200


async def test_a_publish_deny_holds_for_every_spelling(flake_env: FlakeEnv) -> None:
    env = flake_env
    policy = env.state.path / "policy.toml"
    from tests.server.conftest import write_policy  # noqa: PLC0415

    write_policy(
        policy,
        policy.read_text()
        + """
[[rule]]
id = "no-ci-vault"
effect = "deny"
subjects = [{ kind = "github" }]
actions = ["flake:publish"]
resources = ["acme/vault"]
""",
    )
    env.services.policy.reload()
    ci = await env.ci()
    for name in ("vault", "Vault", "VAULT"):
        r = await env.publish(ci, f"acme/{name}", "1.0.0", tarball(), metadata())
        assert r.status_code == 403, (name, r.text)
    assert env.stored() == (0, 0, [])


async def test_another_orgs_ci_cannot_publish_into_any_spelling(flake_env: FlakeEnv) -> None:
    env = flake_env
    ci = await env.ci()
    r = await env.publish(ci, "acme/tool", "1.0.0", tarball(), metadata())
    assert r.status_code == 201, r.text
    other = await env.ci(owner="other", owner_id="2002", repo_id="6001")
    for flake in ("acme/tool", "ACME/tool", "Acme/Tool", "acme/TOOL"):
        r = await env.publish(other, flake, "2.0.0", tarball({"x": b"x"}), metadata())
        ghost = await env.publish(other, flake + "-ghost", "2.0.0", tarball(), metadata())
        assert r.status_code == ghost.status_code == 403, (flake, r.text)
        assert r.text == ghost.text.replace(flake + "-ghost", flake)
    async with env.client(other) as c:
        for path in ("/f/acme/tool/1.0.0.tar.gz", "/f/ACME/TOOL/1.0.0.tar.gz"):
            assert (await c.get(path)).status_code == 404
    assert env.flakes.releases(env.flakes.flake("acme", "tool")) and [
        r.version
        for r in env.flakes.releases(env.flakes.flake("acme", "tool"))  # type: ignore[arg-type]
    ] == ["1.0.0"]
