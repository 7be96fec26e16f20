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


async def test_an_upstream_that_is_down_does_not_hide_a_flake_source(flake_env: FlakeEnv) -> None:
    """With pull-through on, a reader's miss asks the upstream first; when the upstream is
    down, what the server itself can serve (a release's source tree) is still served, and
    only a path nothing here answers is the 503."""
    import socket  # noqa: PLC0415

    from nixd.nix.signing import SecretKey  # noqa: PLC0415
    from nixd.server.config import ServerConfig  # noqa: PLC0415
    from nixd.server.http.app import CacheApp  # noqa: PLC0415
    from nixd.server.http.serve import open_services  # noqa: PLC0415

    env = flake_env
    ci = await env.ci()
    r = await env.publish(ci, "acme/tool", "0.1.0", tarball(), metadata())
    assert r.status_code == 201, r.text
    source = r.json()["store_path"].removeprefix("/nix/store/")[:32]
    env.state.admin("project", "create", "acme/app")
    with socket.socket() as s:  # a port nothing listens on: the upstream is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = SecretKey.generate("up-1").public().render()
    with (env.state.path / "config.toml").open("a") as f:
        f.write(f"""
[[mirror]]
name = "up"
url = "http://127.0.0.1:{port}"
public_keys = ["{key}"]
slices = ["acme/*"]
timeout = 2.0
pull_through = true
""")
    with open_services(ServerConfig.load(env.state.path)) as services:
        assert services.mirror is not None and services.mirror.pull_through
        env.app = CacheApp(services)
        async with env.client(env.member) as c:
            got = await c.get(f"/cache/{source}.narinfo")
            assert got.status_code == 200, got.text
            absent = await c.get(f"/cache/{'0' * 31 + '9'}.narinfo")
            assert absent.status_code == 503, absent.text
        await services.mirror.aclose()


async def test_what_the_name_decides_is_refused_before_the_body(flake_env: FlakeEnv) -> None:
    """An organization that does not exist, or another spelling of a published flake, is
    refused without reading the body (the upload may be as large as the bound)."""
    from nixd.server.http.flakes import RELEASE_TYPE  # noqa: PLC0415
    from tests.server.conftest import write_policy  # noqa: PLC0415

    env = flake_env
    policy = env.state.path / "policy.toml"
    write_policy(
        policy,
        policy.read_text()
        + """
[[rule]]
id = "ci-publishes-anywhere"
effect = "allow"
subjects = [{ kind = "github", org = "acme" }]
actions = ["flake:publish"]
resources = ["*"]
""",
    )
    env.services.policy.reload()
    ci = await env.ci()
    assert (await env.publish(ci, "acme/tool", "1.0.0", tarball(), metadata())).status_code == 201
    for flake, status in [("ghost/tool", 400), ("acme/TOOL", 409)]:
        read: list[int] = []
        sent: list[dict[str, object]] = []

        async def receive(read: list[int] = read) -> dict[str, object]:
            read.append(1)
            return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

        async def send(message: dict[str, object], sent: list[dict[str, object]] = sent) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "PUT",
            "path": f"/api/v1/flakes/{flake}/releases/2.0.0",
            "query_string": b"",
            "headers": [
                (b"authorization", f"Bearer {ci}".encode()),
                (b"content-type", RELEASE_TYPE.encode()),
                (b"x-nixd-metadata-length", b"10"),
            ],
            "client": ("127.0.0.1", 1),
        }
        await env.app(scope, receive, send)
        assert sent[0]["status"] == status, (flake, sent)
        assert not read, flake
