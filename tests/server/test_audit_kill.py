"""No acknowledged read is missing from the audit log, even after ``kill -9`` of the server.

The real ``nixd-server serve`` process (default configuration: ``audit.durable_reads``)
answers concurrent narinfo reads over loopback; it is killed with SIGKILL while requests
are in flight, and every read that got its 200 before the kill must have its allowed
``cache:read`` line in the log (counted per path), the chain intact.
"""

from __future__ import annotations

import collections
import json
import lzma
import os
import signal
from pathlib import Path

import httpx
import trio

from nixd.server.access.audit import verify
from tests.server.appenv import client_narinfo, make_nar
from tests.server.conftest import ServerState
from tests.serverproc import start_server

PATHS = [f"{n:031d}1".replace("0", "a") for n in range(6)]


def _allowed_reads(path: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a torn tail: never acknowledged
            line = json.loads(raw)
            if line["action"] == "cache:read" and line["decision"] == "allow":
                counts[line["object"]] += 1
    return counts


def test_kill_9_loses_no_acknowledged_read(server_state: ServerState, tmp_path: Path) -> None:
    server_state.admin("project", "create", "acme/app")
    _, writer = server_state.token("acme", "ci", fast=True)
    server = start_server(server_state.path, log_path=tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=server.url, auth=("nixd", writer)) as c:
            for n, hash_part in enumerate(PATHS):
                nar = make_nar(tmp_path / hash_part, b"content %d\n" % n)
                compressed = lzma.compress(nar)
                url, text = client_narinfo(hash_part, nar, compressed)
                assert c.put(f"/cache/acme/app/{url}", content=compressed).status_code == 200
                r = c.put(f"/cache/acme/app/{hash_part}.narinfo", content=text.encode())
                assert r.status_code == 200, r.text
        acked: collections.Counter[str] = collections.Counter()
        killed: list[bool] = []

        async def reader(worker: int) -> None:
            async with httpx.AsyncClient(base_url=server.url, auth=("nixd", writer)) as c:
                for i in range(10**6):
                    name = f"{PATHS[(worker + i) % len(PATHS)]}.narinfo"
                    try:
                        r = await c.get(f"/cache/{name}")
                    except httpx.HTTPError:
                        return  # the server is gone: this one was never answered
                    assert r.status_code == 200, r.text
                    acked[name] += 1
                    if sum(acked.values()) >= 1500 and not killed:
                        # Right after an answer, with others in flight: nothing gets later.
                        killed.append(True)
                        assert server.proc is not None
                        os.kill(server.proc.pid, signal.SIGKILL)

        async def main() -> None:
            # The readers end when the server is gone (one of them kills it).
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for worker in range(12):
                        nursery.start_soon(reader, worker)

        trio.run(main)
        assert server.proc is not None
        assert server.proc.wait(30) == -signal.SIGKILL
    finally:
        server.kill()
    log_path = server_state.path / "audit.log"
    written = _allowed_reads(log_path)
    missing = {name: n - written[name] for name, n in acked.items() if n > written[name]}
    assert not missing, f"acknowledged reads without their audit line: {missing}"
    result = verify(log_path)
    assert result.ok, result.describe()
