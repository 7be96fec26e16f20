"""Pull-through and restarts with a real ``nixd-server serve`` and the real Nix.

- A stalled upstream answers readers 503, which Nix retries and does not remember: once
  the upstream is back, the same Nix (its negative cache at the default hour) gets the
  whole closure through pull-through.
- Concurrent readers of one missing path make one upstream fetch.
- A completion cut off by kill -9 is resumed from the database when the server starts.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import httpx

from tests.realnix import RealNix
from tests.server.conftest import ServerState
from tests.server.mirrorenv import make_upstream, stand_in
from tests.server.test_mirror_nix import add_mirror, status, upload_from_cache, wait_complete
from tests.server.test_nix_e2e import exchange, netrc
from tests.serverproc import start_server


def copy_from_cached(
    nix: RealNix, url: str, net: Path, key: str, dest: Path, path: str
) -> tuple[int, str]:
    """``nix copy --from`` with Nix's own negative caching left at its default (an hour)."""
    r = nix.run(
        ["nix", "copy", "--option", "netrc-file", str(net), "--option", "trusted-public-keys",
         key, "--from", url, path],
        store=dest, check=False,
    )  # fmt: skip
    return r.returncode, r.stderr.decode(errors="replace")


def test_a_stalled_upstream_never_poisons_nix_and_pull_through_serves_the_closure(
    server_state: ServerState, real_nix: RealNix, tmp_path: Path
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    cache = tmp_path / "upstream"
    top, paths, up_key = make_upstream(real_nix, cache, n=4, compression="zstd")
    with stand_in(cache) as upstream:
        add_mirror(state.path, upstream.url, up_key, pull_through=True, timeout=1.0)
        server = start_server(state.path)
        try:
            _, writer = state.token("acme", "ci", fast=True)
            key = httpx.get(f"{server.url}/api/v1/cache/keys").json()["current"]
            net = netrc(tmp_path / "n", server.port, exchange(server.url, writer))
            auth = {"authorization": f"Bearer {writer}"}
            top_hash = top.rsplit("/", maxsplit=1)[-1][:32]

            upstream.stall()
            r = httpx.get(f"{server.url}/cache/{top_hash}.narinfo", headers=auth, timeout=30)
            assert r.status_code == 503, r.text
            assert "upstream" in r.text
            code, err = copy_from_cached(real_nix, f"{server.url}/cache/", net, key,
                                         tmp_path / "d1", top)  # fmt: skip
            assert code != 0
            assert "503" in err, err
            upstream.unstall()

            dest = tmp_path / "d2"
            code, err = copy_from_cached(real_nix, f"{server.url}/cache/", net, key, dest, top)
            assert code == 0, err
            for p in paths:
                assert (
                    real_nix.real_path(p, dest).read_bytes() == real_nix.real_path(p).read_bytes()
                )
            # Stored in the slice the view pulled into, with provenance.
            assert status(state, "acme/app")["mirrored"] == 4
        finally:
            server.close()


def test_concurrent_readers_of_a_missing_path_make_one_upstream_fetch(
    server_state: ServerState, real_nix: RealNix, tmp_path: Path
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    cache = tmp_path / "upstream"
    top, _, up_key = make_upstream(real_nix, cache, n=2)
    with stand_in(cache) as upstream:
        add_mirror(state.path, upstream.url, up_key, pull_through=True, timeout=60.0)
        server = start_server(state.path)
        try:
            _, writer = state.token("acme", "ci", fast=True)
            top_hash = top.rsplit("/", maxsplit=1)[-1][:32]
            url = f"{server.url}/cache/acme/app/{top_hash}.narinfo"
            upstream.stall()  # every reader's request arrives while the first fetch waits

            def read() -> int:
                headers = {"authorization": f"Bearer {writer}"}
                return httpx.get(url, headers=headers, timeout=60).status_code

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                answers = [pool.submit(read) for _ in range(16)]
                deadline = time.monotonic() + 30
                while upstream.requests[f"/{top_hash}.narinfo"] == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                time.sleep(0.5)  # let the other readers' requests reach the server
                upstream.unstall()
                codes = [a.result() for a in answers]
            assert codes == [200] * 16
            assert upstream.requests[f"/{top_hash}.narinfo"] == 1
        finally:
            server.close()


def test_a_completion_cut_by_kill_resumes_when_the_server_starts(
    server_state: ServerState, real_nix: RealNix, tmp_path: Path
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    cache = tmp_path / "upstream"
    top, _, up_key = make_upstream(real_nix, cache, n=5)
    with stand_in(cache) as upstream:
        add_mirror(state.path, upstream.url, up_key, timeout=60.0)
        server = start_server(state.path)
        try:
            _, writer = state.token("acme", "ci", fast=True)
            upstream.stall()
            upload_from_cache(server.url, "acme/app", writer, cache, top)
            deadline = time.monotonic() + 30
            while upstream.total == 0:  # the completion is under way, waiting upstream
                assert time.monotonic() < deadline
                time.sleep(0.05)
            server.stop(signal.SIGKILL)
            assert status(state, "acme/app")["roots"] == {
                "pending": 1,
                "complete": 0,
                "incomplete": 0,
            }
            upstream.unstall()
            server.start()
            done = wait_complete(state, "acme/app")
            assert done["roots"] == {"pending": 0, "complete": 1, "incomplete": 0}
            assert done["mirrored"] == 4
        finally:
            server.close()


LIMITED = """
[[rule]]
id = "limited-not-secret"
effect = "deny"
subjects = [{ kind = "token", subject = "acme/limited" }]
actions = ["*"]
resources = ["acme/secret"]
"""


def test_pull_through_treats_a_hidden_path_exactly_as_an_absent_one(
    server_state: ServerState, real_nix: RealNix, tmp_path: Path
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    state.admin("project", "create", "acme/secret")  # no mirror lists it
    (state.path / "policy.toml").write_text((state.path / "policy.toml").read_text() + LIMITED)
    cache = tmp_path / "upstream"
    top, paths, up_key = make_upstream(real_nix, cache, n=2)
    dep = next(p for p in paths if p != top)
    hp = {p: p.rsplit("/", maxsplit=1)[-1][:32] for p in paths}
    with stand_in(cache) as upstream:
        add_mirror(state.path, upstream.url, up_key, pull_through=True)
        server = start_server(state.path)
        try:
            _, ci = state.token("acme", "ci", fast=True)
            _, limited = state.token("acme", "limited", fast=True)
            upload_from_cache(server.url, "acme/secret", ci, cache, top)
            upload_from_cache(server.url, "acme/secret", ci, cache, dep)
            (cache / f"{hp[dep]}.narinfo").unlink()  # only the hidden slice has it now
            before = upstream.total

            def get(token: str, hash_part: str) -> httpx.Response:
                return httpx.get(
                    f"{server.url}/cache/{hash_part}.narinfo",
                    headers={"authorization": f"Bearer {token}"},
                    timeout=30,
                )

            # A reader of acme/secret is answered from it; the upstream is not asked.
            assert get(ci, hp[dep]).status_code == 200
            assert upstream.total == before
            # A reader who may not see acme/secret: its miss is pulled as for any miss.
            hidden = get(limited, hp[dep])
            absent = get(limited, "0" * 32)
            assert hidden.status_code == absent.status_code == 404
            assert hidden.content == absent.content
            assert upstream.requests[f"/{hp[dep]}.narinfo"] == 1
            assert upstream.requests[f"/{'0' * 32}.narinfo"] == 1
            # Upstream has the other: pulled into acme/app, as if acme/secret were empty.
            r = get(limited, hp[top])
            assert r.status_code == 200, r.text
            assert status(state, "acme/app")["mirrored"] == 1
        finally:
            server.close()
