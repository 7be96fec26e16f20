"""Tenant isolation through the app: nobody changes what another identity receives.

Two shapes of the poisoning attack (another organization's public slice; a writer allowed
only one slice of the same organization), metadata isolation both ways, existence
oracles, deny on a public slice, org-scoped token names, conflicts, and the invariant as
a property: for random uploads by random writers, every reader's answer comes from a
slice the reader may read, whose writer uploaded exactly that.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import httpx
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixd.nix import base32
from nixd.nix.narinfo import NarInfo
from nixd.server.access.identity import Identity, anonymous
from nixd.server.config import ServerConfig
from nixd.server.http.app import CacheApp
from nixd.server.http.serve import open_services
from tests.server.appenv import HASH_A, HASH_B, Env, make_nar, upload
from tests.server.conftest import ServerState, audit_text, write_policy

BOTH_BACKENDS = True  # metadata on SQLite and on PostgreSQL (tests/server/conftest.py)

EXTRA_POLICY = """
[[rule]]
id = "evil-members"
effect = "allow"
subjects = [{ kind = "token", org = "evil" }]
actions = ["cache:read", "cache:write"]
resources = ["evil/*"]

[[rule]]
id = "app-writer-only-app"
description = "a token allowed to write one slice and read nothing else"
effect = "deny"
subjects = [{ kind = "token", subject = "acme/app-writer" }]
actions = ["*"]
resources = ["acme/secret"]
"""


def nar_hash_of(nar: bytes) -> str:
    return "sha256:" + base32.encode(hashlib.sha256(nar).digest())


async def narinfo(c: httpx.AsyncClient, url: str) -> NarInfo | None:
    r = await c.get(url)
    return NarInfo.parse(r.text) if r.status_code == 200 else None


async def _setup(env: Env) -> dict[str, str]:
    env.state.admin("org", "create", "evil")
    env.state.admin("project", "create", "evil/pub", "--public")
    env.state.admin("project", "create", "acme/secret")
    policy = env.state.path / "policy.toml"
    write_policy(policy, policy.read_text() + EXTRA_POLICY)
    env.services.policy.reload()
    _, evil = env.state.token("evil", "ci", fast=True)
    _, writer = env.state.token("acme", "app-writer", fast=True)
    return {"evil": evil, "writer": writer}


async def test_another_orgs_public_slice_cannot_shadow(env: Env, tmp_path: Path) -> None:
    tokens = await _setup(env)
    legit = make_nar(tmp_path / "legit", b"acme's build")
    evil = make_nar(tmp_path / "evil", b"#!/bin/sh\nrm -rf ~\n")
    # Before acme has it, acme's readers do not get evil's public copy either.
    async with env.client(auth=tokens["evil"], basic=True) as c:
        assert (await upload(c, "evil/pub", HASH_A, evil)).status_code == 200
        assert (await upload(c, "evil/pub", "0" * 31 + "9", evil)).status_code == 200
    async with env.client(auth=env.member, basic=True) as c:
        assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 404
        assert (await c.get(f"/cache/acme/{HASH_A}.narinfo")).status_code == 404
        assert (await upload(c, "acme/secret", HASH_A, legit)).status_code == 200
        got = await narinfo(c, f"/cache/{HASH_A}.narinfo")
        assert got is not None and str(got.nar_hash) == nar_hash_of(legit)
        nar = await c.get(f"/cache/{got.url}")
        assert nar.status_code == 200
    # evil's own view still serves evil's build to whoever asks for it by name.
    async with env.client() as c:
        got = await narinfo(c, f"/cache/evil/{HASH_A}.narinfo")
        assert got is not None and str(got.nar_hash) == nar_hash_of(evil)
    # The view's name is compared ignoring case, like every org name.
    async with env.client(auth=env.member, basic=True) as c:
        got = await narinfo(c, f"/cache/ACME/{HASH_A}.narinfo")
        assert got is not None and str(got.nar_hash) == nar_hash_of(legit)
    # Opting in makes evil/pub answer after acme's own slices, never before.
    env.state.admin("org", "trust", "acme", "evil/pub")
    async with env.client(auth=env.member, basic=True) as c:
        got = await narinfo(c, f"/cache/{HASH_A}.narinfo")
        assert got is not None and str(got.nar_hash) == nar_hash_of(legit)
        assert (await c.get(f"/cache/{'0' * 31}9.narinfo")).status_code == 200
    lines = [json.loads(x) for x in audit_text(env.state.path).splitlines()]
    served = [
        x for x in lines if x.get("object") == f"{HASH_A}.narinfo" and x["decision"] == "allow"
    ]
    assert served[-1]["resource"] == "acme/secret"


async def test_a_writer_of_one_slice_cannot_shadow_another(env: Env, tmp_path: Path) -> None:
    tokens = await _setup(env)
    legit = make_nar(tmp_path / "legit", b"secret build")
    evil = make_nar(tmp_path / "evil", b"poison")
    drv = f"{HASH_B}-x.drv"
    async with env.client(auth=env.member, basic=True) as c:
        assert (await upload(c, "acme/secret", HASH_A, legit)).status_code == 200
        assert (await c.put(f"/cache/acme/secret/log/{drv}", content=b"real log\n")).is_success
    async with env.client(auth=tokens["writer"], basic=True) as c:
        assert (await upload(c, "acme/app", HASH_A, evil)).status_code == 200  # confined
        assert (await c.put(f"/cache/acme/app/log/{drv}", content=b"fake log\n")).is_success
        # Into the slice it may not write: refused, and nothing there changes.
        r = await c.put(f"/cache/acme/secret/{HASH_A}.narinfo", content=b"x")
        assert r.status_code == 403
    async with env.client(auth=env.member, basic=True) as c:
        got = await narinfo(c, f"/cache/{HASH_A}.narinfo")
        assert got is not None and str(got.nar_hash) == nar_hash_of(legit)
        assert (await c.get(f"/cache/log/{drv}")).content == b"real log\n"
        mine = await narinfo(c, f"/cache/acme/secret/{HASH_A}.narinfo")
        assert mine is not None and str(mine.nar_hash) == nar_hash_of(legit)
        confined = await narinfo(c, f"/cache/acme/app/{HASH_A}.narinfo")
        assert confined is not None and str(confined.nar_hash) == nar_hash_of(evil)
    # An admin who prefers acme/app says so, visibly.
    env.state.admin("project", "priority", "acme/app", "10")
    async with env.client(auth=env.member, basic=True) as c:
        got = await narinfo(c, f"/cache/{HASH_A}.narinfo")
        assert got is not None and str(got.nar_hash) == nar_hash_of(evil)


async def test_metadata_belongs_to_the_slice_both_ways(env: Env, tmp_path: Path) -> None:
    tokens = await _setup(env)
    nar = make_nar(tmp_path / "same", b"identical bytes")
    bad_ref = "0" * 31 + "7-evil"
    # Pre-poisoning: evil uploads the same bytes first, with references of its choice.
    async with env.client(auth=tokens["evil"], basic=True) as c:
        assert (await upload(c, "evil/pub", HASH_A, nar, refs=(bad_ref,))).status_code == 200
    async with env.client(auth=env.member, basic=True) as c:
        assert (await upload(c, "acme/app", HASH_A, nar)).status_code == 200
        got = await narinfo(c, f"/cache/{HASH_A}.narinfo")
        assert got is not None and got.references == ()
        # Read-back: acme uploads with a private reference; evil learns nothing of it.
        secret_ref = "0" * 31 + "8-private"
        assert (await upload(c, "acme/secret", HASH_B, nar, refs=(secret_ref,))).status_code == 200
    async with env.client(auth=tokens["evil"], basic=True) as c:
        assert (await upload(c, "evil/pub", HASH_B, nar)).status_code == 200
        got = await narinfo(c, f"/cache/evil/{HASH_B}.narinfo")
        assert got is not None and got.references == ()
        assert (await c.get(f"/cache/acme/secret/{HASH_B}.narinfo")).status_code == 404


async def test_no_existence_oracles(env: Env, tmp_path: Path) -> None:
    tokens = await _setup(env)
    nar = make_nar(tmp_path / "o", b"o")
    async with env.client(auth=env.member, basic=True) as c:
        assert (await upload(c, "acme/secret", HASH_A, nar)).status_code == 200
        uploaded_url = next(
            ln.split()[1]
            for ln in (await c.get(f"/cache/acme/secret/{HASH_A}.narinfo")).text.splitlines()
            if ln.startswith("URL:")
        )
    async with env.client(auth=tokens["evil"], basic=True) as c:
        pairs = [
            (f"/cache/acme/secret/{HASH_A}.narinfo", f"/cache/acme/secret/{HASH_B}.narinfo"),
            (f"/cache/acme/secret/{HASH_A}.narinfo", f"/cache/acme/nope/{HASH_A}.narinfo"),
            (f"/cache/acme/{HASH_A}.narinfo", f"/cache/nobody/{HASH_A}.narinfo"),
            (f"/cache/{uploaded_url}", f"/cache/nar/{'1' * 52}.nar.zst"),
            (f"/cache/acme/secret/{uploaded_url}", f"/cache/acme/secret/nar/{'1' * 52}.nar.zst"),
        ]
        for hidden, absent in pairs:
            for method in ("GET", "HEAD"):
                a, b = await c.request(method, hidden), await c.request(method, absent)
                assert (a.status_code, a.content) == (b.status_code, b.content), (hidden, absent)
                assert a.status_code == 404
        for prefix in ("acme/secret", "acme/nope", "nobody", "nobody/x"):
            r = await c.get(f"/cache/{prefix}/nix-cache-info")
            assert r.status_code == 200 and r.text.startswith("StoreDir: /nix/store\n")
        # Uploads: a slice that exists and one that does not look the same.
        for target in ("acme/secret", "acme/nope", "nobody/x"):
            r = await c.put(f"/cache/{target}/{HASH_A}.narinfo", content=b"x")
            assert r.status_code == 403
            assert r.text == f"token:evil/ci may not upload to {target}\n"
    # HEAD of an upload's NAR URL by someone who may not write there: like any absent file.
    compressed_url = "nar/" + "2" * 52 + ".nar.xz"
    async with env.client(auth=env.member, basic=True) as c:
        assert (await c.put(f"/cache/acme/secret/{compressed_url}", content=_xz(nar))).is_success
        assert (await c.head(f"/cache/acme/secret/{compressed_url}")).status_code == 200
    async with env.client(auth=env.reader, basic=True) as c:
        a = await c.head(f"/cache/acme/secret/{compressed_url}")
        b = await c.head(f"/cache/acme/secret/nar/{'3' * 52}.nar.xz")
        assert a.status_code == b.status_code == 404 and a.content == b.content


def _xz(data: bytes) -> bytes:
    return lzma.compress(data)


async def test_deny_beats_public_and_explain_agrees(env: Env, tmp_path: Path) -> None:
    env.state.admin("project", "create", "acme/oss", "--public")
    nar = make_nar(tmp_path / "p", b"p")
    async with env.client(auth=env.member, basic=True) as c:
        assert (await upload(c, "acme/oss", HASH_A, nar)).status_code == 200
    async with env.client() as c:
        assert (await c.get(f"/cache/acme/{HASH_A}.narinfo")).status_code == 200
    policy = env.state.path / "policy.toml"
    write_policy(
        policy,
        policy.read_text()
        + """
