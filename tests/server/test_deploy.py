"""Deploying recorded outputs, in-process on the real store, policy and audit log:
resolve (complete, not recorded, incomplete, ``?check=1``), the publish-time refusal of
incomplete outputs, deploy-only tokens that read exactly their closures (everything else
answering as absent, byte for byte), the scope kept through the token exchange, version
pinning, ``deploy:read`` policy rules (and a deny taking a grant away), and the audit."""

from __future__ import annotations

from nixd.nix.flaketarball import normalize
from nixd.semver import parse_version
from nixd.server.flakes.deploy import walk
from nixd.server.flakes.metadata import ReleaseMetadata
from nixd.server.flakes.releases import Flake
from tests.server.deployenv import (
    OUTPUT,
    DeployEnv,
    answer,
    deploy_env,
    deploy_token,
    new_hash,
    path_of,
)
from tests.server.flakeenv import flake_env, tarball

BOTH_BACKENDS = True
__all__ = ["deploy_env", "flake_env"]
ABSENT = "0" * 31 + "9"
TESTS = "packages.x86_64-linux.tests"


async def _closure(env: DeployEnv) -> dict[str, str]:
    """top -> (a -> c, b) in acme/app and acme/lib; x beside it in acme/app, not in it.
    Names -> hash parts; file hashes under "<name>.file"."""
    h = {n: new_hash() for n in ("top", "a", "b", "c", "x")}
    files = {
        "c": await env.put("acme/lib", h["c"]),
        "a": await env.put("acme/app", h["a"], (h["c"],)),
        "b": await env.put("acme/app", h["b"]),
        "top": await env.put("acme/app", h["top"], (h["a"], h["b"])),
        "x": await env.put("acme/app", h["x"]),
    }
    return {**h, **{f"{k}.file": v for k, v in files.items()}}


async def test_resolve_a_complete_output(deploy_env: DeployEnv) -> None:
    env = deploy_env
    h = await _closure(env)
    r = await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(h["top"])})
    assert r.status_code == 201, r.text
    sizes = 0
    for name in ("top", "a", "b", "c"):
        info = await env.get(env.flake.member, f"/cache/{h[name]}.narinfo")
        sizes += int(next(x for x in info.text.splitlines() if x.startswith("NarSize: "))[9:])
    for spec in ("0.1.0", "0.*", "*"):
        r = await env.get(
            env.flake.member, f"/api/v1/flakes/acme/tool/releases/{spec}/outputs/{OUTPUT}"
        )
        assert r.status_code == 200, r.text
        assert r.json() == {
            "org": "acme",
            "name": "tool",
            "version": "0.1.0",
            "output": OUTPUT,
            "store_path": path_of(h["top"]),
            "closure": {"paths": 4, "nar_size": sizes},
            "complete": True,
            "slice": "acme/app",
            "missing": [],
            "missing_count": 0,
        }
    r = await env.get(env.flake.member, "/api/v1/flakes/acme/tool/releases/0.1.0")
    assert r.json()["outputs"] == {OUTPUT: path_of(h["top"])}
    lines = [e for e in env.flake.audit() if e["action"] == "flake:resolve"]
    assert len(lines) == 3
    assert {(e["identity"], e["resource"], e["decision"], e["rule"]) for e in lines} == {
        ("token:acme/ci", "acme/tool", "allow", "acme-members")
    }
    assert lines[0]["output"] == OUTPUT and lines[0]["store_path"] == path_of(h["top"])
    assert lines[1]["object"] == f"0.*#{OUTPUT}" and lines[1]["version"] == "0.1.0"
    assert all(e["complete"] == "true" for e in lines)


async def test_an_output_not_recorded_and_hidden_flakes(deploy_env: DeployEnv) -> None:
    env = deploy_env
    h = await _closure(env)
    assert (await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(h["top"])})).status_code == 201
    r = await env.get(
        env.flake.member, "/api/v1/flakes/acme/tool/releases/0.1.0/outputs/packages.x.other"
    )
    assert r.status_code == 404
    assert r.json() == {
        "error": "not_found",
        "message": "output packages.x.other was not recorded for acme/tool 0.1.0 "
        "(publish with --include-output)",
    }
    r = await env.get(env.flake.member, f"/api/v1/flakes/acme/tool/releases/9.9.9/outputs/{OUTPUT}")
    assert r.status_code == 404 and "no release 9.9.9" in r.text
    # Another org's token, and anonymous callers: hidden is absent.
    for token in (env.flake.other, None):
        there = await env.get(token, f"/api/v1/flakes/acme/tool/releases/0.1.0/outputs/{OUTPUT}")
        ghost = await env.get(token, f"/api/v1/flakes/acme/ghost/releases/0.1.0/outputs/{OUTPUT}")
        assert answer(there) == answer(ghost)
        assert there.status_code == (404 if token else 401)
    denied = [
        e for e in env.flake.audit() if e["action"] == "flake:resolve" and e["decision"] == "deny"
    ]
    assert [e["resource"] for e in denied] == ["acme/tool", "acme/ghost"] * 2


