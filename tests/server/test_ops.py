"""/healthz, /readyz, /metrics and the access log, on real ``nixd-server serve`` processes.

Every wait for a state change (the blob directory moved away and back) polls under a
hang guard; nothing asserts how long anything took.
"""

from __future__ import annotations

import lzma
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nixd.server.http.ops import OpsRoutes, route_of, shown_path
from nixd.server.storage.db import open_db
from nixd.server.storage.store import Store
from tests.server.appenv import HASH_A, client_narinfo, make_nar
from tests.server.conftest import ServerState
from tests.serverproc import ServerProcess, start_server

HANG_GUARD = 60.0


def _set_server_keys(state: ServerState, **values: str) -> None:
    config = state.path / "config.toml"
    text = config.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    config.write_text(text)


def _wait_for(url: str, status: int) -> httpx.Response:
    deadline = time.monotonic() + HANG_GUARD
    while True:
        r = httpx.get(url)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def _upload(url: str, token: str, slice_: str, hash_part: str, nar: bytes) -> None:
    compressed = lzma.compress(nar)
    nar_url, text = client_narinfo(hash_part, nar, compressed)
    auth = {"authorization": f"Bearer {token}"}
    r = httpx.put(f"{url}/cache/{slice_}/{nar_url}", content=compressed, headers=auth)
    assert r.status_code == 200, r.text
    r = httpx.put(f"{url}/cache/{slice_}/{hash_part}.narinfo", content=text.encode(), headers=auth)
    assert r.status_code == 200, r.text


@pytest.fixture
def served(server_state: ServerState, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    workers = getattr(request, "param", 1)
    server_state.admin("project", "create", "acme/app")
    server = start_server(server_state.path, workers=workers)
    try:
        yield server
    finally:
        server.close()


# -- templates and escaping -----------------------------------------------------------


def test_routes_are_templates_whatever_the_path() -> None:
    h = "0" * 32
    assert route_of(f"/cache/{h}.narinfo") == ("/cache/*.narinfo", "narinfo")
    assert route_of(f"/cache/acme/{h}.narinfo") == ("/cache/{org}/*.narinfo", "narinfo")
    assert route_of(f"/cache/acme/app/{h}.narinfo") == (
        "/cache/{org}/{project}/*.narinfo",
        "narinfo",
    )
    assert route_of("/cache/acme/app/nar/x.nar.xz") == ("/cache/{org}/{project}/nar/*", "nar")
    assert route_of("/cache/nar/x.nar.zst") == ("/cache/nar/*", "nar")
    assert route_of("/cache/acme/log/x.drv") == ("/cache/{org}/log/*", "log")
    assert route_of("/cache/nix-cache-info") == ("/cache/nix-cache-info", None)
    assert route_of("/cache/a/b/nix-cache-info") == ("/cache/{org}/{project}/nix-cache-info", None)
    assert route_of("/api/v1/token/exchange") == ("/api/v1/token/exchange", None)
    assert route_of("/api/v1/device/anything/at/all") == ("/api/v1/device/*", None)
    assert route_of("/device/approve") == ("/device/*", None)
    assert route_of("/readyz") == ("/readyz", None)
    seen = {
        route_of(p)[0]
        for p in (
            "/",
            "/etc/passwd",
            "/cache/",
            "/cache//",
            "/cache/secret-org/secret-project/deep/er/path",
            "/cache/\udcff",
            "/api/v1/" + "x" * 5000,
            "/cache/acme/app/" + "a/" * 1000,
        )
    }
    assert seen <= {"other", "/cache/other", "/cache/{org}/other", "/cache/{org}/{project}/other"}


def test_logged_paths_are_bounded_printable_and_one_line() -> None:
    assert shown_path(b"/cache/abc.narinfo") == "/cache/abc.narinfo"
    assert shown_path(b"/x\xff\xfe\n\x1b[31m\\ y") == "/x\\xff\\xfe\\x0a\\x1b[31m\\x5c\\x20y"
    long = shown_path(b"/" + b"a" * 100_000)
    assert long.endswith("…") and len(long) == 257


# -- readiness -------------------------------------------------------------------------


def test_readiness_names_a_database_that_does_not_answer(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "server.db")
    store = Store.open(conn, tmp_path / "blobs")
    assert store.check() == []
    conn.close()  # a real sqlite3 failure: every query now raises
    assert store.check() == ["database"]


def test_metrics_refused_to_a_remote_peer_or_through_a_proxy(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "server.db")
    try:
        store = Store.open(conn, tmp_path / "blobs")
        loopback = OpsRoutes(store)

        def scope(ip: str, *headers: tuple[bytes, bytes]) -> dict[str, object]:
            return {"client": (ip, 1234), "headers": list(headers)}

        assert loopback._may_scrape(scope("127.0.0.1"))
        assert loopback._may_scrape(scope("::1"))
        assert loopback._may_scrape(scope("::ffff:127.0.0.1"))
        assert not loopback._may_scrape(scope("10.1.2.3"))
        assert not loopback._may_scrape(scope("127.0.0.1", (b"x-forwarded-for", b"10.1.2.3")))
        assert not loopback._may_scrape(scope("127.0.0.1", (b"forwarded", b"for=10.1.2.3")))
        assert OpsRoutes(store, metrics="public")._may_scrape(scope("10.1.2.3"))
        assert not OpsRoutes(store, metrics="off")._may_scrape(scope("127.0.0.1"))
    finally:
        conn.close()


def test_health_and_readiness_follow_the_blob_directory(
    served: ServerProcess, server_state: ServerState
) -> None:
    url = served.url
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json() == {"status": "ready"}
    _, member = server_state.token("acme", "ci", fast=True)  # (admin commands make blobs/)
    blobs = server_state.path / "blobs"
    moved = server_state.path / "blobs.away"
    blobs.rename(moved)
    try:
        r = _wait_for(f"{url}/readyz", 503)
        assert r.status_code == 503
        assert r.json() == {"status": "unready", "failed": ["blobs"]}
        assert str(server_state.path) not in r.text
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive all the same
        compressed = lzma.compress(b"not even a NAR")
        nar_url, _ = client_narinfo(HASH_A, b"not even a NAR", compressed)
        refused = httpx.put(
            f"{url}/cache/acme/app/{nar_url}",
            content=compressed,
            headers={"authorization": f"Bearer {member}"},
        )
        assert refused.status_code >= 500, refused.text  # an upload has nowhere to go
    finally:
        moved.rename(blobs)
    assert _wait_for(f"{url}/readyz", 200).json() == {"status": "ready"}
    assert "readiness: the blob directory" in served.log()  # the cause: logged, not answered
    scrape = httpx.get(f"{url}/metrics").text
    assert _sample(scrape, "nixd_server_storage_errors_total", backend="blobs", error="unready")
    assert _sample(scrape, "nixd_server_storage_errors_total", backend="blobs", error="failed")


# -- metrics ---------------------------------------------------------------------------


def _sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not m or m[1] != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m[3])
    return total


