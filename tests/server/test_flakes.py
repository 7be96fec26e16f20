"""Private flakes on the server, in-process on the real store, policy and audit log:
publishing from CI (and nobody else), immutable versions, refusals that store nothing,
constraint redirects, the immutable exact URL, and discovery."""

from __future__ import annotations

import hashlib
import json
import tarfile
from urllib.parse import quote

import pytest
import trio

from nixd.nix.flaketarball import normalize
from nixd.server.http.flakes import RELEASE_TYPE
from tests.server.flakeenv import AUD, MAX_TARBALL, FlakeEnv, flake_env, metadata, tarball

BOTH_BACKENDS = True
__all__ = ["flake_env"]


async def test_publish_then_the_same_is_a_no_op_and_other_content_conflicts(
    flake_env: FlakeEnv,
) -> None:
    env = flake_env
    ci = await env.ci()
    body = tarball({"flake.nix": b"{ outputs = _: { }; }\n", "bin/run": b"#!/bin/sh\n"})
    r = await env.publish(ci, "acme/tool", "0.1.0", body)
    assert r.status_code == 201, r.text
    release = r.json()
    source = normalize(body)
    assert release["published"] is True
    assert release["version"] == "0.1.0"
    assert release["nar_hash"] == source.nar_hash.encode("sri")
    assert release["store_path"] == source.store_path.path()
    assert release["url"] == "http://cache/f/acme/tool/0.1.0.tar.gz"
    assert release["commit"] == "a" * 40 and release["ref"] == "refs/tags/v0.1.0"
    assert release["published_by"] == "github:repo:acme/app:ref:refs/heads/main"
    assert release["lock"] == metadata()["lock"]
    assert release["last_modified"] == source.last_modified
    stored = env.stored()
    assert stored[:2] == (1, 1)

    # The same tree (another archive of it: other mtimes of the files) is a no-op.
    again = tarball({"flake.nix": b"{ outputs = _: { }; }\n", "bin/run": b"#!/bin/sh\n"})
    r = await env.publish(ci, "acme/tool", "0.1.0", again, metadata(commit="b" * 40))
    assert r.status_code == 200, r.text
    assert r.json()["published"] is False and r.json()["commit"] == "a" * 40
    assert env.stored() == stored

    r = await env.publish(ci, "acme/tool", "0.1.0", tarball({"flake.nix": b"# changed\n"}))
    assert r.status_code == 409, r.text
    assert r.json()["message"] == (
        "version 0.1.0 of acme/tool is already published with other content; versions are immutable"
    )
    assert env.stored() == stored

    # GitLab CI of the org publishes too.
    r = await env.publish(await env.gitlab_ci(), "acme/tool", "0.2.0", tarball({"x": b"2"}))
    assert r.status_code == 201, r.text
    assert env.stored()[:2] == (1, 2)

    lines = [e for e in env.audit() if e["action"] in ("flake:publish", "flake:release")]
    assert [(e["action"], e["decision"], e["rule"]) for e in lines] == [
        ("flake:publish", "allow", "acme-ci-publish"),
        ("flake:release", "allow", "published"),
        ("flake:publish", "allow", "acme-ci-publish"),
        ("flake:release", "allow", "unchanged"),
        ("flake:publish", "allow", "acme-ci-publish"),
        ("flake:publish", "allow", "acme-ci-publish"),
        ("flake:release", "allow", "published"),
    ]
    assert all(e["resource"] == "acme/tool" for e in lines)


def _traversal() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    info = tarfile.TarInfo("tool-src/../../etc/passwd")
    info.size = 4
    return [(info, b"evil")]


def _escaping_link() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    info = tarfile.TarInfo("tool-src/up")
    info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
    return [(info, None)]


def _second_top() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    info = tarfile.TarInfo("other-top")
    info.type = tarfile.DIRTYPE
    return [(info, None)]