[[rule]]
id = "no-anonymous-oss"
effect = "deny"
subjects = [{ kind = "anonymous" }]
actions = ["cache:read"]
resources = ["acme/oss"]
""",
    )
    env.services.policy.reload()
    async with env.client() as c:
        assert (await c.get(f"/cache/acme/{HASH_A}.narinfo")).status_code == 401
        assert (await c.get(f"/cache/acme/oss/{HASH_A}.narinfo")).status_code == 401
    explained = env.state.cli(
        "policy",
        "explain",
        "--identity",
        "anonymous:anonymous",
        "--action",
        "cache:read",
        "--resource",
        "acme/oss",
        "--json",
        check=False,
    )
    assert explained.returncode == 2
    assert json.loads(explained.stdout)["rule"] == "no-anonymous-oss"
    lines = [json.loads(x) for x in audit_text(env.state.path).splitlines()]
    assert lines[-1]["decision"] == "deny" and lines[-1]["rule"] == "no-anonymous-oss"


async def test_equally_named_tokens_of_two_orgs_are_different_callers(env: Env) -> None:
    policy = env.state.path / "policy.toml"
    write_policy(
        policy,
        policy.read_text()
        + """
[[rule]]
id = "acme-ci-only"
effect = "deny"
subjects = [{ kind = "token", subject = "acme/ci" }]
actions = ["cache:write"]
resources = ["acme/lib"]
""",
    )
    env.services.policy.reload()
    acme = await env.access(env.member)
    other = await env.access(env.other)
    async with env.client(auth=acme) as c:
        assert (await c.get("/api/v1/token/status")).json()["identity"] == "token:acme/ci"
    async with env.client(auth=other) as c:
        assert (await c.get("/api/v1/token/status")).json()["identity"] == "token:other/ci"
    explained = env.state.cli(
        "policy",
        "explain",
        "--identity",
        "token:other/ci",
        "--attr",
        "org=other",
        "--action",
        "cache:write",
        "--resource",
        "acme/lib",
        check=False,
    )
    assert "acme-ci-only [deny" in explained.stdout and "no match" in explained.stdout


async def test_conflicting_upload_is_409_unless_admin(env: Env, tmp_path: Path) -> None:
    first = make_nar(tmp_path / "1", b"first")
    second = make_nar(tmp_path / "2", b"second")
    async with env.client(auth=env.member, basic=True) as c:
        assert (await upload(c, "acme/app", HASH_A, first)).status_code == 200
        assert (await upload(c, "acme/app", HASH_A, first)).status_code == 200  # same again
        r = await upload(c, "acme/app", HASH_A, second)
        assert r.status_code == 409 and "cache:admin" in r.text
        got = await narinfo(c, f"/cache/acme/app/{HASH_A}.narinfo")
        assert got is not None and str(got.nar_hash) == nar_hash_of(first)
    async with env.client(auth=env.state.admin_token, basic=True) as c:
        assert (await upload(c, "acme/app", HASH_A, second)).status_code == 200
        got = await narinfo(c, f"/cache/acme/app/{HASH_A}.narinfo")
        assert got is not None and str(got.nar_hash) == nar_hash_of(second)


async def test_revocation_and_rotation_apply_to_the_next_request(env: Env) -> None:
    cred_id, api = env.state.token("acme", "laptop", fast=True)
    access = await env.access(api)
    async with env.client(auth=access) as c:
        assert (await c.get("/api/v1/token/status")).status_code == 200
        env.state.admin("token", "revoke", cred_id)
        assert (await c.get("/api/v1/token/status")).status_code == 401
        assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 401
    access = await env.access(env.member)
    async with env.client(auth=access) as c:
        assert (await c.get("/api/v1/token/status")).status_code == 200
        env.state.admin("key", "rotate", "--tokens", "--grace", "0")
        # No narinfo in between, no waiting: the very next request of any kind is refused.
        assert (await c.get("/api/v1/token/status")).status_code == 401
    fresh = await env.access(env.member)
    async with env.client(auth=fresh) as c:
        assert (await c.get("/api/v1/token/status")).status_code == 200


# --- the invariant, as a property ---------------------------------------------------------

SLICES = ["acme/app", "acme/lib", "acme/secret", "evil/pub", "other/app"]
WRITERS = {  # writer -> (org, name, attrs): what the policy lets each write
    "acme-ci": ("acme", "ci"),
    "app-writer": ("acme", "app-writer"),
    "evil": ("evil", "ci"),
    "other": ("other", "ci"),
}
READERS = ["acme-ci", "app-writer", "evil", "other", "anonymous"]
HASHES = ["0" * 31 + c for c in "12345"]


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(sorted(WRITERS)),
            st.sampled_from(SLICES),
            st.sampled_from(HASHES),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_invariant_every_answer_comes_from_a_readable_slice_whose_writer_uploaded_it(
    server_state_factory: object, ops: list[tuple[str, str, str, int]]
) -> None:
    trio.run(_check_invariant, server_state_factory, ops)


async def _check_invariant(factory: object, ops: list[tuple[str, str, str, int]]) -> None:
    assert callable(factory)
    state: ServerState = factory()
    state.admin("org", "create", "evil")
    state.admin("org", "create", "other")
    for s in SLICES:
        org, name = s.split("/")
        args = ["project", "create", s] + (["--public"] if s == "evil/pub" else [])
        state.admin(*args)
        assert name
    policy = state.path / "policy.toml"
    write_policy(
        policy,
        policy.read_text()
        + EXTRA_POLICY
        + """
