"""A release recording an output whose closure's lower half is only upstream: publishing
completes it from the slice's mirror first (as a CI job pushes what it built and
publishes at once), and refuses it — naming what is missing — only when no mirror the
slice may use has it."""

from __future__ import annotations

from pathlib import Path

from nixd.server.mirror.service import MirrorService
from tests.server.deployenv import OUTPUT, DeployEnv, deploy_env, new_hash, path_of
from tests.server.flakeenv import flake_env
from tests.server.mirrorenv import stand_in
from tests.server.test_mirror_hostile import Upstream, mirror

__all__ = ["deploy_env", "flake_env"]


async def test_publish_completes_an_output_from_the_mirror_before_deciding(
    deploy_env: DeployEnv, tmp_path: Path
) -> None:
    env = deploy_env
    services = env.flake.services
    store = services.store
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        low = up.publish("hello", b"the lower half, only upstream")
        services.mirror = MirrorService((mirror(s.url),), store, max_nar_size=64 << 20)
        try:
            top = new_hash()
            await env.put("acme/app", top, (low[:32],))
            r = await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(top)})
            assert r.status_code == 201, r.text
            app = store.project("acme", "app")
            assert app is not None and store.in_slice(app, low[:32]) is not None
            resolved = await env.get(
                env.flake.member, f"/api/v1/flakes/acme/tool/releases/0.1.0/outputs/{OUTPUT}"
            )
            assert resolved.json()["complete"] is True
            assert resolved.json()["closure"]["paths"] == 2

            # A reference no upstream has: refused, naming it, nothing published.
            ghost, top2 = new_hash(), new_hash()
            await env.put("acme/app", top2, (ghost,))
            r = await env.publish("acme/tool", "0.2.0", {OUTPUT: path_of(top2)})
            assert r.status_code == 409, r.text
            assert r.json()["missing"] == [path_of(ghost)]
            listed = await env.get(env.flake.member, "/api/v1/flakes/acme/tool")
            assert [x["version"] for x in listed.json()["releases"]] == ["0.1.0"]
        finally:
            await services.mirror.aclose()
            services.mirror = None


async def test_a_slice_no_mirror_lists_is_refused_without_asking_upstream(
    deploy_env: DeployEnv, tmp_path: Path
) -> None:
    env = deploy_env
    services = env.flake.services
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        low = up.publish("hello", b"only upstream")
        services.mirror = MirrorService((mirror(s.url),), services.store, max_nar_size=64 << 20)
        try:
            top = new_hash()
            await env.put("acme/lib", top, (low[:32],))  # acme/lib is not the mirror's
            r = await env.publish("acme/tool", "0.1.0", {OUTPUT: path_of(top)})
            assert r.status_code == 409, r.text
            assert r.json()["missing"] == [path_of(low[:32])]
            assert s.total == 0
        finally:
            await services.mirror.aclose()
            services.mirror = None