BAD = {
    # case: (version, body, metadata override, raw metadata, headers, status, message part)
    "version-short": ("1.2", tarball(), None, None, None, 400, "not a release version"),
    "version-v": ("v1.2.3", tarball(), None, None, None, 400, "not a release version"),
    "version-build": ("1.0.0+git", tarball(), None, None, None, 400, "not a release version"),
    "version-constraint": ("1.*", tarball(), None, None, None, 400, "not a release version"),
    "not-gzip": ("1.0.0", b"this is not a tarball" * 10, None, None, None, 400, "tarball"),
    "truncated": ("1.0.0", tarball()[:40], None, None, None, 400, "tarball"),
    "traversal": ("1.0.0", tarball(extra=_traversal()), None, None, None, 400, ".."),
    "escaping-symlink": ("1.0.0", tarball(extra=_escaping_link()), None, None, None, 400, "up"),
    "two-tops": ("1.0.0", tarball(extra=_second_top()), None, None, None, 400, "tarball"),
    "empty": ("1.0.0", b"", None, None, None, 400, "tarball"),
    "meta-json": ("1.0.0", tarball(), None, b"{not json", None, 400, "JSON"),
    "meta-array": ("1.0.0", tarball(), None, b"[]", None, 400, "JSON object"),
    "meta-unknown": ("1.0.0", tarball(), {"colour": "red"}, None, None, 400, "colour"),
    "meta-visibility": ("1.0.0", tarball(), {"visibility": "x"}, None, None, 400, "visibility"),
    "meta-commit": ("1.0.0", tarball(), {"commit": "main"}, None, None, 400, "commit"),
    "meta-output": ("1.0.0", tarball(), {"outputs": {"a": "/tmp/x"}}, None, None, 400, "output"),
    "meta-deep": ("1.0.0", tarball(), {"lock": json.loads("[" * 40 + "]" * 40)}, None, None,
                  400, "nested deeper"),
    "meta-too-long": ("1.0.0", tarball(), None, None,
                      {"x-nixd-metadata-length": str(2 << 20)}, 413, "metadata"),
    "meta-length-missing": ("1.0.0", tarball(), None, None,
                            {"x-nixd-metadata-length": ""}, 400, "Metadata-Length"),
    "meta-longer-than-body": ("1.0.0", b"", None, None,
                              {"x-nixd-metadata-length": "100000"}, 400, "shorter"),
    "content-type": ("1.0.0", tarball(), None, None,
                     {"content-type": "application/gzip"}, 400, RELEASE_TYPE),
    "oversized": ("1.0.0", tarball({"big": bytes(range(256)) * 1024}) + b"\0" * MAX_TARBALL,
                  None, None, None, 413, "max_tarball_bytes"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
async def test_bad_publishes_are_refused_and_store_nothing(flake_env: FlakeEnv, case: str) -> None:
    env = flake_env
    version, body, override, raw, headers, status, part = BAD[case]
    if headers and headers.get("x-nixd-metadata-length") == "":
        headers = {}
    ci = await env.ci()
    meta = metadata(**override) if override else None
    if case == "meta-length-missing":
        text = json.dumps(metadata()).encode()
        async with env.client(ci) as c:
            r = await c.put(
                "/api/v1/flakes/acme/tool/releases/1.0.0",
                content=text + body,
                headers={"content-type": RELEASE_TYPE},
            )
    else:
        r = await env.publish(ci, "acme/tool", version, body, meta, raw_meta=raw, headers=headers)
    assert r.status_code == status, r.text
    assert part in r.json()["message"], r.text
    assert env.stored() == (0, 0, [])


async def test_oversized_content_length_is_refused_before_the_body(flake_env: FlakeEnv) -> None:
    """A declared length over the bound is a 413 without reading a byte of the body."""
    env = flake_env
    ci = await env.ci()
    read = []

    async def receive() -> dict[str, object]:
        read.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "PUT",
        "path": "/api/v1/flakes/acme/tool/releases/1.0.0",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {ci}".encode()),
            (b"content-type", RELEASE_TYPE.encode()),
            (b"x-nixd-metadata-length", b"10"),
            (b"content-length", str(MAX_TARBALL + 11).encode()),
        ],
        "client": ("127.0.0.1", 1),
    }
    await env.app(scope, receive, send)
    assert sent[0]["status"] == 413
    assert not read
    assert env.stored() == (0, 0, [])


