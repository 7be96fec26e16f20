"""One policy for every instance on PostgreSQL; ``policy apply`` and ``show`` on both kinds.

With PostgreSQL metadata the policy in force is the database's (the same TOML, one row):
the first instance to start copies ``policy.toml`` in, ``nixd-server policy apply``
changes it for every instance, a broken file changes nothing, and a deny applied through
one host is enforced by another real ``serve`` that shares nothing but the database.
"""

from __future__ import annotations

import json
import logging
import lzma
import time
from pathlib import Path

import httpx
import pytest

from nixd.errors import ConfigError
from nixd.server.access.shared_policy import PolicyTable, apply_policy, open_policy
from nixd.server.config import ServerConfig
from nixd.server.storage import db
from tests.server.appenv import HASH_A, HASH_B, client_narinfo, make_nar
from tests.server.conftest import ServerState, audit_text, init_state, run_cli
from tests.server.test_pg_instances import _twins
from tests.serverproc import running_server

DENY_CI_WRITES = """
[[rule]]
id = "ci-frozen"
effect = "deny"
subjects = [{ kind = "token", org = "acme", name = "ci" }]
actions = ["cache:write"]
resources = ["*"]
"""


def _policy(state: ServerState) -> Path:
    return ServerConfig.load(state.path).policy_path


