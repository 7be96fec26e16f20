"""``nixd-server audit verify`` and ``audit export`` on both metadata backends.

On SQLite they read the state directory's file (as before); on PostgreSQL the database's
table. Either way ``export --output`` writes a file (and its head) that ``verify --file``
accepts, and tampering makes ``verify`` exit 2 naming the first bad line or record.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from nixd.server.access.audit import verify
from nixd.server.config import ServerConfig
from tests.server.conftest import ServerState

BOTH_BACKENDS = True


def _admin_changes(state: ServerState) -> None:
    state.admin("project", "create", "acme/app")
    state.admin("project", "create", "acme/lib")
    state.token("acme", "ci", fast=True)


def test_verify_and_export_read_the_configured_log(
    server_state: ServerState, metadata: str, tmp_path: Path
) -> None:
    _admin_changes(server_state)
    checked = server_state.cli("audit", "verify")
    assert "OK:" in checked.stdout
    result = json.loads(server_state.cli("audit", "verify", "--json").stdout)
    assert result["ok"] and result["lines"] >= 4  # init, two projects, a token
    assert result["unit"] == ("record" if metadata == "postgresql" else "line")
    assert (server_state.path / "audit.log").exists() == (metadata == "sqlite")

    out = tmp_path / "exported.log"
    server_state.cli("audit", "export", "--output", str(out))
    exported = verify(out)
    assert exported.ok and exported.lines == result["lines"], exported.describe()
    assert "reaches its recorded head" in exported.head
    assert json.loads(server_state.cli("audit", "verify", "--file", str(out), "--json").stdout)[
        "ok"
    ]
    to_stdout = server_state.cli("audit", "export").stdout
    assert to_stdout == out.read_text()
    actions = [json.loads(line)["action"] for line in to_stdout.splitlines()]
    assert actions[:1] == ["admin:init"] and "admin:token.create" in actions


def test_tampering_makes_verify_and_export_exit_2_naming_it(
    server_state: ServerState, metadata: str, tmp_path: Path
) -> None:
    _admin_changes(server_state)
    before = json.loads(server_state.cli("audit", "verify", "--json").stdout)["lines"]
    config = ServerConfig.load(server_state.path)
    if metadata == "postgresql":
        with psycopg.connect(str(config.database), autocommit=True) as conn:
            conn.execute("DELETE FROM audit_log WHERE seq = 2")
        where = "record 2: record 2 was removed"
    else:
        lines = config.audit_path.read_text().splitlines(keepends=True)
        config.audit_path.write_text("".join(lines[:1] + lines[2:]))
        where = "line 2: record 2 was removed"
    bad = server_state.cli("audit", "verify", check=False)
    assert bad.returncode == 2
    assert "FAILED" in bad.stderr and where in bad.stderr, bad.stderr
    as_json = json.loads(server_state.cli("audit", "verify", "--json", check=False).stdout)
    assert (as_json["ok"], as_json["first_bad"]) == (False, 2)
    out = tmp_path / "exported.log"
    exported = server_state.cli("audit", "export", "--output", str(out), check=False)
    assert exported.returncode == 2 and where in exported.stderr
    # Every record left is exported (the evidence), and the file fails verify the same way.
    assert len(out.read_text().splitlines()) == before - 1
    file_result = verify(out)
    assert (file_result.ok, file_result.first_bad) == (False, 2), file_result.describe()