@pytest.mark.parametrize("served", [1, 2], indirect=True, ids=["1-worker", "2-workers"])
def test_metrics_count_every_worker_by_route_template(
    served: ServerProcess, server_state: ServerState, tmp_path: Path
) -> None:
    url = served.url
    _, member = server_state.token("acme", "ci", fast=True)
    nar = make_nar(tmp_path / "nar", b"hello metrics")
    _upload(url, member, "acme/app", HASH_A, nar)
    auth = {"authorization": f"Bearer {member}"}
    hits = 20
    for _ in range(hits):  # a fresh connection each: both workers answer some
        assert httpx.get(f"{url}/cache/acme/app/{HASH_A}.narinfo", headers=auth).status_code == 200
    info = httpx.get(f"{url}/cache/acme/app/{HASH_A}.narinfo", headers=auth).text
    nar_url = re.search(r"^URL: (\S+)$", info, re.MULTILINE)
    assert nar_url is not None
    assert httpx.get(f"{url}/cache/acme/app/{nar_url[1]}", headers=auth).status_code == 200
    missing = "1" * 32
    assert httpx.get(f"{url}/cache/acme/app/{missing}.narinfo", headers=auth).status_code == 404
    narinfo = "/cache/{org}/{project}/*.narinfo"
    # a request is counted just after its answer went out: scrape until the last one is in
    deadline = time.monotonic() + HANG_GUARD
    while True:
        text = httpx.get(f"{url}/metrics").text
        counted = _sample(text, "nixd_server_request_duration_seconds_count", route=narinfo)
        if counted >= hits + 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert _sample(text, "nixd_server_requests_total", route=narinfo, status="200") == hits + 2
    assert _sample(text, "nixd_server_requests_total", route=narinfo, status="404") == 1
    assert _sample(text, "nixd_server_requests_total", route=narinfo, method="PUT") == 1
    assert _sample(text, "nixd_server_request_duration_seconds_count", route=narinfo) == hits + 3
    assert _sample(text, "nixd_server_uploads_total", kind="nar") == 1
    assert _sample(text, "nixd_server_uploads_total", kind="narinfo") == 1
    assert _sample(text, "nixd_server_downloads_total", kind="narinfo") == hits + 1
    assert _sample(text, "nixd_server_downloads_total", kind="nar") == 1
    nar_route = "/cache/{org}/{project}/nar/*"
    assert _sample(text, "nixd_server_request_body_bytes_total", route=nar_route) == len(
        lzma.compress(nar)
    )
    assert _sample(text, "nixd_server_response_body_bytes_total", route=narinfo) >= hits * len(info)
    for name in ("gc_runs", "gc_bytes_freed", "gc_paths_removed"):
        assert f"nixd_server_{name}_total 0.0" in text
    # no slice, store path or token in any label
    assert "acme" not in text and HASH_A not in text and member not in text
    if served.workers > 1:  # the run's value files are there while it runs, and go with it
        where = re.search(r"metrics of 2 workers in (\S+)", served.log())
        assert where is not None and Path(where[1]).is_dir()
        assert served.stop() == 0
        assert not Path(where[1]).exists()