async def test_publish_refuses_an_incomplete_output_naming_the_missing_paths(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    top, a, b, c, priv = (new_hash() for _ in range(5))
    await env.put("acme/app", a, (c,))
    await env.put("acme/app", top, (a, b, priv))
    await env.put("other/app", priv)  # trusted by acme, but private to other: not there
    before = env.flake.stored()
    r = await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(top), TESTS: path_of(a)})
    assert r.status_code == 409, r.text
    missing = sorted(path_of(x) for x in (b, c, priv))
    assert r.json() == {
        "error": "incomplete",
        "message": f"the closure of {OUTPUT} of acme/tool 0.1.0 ({path_of(top)}) is not "
        "complete: 3 paths missing from the cache (push the whole closure with nix copy "
        "--to first) (and 1 more outputs)",
        "missing": missing,
        "missing_count": 3,
        "outputs": {OUTPUT: missing, TESTS: [path_of(c)]},
    }
    assert env.flake.stored() == before
    line = [e for e in env.flake.audit() if e["action"] == "flake:release"][-1]
    assert (line["decision"], line["rule"], line["missing"]) == ("deny", "incomplete-closure", "3")

    # Pushed (one in the public slice acme trusts), it is published.
    await env.put("acme/lib", c)
    await env.put("other/pub", b)
    await env.put("acme/lib", priv)
    r = await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(top), TESTS: path_of(a)})
    assert r.status_code == 201, r.text


async def test_resolve_an_incomplete_output(deploy_env: DeployEnv) -> None:
    """An output recorded before part of its closure went away (here: recorded directly)."""
    env = deploy_env
    top, gone = new_hash(), new_hash()
    await env.put("acme/app", top, (gone,))
    source = normalize(tarball({"flake.nix": b"# old\n"}))
    stored = env.flake.flakes.store_blobs(source)
    meta = ReleaseMetadata(visibility="private", outputs={OUTPUT: path_of(top)})
    env.flake.flakes.record(
        "acme", "tool", parse_version("0.1.0"), meta=meta, source=source, blobs=stored,
        published_by="test",
    )  # fmt: skip
    url = f"/api/v1/flakes/acme/tool/releases/0.1.0/outputs/{OUTPUT}"
    r = await env.get(env.flake.member, url)
    assert r.status_code == 409
    assert r.json()["error"] == "incomplete" and r.json()["missing"] == [path_of(gone)]
    assert "1 path missing" in r.json()["message"]
    r = await env.get(env.flake.member, url + "?check=1")
    assert r.status_code == 200
    body = r.json()
    assert body["complete"] is False and body["missing"] == [path_of(gone)]
    assert body["closure"]["paths"] == 1 and body["slice"] == "acme/app"
    # The deploy token resolves it the same way; what is there it may read.
    r = await env.get(env.tokens["kiosk"], url)
    assert r.status_code == 409 and r.json()["missing"] == [path_of(gone)]
    assert (await env.get(env.tokens["kiosk"], f"/cache/{top}.narinfo")).status_code == 200
    line = [e for e in env.flake.audit() if e["action"] == "flake:resolve"][-1]
    assert (line["identity"], line["rule"], line["complete"]) == (
        "token:acme/kiosk",
        "deploy-token",
        "false",
    )


