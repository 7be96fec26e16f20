"""Retention, pins and GC on the real store (SQLite and PostgreSQL): what stays, what goes."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from nixd.errors import ConfigError
from nixd.server.config import RetentionSection, ServerConfig
from nixd.server.http.serve import _housekeeping
from nixd.server.metrics import metrics
from nixd.server.storage.blobs import BlobStore, open_blob_store
from nixd.server.storage.db import Connection, create_org, create_project, open_db
from nixd.server.storage.gc import GcReport, _fingerprint, collect, serve_gc
from nixd.server.storage.pins import add_pin, list_pins, parse_store_path, remove_pin
from nixd.server.storage.store import Store
from tests.server.appenv import HASH_A, Env, make_nar, upload
from tests.server.conftest import ServerState, audit_text
from tests.server.gcenv import DAY, hash_of, labels, nar, put
from tests.serverproc import server_cli

BOTH_BACKENDS = True
BOTH_BLOBS = True  # the tests on the `store` fixture run on a directory and on a bucket


@pytest.fixture
def conn(database: str | Path) -> Iterator[Connection]:
    c = open_db(database)
    create_org(c, "acme")
    yield c
    c.close()


@pytest.fixture
def store(conn: Connection, blob_store: BlobStore) -> Store:
    return Store.open(conn, blob_store)


def rule(slice_: str = "acme/*", **kw: int) -> tuple[RetentionSection, ...]:
    return (RetentionSection(slice=slice_, **kw),)


def test_a_pinned_closure_survives_whole_and_expired_paths_go(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    put(store, tmp_path, app, "libc", age_days=40)
    put(store, tmp_path, app, "lib", ("libc",), age_days=40)
    top = put(store, tmp_path, app, "app", ("lib", "app"), age_days=40)  # self-reference too
    old = put(store, tmp_path, app, "old", ("libc",), age_days=40)
    add_pin(conn, app, top.hash_part, who="user:root@test")
    report = collect(store, rule(days=30), grace=DAY)
    assert labels(store, app) == {"libc", "lib", "app"}
    assert report.paths == {"acme/app": [f"/nix/store/{old.hash_part}-old"]}
    assert [n.nar_hash for n in report.nars] == [old.nar.nar_hash]
    assert report.bytes_freed == old.nar.file_size
    assert not store.blob_exists(old.nar.file_hash)
    assert store.blob_exists(top.nar.file_hash)
    assert store.nar_by_hash(old.nar.nar_hash) is None
    # unpinned, the rest expires too
    assert remove_pin(conn, app, top.hash_part)
    collect(store, rule(days=30), grace=DAY)
    assert labels(store, app) == set()
    assert list(store.iter_blobs()) == []


def test_recently_read_paths_and_their_closures_stay(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    put(store, tmp_path, app, "dep", age_days=40)
    top = put(store, tmp_path, app, "top", ("dep",), age_days=40)
    put(store, tmp_path, app, "unread", age_days=40)
    store.note_access(app.id, top.hash_part)  # a narinfo served: noted in memory
    assert store.flush_accesses() == 1
    collect(store, rule(days=30), grace=DAY)
    assert labels(store, app) == {"dep", "top"}
    # a NAR download counts too
    other = put(store, tmp_path, app, "other", age_days=40)
    store.note_nar_access(app.id, other.nar.nar_hash)
    store.flush_accesses()
    collect(store, rule(days=30), grace=DAY)
    assert labels(store, app) == {"dep", "top", "other"}


def test_releases_keep_exactly_the_last_n_closures_and_shared_paths_stay(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    put(store, tmp_path, app, "shared", age_days=10)
    for n in range(1, 5):
        put(store, tmp_path, app, f"dep{n}", age_days=10 - n)
        put(store, tmp_path, app, f"release{n}", (f"dep{n}", "shared"), age_days=10 - n)
    report = collect(store, rule(releases=2), grace=0)
    assert labels(store, app) == {"shared", "dep3", "release3", "dep4", "release4"}
    assert sorted(report.paths["acme/app"]) == sorted(
        f"/nix/store/{hash_of(x)}-{x}" for x in ("dep1", "release1", "dep2", "release2")
    )
    # a new release pushes the oldest retained one out; the shared path stays throughout
    put(store, tmp_path, app, "dep5")
    put(store, tmp_path, app, "release5", ("dep5", "shared"))
    collect(store, rule(releases=2), grace=0)
    assert labels(store, app) == {"shared", "dep4", "release4", "dep5", "release5"}


def test_a_closure_half_pushed_does_not_count_as_releases(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    put(store, tmp_path, app, "d1", age_days=5)
    put(store, tmp_path, app, "r1", ("d1",), age_days=5)
    for n in range(3):  # the dependencies of a release on its way: top-level for now
        put(store, tmp_path, app, f"incoming{n}")
    collect(store, rule(releases=1), grace=DAY)
    assert labels(store, app) == {"d1", "r1", "incoming0", "incoming1", "incoming2"}


def test_references_into_other_slices_keep_those_records(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    lib = create_project(conn, "acme", "lib")
    put(store, tmp_path, lib, "libfoo", age_days=40)
    put(store, tmp_path, lib, "libbar", age_days=40)
    top = put(store, tmp_path, app, "app", ("libfoo",), age_days=40)
    add_pin(conn, app, top.hash_part, who="user:root@test")
    collect(store, rule(days=1), grace=DAY)
    assert labels(store, app) == {"app"}
    assert labels(store, lib) == {"libfoo"}


def test_keep_all_is_the_default_and_slice_globs_choose(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    ci = create_project(conn, "acme", "ci-nightly")
    put(store, tmp_path, app, "a", age_days=400)
    put(store, tmp_path, ci, "c", age_days=400)
    rules = (
        RetentionSection(slice="ACME/CI-*", days=7),
        RetentionSection(slice="acme/*", keep="all"),
    )
    report = collect(store, rules, grace=DAY)
    assert labels(store, app) == {"a"} and labels(store, ci) == set()
    assert list(report.paths) == ["acme/ci-nightly"]
    assert collect(store, (), grace=DAY).paths_removed == 0


def test_dry_run_changes_nothing_and_reports_what_the_run_does(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    for n in range(4):
        put(store, tmp_path, app, f"dep{n}", age_days=10 - n)
        put(store, tmp_path, app, f"rel{n}", (f"dep{n}",), age_days=10 - n)
    lost = put(store, tmp_path, app, "lost", age_days=20)
    store.delete_blob(lost.nar.file_hash)
    orphan = nar(store, tmp_path, app, b"uploaded, never described")
    conn.execute("UPDATE upload_aliases SET created = 0 WHERE nar_hash = ?", (orphan.nar_hash,))
    conn.execute("UPDATE nars SET created = 0 WHERE nar_hash = ?", (orphan.nar_hash,))

    def state() -> tuple[object, ...]:
        q = conn.execute
        return (
            q("SELECT count(*) FROM slice_records").fetchone()[0],
            q("SELECT count(*) FROM nars").fetchone()[0],
            q("SELECT count(*) FROM upload_aliases").fetchone()[0],
            sorted(store.iter_blobs()),
        )

    before = state()
    now = time.time()
    dry = collect(store, rule(releases=2), grace=DAY, dry_run=True, now=now)
    assert state() == before
    real = collect(store, rule(releases=2), grace=DAY, now=now)
    assert {**dry.to_json(), "dry_run": False} == real.to_json()
    assert real.paths_removed == 5 and real.missing_blobs
    assert lost.nar.file_hash in real.missing_blobs
    assert orphan.nar_hash in {n.nar_hash for n in real.nars}
    assert state() != before
    assert collect(store, rule(releases=2), grace=DAY, dry_run=True).to_json()["paths"] == {}


def test_orphan_blobs_older_than_grace_go_younger_stay(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    kept = put(store, tmp_path, app, "kept")
    stray = nar(store, tmp_path, app, b"a blob whose row was lost")
    conn.execute("DELETE FROM upload_aliases WHERE nar_hash = ?", (stray.nar_hash,))
    conn.execute("DELETE FROM nars WHERE nar_hash = ?", (stray.nar_hash,))  # as after a crash
    young = collect(store, (), grace=DAY)
    assert young.orphan_blobs == [] and store.blob_exists(stray.file_hash)
    later = collect(store, (), grace=DAY, now=time.time() + 2 * DAY)
    assert later.orphan_blobs == [(stray.file_hash, stray.file_size)]
    assert later.bytes_freed == stray.file_size
    assert not store.blob_exists(stray.file_hash)
    assert store.blob_exists(kept.nar.file_hash) and labels(store, app) == {"kept"}


def test_records_whose_blob_is_missing_are_reported_and_removed(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    lib = create_project(conn, "acme", "lib")
    body = b"bytes both slices use"
    gone = put(store, tmp_path, app, "gone", content=body, age_days=2)
    put(store, tmp_path, lib, "gone", shared=gone.nar, age_days=2)
    add_pin(conn, app, gone.hash_part, who="user:root@test")
    store.delete_blob(gone.nar.file_hash)
    report = collect(store, (), grace=DAY)
    assert sorted(report.missing_blobs[gone.nar.file_hash]) == [
        f"acme/app:/nix/store/{gone.hash_part}-gone",
        f"acme/lib:/nix/store/{gone.hash_part}-gone",
    ]
    assert report.bytes_freed == 0
    assert labels(store, app) == set() and labels(store, lib) == set()
    assert store.nar_by_hash(gone.nar.nar_hash) is None
    assert [p.present for p in list_pins(conn)] == [False]  # the pin stays, says so
    assert collect(store, (), grace=DAY, dry_run=True).missing_blobs == {}


def test_a_nar_uploaded_without_its_narinfo_goes_after_grace(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    half = nar(store, tmp_path, app, b"nar without narinfo")
    assert collect(store, (), grace=DAY).nars == []
    report = collect(store, (), grace=DAY, now=time.time() + 2 * DAY)
    assert report.aliases == 1 and [n.nar_hash for n in report.nars] == [half.nar_hash]
    assert not store.blob_exists(half.file_hash)
    assert conn.execute("SELECT count(*) FROM upload_aliases").fetchone()[0] == 0


def test_slice_option_limits_what_goes(store: Store, conn: Connection, tmp_path: Path) -> None:
    app = create_project(conn, "acme", "app")
    lib = create_project(conn, "acme", "lib")
    put(store, tmp_path, app, "a", age_days=40)
    put(store, tmp_path, lib, "l", age_days=40)
    report = collect(store, rule(days=1), grace=DAY, slice_name="acme/lib")
    assert list(report.paths) == ["acme/lib"]
    assert labels(store, app) == {"a"} and labels(store, lib) == set()


def test_pins_name_paths_the_slice_holds(store: Store, conn: Connection, tmp_path: Path) -> None:
    app = create_project(conn, "acme", "app")
    info = put(store, tmp_path, app, "hello")
    assert parse_store_path(f"/nix/store/{info.hash_part}-hello") == info.hash_part
    assert parse_store_path(f"{info.hash_part}-hello") == info.hash_part
    assert parse_store_path(info.hash_part) == info.hash_part
    for bad in ("/nix/store/short-x", "/tmp/x", "nope"):
        with pytest.raises(ConfigError):
            parse_store_path(bad)
    with pytest.raises(ConfigError, match="holds no store path"):
        add_pin(conn, app, hash_of("absent"), who="user:root@test")
    pin = add_pin(conn, app, info.hash_part, who="user:root@test", note="v1.0")
    assert pin.path == f"/nix/store/{info.hash_part}-hello"
    assert [(p.slice, p.note, p.present) for p in list_pins(conn)] == [("acme/app", "v1.0", True)]
    assert remove_pin(conn, app, info.hash_part) and not remove_pin(conn, app, info.hash_part)


def test_cli_gc_and_pins_are_audited(server_state: ServerState) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    config = ServerConfig.load(state.path)
    conn = open_db(config.database)
    try:
        store = Store.open(conn, open_blob_store(config))
        app = store.project("acme", "app")
        assert app is not None
        keep = put(store, state.path / "trees", app, "keep", age_days=40)
        put(store, state.path / "trees", app, "drop", age_days=40)
    finally:
        conn.close()
    with (state.path / "config.toml").open("a") as f:
        f.write('\n[[retention]]\nslice = "acme/app"\ndays = 30\n')
    said = state.admin(
        "pin", "add", "acme/app", f"/nix/store/{keep.hash_part}-keep", "--note", "v1"
    )
    assert f"(1 path(s), {keep.nar.file_size} bytes of NARs)" in said
    listed = json.loads(state.admin("pin", "list", "--json"))
    assert [(p["slice"], p["note"]) for p in listed] == [("acme/app", "v1")]
    dry = json.loads(state.admin("gc", "--dry-run", "--json"))
    assert dry["paths"] == {"acme/app": [f"/nix/store/{hash_of('drop')}-drop"]}
    real = json.loads(state.admin("gc", "--json"))
    assert {**dry, "dry_run": False} == real
    state.admin("pin", "rm", "acme/app", keep.hash_part)
    lines = [json.loads(x) for x in audit_text(state.path).splitlines()]
    actions = [e.get("action") for e in lines]
    assert actions[-4:] == ["admin:pin.add", "admin:gc", "admin:gc", "admin:pin.rm"]
    assert [e.get("dry_run") for e in lines[-3:-1]] == [True, False]
    assert "ok" in state.admin("audit", "verify").lower()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('slice = "acme"\ndays = 3', "needs ORG/PROJECT"),
        ('slice = "acme/*"', "say what to keep"),
        ('slice = "acme/*"\nkeep = "some"', 'the only value is "all"'),
        ('slice = "acme/*"\nkeep = "all"\ndays = 3', "cannot be combined"),
        ('slice = "acme/*"\ndays = -1', "must be positive"),
        ('slice = "acme/*"\nweeks = 2', "unknown key"),
        ('slice = "acme/*"\nreleases = "5"', "must be an integer"),
    ],
)
def test_retention_config_errors_say_where(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        ServerConfig.from_toml(f"[[retention]]\n{table}\n", state_dir=Path("/s"), source="c.toml")
    assert "c.toml:retention[0]" in str(caught.value)


def test_gc_config_defaults_and_errors() -> None:
    config = ServerConfig.from_toml("", state_dir=Path("/s"))
    assert (config.gc.interval, config.gc.grace, config.gc.access_flush) == (DAY, DAY, 60.0)
    assert config.retention == ()
    both = ServerConfig.from_toml(
        '[gc]\ninterval = 0\n[[retention]]\nslice = "a/b"\ndays = 3\nreleases = 2\n',
        state_dir=Path("/s"),
    )
    assert both.gc.interval == 0 and both.retention[0].days == 3
    for bad, message in (
        ("interval = 5", "at least 60"),
        ("grace = -1", "must not be negative"),
        ("access_flush = 0", "between 1 and 3600"),
    ):
        with pytest.raises(ConfigError, match=message):
            ServerConfig.from_toml(f"[gc]\n{bad}\n", state_dir=Path("/s"))


async def test_reads_through_the_app_are_noted_and_flushed(env: Env, tmp_path: Path) -> None:
    store = env.services.store
    async with env.client(auth=env.member, basic=True) as c:
        r = await upload(c, "acme/app", HASH_A, make_nar(tmp_path / "a", b"read me"))
        assert r.status_code == 200
        app = store.project("acme", "app")
        assert app is not None

        def last_access() -> object:
            row = store.conn.execute(
                "SELECT last_access FROM slice_records WHERE project_id = ? AND hash_part = ?",
                (app.id, HASH_A),
            ).fetchone()
            return row[0]

        assert last_access() is None
        before = time.time()
        narinfo = await c.get(f"/cache/acme/{HASH_A}.narinfo")  # through the org's view
        assert narinfo.status_code == 200
        assert last_access() is None  # noted in memory only
        assert store.flush_accesses() == 1
        first = last_access()
        assert isinstance(first, float) and first >= before
        url = next(x for x in narinfo.text.splitlines() if x.startswith("URL: "))[5:]
        assert (await c.get(f"/cache/acme/app/{url}")).status_code == 200
        assert store.flush_accesses() == 1
        second = last_access()
        assert isinstance(second, float) and second >= first


async def test_the_servers_own_gc_flushes_reads_and_collects_on_its_interval(
    store: Store, conn: Connection, tmp_path: Path, database: str | Path, autojump_clock: object
) -> None:
    del autojump_clock  # virtual time: an hour's interval passes at once
    app = create_project(conn, "acme", "app")
    put(store, tmp_path, app, "unread", age_days=40)
    read = put(store, tmp_path, app, "read", age_days=40)
    store.note_access(app.id, read.hash_part)
    reports: list[GcReport] = []
    registry = metrics().registry

    def counted() -> tuple[float | None, ...]:
        return tuple(
            registry.get_sample_value(f"nixd_server_gc_{name}_total")
            for name in ("runs", "paths_removed", "bytes_freed")
        )

    runs, paths, freed = counted()

    async def audit(report: GcReport) -> None:
        reports.append(report)
        if len(reports) == 2:
            scope.cancel()

    # No deadline: under the autojump clock one would pass while a run's thread works.
    with trio.CancelScope() as scope:
        await serve_gc(
            store,
            lambda: Store(open_db(database), store.blobs),
            rule(days=30),
            interval=3600,
            grace=DAY,
            access_flush=60,
            audit=audit,
        )
    assert len(reports) == 2
    assert reports[0].paths == {"acme/app": [f"/nix/store/{hash_of('unread')}-unread"]}
    assert reports[1].paths_removed == 0
    assert labels(store, app) == {"read"}
    assert runs is not None and paths is not None and freed is not None
    assert counted() == (runs + 2, paths + 1, freed + reports[0].bytes_freed)


def test_a_lost_blob_goes_with_its_aliases_so_the_next_upload_stores_it_again(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    app = create_project(conn, "acme", "app")
    lost = put(store, tmp_path, app, "lost", content=b"bytes to lose", age_days=2)
    store.delete_blob(lost.nar.file_hash)
    again = nar(store, tmp_path / "again", app, b"bytes to lose")  # finds the row: no bytes
    assert again.nar_hash == lost.nar.nar_hash and not store.blob_exists(again.file_hash)
    report = collect(store, (), grace=DAY)
    assert lost.nar.file_hash in report.missing_blobs
    assert store.nar_by_hash(lost.nar.nar_hash) is None
    assert conn.execute("SELECT count(*) FROM upload_aliases").fetchone()[0] == 0
    restored = nar(store, tmp_path / "third", app, b"bytes to lose")
    assert store.blob_exists(restored.file_hash)


def test_every_write_a_mark_depends_on_changes_the_fingerprint(
    store: Store, conn: Connection, tmp_path: Path
) -> None:
    """What lets GC mark without the write lock: a change in between is always noticed."""
    app = create_project(conn, "acme", "app")
    old = put(store, tmp_path, app, "old", age_days=40)
    since = time.time() - 3600

    def changed(write: Callable[[], object]) -> bool:
        before = _fingerprint(store, since)
        write()
        return _fingerprint(store, since) != before

    assert not changed(lambda: None)
    assert changed(lambda: put(store, tmp_path, app, "new", ("old",)))  # an upload
    store.note_access(app.id, old.hash_part)
    assert changed(store.flush_accesses)  # a read time
    assert changed(lambda: add_pin(conn, app, old.hash_part, who="user:root@test"))
    assert changed(lambda: nar(store, tmp_path, app, b"a NAR on its way"))  # an alias
    assert changed(lambda: remove_pin(conn, app, old.hash_part))
    assert changed(lambda: collect(store, rule(days=1), grace=0))  # another GC's deletions


def test_cli_errors_are_one_line(server_state: ServerState) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    path = str(state.path)
    for args, message in (
        (("gc", path, "--slice", "acme/nope"), "project acme/nope does not exist"),
        (("gc", path, "--grace", "soon"), "--grace 'soon'"),
        (("pin", "add", path, "acme/app", hash_of("absent")), "holds no store path"),
        (("pin", "rm", path, "acme/app", hash_of("absent")), "has no pin"),
        (("pin", "add", path, "acme/app", "/tmp/x"), "not a store path"),
    ):
        proc = server_cli(*args, check=False)
        assert proc.returncode == 1, proc
        assert message in proc.stderr and "Traceback" not in proc.stderr


async def test_the_servers_periodic_gc_is_audited(env: Env, autojump_clock: object) -> None:
    del autojump_clock  # virtual time: the interval passes at once
    config = ServerConfig.load(env.state.path)
    config = dataclasses.replace(config, gc=dataclasses.replace(config.gc, interval=600.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_housekeeping, config, env.services, True)
        for _ in range(100_000):  # a guard only: each turn is a virtual second
            if '"admin:gc"' in audit_text(env.state.path):
                break
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    event = next(
        json.loads(line) for line in audit_text(env.state.path).splitlines() if '"admin:gc"' in line
    )
    assert (event["identity"], event["rule"], event["paths"]) == (
        "system:nixd-server",
        "gc-interval",
        0,
    )
