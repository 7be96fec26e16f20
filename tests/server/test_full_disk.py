"""A full disk and other early refusals of an upload, over HTTP, with the real server.

The blob directory of a real ``nixd-server serve`` is a small tmpfs (:mod:`tests.smallfs`).
``nix copy --to '...?compression=zstd'`` of a NAR bigger than the free space fails with
the server's 507 and its message in Nix's output, on every one of Nix's attempts:
Nix 2.8 does not rewind an upload it retries (its read offset stays where the failed
attempt stopped), so a refusal after part of the body was read made the retry send the
body's tail, answered 400 "not valid zstd". The server refuses before the body
(``Store.check_room``, before ``100 Continue``), so nothing of it is sent. With room made,
the same ``nix copy`` succeeds and ``nix copy --from`` gets the path back, verified.

The raw-socket tests hold the front to "one bad request ends only itself": an answer
given before the body was read (507, 403, 400 mid-body, 413) says ``connection:
close`` and the connection ends (the body's rest is never read as a next request); a
small refused body is dropped and the next request on the connection is answered.
"""

from __future__ import annotations

import os
import select
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zstandard

from nixd.server.config import ServerConfig
from tests.realnix import RealNix
from tests.server.appenv import make_nar
from tests.server.conftest import ServerState
from tests.server.test_nix_e2e import copy_from, copy_to, netrc
from tests.serverproc import ServerProcess, running_server
from tests.smallfs import resize, small_filesystem

MiB = 1 << 20
HANG_GUARD = 60.0
"""Seconds a raw socket waits for the server before the test fails (not a timing bound)."""
FILE_HASH = "0" * 52


@pytest.fixture
def small_blobs(server_state: ServerState) -> Iterator[Path]:
    """The state directory's blob directory on a 2 MiB tmpfs."""
    with small_filesystem(server_state.path / "blobs", "2m") as blobs:
        yield blobs


@pytest.fixture
def acme(server_state: ServerState) -> ServerState:
    server_state.admin("project", "create", "acme/app")
    return server_state


def _stored(blobs: Path) -> list[Path]:
    return sorted(p for p in blobs.rglob("*") if p.is_file())


def _rows(state: ServerState) -> tuple[int, int, int]:
    """(NARs, upload aliases, slice records) in the server's database."""
    db = sqlite3.connect(ServerConfig.load(state.path).database_path)
    try:
        return tuple(  # type: ignore[return-value]
            db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("nars", "upload_aliases", "slice_records")
        )
    finally:
        db.close()


def _no_room_warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if "WARNING" in line and "no room" in line]


@pytest.mark.realnix
def test_nix_copy_to_a_full_disk_says_507_and_keeps_nothing_until_there_is_room(
    acme: ServerState, small_blobs: Path, real_nix: RealNix, tmp_path: Path
) -> None:
    _, writer = acme.token("acme", "ci", fast=True)
    source = tmp_path / "payload"
    source.write_bytes(os.urandom(4 * MiB))  # zstd cannot shrink it below the 2 MiB free
    path = real_nix.run(["nix-store", "--add", str(source)]).stdout.decode().strip()
    with running_server(acme.path) as server:
        net = netrc(tmp_path / "netrc", server.port, writer)
        url = f"{server.url}/cache/acme/app?compression=zstd"
        r = copy_to(real_nix, url, net, path)
        err = r.stderr.decode(errors="replace")
        assert r.returncode != 0, err
        attempts = err.count("HTTP error 507")
        assert attempts >= 2, err  # Nix retried, and the retry was refused the same way
        assert "no room to store the upload" in err, err
        assert "not valid zstd" not in err and "HTTP error 100" not in err, err
        # The final error, after the last retry, is the 507 with its message.
        final = err[err.rindex("error: while uploading") :]
        assert "HTTP error 507" in final and "no room to store the upload" in final, err

        log = server.log()
        assert "Traceback" not in log, log
        assert len(_no_room_warnings(log)) == attempts, log  # one WARNING per refusal
        assert not any(" ERROR: " in line for line in log.splitlines()), log

        # Nothing partial: no blob, no temp file, no record; the server serves on.
        assert _stored(small_blobs) == []
        assert _rows(acme) == (0, 0, 0)
        hash_part = Path(path).name.split("-")[0]
        auth = {"authorization": f"Bearer {writer}"}
        narinfo = httpx.get(f"{server.url}/cache/acme/app/{hash_part}.narinfo", headers=auth)
        assert narinfo.status_code == 404
        assert httpx.get(f"{server.url}/cache/nix-cache-info").status_code == 200

        resize(small_blobs, "64m")
        r = copy_to(real_nix, url, net, path)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        key = httpx.get(f"{server.url}/api/v1/cache/keys").json()["current"]
        dest = tmp_path / "fresh"
        r = copy_from(real_nix, f"{server.url}/cache/", net, key, dest, path)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        assert real_nix.real_path(path, dest).read_bytes() == source.read_bytes()
        (blob,) = _stored(small_blobs)  # one blob, no temp file left
        assert blob.suffix == ".zst" and blob.parent.name != "tmp"
        assert _rows(acme) == (1, 1, 1)


# -- raw sockets ------------------------------------------------------------------------


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD)
    return sock