async def test_a_deploy_token_reads_exactly_the_closure(deploy_env: DeployEnv) -> None:
    env = deploy_env
    kiosk = env.tokens["kiosk"]
    h = await _closure(env)
    # Before the release, nothing.
    absent = await env.get(kiosk, f"/cache/{ABSENT}.narinfo")
    assert absent.status_code == 404
    assert answer(await env.get(kiosk, f"/cache/{h['top']}.narinfo")) == answer(absent)

    assert (await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(h["top"])})).status_code == 201
    for name in ("top", "a", "b", "c"):
        for prefix in ("/cache/", "/cache/acme/"):
            r = await env.get(kiosk, f"{prefix}{h[name]}.narinfo")
            assert r.status_code == 200, (name, prefix)
            mine = await env.get(env.flake.member, f"{prefix}{h[name]}.narinfo")
            assert r.content == mine.content  # the record a member is served, signed alike
            nar = await env.get(kiosk, f"{prefix}nar/{h[name + '.file']}.nar.zst")
            assert nar.status_code == 200
            member_nar = await env.get(env.flake.member, f"/cache/nar/{h[name + '.file']}.nar.zst")
            assert nar.content == member_nar.content
    # In the slice whose record is served, too; not in another one.
    assert (await env.get(kiosk, f"/cache/acme/lib/{h['c']}.narinfo")).status_code == 200
    slice_absent = await env.get(kiosk, f"/cache/acme/app/{ABSENT}.narinfo")
    assert answer(await env.get(kiosk, f"/cache/acme/app/{h['c']}.narinfo")) == answer(slice_absent)

    # Another path of the same slice is absent, byte for byte; its NAR too.
    for method in ("GET", "HEAD"):
        absent = await env.get(kiosk, f"/cache/{ABSENT}.narinfo", method)
        assert answer(await env.get(kiosk, f"/cache/{h['x']}.narinfo", method)) == answer(absent)
        absent_nar = await env.get(kiosk, f"/cache/nar/{'0' * 52}.nar.zst", method)
        x_nar = await env.get(kiosk, f"/cache/nar/{h['x.file']}.nar.zst", method)
        assert answer(x_nar) == answer(absent_nar) and x_nar.status_code == 404
        assert answer(await env.get(kiosk, f"/cache/acme/app/{h['x']}.narinfo", method)) == answer(
            await env.get(kiosk, f"/cache/acme/app/{ABSENT}.narinfo", method)
        )
    # The flake's sources: the tarball, its store path, the listings.
    tar = await env.get(kiosk, "/f/acme/tool/0.1.0.tar.gz")
    assert answer(tar) == answer(await env.get(kiosk, "/f/acme/ghost/0.1.0.tar.gz"))
    assert tar.status_code == 404
    assert (await env.get(kiosk, "/f/acme/tool/0.*.tar.gz")).status_code == 404
    release = (await env.get(env.flake.member, "/api/v1/flakes/acme/tool/releases/0.1.0")).json()
    source = release["store_path"].removeprefix("/nix/store/")[:32]
    assert (await env.get(env.flake.member, f"/cache/{source}.narinfo")).status_code == 200
    assert answer(await env.get(kiosk, f"/cache/{source}.narinfo")) == answer(
        await env.get(kiosk, f"/cache/{ABSENT}.narinfo")
    )
    assert (await env.get(kiosk, "/api/v1/flakes")).json() == {"flakes": []}
    assert answer(await env.get(kiosk, "/api/v1/flakes/acme/tool")) == answer(
        await env.get(kiosk, "/api/v1/flakes/acme/ghost")
    )
    assert answer(await env.get(kiosk, "/api/v1/flakes/acme/tool/releases/0.1.0")) == answer(
        await env.get(kiosk, "/api/v1/flakes/acme/ghost/releases/0.1.0")
    )
    # It resolves its output, and only that one.
    r = await env.get(kiosk, f"/api/v1/flakes/acme/tool/releases/*/outputs/{OUTPUT}")
    assert r.status_code == 200 and r.json()["store_path"] == path_of(h["top"])
    other = await env.get(kiosk, "/api/v1/flakes/acme/tool/releases/*/outputs/packages.x.other")
    ghost = await env.get(kiosk, f"/api/v1/flakes/acme/ghost/releases/*/outputs/{OUTPUT}")
    assert answer(other) == answer(ghost) and other.status_code == 404
    # It writes nothing.
    async with env.flake.client(kiosk) as c:
        r = await c.put(f"/cache/acme/app/{new_hash()}.narinfo", content=b"x")
    assert r.status_code == 403

    reads = [e for e in env.flake.audit() if e["action"] == "deploy:read"]
    assert reads and all(
        (e["identity"], e["resource"], e["rule"], e["output"], e["store_path"], e["version"])
        == ("token:acme/kiosk", "acme/tool", "deploy-token", OUTPUT, path_of(h["top"]), "0.1.0")
        for e in reads
    )
    assert {e["path"] for e in reads} == {path_of(h[n]) for n in ("top", "a", "b", "c")}
    refused = [
        e
        for e in env.flake.audit()
        if e["identity"] == "token:acme/kiosk" and e["decision"] == "deny"
    ]
    assert any(e["object"] == f"{h['x']}.narinfo" and e["rule"] == "deploy-only" for e in refused)
    # A served read is one line (deploy:read), not a refusal and then a read.
    assert not {e["request_id"] for e in reads} & {e["request_id"] for e in refused}