def test_metrics_off_and_forwarded_requests(server_state: ServerState) -> None:
    _set_server_keys(server_state, metrics='"off"')
    server = start_server(server_state.path)
    try:
        assert httpx.get(f"{server.url}/metrics").status_code == 404
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        server.close()
    _set_server_keys(server_state, metrics='"loopback"')
    server = start_server(server_state.path)
    try:
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        forwarded = httpx.get(f"{server.url}/metrics", headers={"x-forwarded-for": "192.0.2.1"})
        assert forwarded.status_code == 404
    finally:
        server.close()


# -- access log ------------------------------------------------------------------------


def _access_lines(server: ServerProcess, *, until: str | None = None) -> list[str]:
    """The access log lines so far; with ``until``, once one matches it (a line is written
    just after its answer is sent, so a client can read the answer first)."""
    deadline = time.monotonic() + HANG_GUARD
    while True:
        lines = [line for line in server.log().splitlines() if "nixd.server.http.access:" in line]
        if until is None or any(re.search(until, line) for line in lines):
            return lines
        assert time.monotonic() < deadline, f"no access line matching {until!r}"
        time.sleep(0.05)


def test_access_log_has_no_secret_and_survives_hostile_paths(
    served: ServerProcess, server_state: ServerState
) -> None:
    url = served.url
    _, member = server_state.token("acme", "ci", fast=True)
    secret_query = "sekrit-query-token-123"
    r = httpx.get(
        f"{url}/cache/acme/app/{HASH_A}.narinfo?token={secret_query}",
        headers={"authorization": f"Bearer {member}", "cookie": "session=sekrit-cookie"},
    )
    assert r.status_code == 404
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    hostile = [
        b"GET /cache/\xff\xfe\x1b[31m HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET /cache/%ff%00%0a%1b?token=q HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET /" + b"a" * 6000 + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    ]
    for raw in hostile:
        with socket.create_connection((host, int(port)), timeout=HANG_GUARD) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 ")
    assert httpx.get(f"{url}/healthz").status_code == 200  # still serving
    lines = _access_lines(served, until=r" [0-9a-f]{12} GET /healthz 200 ")
    log = "\n".join(lines)
    assert member not in served.log() and member[5:20] not in served.log()
    assert secret_query not in served.log() and "sekrit-cookie" not in served.log()
    narinfo = next(line for line in lines if f"{HASH_A}.narinfo" in line)
    assert re.search(
        rf"GET /cache/acme/app/{HASH_A}\.narinfo 404 \d+B [\d.]+ms token 127\.0\.0\.1$", narinfo
    )
    assert re.search(r" [0-9a-f]{12} GET /healthz 200 ", log)
    # raw non-ASCII bytes are the front's 400 (no app, no line); escaped ones reach the app
    # and are logged as sent, undecoded
    assert re.search(r" GET /cache/%ff%00%0a%1b 401 ", log)
    assert "\x1b" not in log and "\x00" not in log
    assert re.search(r" GET /a{255}… 404 ", log)
    assert all(len(line) < 1000 for line in lines)


def test_access_log_off(server_state: ServerState) -> None:
    _set_server_keys(server_state, access_log="false")
    server = start_server(server_state.path)
    try:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200  # metrics still count
    finally:
        server.close()  # stopped: every line it would write is written
    assert _access_lines(server) == []
