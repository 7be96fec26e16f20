"""Keys in PostgreSQL: a rotation on one host reaches every instance at once.

With the metadata on PostgreSQL the keyrings are rows of ``keyrings`` (the same JSON
document as the files of a single box); ``init`` writes them there, a state directory that
still has ``keys/`` files has them copied in the first time, and two real ``serve``
instances that share nothing but the database publish and sign with a key rotated through
either one on their next request.
"""

from __future__ import annotations

import json
import logging
import lzma
import shutil
from pathlib import Path

import httpx
import pytest

from nixd.errors import ConfigError
from nixd.nix.narinfo import NarInfo
from nixd.server.access.keys import JwtKeys, KeyTable, NarinfoKeys, ServerKeys
from nixd.server.storage import db
from tests.server.appenv import HASH_A, client_narinfo, make_nar
from tests.server.test_pg_instances import _twins
from tests.serverproc import running_server


def _rows(url: str) -> dict[str, int]:
    conn = db.open_db(url)
    try:
        rows = conn.execute("SELECT name, version FROM keyrings ORDER BY name").fetchall()
        return {str(name): int(version) for name, version in rows}
    finally:
        conn.close()


def test_init_keeps_the_keys_in_the_database_and_a_rotation_reaches_another_connection(
    tmp_path: Path, pg_database: str
) -> None:
    one, two = db.open_db(pg_database), db.open_db(pg_database)
    try:
        mine = ServerKeys.init(tmp_path / "a", "acme-cache-1", conn=one)
        assert not (tmp_path / "a" / "keys").exists()  # nothing on this host's disk
        theirs = ServerKeys.load(tmp_path / "b", conn=two)  # another host: no files at all
        assert theirs.narinfo.current.render() == mine.narinfo.current.render()
        assert theirs.jwt.current.kid == mine.jwt.current.kid
        assert not theirs.refresh()

        new = mine.narinfo.rotate()
        token_key = mine.jwt.rotate(retain_for=60)
        assert theirs.refresh()
        assert theirs.narinfo.current.render() == new.render()
        assert [k.name for k in theirs.narinfo.public_keys()] == ["acme-cache-2", "acme-cache-1"]
        assert theirs.jwt.current.kid == token_key.kid and theirs.jwt.current.private is not None
        assert not theirs.refresh()
        # a rotation from the other side re-reads the row first: nothing is lost
        theirs.narinfo.rotate()
        assert mine.refresh()
        names = [k.name for k in mine.narinfo.public_keys()]
        assert names == ["acme-cache-3", "acme-cache-2", "acme-cache-1"]
    finally:
        one.close()
        two.close()
    assert _rows(pg_database) == {"jwt": 2, "narinfo": 3}


def test_init_refuses_a_database_that_has_keys(tmp_path: Path, pg_database: str) -> None:
    conn = db.open_db(pg_database)
    try:
        ServerKeys.init(tmp_path / "a", "acme-cache-1", conn=conn)
        before = _rows(pg_database)
        with pytest.raises(ConfigError, match="exists already"):
            ServerKeys.init(tmp_path / "b", "other-1", conn=conn)
        assert _rows(pg_database) == before
        assert ServerKeys.load(tmp_path / "c", conn=conn).narinfo.current.name == "acme-cache-1"
    finally:
        conn.close()


def test_a_single_boxs_key_files_are_copied_in_once(
    tmp_path: Path, pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    files = ServerKeys.init(tmp_path, "box-1")  # a single box: files in keys/
    conn = db.open_db(pg_database)
    try:
        with caplog.at_level(logging.WARNING, logger="nixd.server.access.keys"):
            moved = ServerKeys.load(tmp_path, conn=conn)
        assert moved.narinfo.current.render() == files.narinfo.current.render()
        assert moved.jwt.current.kid == files.jwt.current.kid
        assert moved.narinfo.table is not None and moved.jwt.table is not None
        assert sum("no longer read" in r.getMessage() for r in caplog.records) == 2
        moved.narinfo.rotate()
        # the files are not read or written any more
        assert NarinfoKeys.load(tmp_path / "keys" / "narinfo.json").current.name == "box-1"
        shutil.rmtree(tmp_path / "keys")
        again = ServerKeys.load(tmp_path, conn=conn)
        assert again.narinfo.current.name == "box-2"
    finally:
        conn.close()


def test_an_unusable_key_file_is_refused_and_nothing_is_copied(
    tmp_path: Path, pg_database: str
) -> None:
    ServerKeys.init(tmp_path, "box-1")
    broken = tmp_path / "keys" / "jwt.json"
    broken.write_text(json.dumps({"version": 1, "keys": []}))
    conn = db.open_db(pg_database)
    try:
        with pytest.raises(ConfigError, match=r"jwt\.json: 0 current token signing keys"):
            ServerKeys.load(tmp_path, conn=conn)
        assert _rows(pg_database) == {}  # all or nothing: not even the good narinfo keys
        with pytest.raises(ConfigError, match="no token signing keys"):
            JwtKeys.from_table(KeyTable(conn, "jwt"))
    finally:
        conn.close()


def test_a_broken_row_keeps_the_keys_a_server_has(tmp_path: Path, pg_database: str) -> None:
    conn = db.open_db(pg_database)
    try:
        keys = ServerKeys.init(tmp_path, "acme-cache-1", conn=conn)
        with db.transaction(conn):
            conn.execute(
                "UPDATE keyrings SET body = ?, version = version + 1 WHERE name = 'narinfo'",
                ('{"version": 1, "keys": []}',),
            )
        with pytest.raises(ConfigError, match="0 current narinfo signing keys"):
            keys.refresh()
        assert keys.narinfo.current.name == "acme-cache-1"  # still signing with what it had
    finally:
        conn.close()


def test_a_rotation_through_one_instance_is_published_and_used_by_the_other(
    tmp_path: Path, pg_database: str
) -> None:
    a, b = _twins(tmp_path, pg_database)
    assert not (a.path / "keys").exists() and not (b.path / "keys").exists()
    a.admin("project", "create", "acme/app")
    _, member = a.token("acme", "ci", fast=True)
    auth = {"authorization": f"Bearer {member}"}
    nar = make_nar(tmp_path / "nar", b"signed by the current key\n")
    compressed = lzma.compress(nar)
    url, text = client_narinfo(HASH_A, nar, compressed)
    with running_server(a.path) as server_a, running_server(b.path) as server_b:
        for path, body in ((url, compressed), (f"{HASH_A}.narinfo", text.encode())):
            r = httpx.put(f"{server_a.url}/cache/acme/app/{path}", content=body, headers=auth)
            assert r.status_code == 200, r.text
        before = httpx.get(f"{server_b.url}/api/v1/cache/keys").json()
        assert before["current"] == a.public_key
        a.cli("key", "rotate", "--grace", "0")  # compromised: the old key goes at once
        published = httpx.get(f"{server_b.url}/api/v1/cache/keys").json()
        assert published["current"] != a.public_key
        assert published["keys"] == [published["current"]]
        got = httpx.get(f"{server_b.url}/cache/{HASH_A}.narinfo", headers=auth)
        assert got.status_code == 200, got.text
        signers = [sig.split(":", 1)[0] for sig in NarInfo.parse(got.text).sigs]
        assert signers == [published["current"].split(":", 1)[0]]
        same = httpx.get(f"{server_a.url}/api/v1/cache/keys").json()
        assert same == published