async def test_the_exchanged_access_token_keeps_the_scope(deploy_env: DeployEnv) -> None:
    env = deploy_env
    h = await _closure(env)
    assert (await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(h["top"])})).status_code == 201
    r = await env.flake.exchange("token", env.tokens["kiosk"])
    assert r.status_code == 200, r.text
    access = r.json()["access_token"]
    status = (await env.get(access, "/api/v1/token/status")).json()
    assert status["attributes"]["deploy"] == [f"acme/tool#{OUTPUT}@*"]
    assert (await env.get(access, f"/cache/{h['a']}.narinfo")).status_code == 200
    assert answer(await env.get(access, f"/cache/{h['x']}.narinfo")) == answer(
        await env.get(access, f"/cache/{ABSENT}.narinfo")
    )
    assert (await env.get(access, "/f/acme/tool/0.1.0.tar.gz")).status_code == 404
    r = await env.get(access, f"/api/v1/flakes/acme/tool/releases/0.1.0/outputs/{OUTPUT}")
    assert r.status_code == 200


async def test_a_pinned_token_deploys_only_the_versions_it_names(deploy_env: DeployEnv) -> None:
    env = deploy_env
    old, new, shared = new_hash(), new_hash(), new_hash()
    await env.put("acme/app", shared)
    await env.put("acme/app", old, (shared,))
    await env.put("acme/app", new, (shared,))
    assert (await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(old)})).status_code == 201
    assert (await env.publish("acme/tool", "0.2.0", {OUTPUT: path_of(new)})).status_code == 201
    pinned, kiosk = env.tokens["pinned"], env.tokens["kiosk"]
    base = "/api/v1/flakes/acme/tool/releases"
    r = await env.get(pinned, f"{base}/*/outputs/{OUTPUT}")
    assert r.json()["version"] == "0.1.0" and r.json()["store_path"] == path_of(old)
    assert (await env.get(kiosk, f"{base}/*/outputs/{OUTPUT}")).json()["version"] == "0.2.0"
    hidden = await env.get(pinned, f"{base}/0.2.0/outputs/{OUTPUT}")
    assert answer(hidden) == answer(await env.get(pinned, f"{base}/7.0.0/outputs/{OUTPUT}"))
    assert answer(hidden) == answer(await env.get(pinned, f"{base}/0.2.*/outputs/{OUTPUT}"))
    assert hidden.status_code == 404
    for h, pinned_sees in ((old, True), (shared, True), (new, False)):
        assert (await env.get(pinned, f"/cache/{h}.narinfo")).status_code == (
            200 if pinned_sees else 404
        )
        assert (await env.get(kiosk, f"/cache/{h}.narinfo")).status_code == 200


async def test_deploy_read_by_policy_and_a_deny_over_a_grant(deploy_env: DeployEnv) -> None:
    env = deploy_env
    h = await _closure(env)
    assert (await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(h["top"])})).status_code == 201
    guest, blocked = env.tokens["guest"], env.tokens["blocked"]
    # other's guest token: deploy:read on acme/tool by a rule. It reads the closure in acme's
    # view (its own /cache/ is other's view), keeps reading what its org may read, no more.
    assert (await env.get(guest, f"/cache/acme/{h['a']}.narinfo")).status_code == 200
    assert (await env.get(guest, f"/cache/{h['a']}.narinfo")).status_code == 404
    assert (await env.get(guest, f"/cache/acme/{h['x']}.narinfo")).status_code == 404
    r = await env.get(guest, f"/api/v1/flakes/acme/tool/releases/0.1.0/outputs/{OUTPUT}")
    assert r.status_code == 200, r.text
    assert (await env.get(guest, "/f/acme/tool/0.1.0.tar.gz")).status_code == 404
    line = [e for e in env.flake.audit() if e["action"] == "deploy:read"][-1]
    assert (line["identity"], line["rule"]) == ("token:other/guest", "guest-deploys-tool")
    # The deny rule takes the blocked token's grant away: nothing at all.
    for path in (f"/cache/{h['top']}.narinfo", f"/cache/acme/{h['a']}.narinfo"):
        assert answer(await env.get(blocked, path)) == answer(
            await env.get(blocked, f"/cache/{ABSENT}.narinfo")
        )
    r = await env.get(blocked, f"/api/v1/flakes/acme/tool/releases/0.1.0/outputs/{OUTPUT}")
    assert r.status_code == 404


