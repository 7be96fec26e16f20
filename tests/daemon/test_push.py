"""The daemon's pusher without processes: Nix's records, the queue file, the upstream
filter, the push config, and the retry policy of one request (against MockTransport)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from nixd.auth.model import AccessToken
from nixd.daemon.config import Config, ConfigError, parse_config
from nixd.daemon.push import (
    PathRecord,
    Pusher,
    PushError,
    _signed_upstream,
    check_paths,
    enqueue,
    parse_path_info,
    read_queue,
    take_queue,
    upstream_filter_keys,
)
from nixd.nix.signing import SecretKey
from tests.realnix import RealNix
from tests.server.appenv import Env
from tests.server.conftest import blobs, database, env, metadata, server_state  # noqa: F401 - fixtures

# `nix path-info --json --sigs --recursive` of Nix 2.8, copied from a real run
PATH_INFO = json.loads(
    '[{"path":"/nix/store/sh1nri3g62i0yddx21w05jzxqjf1zaxs-lt",'
    '"narHash":"sha256-2PNF8sp6JG1nf+S+xUt53bVOl8AqrJ5Fpp7GmMcXdFw=","narSize":120,'
    '"references":[],"deriver":"/nix/store/xk2fjw02gf00vv2cg3jl6cr36qdpfgc3-lt.drv",'
    '"registrationTime":1796176534,"ultimate":true},'
    '{"path":"/nix/store/zspbmfifc9j7nvpqj1ichh7vismvxvzc-f.txt",'
    '"narHash":"sha256-WKLAMqtrTrbkS0k8r+udt44bp1MyfzPr3fYqDbHBLeY=","narSize":136,'
    '"references":[],"ca":"fixed:r:sha256:1ridq6qhsapnvpmk6zrjafkip3mpkpmsyg299gjbckkbmcrc18jq",'
    '"registrationTime":1796176263}]'
)
LT = "/nix/store/sh1nri3g62i0yddx21w05jzxqjf1zaxs-lt"


def test_path_info_records() -> None:
    lt, f = parse_path_info(PATH_INFO)
    assert lt.path == LT and lt.nar_size == 120 and lt.references == ()
    assert lt.deriver == "/nix/store/xk2fjw02gf00vv2cg3jl6cr36qdpfgc3-lt.drv"
    assert f.ca is not None and f.ca.startswith("fixed:r:sha256:")
    info = lt.narinfo("nar/x.nar.zst", "zstd")
    assert info.nar_hash == lt.nar_hash and info.store_path.path() == LT
    with pytest.raises(PushError):
        parse_path_info([{"path": "/tmp/x", "narHash": "sha256-x", "narSize": 1}])
    with pytest.raises(PushError):
        parse_path_info({"not": "a list"})


def test_request_paths_are_checked() -> None:
    assert check_paths([LT, LT + "/"]) == [LT]
    for bad in ([], ["/tmp/x"], [LT + "/bin/sh"], ["/nix/store/" + "e" * 32 + "-x"], [1]):
        with pytest.raises(PushError):
            check_paths(bad)


def test_upstream_filter_verifies_the_signature(tmp_path: Path) -> None:
    upstream, other = SecretKey.generate("upstream-1"), SecretKey.generate("upstream-1")
    (record,) = parse_path_info(PATH_INFO[:1])
    signed = record.narinfo("nar/x", "none").signed(upstream)
    forged = record.narinfo("nar/x", "none").signed(other)  # same key name, other key
    keys = (upstream.public(),)
    assert _signed_upstream(_with_sigs(record, signed.sigs), keys)
    assert not _signed_upstream(_with_sigs(record, forged.sigs), keys)
    assert not _signed_upstream(record, keys)
    config = parse_config(
        {
            "push": {"upstream_keys": [upstream.public().render()]},
            "proxy": {
                "upstreams": [
                    {"url": "https://cache.example", "trusted_keys": [other.public().render()]}
                ]
            },
        }
    )
    assert {k.render() for k in upstream_filter_keys(config)} == {
        upstream.public().render(),
        other.public().render(),
    }


def _with_sigs(record: PathRecord, sigs: tuple[str, ...]) -> PathRecord:
    return PathRecord(
        record.path, record.nar_hash, record.nar_size, record.references, record.deriver,
        record.ca, sigs,
    )  # fmt: skip


def test_push_config() -> None:
    c = parse_config({"push": {"to": "acme/app", "compression": "xz", "jobs": 8}})
    assert (c.push.to, c.push.compression, c.push.jobs) == ("acme/app", "xz", 8)
    assert Config().push.to is None
    for bad in (
        {"to": "acme"},
        {"to": "a/b/c"},
        {"compression": "br"},
        {"jobs": 0},
        {"store": "relative"},
        {"nope": 1},
    ):
        with pytest.raises(ConfigError, match=r"push\."):
            parse_config({"push": bad})


def test_queue_entries_survive_a_drain_in_between(tmp_path: Path) -> None:
    queue = tmp_path / "push-queue"
    assert take_queue(queue) == []
    enqueue(queue, [LT], None)
    taken = take_queue(queue)
    assert len(taken) == 1 and not queue.exists()
    enqueue(queue, [LT], "acme/lib")  # after the rename: a new file, not the taken one
    with taken[0].open("ab") as f:
        f.write(b"not json\n" + json.dumps({"paths": ["/tmp/evil"]}).encode() + b"\n")
    entries = read_queue(taken[0])
    assert [e["paths"] for e in entries] == [[LT]]
    # a crash before the taken file was deleted: it is found again with the new one
    again = take_queue(queue)
    assert taken[0] in again and len(again) == 2
    assert read_queue(again[-1])[0]["to"] == "acme/lib"
    assert oct(os.stat(again[-1]).st_mode & 0o777) == "0o600"


class _Host:
    def __init__(self, handler: Any, state_dir: Path) -> None:
        self.config = parse_config(
            {"daemon": {"state_dir": str(state_dir)}, "push": {"to": "acme/app", "retries": 3}}
        )
        self.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        self.refreshed = 0

    @property
    def push_server(self) -> str | None:
        return "http://cache.test"

    @property
    def push_tokens(self) -> _Host:
        return self

    async def get(self) -> AccessToken:
        return AccessToken(f"token-{self.refreshed}", expires_at=2e9, identity="token:acme/ci")

    async def refresh(self, stale: Any) -> AccessToken:
        self.refreshed += 1
        return await self.get()


async def test_requests_retry_transient_failures_and_renew_once(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    seen: list[tuple[str, str]] = []
    answers = [503, 429, 200]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers["authorization"]))
        if request.url.path == "/flaky":
            return httpx.Response(answers.pop(0))
        if request.url.path == "/renew":
            ok = request.headers["authorization"] == "Bearer token-1"
            return httpx.Response(200 if ok else 401)
        if request.url.path == "/down":
            raise httpx.ConnectError("refused")
        return httpx.Response(403, text="token:acme/ci may not upload to acme/app")

    host = _Host(handler, tmp_path)
    pusher = Pusher(host)  # type: ignore[arg-type]
    assert (await pusher._request("GET", "http://cache.test/flaky")).status_code == 200
    assert len(seen) == 3
    assert (await pusher._request("GET", "http://cache.test/renew")).status_code == 200
    assert host.refreshed == 1
    with pytest.raises(PushError, match="may not upload"):
        await pusher._request("PUT", "http://cache.test/forbidden")
    assert sum(1 for p, _ in seen if p == "/forbidden") == 1  # a 4xx is not retried
    with pytest.raises(PushError, match="after 3 attempts"):
        await pusher._request("GET", "http://cache.test/down")
    await host.http.aclose()


async def test_a_bad_request_is_refused_before_any_work(tmp_path: Path) -> None:
    host = _Host(lambda r: httpx.Response(500), tmp_path)
    pusher = Pusher(host)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(pusher.run)
        for body in ({"paths": ["/tmp/x"]}, {"paths": [LT], "to": "not-a-slice"}, "junk"):
            with pytest.raises(Exception, match=r"Nix store|ORG/PROJECT|JSON object") as info:
                await pusher.api_push(None, body)
            assert getattr(info.value, "status", None) == 400
        nursery.cancel_scope.cancel()
    await host.http.aclose()


def app_host(app_env: Env, token: str, state: Path, compression: str, nix: RealNix) -> Any:
    """A daemon stand-in that pushes to the server app in-process with ``token``."""

    class Host:
        config = parse_config(
            {
                "daemon": {"state_dir": str(state)},
                "push": {"compression": compression, "store": str(nix.store)},
            }
        )
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app_env.app))
        push_server = "http://cache"

        @property
        def push_tokens(self) -> Host:
            return self

        async def get(self) -> AccessToken:
            return AccessToken(token, expires_at=2e9, identity="token:acme/x")

        async def refresh(self, stale: Any) -> AccessToken:
            return await self.get()

    return Host()


@pytest.mark.parametrize("compression", ["zstd", "xz", "none"])
async def test_push_each_compression_into_the_app(
    env: Env,  # noqa: F811 - the fixture imported above
    real_nix: RealNix,
    tmp_path: Path,
    compression: str,
) -> None:
    """The whole job against the server app in-process: closure from the real Nix,
    NAR (spooled, or streamed for ``none``) and narinfo accepted, then skipped as present."""
    top = real_nix.build(
        f'derivation {{ name = "push-{compression}"; system = builtins.currentSystem; '
        f'builder = "/bin/sh"; args = [ "-c" "echo {os.urandom(4).hex()} > $out" ]; }}'
    )

    (tmp_path / "state").mkdir()
    host = app_host(env, env.member, tmp_path / "state", compression, real_nix)
    pusher = Pusher(host)  # type: ignore[arg-type]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(pusher.run)
            job = pusher.submit([top], "acme/app")
            await job.finished.wait()
            assert (job.state, job.pushed, job.failed) == ("done", 1, 0), job.summary()
            again = pusher.submit([top], "acme/app")
            await again.finished.wait()
            assert (again.present, again.pushed) == (1, 0), again.summary()
            nursery.cancel_scope.cancel()
    async with env.client(auth=env.member) as c:
        r = await c.get(f"/cache/acme/app/{Path(top).name[:32]}.narinfo")
        assert r.status_code == 200, r.text
    assert not list((tmp_path / "state" / "push-tmp").iterdir())  # spool files removed
    await host.http.aclose()


async def test_a_failed_queued_push_is_kept_for_later(tmp_path: Path) -> None:
    """The queue is durable: a push from it that fails leaves the entry for a retry."""
    state = tmp_path / "state"
    state.mkdir()
    host = _Host(lambda r: httpx.Response(503), state)
    host.config = parse_config(
        {"daemon": {"state_dir": str(state)}, "push": {"to": "acme/app", "store": str(tmp_path)}}
    )
    pusher = Pusher(host)  # type: ignore[arg-type]
    enqueue(host.config.push_queue, [LT], None)
    # The store made once before two jobs may run nix-store on it at the same moment:
    # Nix's first-use set-up of a fresh chroot store is not safe against itself.
    await trio.run_process(["nix-store", "--store", str(tmp_path), "--init"])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pusher.run)
            # the pusher's own drain may have taken it first: drain until a job ran
            jobs = []
            while not jobs and not pusher.jobs:
                jobs = await pusher.drain_once()
                await trio.sleep(0.05)
            for job in [*jobs, *pusher.jobs.values()]:
                await job.finished.wait()
                assert job.state == "failed" and "not valid" in str(job.error)
            await trio.sleep(0.2)
            taken = list(state.glob("push-queue.*.taken"))
            assert len(taken) == 1, "the failed batch was dropped"
            assert await pusher.drain_once() == []  # backing off: not tried again at once
            nursery.cancel_scope.cancel()
    await host.http.aclose()


async def test_a_refused_identity_ends_the_job(
    env: Env,  # noqa: F811 - the fixture imported above
    real_nix: RealNix,
    tmp_path: Path,
) -> None:
    top = real_nix.build(
        'let mk = n: derivation { name = n; system = builtins.currentSystem; builder = "/bin/sh";'
        f' args = [ "-c" "echo {os.urandom(4).hex()} > $out" ]; }}; a = mk "a";'
        ' in derivation { name = "b"; system = builtins.currentSystem; builder = "/bin/sh";'
        ' args = [ "-c" "echo ${a} > $out" ]; }'
    )
    (tmp_path / "state").mkdir()
    host = app_host(env, env.reader, tmp_path / "state", "zstd", real_nix)
    pusher = Pusher(host)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(pusher.run)
            job = pusher.submit([top], "acme/app")
            await job.finished.wait()
            nursery.cancel_scope.cancel()
    summary = job.summary()
    assert summary["state"] == "failed" and summary["failed"] == summary["total"] == 2
    assert "may not upload to acme/app" in str(summary["error"]), summary
    await host.http.aclose()
