"""GC against real processes: a download in flight survives it, kill -9 leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import zstandard

from nixd.nix import base32
from nixd.server.config import ServerConfig
from nixd.server.storage.db import open_db
from nixd.server.storage.store import Store
from tests.server.appenv import client_narinfo, make_nar
from tests.server.conftest import ServerState
from tests.server.gcenv import hash_of, labels, put
from tests.serverproc import SERVER_CLI, running_server, server_cli

BOTH_BACKENDS = True


def configure(state: ServerState, retention: str) -> None:
    """The server's own GC off (the test runs it), and a retention rule."""
    path = state.path / "config.toml"
    text = path.read_text().replace("interval = 86400.0", "interval = 0", 1)
    path.write_text(f"{text}\n[[retention]]\n{retention}\n")


@contextmanager
def opened(state: ServerState) -> Iterator[Store]:
    config = ServerConfig.load(state.path)
    conn = open_db(config.database)
    try:
        yield Store.open(conn, config.blobs_path)
    finally:
        conn.close()


def push(c: httpx.Client, label: str, content: bytes, tmp: Path) -> str:
    """Upload one path to acme/app as `nix copy --to ...?compression=zstd` does; its hash."""
    nar = make_nar(tmp / label, content)
    compressed = zstandard.ZstdCompressor(level=1).compress(nar)
    hash_part = hash_of(label)
    url, text = client_narinfo(hash_part, nar, compressed, compression="zstd")
    r = c.put(f"/cache/acme/app/{url}", content=compressed)
    assert r.status_code == 200, r.text
    r = c.put(f"/cache/acme/app/{hash_part}.narinfo", content=text.encode())
    assert r.status_code == 200, r.text
    return hash_part


