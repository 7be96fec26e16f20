"""Two ``nixd-server serve`` instances on one PostgreSQL: one audit chain, one copy of each NAR.

The instances (their own state directories, one database, one blob directory: see
:func:`tests.server.test_pg_instances._twins`) answer many requests at once; the audit
table holds one contiguous chain of both instances' lines that ``nixd-server audit
verify`` accepts, even after one instance is killed with SIGKILL mid-append, and whose
export verifies as a file. The same uploads racing on both, by the real Nix and by raw
HTTP, end as one blob and one record, served by both.
"""

from __future__ import annotations

import collections
import json
import lzma
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import trio
import zstandard

from nixd.nix.narinfo import NarInfo
from nixd.server.access.audit import verify
from tests.realnix import RealNix
from tests.server.appenv import client_narinfo, make_nar
from tests.server.conftest import ServerState
from tests.server.test_nix_e2e import build_closure, closure, copy_from, copy_to, exchange, netrc
from tests.server.test_pg_instances import _twins
from tests.serverproc import running_server, start_server

PATHS = [f"{n:031d}2".replace("0", "c") for n in range(4)]


def _upload(url: str, token: str, tmp: Path, hash_part: str, content: bytes) -> None:
    nar = make_nar(tmp / hash_part, content)
    compressed = lzma.compress(nar)
    nar_url, text = client_narinfo(hash_part, nar, compressed)
    with httpx.Client(base_url=url, auth=("nixd", token), timeout=60) as c:
        assert c.put(f"/cache/acme/app/{nar_url}", content=compressed).status_code == 200
        r = c.put(f"/cache/acme/app/{hash_part}.narinfo", content=text.encode())
        assert r.status_code == 200, r.text


