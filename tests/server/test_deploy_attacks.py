"""A deploy-only token against everything beside its closure: the granted paths under
another org's view or slice, logs, realisations; and deny rules on the flake's name in
another spelling than the one it was published under."""

from __future__ import annotations

from tests.server.deployenv import OUTPUT, DeployEnv, answer, deploy_env, new_hash, path_of
from tests.server.flakeenv import flake_env

__all__ = ["deploy_env", "flake_env"]


async def _published(env: DeployEnv, flake: str = "acme/tool") -> dict[str, str]:
    h = {"c": new_hash(), "top": new_hash()}
    files = {
        "c": await env.put("acme/lib", h["c"]),
        "top": await env.put("acme/app", h["top"], (h["c"],)),
    }
    r = await env.publish(flake, "0.1.0", {OUTPUT: path_of(h["top"])})
    assert r.status_code == 201, r.text
    return {**h, **{f"{k}.file": v for k, v in files.items()}}


async def test_granted_paths_only_where_they_are_served(deploy_env: DeployEnv) -> None:
    env = deploy_env
    kiosk = env.tokens["kiosk"]
    h = await _published(env)
    assert (await env.get(kiosk, f"/cache/{h['top']}.narinfo")).status_code == 200
    ghost = new_hash()
    for method in ("GET", "HEAD"):
        for there, absent in [
            (f"/cache/other/{h['top']}.narinfo", f"/cache/other/{ghost}.narinfo"),
            (f"/cache/other/app/{h['top']}.narinfo", f"/cache/other/app/{ghost}.narinfo"),
            (f"/cache/other/nar/{h['top.file']}.nar.zst", f"/cache/other/nar/{'0' * 52}.nar.zst"),
            (f"/cache/acme/lib/{h['top']}.narinfo", f"/cache/acme/lib/{ghost}.narinfo"),
            (f"/cache/log/{h['top']}-hello.drv", f"/cache/log/{ghost}-hello.drv"),
            (f"/cache/acme/log/{h['top']}-hello", f"/cache/acme/log/{ghost}-hello"),
            (
                f"/cache/realisations/sha256:{'1' * 64}!out.doi",
                f"/cache/realisations/sha256:{'2' * 64}!out.doi",
            ),
            (f"/cache/nar/{h['top.file']}.nar.xz", f"/cache/nar/{'0' * 52}.nar.xz"),
        ]:
            got, want = await env.get(kiosk, there, method), await env.get(kiosk, absent, method)
            assert got.status_code == 404 and answer(got) == answer(want), (there, got.text)


async def test_a_deploy_deny_holds_for_another_spelling(deploy_env: DeployEnv) -> None:
    """``blocked-kiosk`` denies ``deploy:read`` on ``acme/tool``; the flake published as
    ``acme/Tool`` is the same flake, so the deny holds (and the grant, which names it
    ignoring case, still serves the kiosk)."""
    env = deploy_env
    h = await _published(env, "acme/Tool")
    url = f"/api/v1/flakes/acme/tool/releases/0.1.0/outputs/{OUTPUT}"
    assert (await env.get(env.tokens["kiosk"], url)).status_code == 200
    assert (await env.get(env.tokens["kiosk"], f"/cache/{h['top']}.narinfo")).status_code == 200
    blocked = env.tokens["blocked"]
    assert (await env.get(blocked, url)).status_code == 404
    absent = await env.get(blocked, f"/cache/{new_hash()}.narinfo")
    assert answer(await env.get(blocked, f"/cache/{h['top']}.narinfo")) == answer(absent)