def test_a_download_in_flight_completes_while_gc_removes_its_path(
    server_state: ServerState, tmp_path: Path
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    configure(state, 'slice = "acme/app"\nreleases = 1')
    big = os.urandom(24 << 20)  # incompressible: far more than the sockets buffer
    auth = {"authorization": f"Bearer {state.admin_token}"}
    with (
        running_server(state.path) as server,
        httpx.Client(base_url=server.url, headers=auth, timeout=120) as c,
    ):
        old = push(c, "old-release", big, tmp_path)
        push(c, "new-release", b"small", tmp_path)
        narinfo = c.get(f"/cache/acme/app/{old}.narinfo")
        assert narinfo.status_code == 200
        fields = dict(line.split(": ", 1) for line in narinfo.text.splitlines())
        file_hash = fields["URL"].removeprefix("nar/").removesuffix(".nar.zst")
        got = hashlib.sha256()
        with c.stream("GET", f"/cache/acme/app/{fields['URL']}") as r:
            assert r.status_code == 200
            chunks = r.iter_raw(1 << 16)
            got.update(next(chunks))  # the server has opened the blob and is sending
            report = json.loads(server_cli("gc", str(state.path), "--grace", "0", "--json").stdout)
            assert report["paths"] == {"acme/app": [f"/nix/store/{old}-hello"]}
            with opened(state) as store:
                assert not store.blob_exists(file_hash)  # unlinked under the download
            for chunk in chunks:
                got.update(chunk)
        assert f"sha256:{base32.encode(got.digest())}" == fields["FileHash"]
        assert c.get(f"/cache/acme/app/{old}.narinfo").status_code == 404


def _consistent(store: Store) -> None:
    """Every NAR row's blob is there (GC deletes a blob only after its row's commit)."""
    rows = store.conn.execute("SELECT file_hash FROM nars").fetchall()
    assert [r[0] for r in rows if not store.blob_exists(r[0])] == []


def test_kill_9_of_gc_at_any_point_leaves_metadata_consistent_and_the_next_sweep_clean(
    server_state: ServerState,
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    configure(state, 'slice = "acme/app"\nreleases = 1')
    trees = state.path / "trees"
    with opened(state) as store:
        app = store.project("acme", "app")
        assert app is not None
        put(store, trees, app, "base", age_days=30)
        put(store, trees, app, "pinned", ("base",), age_days=30)
        state.admin("pin", "add", "acme/app", hash_of("pinned"))
        put(store, trees, app, "latest", ("base",), age_days=1)
    for round_, delay in enumerate((0.3, 0.8, 1.2, 1.5, 1.8, 2.1, 2.5)):
        with opened(state) as store:
            app = store.project("acme", "app")
            assert app is not None
            for n in range(120):
                put(store, trees, app, f"old-{round_}-{n}", age_days=20)
        proc = subprocess.Popen(
            [*SERVER_CLI, "gc", str(state.path), "--grace", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)  # wherever it is by then: every point must be safe
        proc.kill()
        proc.wait(30)
        with opened(state) as store:
            _consistent(store)
            app = store.project("acme", "app")
            assert app is not None
            assert {"base", "pinned", "latest"} <= labels(store, app)
    server_cli("gc", str(state.path), "--grace", "0")
    after = json.loads(
        server_cli("gc", str(state.path), "--grace", "0", "--dry-run", "--json").stdout
    )
    assert after["orphan_blobs"] == [] and after["missing_blobs"] == []
    assert after["paths"] == {} and after["nars_removed"] == 0
    with opened(state) as store:
        app = store.project("acme", "app")
        assert app is not None
        assert labels(store, app) == {"base", "pinned", "latest"}
        assert len(list(store.iter_blobs())) == 3
        _consistent(store)


def test_kill_9_of_the_server_during_uploads_then_a_sweep_leaves_no_orphans(
    server_state: ServerState, tmp_path: Path
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    configure(state, 'slice = "acme/*"\nkeep = "all"')
    auth = {"authorization": f"Bearer {state.admin_token}"}
    done: list[str] = []
    with running_server(state.path) as server:

        def uploads() -> None:
            with httpx.Client(base_url=server.url, headers=auth, timeout=30) as c:
                try:
                    for n in range(200):
                        done.append(push(c, f"up-{n}", os.urandom(200_000), tmp_path))
                except httpx.HTTPError:
                    return  # the server went away mid-upload

        worker = threading.Thread(target=uploads)
        worker.start()
        deadline = time.monotonic() + 120
        while len(done) < 5 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()
        worker.join(60)
    assert len(done) >= 5
    server_cli("gc", str(state.path), "--grace", "0")
    after = json.loads(
        server_cli("gc", str(state.path), "--grace", "0", "--dry-run", "--json").stdout
    )
    assert after["orphan_blobs"] == [] and after["missing_blobs"] == [] and after["paths"] == {}
    with opened(state) as store:
        _consistent(store)
        app = store.project("acme", "app")
        assert app is not None
        assert {hash_of(f"up-{n}") for n in range(len(done))} <= {
            str(r[0])
            for r in store.conn.execute(
                "SELECT hash_part FROM slice_records WHERE project_id = ?", (app.id,)
            )
        }
        named = {str(r[0]) for r in store.conn.execute("SELECT file_hash FROM nars")}
        assert {fh for fh, _, _ in store.iter_blobs()} == named


def test_read_times_noted_in_memory_are_written_at_shutdown(
    server_state: ServerState, tmp_path: Path
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    configure(state, 'slice = "acme/app"\ndays = 30')
    auth = {"authorization": f"Bearer {state.admin_token}"}
    with running_server(state.path) as server:
        with httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
            read = push(c, "read", b"read me", tmp_path)
            push(c, "unread", b"nobody reads me", tmp_path)
            assert c.get(f"/cache/acme/{read}.narinfo").status_code == 200
        assert server.stop() == 0  # SIGTERM: the server flushes on its way out
    with opened(state) as store:
        rows = dict(
            store.conn.execute("SELECT hash_part, last_access FROM slice_records").fetchall()
        )
    assert rows[hash_of("unread")] is None
    assert isinstance(rows[read], float)
