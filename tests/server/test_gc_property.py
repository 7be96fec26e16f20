"""The GC's promise over random reference graphs, pins, ages and rules (hypothesis).

GC never removes anything reachable from a pin or a retained root, and removes everything
else that is expired. The oracle below is written from the rules in
:mod:`nixd.server.storage.gc`'s docstring, independently of its code: a naive fixpoint
over the references instead of a worklist, the roots from the rules as stated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixd.server.config import RetentionSection
from nixd.server.storage.db import Connection, Project, create_org, create_project, open_db
from nixd.server.storage.gc import collect
from nixd.server.storage.pins import add_pin
from nixd.server.storage.store import Nar, PathInfo, Store
from tests.server.gcenv import DAY, hash_of, nar

BOTH_BACKENDS = True
SLICES = ("app", "lib")
GRACE = DAY


@pytest.fixture
def world(database: str | Path, tmp_path: Path) -> Iterator[tuple[Store, list[Project], Path]]:
    conn = open_db(database)
    create_org(conn, "acme")
    store = Store.open(conn, tmp_path / "blobs")
    projects = [create_project(conn, "acme", name) for name in SLICES]
    yield store, projects, tmp_path
    conn.close()


node = st.fixed_dictionaries(
    {
        "slice": st.integers(0, len(SLICES) - 1),
        "age": st.floats(0, 20),  # days since upload
        "read": st.one_of(st.none(), st.floats(0, 20)),  # days since last read
        "pinned": st.booleans(),
        "nar": st.integers(0, 3),
    }
)
rule = st.one_of(
    st.just(RetentionSection(slice="x/x", keep="all")),
    st.builds(lambda d: RetentionSection(slice="x/x", days=d), st.integers(1, 15)),
    st.builds(lambda r: RetentionSection(slice="x/x", releases=r), st.integers(1, 4)),
    st.builds(
        lambda d, r: RetentionSection(slice="x/x", days=d, releases=r),
        st.integers(1, 15),
        st.integers(1, 4),
    ),
)


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[dict[str, object]], list[set[int]], list[object]]:
    nodes = draw(st.lists(node, min_size=1, max_size=12))
    # references point to earlier nodes (a store's references form a DAG), any slice
    edges = [
        draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set() for i in range(len(nodes))
    ]
    rules = [draw(rule) for _ in SLICES]
    return nodes, edges, rules


def oracle(
    nodes: list[dict[str, object]],
    edges: list[set[int]],
    rules: list[RetentionSection],
    now: float,
) -> set[int]:
    """Which nodes must stay, from the rules as the docstring states them."""
    present = {i for i in range(len(nodes))}
    slice_of = {i: int(nodes[i]["slice"]) for i in present}  # type: ignore[call-overload]
    created = {i: now - float(nodes[i]["age"]) * DAY for i in present}  # type: ignore[arg-type]
    read = {
        i: created[i] if nodes[i]["read"] is None else now - float(nodes[i]["read"]) * DAY  # type: ignore[arg-type]
        for i in present
    }
    roots: set[int] = set()
    for i in present:
        r = rules[slice_of[i]]
        if nodes[i]["pinned"] or created[i] > now - GRACE or r.keeps_all:
            roots.add(i)
        if r.days and max(read[i], created[i]) >= now - r.days * DAY:
            roots.add(i)
    for s, r in enumerate(rules):
        if not r.releases:
            continue
        mine = [i for i in present if slice_of[i] == s]
        referenced = {j for i in mine for j in edges[i] if slice_of[j] == s}
        tops = [i for i in mine if i not in referenced and created[i] <= now - GRACE]
        tops.sort(key=lambda i: (created[i], hash_of(f"n{i}")), reverse=True)
        roots |= set(tops[: r.releases])
    kept = set(roots)
    changed = True
    while changed:  # a node's reference is its slice's record of that path, or every one
        changed = False
        for i in list(kept):
            for j in edges[i]:
                if j not in kept:
                    kept.add(j)
                    changed = True
    return kept


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=graphs())
def test_gc_removes_exactly_what_no_pin_or_retained_root_reaches(
    world: tuple[Store, list[Project], Path],
    case: tuple[list[dict[str, object]], list[set[int]], list[RetentionSection]],
) -> None:
    store, projects, tmp = world
    nodes, edges, rules = case
    conn: Connection = store.conn
    for table in ("pins", "slice_records"):
        conn.execute(f"DELETE FROM {table}")
    # the same four NARs each time (uploaded again if the last example's GC removed them)
    nars: list[Nar] = [nar(store, tmp, projects[0], f"nar {k}".encode()) for k in range(4)]
    now = time.time()
    for i, n in enumerate(nodes):
        project = projects[int(n["slice"])]  # type: ignore[call-overload]
        refs = tuple(sorted(f"{hash_of(f'n{j}')}-n{j}" for j in edges[i]))
        info = PathInfo(hash_of(f"n{i}"), f"n{i}", nars[int(n["nar"])], refs, None, None, None)  # type: ignore[call-overload]
        store.add_path(project, info)
        read = None if n["read"] is None else now - float(n["read"]) * DAY  # type: ignore[arg-type]
        conn.execute(
            "UPDATE slice_records SET created = ?, last_access = ? "
            "WHERE project_id = ? AND hash_part = ?",
            (now - float(n["age"]) * DAY, read, project.id, info.hash_part),  # type: ignore[arg-type]
        )
        if n["pinned"]:
            add_pin(conn, project, info.hash_part, who="user:root@test")
    # the NARs' own rows and aliases are old: only records keep a blob alive
    conn.execute("UPDATE nars SET created = 0")
    conn.execute("UPDATE upload_aliases SET created = 0")
    slice_rules = tuple(
        RetentionSection(slice=f"acme/{name}", keep=r.keep, days=r.days, releases=r.releases)
        for name, r in zip(SLICES, rules, strict=True)
    )
    expected = oracle(nodes, edges, rules, now)
    dry = collect(store, slice_rules, grace=GRACE, now=now, dry_run=True)
    report = collect(store, slice_rules, grace=GRACE, now=now)
    assert {**dry.to_json(), "dry_run": False} == report.to_json()
    left = {str(r[0]) for r in conn.execute("SELECT name FROM slice_records")}
    assert left == {f"n{i}" for i in expected}
    for k, stored in enumerate(nars):  # a blob goes exactly when no record left uses it
        used = any(int(nodes[i]["nar"]) == k for i in expected)  # type: ignore[call-overload]
        assert store.blob_exists(stored.file_hash) == used
        assert (store.nar_by_hash(stored.nar_hash) is not None) == used
