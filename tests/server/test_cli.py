"""``nixd-server`` administration commands, in-process."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from nixd.nix.signing import PublicKey
from nixd.server.access.audit import verify
from nixd.server.access.keys import ServerKeys
from nixd.server.cli.main import build_parser, main
from tests.server.conftest import ServerState


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [
        ["init"],
        ["serve"],
        ["token", "create"],
        ["token", "list"],
        ["token", "revoke"],
        ["org", "create"],
        ["project", "create"],
        ["project", "list"],
        ["policy", "explain"],
        ["audit", "verify"],
        ["key", "rotate"],
    ]
    for cmd in commands:
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([*cmd, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert "STATE_DIR" in out, cmd


def test_init_tokens_projects_and_audit(server_state: ServerState) -> None:
    assert server_state.admin_token.startswith("nixd_")
    cred, token = server_state.token("acme", "ci", "role=member", expires="30d", fast=True)
    listed = json.loads(server_state.admin("token", "list", "--json"))
    assert {t["name"] for t in listed} == {"admin", "ci"}
    assert all(token not in json.dumps(t) for t in listed)
    ci = next(t for t in listed if t["name"] == "ci")
    assert ci["state"] == "active" and ci["attributes"]["role"] == "member" and ci["expires"]
    server_state.admin("token", "revoke", "acme/ci")
    listed = json.loads(server_state.admin("token", "list", "--json", "--all"))
    assert next(t for t in listed if t["id"] == cred)["state"] == "revoked"
    out = server_state.admin("project", "create", "acme/app", "--public")
    assert "created project acme/app (public)" in out
    assert "acme/app\tpublic" in server_state.admin("project", "list")
    # Admin changes are in the audit log, which verifies.
    log = (server_state.path / "audit.log").read_text()
    assert '"admin:token.revoke"' in log and '"admin:project.create"' in log
    assert verify(server_state.path / "audit.log").ok


def test_errors_are_one_line(server_state: ServerState, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["project", "create", str(server_state.path), "nope/app"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nixd-server: error: ") and "org create" in err
    assert (
        main(
            [
                "token",
                "create",
                str(server_state.path),
                "--org",
                "acme",
                "--name",
                "x",
                "--expires",
                "soon",
            ]
        )
        == 1
    )
    assert "--expires 'soon'" in capsys.readouterr().err


def test_policy_explain(server_state: ServerState) -> None:
    out = io.StringIO()
    args = [
        "policy",
        "explain",
        str(server_state.path),
        "--identity",
        "token:ci",
        "--attr",
        "org=acme",
        "--action",
        "cache:write",
        "--resource",
        "acme/app",
    ]
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    assert "decision: allow" in out.getvalue() and "acme-members" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--attr", "role=reader", "--json"]) == 2
    decided = json.loads(out.getvalue())
    assert decided["decision"] == "deny" and decided["rule"] == "acme-readers-read-only"


def test_key_rotate_keeps_old_key_published(server_state: ServerState) -> None:
    old = PublicKey.parse(server_state.public_key)
    out = server_state.admin("key", "rotate")
    keys = ServerKeys.load(server_state.path)
    assert keys.narinfo.current.name == "acme-cache-2"
    assert [k.name for k in keys.narinfo.public_keys()] == ["acme-cache-2", old.name]
    assert "acme-cache-2:" in out
    server_state.admin("key", "rotate", "--tokens", "--grace", "0")
    assert len(ServerKeys.load(server_state.path).jwt.jwks()["keys"]) == 1