async def test_publishing_is_only_for_the_orgs_ci(flake_env: FlakeEnv) -> None:
    env = flake_env
    _, admin_token = env.state.token("acme", "boss", "role=admin", fast=True)
    body = tarball()
    callers = {
        "api token": env.member,
        "admin api token": admin_token,
        "person (device login)": await env.person(),
        "another org's CI": await env.ci(owner="other", owner_id="2002", repo_id="6001"),
    }
    for who, token in callers.items():
        r = await env.publish(token, "acme/tool", "0.1.0", body)
        assert r.status_code == 403, (who, r.text)
        assert "may not publish acme/tool" in r.json()["message"]
    r = await env.publish(None, "acme/tool", "0.1.0", body)
    assert r.status_code == 401 and "www-authenticate" in r.headers
    # A repository whose owner no [[github]] entry lists gets no token at all.
    token = env.github.github_token(audience=AUD, owner="evil", owner_id="3003")
    r = await env.exchange("github-action", token)
    assert r.status_code == 403 and r.json()["error"] == "unknown_owner"
    assert env.stored() == (0, 0, [])
    denied = [e for e in env.audit() if e["action"] == "flake:publish"]
    assert [e["decision"] for e in denied] == ["deny"] * 5
    assert [e["rule"] for e in denied[:3]] == ["no-publish-outside-ci"] * 3
    assert denied[3]["rule"] == "default-deny"


async def _publish_versions(env: FlakeEnv, name: str, versions: list[str], **meta: str) -> None:
    ci = await env.ci()
    for v in versions:
        r = await env.publish(ci, name, v, tarball({"v": v.encode()}), metadata(**meta))
        assert r.status_code == 201, r.text


REDIRECTS = [
    ("0.*", "0.2.0"),
    ("*", "1.0.0"),
    ("^0.1", "0.1.0"),
    ("~0.2", "0.2.0"),
    (">=0.2 <1", "0.2.0"),
    (">=0.2, <1", "0.2.0"),
    ("1", "1.0.0"),
    (">=0.3.0-rc.0 <0.4.0", "0.3.0-rc.1"),
    ("=0.1.0", "0.1.0"),
]


async def test_constraints_redirect_to_the_best_release(flake_env: FlakeEnv) -> None:
    env = flake_env
    await _publish_versions(env, "acme/tool", ["0.1.0", "0.2.0", "0.3.0-rc.1", "1.0.0"])
    async with env.client(env.member) as c:
        for constraint, best in REDIRECTS:
            r = await c.get(f"/f/acme/tool/{quote(constraint)}.tar.gz")
            assert r.status_code == 302, (constraint, r.text)
            assert r.headers["location"] == f"http://cache/f/acme/tool/{best}.tar.gz", constraint
            assert r.headers["cache-control"] == "no-store"
            api = await c.get(f"/api/v1/flakes/acme/tool/releases/{quote(constraint)}")
            assert api.status_code == 200 and api.json()["version"] == best
        # Pre-releases only for a constraint that names one; nothing matching is a 404.
        for nothing in ("0.3.*", "2.*", "^1.1"):
            r = await c.get(f"/f/acme/tool/{quote(nothing)}.tar.gz")
            assert r.status_code == 404, nothing
            assert "no release of acme/tool matches" in r.json()["message"]
        r = await c.get("/f/acme/tool/~~1.tar.gz")
        assert r.status_code == 400 and "constraint" in r.json()["message"]
        r = await c.get("/f/acme/tool/9.9.9.tar.gz")
        assert r.status_code == 404 and "no release 9.9.9" in r.json()["message"]
        # The Host the client used, and the case it spelled the flake in, give way to
        # the canonical names.
        r = await c.get("/f/ACME/Tool/0.*.tar.gz", headers={"host": "flakes.internal:8443"})
        assert r.headers["location"] == "http://flakes.internal:8443/f/acme/tool/0.2.0.tar.gz"
    env.services.public_url = "https://flakes.example.com/"
    async with env.client(env.member) as c:
        r = await c.get("/f/acme/tool/0.*.tar.gz")
    assert r.headers["location"] == "https://flakes.example.com/f/acme/tool/0.2.0.tar.gz"