[[rule]]
id = "other-members"
effect = "allow"
subjects = [{ kind = "token", org = "other" }]
actions = ["cache:read", "cache:write"]
resources = ["other/*"]
""",
    )
    tokens = {w: state.token(org, name, fast=True)[1] for w, (org, name) in WRITERS.items()}
    with open_services(ServerConfig.load(state.path)) as services:
        app = CacheApp(services)
        env = Env(state, services, app, tokens["acme-ci"], tokens["acme-ci"], tokens["other"])
        policy_now = services.policy.current
        # What each slice holds according to the uploads that were accepted: (hash -> NarHash).
        accepted: dict[str, dict[str, str]] = {s: {} for s in SLICES}
        for n, (writer, slice_, hash_part, variant) in enumerate(ops):
            nar = make_nar(Path(state.path) / "nars" / f"{n}", f"{hash_part}/{variant}".encode())
            async with env.client(auth=tokens[writer], basic=True) as c:
                try:
                    r = await upload(c, slice_, hash_part, nar)
                except AssertionError:
                    continue  # the NAR PUT itself was refused: nothing stored
            if r.status_code == 200:
                accepted[slice_].setdefault(hash_part, nar_hash_of(nar))
        for reader in READERS:
            auth = tokens.get(reader)
            async with env.client(auth=auth, basic=True) if auth else env.client() as c:
                for hash_part in HASHES:
                    for url in (f"/cache/{hash_part}.narinfo", f"/cache/acme/{hash_part}.narinfo"):
                        r = await c.get(url)
                        if r.status_code != 200:
                            continue
                        got = nar_hash_of_text(r.text)
                        audit = json.loads(audit_text(state.path).splitlines()[-1])
                        served_by = audit["resource"]
                        # The slice that served it holds exactly that record ...
                        assert accepted[served_by].get(hash_part) == got, (reader, url)
                        # ... and the reader may read that slice.
                        ident = services.credentials.authenticate(auth) if auth else None
                        org, name = served_by.split("/")
                        project = services.store.project(org, name)
                        assert project is not None
                        decision = policy_now.decide(
                            ident or anonymous(),
                            "cache:read",
                            served_by,
                            "127.0.0.1",
                            public=project.public,
                        )
                        assert decision.allowed, (reader, served_by)


def nar_hash_of_text(text: str) -> str:
    return str(NarInfo.parse(text).nar_hash)


async def test_user_disable_refuses_unexpired_access_tokens_at_once(env: Env) -> None:
    device = env.services.device
    assert device is not None
    device.accounts.create("acme", "alice", "correct horse battery")
    access, _ = env.services.issuer.issue(
        Identity("user", "alice", {"org": "acme", "user": "alice"})
    )
    async with env.client(auth=access) as c:
        assert (await c.get("/api/v1/token/status")).status_code == 200
        env.state.admin("user", "disable", "alice")
        r = await c.get("/api/v1/token/status")
        assert r.status_code == 401 and "disabled" in r.text