def test_the_first_start_copies_the_file_in_and_a_differing_file_is_only_warned_about(
    tmp_path: Path, pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = init_state(tmp_path / "s", pg_database)
    logging.getLogger().addHandler(caplog.handler)  # the in-process init set up its own
    path = _policy(state)
    conn = db.open_db(pg_database)
    try:
        with caplog.at_level(logging.WARNING, logger="nixd.server.access.shared_policy"):
            holder = open_policy(path, conn)
        assert PolicyTable(conn).read() == path.read_bytes()
        assert any("copied the policy" in r.getMessage() for r in caplog.records)
        rules = {r.id for r in holder.current.rules}
        assert "acme-members" in rules
        caplog.clear()
        path.write_text(path.read_text() + DENY_CI_WRITES)  # an edit on one host's disk
        with caplog.at_level(logging.WARNING, logger="nixd.server.access.shared_policy"):
            again = open_policy(path, conn)
        assert any("differs from the policy in force" in r.getMessage() for r in caplog.records)
        assert {r.id for r in again.current.rules} == rules  # the database's, not the file's
        assert not holder.reload()
    finally:
        conn.close()


def test_apply_checks_the_file_and_puts_it_in_force_for_every_holder(
    tmp_path: Path, pg_database: str
) -> None:
    state = init_state(tmp_path / "s", pg_database)
    conn = db.open_db(pg_database)
    try:
        holder = open_policy(_policy(state), conn)
        before = PolicyTable(conn).read()
        broken = tmp_path / "broken.toml"
        broken.write_text('[[rule]]\nid = "x"\neffect = "allow-ish"\n')
        out = run_cli("policy", "apply", str(state.path), str(broken), check=False)
        assert out.returncode != 0 and f"{broken}:" in out.stderr
        assert PolicyTable(conn).read() == before
        new = tmp_path / "new.toml"
        new.write_text(_policy(state).read_text() + DENY_CI_WRITES)
        out = run_cli("policy", "apply", str(state.path), str(new), "--json")
        applied = json.loads(out.stdout)
        assert applied["changed"] is True and applied["where"] == PolicyTable.where
        assert holder.reload()
        assert "ci-frozen" in {r.id for r in holder.current.rules}
        again = json.loads(run_cli("policy", "apply", str(state.path), str(new), "--json").stdout)
        assert again["changed"] is False
        shown = run_cli("policy", "show", str(state.path)).stdout
        assert shown == new.read_text()
        explained = run_cli(
            "policy", "explain", str(state.path), "--identity", "token:acme/ci",
            "--attr", "org=acme", "--attr", "name=ci", "--action", "cache:write",
            "--resource", "acme/app", check=False,
        )  # fmt: skip
        assert explained.returncode == 2 and "ci-frozen" in explained.stdout
    finally:
        conn.close()
    audit = audit_text(state.path)
    assert audit.count('"admin:policy.apply"') == 1  # the unchanged second apply is not an event


def test_apply_on_a_single_box_replaces_the_file(tmp_path: Path) -> None:
    state = init_state(tmp_path / "s")
    path = _policy(state)
    new = tmp_path / "new.toml"
    new.write_text(path.read_text() + DENY_CI_WRITES)
    conn = db.open_db(state.path / "server.db")
    try:
        policy, changed, _ = apply_policy(new, path, conn)
        assert changed and path.read_text() == new.read_text()
        assert "ci-frozen" in {r.id for r in policy.rules}
        assert apply_policy(path, path, conn)[1] is False  # checked in place
        (tmp_path / "bad.toml").write_text("[[rule]\n")
        with pytest.raises(ConfigError, match=r"bad\.toml:1"):
            apply_policy(tmp_path / "bad.toml", path, conn)
        assert path.read_text() == new.read_text()
    finally:
        conn.close()


def _put(url: str, auth: dict[str, str], hash_part: str, tmp_path: Path) -> int:
    nar = make_nar(tmp_path / hash_part, f"uploaded as {hash_part}\n".encode())
    compressed = lzma.compress(nar)
    nar_url, _ = client_narinfo(hash_part, nar, compressed)
    return httpx.put(
        f"{url}/cache/acme/app/{nar_url}", content=compressed, headers=auth
    ).status_code


def test_a_deny_applied_through_one_host_is_enforced_by_the_other(
    tmp_path: Path, pg_database: str
) -> None:
    a, b = _twins(tmp_path, pg_database)
    a.admin("project", "create", "acme/app")
    _, ci = a.token("acme", "ci", fast=True)
    auth = {"authorization": f"Bearer {ci}"}
    with running_server(a.path) as server_a, running_server(b.path) as server_b:
        assert _put(server_b.url, auth, HASH_A, tmp_path) == 200
        new = tmp_path / "frozen.toml"
        new.write_text(_policy(a).read_text() + DENY_CI_WRITES)
        a.cli("policy", "apply", str(new))
        deadline = time.monotonic() + 60  # a guard only: each instance re-reads every second
        for server in (server_b, server_a):
            while _put(server.url, auth, HASH_B, tmp_path) == 200:
                assert time.monotonic() < deadline, f"{server.url} never applied the deny"
                time.sleep(0.2)
            assert _put(server.url, auth, HASH_B, tmp_path) == 403


def test_an_edit_of_the_file_on_a_shared_database_is_warned_about_once(
    tmp_path: Path, pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = init_state(tmp_path / "s", pg_database)
    logging.getLogger().addHandler(caplog.handler)  # the in-process init set up its own
    path = _policy(state)
    conn = db.open_db(pg_database)
    try:
        holder = open_policy(path, conn)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nixd.server.access.policy"):
            assert not holder.reload()  # the file as it is in force: nothing to say
            path.write_text(path.read_text() + DENY_CI_WRITES)
            assert not holder.reload()  # not in force ...
            assert not holder.reload()
        warned = [r.getMessage() for r in caplog.records if "policy apply" in r.getMessage()]
        assert len(warned) == 1 and str(path) in warned[0]  # ... and said once
        assert "ci-frozen" not in {r.id for r in holder.current.rules}
    finally:
        conn.close()


def test_a_database_outage_keeps_the_policy_and_is_logged_once(
    tmp_path: Path, pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = init_state(tmp_path / "s", pg_database)
    logging.getLogger().addHandler(caplog.handler)  # the in-process init set up its own
    conn = db.open_db(pg_database)
    try:
        holder = open_policy(_policy(state), conn)
        rules = {r.id for r in holder.current.rules}
        with db.transaction(conn):
            conn.execute("ALTER TABLE policies RENAME TO policies_away")
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="nixd.server.access.policy"):
            for _ in range(3):  # the watcher asks every second
                assert not holder.reload()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "cannot read the policy" in errors[0].getMessage()
        assert holder.last_error is not None
        assert {r.id for r in holder.current.rules} == rules  # still in force
        with db.transaction(conn):
            conn.execute("ALTER TABLE policies_away RENAME TO policies")
        assert not holder.reload() and holder.last_error is None
    finally:
        conn.close()
