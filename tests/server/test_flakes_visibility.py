"""Who sees a flake: no existence oracle for anyone without ``flake:read`` (property-tested
over the whole URL space), public flakes for anonymous callers, deny rules over public,
and the release's source tree as a store path in the cache, for readers only."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
import trio
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixd.nix.flaketarball import Source, normalize
from nixd.nix.narinfo import NarInfo
from tests.server.flakeenv import FlakeEnv, flake_env, metadata, tarball

BOTH_BACKENDS = True
__all__ = ["flake_env"]

ABSENT_HASH = "0" * 31 + "9"


@pytest.fixture
def published(flake_env: FlakeEnv) -> Iterator[dict[str, Source]]:
    """acme/tool (private, 0.1.0 and 0.2.0), acme/secret (private, denied to acme's
    tokens), acme/pub (public) and acme/closed (public, denied to anonymous callers)."""
    env = flake_env
    sources: dict[str, Source] = {}

    async def publish() -> None:
        ci = await env.ci()
        for name, version, visibility in [
            ("tool", "0.1.0", "private"),
            ("tool", "0.2.0", "private"),
            ("secret", "1.0.0", "private"),
            ("pub", "1.0.0", "public"),
            ("closed", "1.0.0", "public"),
        ]:
            body = tarball({"flake.nix": f"# {name} {version}\n".encode()})
            meta = metadata(visibility=visibility)
            r = await env.publish(ci, f"acme/{name}", version, body, meta)
            assert r.status_code == 201, r.text
            sources[f"{name}@{version}"] = normalize(body)

    trio.run(publish)
    yield sources


def _answer(r: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    return r.status_code, sorted(r.headers.items()), r.content


async def _ask(env: FlakeEnv, token: str | None, method: str, path: str) -> httpx.Response:
    async with env.client(token) as c:
        return await c.request(method, path)


SUFFIXES = st.one_of(
    st.sampled_from(
        ["0.1.0.tar.gz", "0.2.0.tar.gz", "1.0.0.tar.gz", "0.*.tar.gz", "*.tar.gz", "9.9.9.tar.gz",
         ">=0.1 <1.tar.gz", "~~.tar.gz", "0.1.0.zip", "", "a/b", "0.1.0"]
    ),
    st.text(alphabet="0123456789.*^~<>=, -xv/tarbgz", max_size=24),
)  # fmt: skip
TEMPLATES = st.sampled_from(
    [
        "/f/{org}/{name}/{s}",
        "/f/{org}/{name}/{s}.tar.gz",
        "/f/{org}/{name}",
        "/api/v1/flakes/{org}/{name}",
        "/api/v1/flakes/{org}/{name}/releases/{s}",
        "/api/v1/flakes/{org}/{name}/{s}",
        "/api/v1/flakes?org={org}",
    ]
)
CALLERS = st.sampled_from(["anonymous", "other org", "denied member"])


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    caller=CALLERS,
    template=TEMPLATES,
    suffix=SUFFIXES,
    method=st.sampled_from(["GET", "HEAD"]),
    upper=st.booleans(),
)
def test_no_existence_oracle_without_flake_read(
    flake_env: FlakeEnv,
    published: dict[str, Source],
    caller: str,
    template: str,
    suffix: str,
    method: str,
    upper: bool,
) -> None:
    """For a caller without ``flake:read``, every flake URL answers byte for byte the same
    whether the flake exists or not."""
    env = flake_env
    token = {"anonymous": None, "other org": env.other, "denied member": env.member}[caller]
    hidden = {"anonymous": "tool", "other org": "tool", "denied member": "secret"}[caller]

    def path(name: str) -> str:
        name = name.upper() if upper else name
        return template.format(org="acme", name=name, s=quote(suffix, safe="/"))

    async def check() -> None:
        there = await _ask(env, token, method, path(hidden))
        absent = await _ask(env, token, method, path("ghost"))
        assert _answer(there) == _answer(absent), (path(hidden), there.text, absent.text)
        if caller == "anonymous" and template.startswith("/f/"):
            assert there.status_code == 401 and "www-authenticate" in there.headers
        if caller == "anonymous":  # also a public flake that a deny rule closes to them
            closed = await _ask(env, token, method, path("closed"))
            assert _answer(closed) == _answer(absent)

    trio.run(check)


async def test_readers_and_the_rest(flake_env: FlakeEnv, published: dict[str, Source]) -> None:
    env = flake_env
    ci = await env.ci()
    for token in (env.member, ci):
        async with env.client(token) as c:
            r = await c.get("/f/acme/tool/0.1.0.tar.gz")
            assert r.status_code == 200 and r.content == published["tool@0.1.0"].tarball
    async with env.client(env.other) as c:
        hidden = await c.get("/f/acme/tool/0.1.0.tar.gz")
        absent = await c.get("/f/acme/ghost/0.1.0.tar.gz")
    assert hidden.status_code == absent.status_code == 404
    assert hidden.content == absent.content == b'{"error": "not_found", "message": "not found"}'
    async with env.client() as c:
        hidden = await c.get("/f/acme/tool/0.*.tar.gz")
        absent = await c.get("/f/acme/ghost/0.*.tar.gz")
        public = await c.get("/f/acme/pub/1.0.0.tar.gz")
        public_redirect = await c.get("/f/acme/pub/*.tar.gz")
        closed = await c.get("/f/acme/closed/1.0.0.tar.gz")
    assert hidden.status_code == absent.status_code == closed.status_code == 401
    assert hidden.content == absent.content == closed.content
    assert hidden.headers["www-authenticate"] == absent.headers["www-authenticate"]
    assert public.status_code == 200 and public.content == published["pub@1.0.0"].tarball
    assert "public" in public.headers["cache-control"]
    assert public_redirect.headers["location"] == "http://cache/f/acme/pub/1.0.0.tar.gz"
    async with env.client(env.member) as c:  # the deny on anonymous leaves members alone
        assert (await c.get("/f/acme/closed/1.0.0.tar.gz")).status_code == 200
        assert (await c.get("/f/acme/secret/1.0.0.tar.gz")).status_code == 404
    reads = [e for e in env.audit() if e["action"] == "flake:read"]
    rules = {(e["identity"].split(":")[0], e["resource"], e["decision"], e["rule"]) for e in reads}
    assert ("token", "acme/tool", "allow", "acme-members") in rules
    assert ("github", "acme/tool", "allow", "acme-ci-publish") in rules
    assert ("token", "acme/tool", "deny", "default-deny") in rules  # other's token
    assert ("token", "acme/ghost", "deny", "no-flake") in rules
    assert ("anonymous", "acme/pub", "allow", "public-flake") in rules
    assert ("anonymous", "acme/closed", "deny", "closed-to-anonymous") in rules
    assert ("token", "acme/secret", "deny", "hide-secret") in rules


async def test_the_source_tree_is_a_store_path_for_readers_only(
    flake_env: FlakeEnv, published: dict[str, Source]
) -> None:
    env = flake_env
    source = published["tool@0.1.0"]
    hash_part = source.store_path.hash_part
    for view in ("/cache/", "/cache/acme/"):
        async with env.client(env.member) as c:
            r = await c.get(f"{view}{hash_part}.narinfo")
            assert r.status_code == 200, r.text
            info = NarInfo.parse(r.content)
            nar = await c.get(f"{view}{info.url}")
        assert info.store_path == source.store_path
        assert info.nar_hash == source.nar_hash and info.nar_size == source.nar_size
        assert info.references == () and info.deriver is None
        assert info.ca == source.content_address == f"fixed:r:{source.nar_hash}"
        assert info.sigs and info.sigs[0].startswith(env.state.public_key.split(":")[0] + ":")
        assert nar.status_code == 200
        assert hashlib.sha256(nar.content).digest() == info.file_hash.digest
        unpacked = zstandard.ZstdDecompressor().decompressobj().decompress(nar.content)
        assert hashlib.sha256(unpacked).digest() == source.nar_hash.digest
        assert unpacked == source.nar_bytes()
    # The release JSON names the same store path and NAR hash.
    async with env.client(env.member) as c:
        release = (await c.get("/api/v1/flakes/acme/tool/releases/0.1.0")).json()
    assert release["store_path"] == source.store_path.path()
    assert release["nar_hash"] == source.nar_hash.encode("sri")
    # Hidden = absent, byte for byte, narinfo and NAR alike.
    async with env.client(env.member) as c:
        url = NarInfo.parse((await c.get(f"/cache/{hash_part}.narinfo")).content).url
    absent_url = "nar/" + "1" * 52 + ".nar.zst"
    for token in (None, env.other):
        for view in ("/cache/", "/cache/acme/"):
            async with env.client(token) as c:
                for hidden, absent in (
                    (f"{hash_part}.narinfo", f"{ABSENT_HASH}.narinfo"),
                    (url, absent_url),
                ):
                    there = await c.get(f"{view}{hidden}")
                    gone = await c.get(f"{view}{absent}")
                    assert there.status_code in (401, 404), there.text
                    assert _answer(there) == _answer(gone), (view, hidden)
    secret = published["secret@1.0.0"].store_path.hash_part
    async with env.client(env.member) as c:  # denied by rule: absent too
        there = await c.get(f"/cache/{secret}.narinfo")
        gone = await c.get(f"/cache/{ABSENT_HASH}.narinfo")
    assert _answer(there) == _answer(gone)
    # A public flake's source is anyone's, anonymous callers' included.
    pub = published["pub@1.0.0"].store_path.hash_part
    closed = published["closed@1.0.0"].store_path.hash_part
    async with env.client() as c:
        assert (await c.get(f"/cache/acme/{pub}.narinfo")).status_code == 200
        assert (await c.get(f"/cache/{pub}.narinfo")).status_code == 200
        assert (await c.get(f"/cache/{closed}.narinfo")).status_code == 401
    served = [
        e
        for e in env.audit()
        if e["action"] == "flake:read" and e.get("object", "").endswith(".narinfo")
    ]
    assert any(e["decision"] == "allow" and e["resource"] == "acme/tool" for e in served)
    assert any(e["decision"] == "deny" and e["rule"] == "hide-secret" for e in served)
