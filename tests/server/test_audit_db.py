"""The audit log in PostgreSQL: one chain, batched appends, tamper evidence, export, outages.

Real PostgreSQL (the session's throwaway cluster, a fresh database per test). Several
:class:`DatabaseAuditLog` objects on one database stand for several server instances;
each has its own connection, as each instance does.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import trio

from nixd.server.access.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    event_body,
    line_hash,
    line_of,
    verify,
)
from nixd.server.access.audit_db import DatabaseAuditLog, export_file, verify_database
from tests.pgcluster import PgCluster
from tests.server.appenv import HASH_A, HASH_B, Env, client_narinfo, make_nar, upload


def _event(n: int) -> dict[str, object]:
    return {
        "request_id": f"r{n}",
        "identity": "token:acme/ci",
        "action": "cache:read",
        "resource": "acme/app",
        "decision": "allow",
        "rule": "acme-members",
        "source": "127.0.0.1",
        "object": f"{n:032d}.narinfo",
    }


def _rows(url: str) -> list[tuple[int, str, str, str]]:
    with psycopg.connect(url) as conn:
        return [
            (int(s), p, h, b)
            for s, p, h, b in conn.execute(
                "SELECT seq, prev, hash, body FROM audit_log ORDER BY seq"
            )
        ]


def _sql(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _filled(url: str, count: int) -> None:
    with DatabaseAuditLog(url) as audit:
        for n in range(count):
            audit.record(_event(n))


def test_records_chain_like_the_file_and_export_verifies(pg_database: str, tmp_path: Path) -> None:
    clock = iter(float(1_700_000_000 + n) for n in range(100))
    with DatabaseAuditLog(pg_database, clock=lambda: next(clock)) as audit:
        for n in range(5):
            audit.record(_event(n))
    clock = iter(float(1_700_000_000 + n) for n in range(100))
    with AuditLog(tmp_path / "file.log", clock=lambda: next(clock)) as file_log:
        for n in range(5):
            file_log.record(_event(n))
    rows = _rows(pg_database)
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    prev = GENESIS
    for seq, row_prev, digest, body in rows:
        assert row_prev == prev
        assert digest == line_hash(line_of(seq, body, row_prev))
        prev = digest
    result = verify_database(pg_database)
    assert result.ok, result.describe()
    assert result.lines == 5
    assert export_file(pg_database, tmp_path / "export.log").ok
    # The same events at the same times make the same bytes in the file and the export.
    assert (tmp_path / "export.log").read_bytes() == (tmp_path / "file.log").read_bytes()
    exported = verify(tmp_path / "export.log")
    assert exported.ok and exported.lines == 5, exported.describe()
    assert "reaches its recorded head (line 5)" in exported.head


def test_two_instances_appending_at_once_keep_one_chain(pg_database: str) -> None:
    """Two logs (instances) with threads calling record() and trio tasks calling
    arecord() at once: every line lands once, seqs are contiguous, the chain verifies."""
    logs = [DatabaseAuditLog(pg_database), DatabaseAuditLog(pg_database)]
    per_thread, threads_per_log, tasks, per_task = 40, 2, 16, 10

    def writer(log: DatabaseAuditLog, offset: int) -> None:
        for n in range(per_thread):
            log.record(_event(offset + n))

    async def trio_side(log: DatabaseAuditLog, offset: int) -> None:
        async def task(t: int) -> None:
            for n in range(per_task):
                await log.arecord_body(
                    event_body(
                        log.now(),
                        f"t{offset}-{t}-{n}",
                        identity="token:acme/ci",
                        action="cache:read",
                        resource="acme/app",
                        decision="allow",
                        rule="r",
                        source="127.0.0.1",
                        object=f"{t}/{n}",
                    )
                )

        async with trio.open_nursery() as nursery:
            for t in range(tasks):
                nursery.start_soon(task, t)

    threads = [
        threading.Thread(target=writer, args=(log, 1000 * i + 100 * k))
        for i, log in enumerate(logs)
        for k in range(threads_per_log)
    ]
    threads += [
        threading.Thread(target=trio.run, args=(trio_side, log, i)) for i, log in enumerate(logs)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
            assert not t.is_alive()
    finally:
        for log in logs:
            log.close()
    total = len(logs) * (threads_per_log * per_thread + tasks * per_task)
    rows = _rows(pg_database)
    assert [r[0] for r in rows] == list(range(1, total + 1))
    result = verify_database(pg_database)
    assert result.ok and result.lines == total, result.describe()
    # The trio side shared commits: fewer batches than its lines.
    assert sum(log.batches for log in logs) < total


@pytest.mark.parametrize(
    ("tamper", "first_bad", "words"),
    [
        (["UPDATE audit_log SET body = replace(body, 'allow', 'deny') WHERE seq = 3"], 3,
         "no longer hashes"),
        (["DELETE FROM audit_log WHERE seq = 3"], 3, "record 3 was removed"),
        (["DELETE FROM audit_log WHERE seq IN (3, 4)"], 3, "records 3..4 were removed"),
        (["DELETE FROM audit_log WHERE seq >= 5"], 5, "truncated: 2 record(s) after record 4"),
        (["UPDATE audit_log SET seq = seq + 1000 WHERE seq IN (3, 4)",
          "UPDATE audit_log SET seq = 4 WHERE seq = 1003",
          "UPDATE audit_log SET seq = 3 WHERE seq = 1004"], 3, "rows were reordered"),
        (["UPDATE audit_log SET body = replace(body, 'allow', 'deny') WHERE seq = 6"], 6,
         "no longer hashes"),
        (["UPDATE audit_head SET hash = 'f00d'"], 6, "does not match audit_head"),
    ],
)  # fmt: skip
def test_tampering_is_detected_and_named(
    pg_database: str, tamper: list[str], first_bad: int, words: str
) -> None:
    _filled(pg_database, 6)
    assert verify_database(pg_database).ok
    _sql(pg_database, *tamper)
    result = verify_database(pg_database)
    assert not result.ok
    assert result.first_bad == first_bad, result.describe()
    assert words in (result.problem or ""), result.describe()
    assert f"record {first_bad}: " in result.describe()


@pytest.mark.parametrize(
    ("seq", "words"),
    [(2, "does not match the prev recorded in record 3"), (4, "does not match audit_head")],
)
def test_an_edit_that_rewrites_the_hash_too_is_caught_by_the_next_link(
    pg_database: str, seq: int, words: str
) -> None:
    _filled(pg_database, 4)
    _, prev, _, body = _rows(pg_database)[seq - 1]
    forged = body.replace("allow", "deny")
    digest = line_hash(line_of(seq, forged, prev))
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(
            "UPDATE audit_log SET body = %s, hash = %s WHERE seq = %s", (forged, digest, seq)
        )
    result = verify_database(pg_database)
    assert (result.ok, result.first_bad) == (False, seq), result.describe()
    assert words in (result.problem or "")


def test_a_well_chained_row_added_behind_the_logs_back_is_caught_by_the_head(
    pg_database: str,
) -> None:
    _filled(pg_database, 3)
    _, _, last, body = _rows(pg_database)[-1]
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO audit_log VALUES (4, %s, %s, %s)",
            (last, line_hash(line_of(4, body, last)), body),
        )
    result = verify_database(pg_database)
    assert (result.ok, result.first_bad) == (False, 4), result.describe()
    assert "added outside the log" in (result.problem or "")


def test_a_damaged_log_is_extended_from_its_head_and_says_so(pg_database: str) -> None:
    """Rows cut off the end: the next writer keeps the gap (evidence) and records it."""
    _filled(pg_database, 5)
    _sql(pg_database, "DELETE FROM audit_log WHERE seq >= 4")
    with DatabaseAuditLog(pg_database) as audit:
        audit.record(_event(99))
    rows = _rows(pg_database)
    assert [r[0] for r in rows] == [1, 2, 3, 6, 7]
    assert '"action":"audit:damage"' in rows[3][3]
    assert "ends at record 3 but audit_head records 5" in rows[3][3]
    result = verify_database(pg_database)
    assert (result.ok, result.first_bad) == (False, 4)
    assert "records 4..5 were removed" in (result.problem or "")


def test_export_of_a_broken_chain_writes_every_row_and_says_where(
    pg_database: str, tmp_path: Path
) -> None:
    _filled(pg_database, 5)
    _sql(pg_database, "DELETE FROM audit_log WHERE seq = 2")
    out = tmp_path / "export.log"
    result = export_file(pg_database, out)
    assert (result.ok, result.first_bad) == (False, 2)
    assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == [1, 3, 4, 5]
    assert not Path(f"{out}.head").exists()
    file_result = verify(out)
    assert (file_result.ok, file_result.first_bad) == (False, 2), file_result.describe()


def _terminate(cluster: PgCluster, url: str) -> None:
    dbname = urlsplit(url).path.lstrip("/")
    cluster.admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{dbname}' AND pid <> pg_backend_pid()"
    )


def test_a_lost_connection_costs_nothing_and_an_outage_refuses_then_recovers(
    pg_database: str, pg_cluster: PgCluster
) -> None:
    dbname = urlsplit(pg_database).path.lstrip("/")
    with DatabaseAuditLog(pg_database) as audit:
        audit.record(_event(1))
        _terminate(pg_cluster, pg_database)
        audit.record(_event(2))  # a fresh connection, tried once more

        async def during_outage() -> None:
            with pytest.raises(AuditError, match="audit log"):
                await audit.arecord(_event(3))

        pg_cluster.admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            _terminate(pg_cluster, pg_database)
            with pytest.raises(AuditError, match="cannot"):
                audit.record(_event(3))
            trio.run(during_outage)
        finally:
            pg_cluster.admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        audit.record(_event(4))
    rows = _rows(pg_database)
    assert [json.loads(f"{{{r[3]}}}")["request_id"] for r in rows] == ["r1", "r2", "r4"]
    assert verify_database(pg_database).ok


def test_verify_without_a_table_says_so(pg_database: str) -> None:
    result = verify_database(pg_database)
    assert not result.ok
    assert "no audit_log table" in (result.problem or "")


@pytest.mark.parametrize("metadata", ["postgresql"], indirect=True)
async def test_what_the_database_cannot_audit_is_not_answered(env: Env, database: str) -> None:
    """The audit table unwritable while the rest of the database works: a read and an
    upload answer 503 audit_unavailable and the upload stores nothing; once the table is
    back the same requests succeed, without a restart, and the chain verifies."""
    nar = make_nar(env.state.path / "n", b"audited or not done\n")
    async with env.client(auth=env.member, basic=True) as c:
        assert (await upload(c, "acme/app", HASH_A, nar)).status_code == 200
        _sql(database, "ALTER TABLE audit_log RENAME TO audit_log_away")
        try:
            r = await c.get(f"/cache/{HASH_A}.narinfo")
            assert (r.status_code, "audit unavailable" in r.text) == (503, True), r.text
            other = make_nar(env.state.path / "m", b"never stored\n")
            compressed = lzma.compress(other)
            url, _ = client_narinfo(HASH_B, other, compressed)
            r = await c.put(f"/cache/acme/app/{url}", content=compressed)
            assert r.status_code == 503, r.text
        finally:
            _sql(database, "ALTER TABLE audit_log_away RENAME TO audit_log")
        with psycopg.connect(database) as conn:
            assert conn.execute("SELECT count(*) FROM nars").fetchone() == (1,)
        assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 200
        assert (
            await upload(c, "acme/app", HASH_B, make_nar(env.state.path / "o", b"later\n"))
        ).status_code == 200
    assert verify_database(database).ok


def test_verify_of_an_unreachable_database_says_so(pg_database: str, pg_cluster: PgCluster) -> None:
    _filled(pg_database, 1)
    dbname = urlsplit(pg_database).path.lstrip("/")
    pg_cluster.admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
    try:
        result = verify_database(pg_database)
    finally:
        pg_cluster.admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    assert not result.ok
    shown = pg_database.split("?", 1)[0]
    assert result.describe().splitlines()[1].startswith(f"{shown}: cannot reach")


class _CuttingProxy:
    """A loopback TCP proxy to the cluster's socket that can cut a connection at COMMIT.

    ``cut = "before"``: the COMMIT never reaches the database (which then rolls back);
    ``cut = "after"``: the database commits, and its answer never reaches the client.
    Either way the client sees its connection break mid-COMMIT: the outcome unknown.
    """

    def __init__(self, cluster: PgCluster) -> None:
        self.target = str(cluster.socket_dir / ".s.PGSQL.5432")
        self.cut: str | None = None
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, dbname: str, user: str) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}?sslmode=disable"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.target)
            self.sockets += [client, server]
            dropped = threading.Event()
            for pump, args in ((self._up, (client, server)), (self._down, (server, client))):
                thread = threading.Thread(target=pump, args=(*args, dropped), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _up(self, client: socket.socket, server: socket.socket, dropped: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.cut and b"COMMIT\x00" in data:
                    mode, self.cut = self.cut, None
                    self.cuts += 1
                    if mode == "after":
                        dropped.set()  # the answer to this COMMIT is not passed on
                        server.sendall(data)
                        continue
                    for sock in (client, server):  # shutdown wakes the other pump too
                        sock.shutdown(socket.SHUT_RDWR)
                    return
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _down(self, server: socket.socket, client: socket.socket, dropped: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if dropped.is_set():
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    return
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.close()

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(timeout=10)


@pytest.mark.parametrize("cut", ["before", "after"])
def test_a_connection_cut_at_commit_appends_the_batch_exactly_once(
    pg_database: str, pg_cluster: PgCluster, cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection breaks during COMMIT: committed or not, the writer finds out on a
    fresh connection, and the line is in the chain once, acknowledged."""
    proxy = _CuttingProxy(pg_cluster)
    try:
        url = proxy.url(urlsplit(pg_database).path.lstrip("/"), pg_cluster.user)
        with DatabaseAuditLog(url) as audit:
            audit.record(_event(1))
            proxy.cut = cut
            audit.record(_event(2))  # returns: the line is durable
            assert proxy.cuts == 1
            audit.record(_event(3))
    finally:
        proxy.close()
    said = "the batch was committed" if cut == "after" else "trying again"
    assert said in caplog.text
    rows = _rows(pg_database)
    assert [json.loads(f"{{{r[3]}}}")["request_id"] for r in rows] == ["r1", "r2", "r3"]
    assert verify_database(pg_database).ok
