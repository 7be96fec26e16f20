"""The deploy-only read path, property-tested: for a deploy token, the store paths answered
200 are exactly the closures (in the deploy view of the flake's organization) of the
outputs it may deploy, and every other path's answer is byte for byte a missing path's.

Each example is a random reference graph whose paths sit in random slices: acme's own
(private), ``other/pub`` (public, trusted by acme: in the view), ``other/app`` (private,
trusted: not in it), or nowhere. It is published as the next release of ``acme/prop``
with its root as output ``out`` (refused, naming the missing paths, if the closure is not
all in the view); the token ``prop`` may deploy ``out`` of every release, so what it may
read grows with each published example and never includes a refused one.
"""

from __future__ import annotations

import itertools

import httpx
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.deployenv import DeployEnv, answer, deploy_env, new_hash, path_of
from tests.server.flakeenv import flake_env

BOTH_BACKENDS = True
__all__ = ["deploy_env", "flake_env"]
ABSENT = "0" * 31 + "9"
ABSENT_NAR = "0" * 52
IN_VIEW = frozenset({"acme/app", "acme/lib", "other/pub"})
PLACES = st.sampled_from(["acme/app", "acme/lib", "other/pub", "other/app", "nowhere", "both"])
_versions = itertools.count(1)


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[str], list[list[int]]]:
    """Places of n paths and each one's references (to later paths only: a DAG)."""
    n = draw(st.integers(min_value=1, max_value=8))
    places = [draw(PLACES) for _ in range(n)]
    refs = [
        sorted(draw(st.sets(st.integers(min_value=i + 1, max_value=n - 1))) if i < n - 1 else [])
        for i in range(n)
    ]
    return places, refs


def _slices(place: str) -> list[str]:
    return {"nowhere": [], "both": ["acme/app", "other/app"]}.get(place, [place])


def expected(places: list[str], refs: list[list[int]]) -> tuple[set[int], set[int]]:
    """(readable, missing) nodes of the closure of node 0, walked as Nix would."""
    readable: set[int] = set()
    missing: set[int] = set()
    todo, seen = [0], {0}
    while todo:
        node = todo.pop()
        if not IN_VIEW.intersection(_slices(places[node])):
            missing.add(node)
            continue
        readable.add(node)
        for ref in refs[node]:
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return readable, missing


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(graph=graphs(), head=st.booleans(), view=st.sampled_from(["/cache/", "/cache/acme/"]))
def test_a_deploy_token_reads_exactly_its_closures(
    deploy_env: DeployEnv, graph: tuple[list[str], list[list[int]]], head: bool, view: str
) -> None:
    env = deploy_env
    places, refs = graph
    hashes = [new_hash() for _ in places]
    readable: set[str] = env.scratch.setdefault("readable", set())
    earlier: list[tuple[str, str | None]] = env.scratch.setdefault("earlier", [])
    token = env.tokens["prop"]
    method = "HEAD" if head else "GET"

    async def check() -> None:
        files: dict[str, str | None] = {}
        for i in reversed(range(len(places))):
            files[hashes[i]] = None
            for slice_ in _slices(places[i]):
                files[hashes[i]] = await env.put(
                    slice_, hashes[i], tuple(hashes[j] for j in refs[i])
                )
        reach, missing = expected(places, refs)
        version = f"0.0.{next(_versions)}"
        r = await env.publish(
            "acme/prop", version, {"out": path_of(hashes[0])}, files=version.encode()
        )
        if missing:
            assert r.status_code == 409, r.text
            assert r.json()["missing"] == sorted(path_of(hashes[i]) for i in missing)
        else:
            assert r.status_code == 201, r.text
            readable.update(hashes[i] for i in reach)
            url = f"/api/v1/flakes/acme/prop/releases/{version}/outputs/out"
            resolved = await env.get(token, url)
            assert resolved.status_code == 200, resolved.text
            assert resolved.json()["closure"]["paths"] == len(reach)
        async with env.flake.client(token) as c:
            absent = answer(await c.request(method, f"{view}{ABSENT}.narinfo"))
            absent_nar = answer(await c.request(method, f"{view}nar/{ABSENT_NAR}.nar.zst"))
            assert absent[0] == 404 and absent_nar[0] == 404
            for hash_part, file_hash in [*files.items(), *earlier[-16:]]:
                got = await c.request(method, f"{view}{hash_part}.narinfo")
                _same(got, hash_part in readable, absent, hash_part)
                if file_hash is not None:
                    nar = await c.request(method, f"{view}nar/{file_hash}.nar.zst")
                    # A NAR is readable when its path is (contents are unique per path here).
                    _same(nar, hash_part in readable, absent_nar, file_hash)
        earlier.extend(files.items())

    trio.run(check)


def _same(
    got: httpx.Response,
    readable: bool,
    absent: tuple[int, list[tuple[str, str]], bytes],
    what: str,
) -> None:
    if readable:
        assert got.status_code == 200, what
    else:
        assert answer(got) == absent, what