def _seqs(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [int(r[0]) for r in conn.execute("SELECT seq FROM audit_log ORDER BY seq")]


def _allowed_reads(text: str) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for raw in text.splitlines():
        line = json.loads(raw)
        if line["action"] == "cache:read" and line["decision"] == "allow":
            counts[line["object"]] += 1
    return counts


def _verified(state: ServerState, tmp_path: Path) -> str:
    """``audit verify`` (JSON) OK, ``audit export`` to a file that verifies; its text."""
    checked = state.cli("audit", "verify", "--json")
    result = json.loads(checked.stdout)
    assert result["ok"] and result["unit"] == "record", result
    out = tmp_path / "exported.log"
    state.cli("audit", "export", "--output", str(out))
    exported = verify(out)
    assert exported.ok, exported.describe()
    assert '"audit:damage"' not in out.read_text()  # no writer saw damage that was not there
    assert exported.lines >= result["lines"]  # appends may go on between the two
    return out.read_text()


async def _readers(urls: list[str], token: str, count: int, per_reader: int) -> list[str]:
    """``count`` concurrent readers spread over ``urls``; the paths each 200 was for."""
    acked: list[str] = []

    async def reader(n: int) -> None:
        async with httpx.AsyncClient(
            base_url=urls[n % len(urls)], auth=("nixd", token), timeout=60
        ) as c:
            for i in range(per_reader):
                path = PATHS[(n + i) % len(PATHS)]
                r = await c.get(f"/cache/{path}.narinfo")
                assert r.status_code == 200, r.text
                acked.append(f"{path}.narinfo")

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(reader, n)
    return acked


def test_many_requests_to_both_instances_make_one_chain(tmp_path: Path, pg_database: str) -> None:
    a, b = _twins(tmp_path, pg_database)
    a.admin("project", "create", "acme/app")
    _, token = a.token("acme", "ci", fast=True)
    # A runs two worker processes: three writers on one chain.
    with running_server(a.path, workers=2) as server_a, running_server(b.path) as server_b:
        for n, path in enumerate(PATHS):
            url = (server_a if n % 2 else server_b).url
            _upload(url, token, tmp_path, path, b"chained %d\n" % n)
        # Admin commands (more processes) append to the chain meanwhile.
        with ThreadPoolExecutor(max_workers=1) as pool:
            admin = pool.submit(
                lambda: [a.cli("project", "create", f"acme/p{n}") for n in range(3)]
            )
            acked = trio.run(_readers, [server_a.url, server_b.url], token, 16, 25)
            admin.result(timeout=300)
    assert len(acked) == 16 * 25
    seqs = _seqs(pg_database)
    assert seqs == list(range(1, len(seqs) + 1))
    text = _verified(a, tmp_path)
    assert _allowed_reads(text) == collections.Counter(acked)
    assert text.count('"admin:project.create"') == 4
    # B's view of the same chain is the same chain.
    assert json.loads(b.cli("audit", "verify", "--json").stdout)["lines"] == len(seqs)
    # Neither instance wrote an audit file: the database is the log.
    assert not (a.path / "audit.log").exists() and not (b.path / "audit.log").exists()


def test_kill_9_of_one_instance_mid_append_leaves_a_chain_that_verifies(
    tmp_path: Path, pg_database: str
) -> None:
    """Readers on both instances; A is killed while its lines are being committed. Every
    read either instance acknowledged has its line, and the chain verifies."""
    a, b = _twins(tmp_path, pg_database)
    a.admin("project", "create", "acme/app")
    _, token = a.token("acme", "ci", fast=True)
    server_a = start_server(a.path)
    try:
        with running_server(b.path) as server_b:
            for n, path in enumerate(PATHS):
                _upload(server_b.url, token, tmp_path, path, b"killed %d\n" % n)
            acked: list[str] = []
            goal: list[tuple[int, trio.Event]] = []

            async def reached(count: int) -> None:
                """Wait until ``count`` reads were acknowledged (by the readers' progress)."""
                event = trio.Event()
                goal.append((count, event))
                await event.wait()

            async def reader(url: str, n: int) -> None:
                async with httpx.AsyncClient(base_url=url, auth=("nixd", token)) as c:
                    for i in range(10**6):
                        path = f"{PATHS[(n + i) % len(PATHS)]}.narinfo"
                        try:
                            r = await c.get(f"/cache/{path}", timeout=30)
                        except httpx.TransportError:
                            return  # A is gone
                        if r.status_code == 200:
                            acked.append(path)
                            for count, event in goal:
                                if len(acked) >= count:
                                    event.set()

            async def main() -> None:
                async with trio.open_nursery() as nursery:
                    for n in range(6):
                        nursery.start_soon(reader, server_a.url, n)
                    await reached(300)
                    server_a.kill()
                    await reached(len(acked) + 100)
                    nursery.cancel_scope.cancel()

            async def with_b() -> None:
                async with trio.open_nursery() as nursery:
                    for n in range(4):
                        nursery.start_soon(reader, server_b.url, n)
                    with trio.fail_after(300):  # hang guard only
                        await main()
                    nursery.cancel_scope.cancel()

            trio.run(with_b)
            # B goes on appending after A's death.
            assert httpx.get(
                f"{server_b.url}/cache/{PATHS[0]}.narinfo", auth=("nixd", token)
            ).is_success
    finally:
        server_a.close()
    seqs = _seqs(pg_database)
    assert seqs == list(range(1, len(seqs) + 1))
    logged = _allowed_reads(_verified(a, tmp_path))
    missing = collections.Counter(acked) - logged
    assert not missing, f"acknowledged reads without their audit line: {missing}"


def _stored(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        nars = conn.execute("SELECT count(*) FROM nars").fetchone()
        records = conn.execute(
            "SELECT count(*), count(DISTINCT (project_id, hash_part)) FROM slice_records"
        ).fetchone()
    assert nars is not None and records is not None
    assert records[0] == records[1]  # one record per (slice, path)
    return int(nars[0]), int(records[0])


def test_nix_copies_of_one_closure_to_both_at_once_end_as_one(
    tmp_path: Path, pg_database: str, real_nix: RealNix
) -> None:
    a, b = _twins(tmp_path, pg_database)
    a.admin("project", "create", "acme/app")
    _, writer = a.token("acme", "ci", fast=True)
    net = netrc(tmp_path / "netrc-w", 0, writer)
    with running_server(a.path) as server_a, running_server(b.path) as server_b:
        top = build_closure(real_nix)
        paths = closure(real_nix, top)
        with ThreadPoolExecutor(max_workers=2) as pool:
            copies = list(
                pool.map(
                    lambda url: copy_to(real_nix, f"{url}/cache/acme/app", net, top),
                    [server_a.url, server_b.url],
                )
            )
        for up in copies:
            assert up.returncode == 0, up.stderr
        assert _stored(pg_database) == (len(paths), len(paths))
        assert len(list((a.path / "blobs").glob("*/*.nar.zst"))) == len(paths)
        assert not list((a.path / "blobs" / "tmp").iterdir())
        for name, server in (("a", server_a), ("b", server_b)):
            access = exchange(server.url, writer)
            dest = tmp_path / f"dest-{name}"
            down = copy_from(
                real_nix,
                f"{server.url}/cache/",
                netrc(tmp_path / f"netrc-{name}", 0, access),
                a.public_key,
                dest,
                top,
            )
            assert down.returncode == 0, down.stderr
            for p in paths:
                assert (
                    real_nix.real_path(p, dest).read_bytes() == real_nix.real_path(p).read_bytes()
                )
    _verified(a, tmp_path)


def test_the_same_nar_and_narinfo_put_many_times_at_once_to_both(
    tmp_path: Path, pg_database: str
) -> None:
    """16 clients, half on each instance, each PUT the same NAR and then the same narinfo,
    all at once, for each of three paths: every PUT is a 200, and there is one blob, one
    NAR record and one slice record per path, which both instances serve."""
    a, b = _twins(tmp_path, pg_database)
    a.admin("project", "create", "acme/app")
    _, member = a.token("acme", "ci", fast=True)
    clients = 16
    uploads = []
    for n in range(3):
        nar = make_nar(tmp_path / f"nar{n}", f"raced many times {n}\n".encode() * 5000)
        compressed = lzma.compress(nar)
        hash_part = f"{n:031d}3".replace("0", "d")
        uploads.append((hash_part, nar, compressed, *client_narinfo(hash_part, nar, compressed)))
    with running_server(a.path) as server_a, running_server(b.path) as server_b:
        bases = [server_a.url, server_b.url]

        async def client(n: int, hash_part: str, compressed: bytes, url: str, text: str) -> None:
            async with httpx.AsyncClient(
                base_url=bases[n % 2], auth=("nixd", member), timeout=120
            ) as c:
                r = await c.put(f"/cache/acme/app/{url}", content=compressed)
                assert r.status_code == 200, (n, r.status_code, r.text)
                r = await c.put(f"/cache/acme/app/{hash_part}.narinfo", content=text.encode())
                assert r.status_code == 200, (n, r.status_code, r.text)

        async def race() -> None:
            async with trio.open_nursery() as nursery:
                for hash_part, _, compressed, url, text in uploads:
                    for n in range(clients):
                        nursery.start_soon(client, n, hash_part, compressed, url, text)

        trio.run(race)
        assert _stored(pg_database) == (len(uploads), len(uploads))
        assert len(list((a.path / "blobs").glob("*/*.nar.zst"))) == len(uploads)
        assert not list((a.path / "blobs" / "tmp").iterdir())
        for base in bases:
            for hash_part, nar, *_ in uploads:
                got = httpx.get(f"{base}/cache/{hash_part}.narinfo", auth=("nixd", member))
                assert got.status_code == 200, got.text
                served = NarInfo.parse(got.text)
                body = httpx.get(f"{base}/cache/{served.url}", auth=("nixd", member)).content
                assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == nar
    _verified(a, tmp_path)