def _put_head(path: str, length: int, token: str, *, expect: bool = False) -> bytes:
    lines = [
        f"PUT {path} HTTP/1.1",
        "Host: cache",
        f"Authorization: Bearer {token}",
        "Content-Type: application/x-nix-nar",
        f"Content-Length: {length}",
    ]
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after the answer included)."""
    out = bytearray()
    while True:
        try:
            data = sock.recv(MiB)
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return bytes(out)


def _send_until_answered(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` until the server answers, as curl does ("HTTP error before end of
    send, stop sending"); a server that closed meanwhile ends the sending too."""
    view = memoryview(data)
    while view:
        readable, writable, _ = select.select([sock], [sock], [], HANG_GUARD)
        if readable:
            return
        assert writable, "the server neither read nor answered"
        try:
            view = view[sock.send(view[: 1 << 16]) :]
        except (BrokenPipeError, ConnectionResetError):
            return


def _answers(data: bytes) -> list[tuple[int, bytes]]:
    """The status and head of each response in ``data`` (bodies skipped by length)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if status != 100:
            out.append((status, head.lower()))
        data = rest[length:] if status != 100 else rest
    return out


def _assert_ended_alone(server: ServerProcess, got: bytes, status: int) -> None:
    """One answer, ``status``, announcing the close; and the server answers others."""
    answers = _answers(got)
    assert [s for s, _ in answers] == [status], got[:2000]
    assert b"\r\nconnection: close" in answers[0][1], got[:2000]
    assert httpx.get(f"{server.url}/cache/nix-cache-info").status_code == 200


def test_an_upload_too_big_for_the_disk_is_refused_before_its_body(
    acme: ServerState, small_blobs: Path
) -> None:
    """``Expect: 100-continue`` and a length past the free space: 507 instead of the
    interim answer, ``connection: close``, and nothing of the body is asked for."""
    _, writer = acme.token("acme", "ci", fast=True)
    with running_server(acme.path) as server, _connect(server) as sock:
        path = f"/cache/acme/app/nar/{FILE_HASH}.nar.zst"
        sock.sendall(_put_head(path, 8 * MiB, writer, expect=True))
        got = _read_to_end(sock)
        assert not got.startswith(b"HTTP/1.1 100"), got
        _assert_ended_alone(server, got, 507)
        assert b"no room to store the upload" in got
        assert _stored(small_blobs) == []


def test_an_upload_refused_mid_body_ends_its_connection_only(
    acme: ServerState, small_blobs: Path, tmp_path: Path
) -> None:
    """The disk fills after the upload's length was found to fit (another writer took
    the room): 507 mid-body, no traceback, nothing kept, and what the client still sends
    is never read as a request, though the rest of the body is request after request."""
    _, writer = acme.token("acme", "ci", fast=True)
    smuggled = b"GET /cache/nix-cache-info HTTP/1.1\r\nHost: cache\r\n\r\n"
    nar = make_nar(tmp_path / "nar", os.urandom(3 * MiB // 2))
    body = zstandard.ZstdCompressor().compress(nar) + smuggled * 2000
    with running_server(acme.path) as server, _connect(server) as sock:
        path = f"/cache/acme/app/nar/{FILE_HASH}.nar.zst"
        sock.sendall(_put_head(path, len(body), writer, expect=True))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")  # it fitted
        (small_blobs / "filler").write_bytes(os.urandom(3 * MiB // 2))  # now it does not
        _send_until_answered(sock, body)
        got = _read_to_end(sock)
        _assert_ended_alone(server, got, 507)
        assert b"no room to store the upload" in got
        (small_blobs / "filler").unlink()
        assert _stored(small_blobs) == []
        log = server.log()
        assert "Traceback" not in log and len(_no_room_warnings(log)) == 1, log


@pytest.mark.parametrize("refusal", ["403 reader", "400 not zstd", "413 narinfo"])
def test_an_early_refusal_with_a_large_body_ends_its_connection_only(
    acme: ServerState, tmp_path: Path, refusal: str
) -> None:
    """403 (before the body), 400 (its first bytes) and 413 (past a bound) with several
    MiB still to come: one answer, ``connection: close``, the connection ends."""
    _, writer = acme.token("acme", "ci", fast=True)
    _, reader = acme.token("acme", "viewer", "role=reader", fast=True)
    smuggled = b"GET /cache/nix-cache-info HTTP/1.1\r\nHost: cache\r\n\r\n"
    filler = smuggled * (8 * MiB // len(smuggled))
    nar_path = f"/cache/acme/app/nar/{FILE_HASH}.nar.zst"
    status, token, path = {
        "403 reader": (403, reader, nar_path),
        "400 not zstd": (400, writer, nar_path),
        "413 narinfo": (413, writer, "/cache/acme/app/" + "0" * 32 + ".narinfo"),
    }[refusal]
    with running_server(acme.path) as server, _connect(server) as sock:
        sock.sendall(_put_head(path, len(filler), token))
        _send_until_answered(sock, filler)
        got = _read_to_end(sock)
        _assert_ended_alone(server, got, status)


def test_a_small_refused_body_is_dropped_and_the_next_request_answered(
    acme: ServerState,
) -> None:
    """A refusal before a small body was read keeps the connection in step: the body
    (which looks like a request) is dropped and the pipelined request after it is the
    one answered next."""
    _, reader = acme.token("acme", "viewer", "role=reader", fast=True)
    fake = b"GET /cache/acme/app/nix-cache-info HTTP/1.1\r\nHost: cache\r\n\r\n"
    after = b"GET /cache/nix-cache-info HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n\r\n"
    with running_server(acme.path) as server, _connect(server) as sock:
        path = f"/cache/acme/app/nar/{FILE_HASH}.nar.zst"
        sock.sendall(_put_head(path, len(fake), reader) + fake + after)
        answers = _answers(_read_to_end(sock))
        assert [s for s, _ in answers] == [403, 200]
        assert b"connection: close" not in answers[0][1]