def test_token_create_checks_deploy_grants(deploy_env: DeployEnv) -> None:
    state = deploy_env.flake.state
    bad = [
        (("--deploy", "other/tool#out"), "a token of acme may only deploy flakes of acme"),
        (("--deploy", "acme/tool"), "expected ORG/FLAKE#OUTPUT[@CONSTRAINT]"),
        (("--deploy", "acme/t#o", "--deploy-version", "~~"), "deploy grant 'acme/t#o@~~'"),
        (("--deploy-version", "1.*"), "--deploy-version needs --deploy"),
        (("--attr", "deploy=acme/../x#out"), "expected ORG/FLAKE#OUTPUT"),
    ]
    for i, (args, message) in enumerate(bad):
        proc = state.cli(
            "token", "create", "--org", "acme", "--name", f"bad{i}", *args, check=False
        )
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
    token = deploy_token(
        state, "acme", "two", "--deploy", "acme/a#x", "--deploy", "acme/b#y@~1.2",
    )  # fmt: skip
    assert token.startswith("nixd_")
    listed = state.cli("token", "list", "--json").stdout
    assert '"deploy": ["acme/a#x@*", "acme/b#y@~1.2"]' in listed
    # policy explain says what the server decides for such an identity.
    who = ("--identity", "token:acme/two", "--attr", "org=acme", "--attr", "deploy=acme/a#x")
    proc = state.cli("policy", "explain", *who, "--action", "cache:read", "--resource", "acme/app",
                     check=False)  # fmt: skip
    assert proc.returncode == 2 and "deny cache:read on acme/app (rule deploy-only)" in proc.stdout


async def test_members_read_as_before(deploy_env: DeployEnv) -> None:
    """The deploy paths change nothing for a normal reader: a member still reads every
    path of its slices, the closure and the rest, and the flake itself."""
    env = deploy_env
    h = await _closure(env)
    assert (await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(h["top"])})).status_code == 201
    for name in ("top", "a", "b", "c", "x"):
        assert (await env.get(env.flake.member, f"/cache/{h[name]}.narinfo")).status_code == 200
    assert (await env.get(env.flake.member, "/f/acme/tool/0.1.0.tar.gz")).status_code == 200
    flake = env.flake.flakes.flake("acme", "tool")
    assert isinstance(flake, Flake) and flake.visibility == "private"


async def test_hostile_resolves_and_reference_graphs(deploy_env: DeployEnv) -> None:
    """Gigantic or malformed names, versions and attributes; cycles and self-references
    in uploaded narinfos; a closure past the walk's bound."""
    env = deploy_env
    a, b = new_hash(), new_hash()
    await env.put("acme/app", a, (a, b))  # a self-reference and a cycle a -> b -> a
    await env.put("acme/app", b, (a,))
    assert (await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(a)})).status_code == 201
    base = "/api/v1/flakes/acme/tool/releases"
    r = await env.get(env.flake.member, f"{base}/0.1.0/outputs/{OUTPUT}")
    assert r.status_code == 200 and r.json()["closure"]["paths"] == 2
    member, kiosk = env.flake.member, env.tokens["kiosk"]
    for attr in ("x" * 5000, "a%2Fb", "%2E%2E", "$(id)", 'a"b'):
        r = await env.get(member, f"{base}/0.1.0/outputs/{attr}")
        assert r.status_code in (400, 404), r.text
        assert len(r.content) < 400
        hidden = await env.get(kiosk, f"{base}/0.1.0/outputs/{attr}")
        ghost = await env.get(kiosk, f"/api/v1/flakes/acme/ghost/releases/0.1.0/outputs/{attr}")
        assert answer(hidden) == answer(ghost)
    for spec in ("9" * 400, "~~", ">=0.1 <1 " * 40):
        r = await env.get(member, f"{base}/{spec}/outputs/{OUTPUT}")
        assert r.status_code == 400, r.text
        hidden = await env.get(kiosk, f"{base}/{spec}/outputs/{OUTPUT}")
        assert hidden.status_code in (400, 404)
    for flake in ("acme/" + "x" * 300, "../acme/tool", "acme/tool%00"):
        r = await env.get(member, f"/api/v1/flakes/{flake}/releases/0.1.0/outputs/{OUTPUT}")
        assert r.status_code == 404
    # More paths than the walk takes: incomplete, and said so.
    chain = [new_hash() for _ in range(4)]
    for i in reversed(range(4)):
        await env.put("acme/app", chain[i], (chain[i + 1],) if i < 3 else ())
    walked = walk(env.flake.services.store, "acme", path_of(chain[0]), limit=2)
    assert walked.truncated and not walked.complete and len(walked.records) == 2
    assert walk(env.flake.services.store, "ACME", path_of(chain[0])).complete