async def test_the_exact_url_is_immutable(flake_env: FlakeEnv) -> None:
    env = flake_env
    body = tarball({"flake.nix": b"{ }\n"})
    ci = await env.ci()
    assert (await env.publish(ci, "acme/tool", "0.1.0", body)).status_code == 201
    source = normalize(body)
    async with env.client(env.member) as c:
        r = await c.get("/f/acme/tool/0.1.0.tar.gz")
        head = await c.head("/f/acme/tool/0.1.0.tar.gz")
        cached = await c.get(
            "/f/acme/tool/0.1.0.tar.gz", headers={"if-none-match": r.headers["etag"]}
        )
    assert r.status_code == 200
    assert r.content == source.tarball  # the canonical tarball, not the upload
    assert normalize(r.content).nar_hash == source.nar_hash
    assert r.headers["content-type"] == "application/gzip"
    assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
    assert "immutable" in r.headers["cache-control"] and "private" in r.headers["cache-control"]
    assert r.headers["link"] == '<http://cache/f/acme/tool/0.1.0.tar.gz>; rel="immutable"'
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(source.tarball))
    assert head.headers["etag"] == r.headers["etag"]
    assert cached.status_code == 304 and cached.content == b""


async def test_discovery_lists_what_the_caller_may_read(flake_env: FlakeEnv) -> None:
    env = flake_env
    await _publish_versions(env, "acme/tool", ["0.1.0", "0.2.0-beta.1", "0.2.0", "0.10.0"])
    await _publish_versions(env, "acme/secret", ["1.0.0"])
    await _publish_versions(env, "acme/pub", ["1.0.0"], visibility="public")
    async with env.client(env.member) as c:
        listed = (await c.get("/api/v1/flakes")).json()["flakes"]
        one = (await c.get("/api/v1/flakes/acme/tool")).json()
        by_org = (await c.get("/api/v1/flakes", params={"org": "other"})).json()["flakes"]
    assert [(f["org"], f["name"], f["latest"]) for f in listed] == [
        ("acme", "pub", "1.0.0"),
        ("acme", "tool", "0.10.0"),
    ]  # acme/secret is denied to acme's tokens
    assert by_org == []
    assert one["visibility"] == "private" and one["description"] == "a tool"
    assert [r["version"] for r in one["releases"]] == ["0.10.0", "0.2.0", "0.2.0-beta.1", "0.1.0"]
    async with env.client() as c:
        anonymous = (await c.get("/api/v1/flakes")).json()["flakes"]
    assert [f["name"] for f in anonymous] == ["pub"]
    async with env.client(env.other) as c:
        assert [f["name"] for f in (await c.get("/api/v1/flakes")).json()["flakes"]] == ["pub"]


async def test_admin_lists_and_shows_flakes(flake_env: FlakeEnv) -> None:
    env = flake_env
    await _publish_versions(env, "acme/tool", ["0.1.0", "0.2.0"])
    listed = json.loads(env.state.admin("flake", "list", "--json"))
    assert listed == [
        {
            "flake": "acme/tool",
            "visibility": "private",
            "latest": "0.2.0",
            "releases": 2,
            "description": "a tool",
        }
    ]
    assert json.loads(env.state.admin("flake", "list", "other", "--json")) == []
    shown = json.loads(env.state.admin("flake", "show", "acme/tool", "--json"))
    assert [r["version"] for r in shown["releases"]] == ["0.2.0", "0.1.0"]
    assert "acme/tool (private): a tool" in env.state.admin("flake", "show", "acme/tool")


async def test_racing_publishes_of_one_version_keep_one_tree(flake_env: FlakeEnv) -> None:
    """Two CI jobs publish one version at once with different trees: one wins (201), the
    other is told the version is taken (409), never a 500 or a second release."""
    env = flake_env
    ci = await env.ci()
    answers: list[int] = []

    async def one(content: bytes) -> None:
        r = await env.publish(ci, "acme/tool", "1.0.0", tarball({"flake.nix": content}))
        answers.append(r.status_code)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, f"# tree {i}\n".encode())
    assert sorted(answers) == [201, 409, 409, 409]
    assert env.stored()[:2] == (1, 1)
