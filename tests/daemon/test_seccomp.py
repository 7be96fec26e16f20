"""nixd's file writes under the shipped unit's system call filter (``SystemCallFilter=``).

The unit denies ``@privileged`` with EPERM, and ``fchown`` is in it: a rewrite of an
existing, root-owned ``/etc/nix/nix.conf`` that asked for a no-op ``fchown`` failed there
while every test outside the unit passed. Here the filter comes from the unit file itself
(see :mod:`tests.daemon.seccomp`), so a change to either side that breaks this fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

from tests.daemon.conftest import NIXD, DaemonProcess, cli, start_daemon, write_config
from tests.daemon.seccomp import unit_filter
from tests.daemon.tokenserver import TokenServer

REPO = Path(__file__).resolve().parents[2]


def _spec(**extra: object) -> str:
    allowed, number = unit_filter((REPO / "systemd" / "nixd.service").read_text())
    assert "fchown" not in allowed and "openat" in allowed  # the filter is what we think
    return json.dumps({"allow": allowed, "errno": number, **extra})


def _run_under_unit_filter(root: Path) -> dict[str, object]:
    spec = _spec(root=str(root))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.daemon.seccomp", spec],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_nix_conf_rewrite_works_under_the_units_seccomp_filter(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    original = "sandbox = false\nsubstituters =\n"
    (etc / "nix.conf").write_text(original)  # exists, owned by root like /etc/nix/nix.conf
    report = _run_under_unit_filter(tmp_path)
    assert report["chown_denied"] is True  # the filter really applies
    assert report["login"] == [True, True, True]
    assert report["in_effect"] is True
    assert report["include_added"] is True
    assert report["renewal"] is True
    assert report["logout"] is True
    assert report["nix_conf_restored"] == original
    problem = str(report["foreign_owner_problem"])
    assert "Operation not permitted" in problem and "!include" in problem


async def test_the_whole_daemon_runs_under_the_units_seccomp_filter(
    world_dir: Path, token_server: TokenServer, daemon_factory: list[DaemonProcess]
) -> None:
    """Start-up, login (rewriting the existing nix.conf), status and logout, all filtered."""
    config = write_config(world_dir, server_url=token_server.url)
    nix_conf = world_dir / "etc" / "nix.conf"
    nix_conf.write_text("sandbox = false\n")
    command = [
        sys.executable, "-m", "tests.daemon.seccomp", "exec", _spec(),
        *NIXD, "-v", "daemon", "--config", str(config),
    ]  # fmt: skip
    daemon = await start_daemon(world_dir, config, command=command)
    daemon_factory.append(daemon)
    try:
        await daemon.wait_for("READY=1", within=60)
    except trio.TooSlowError:
        raise AssertionError(f"no READY=1 under the filter:\n{daemon.log()}") from None
    login = await cli(
        "login", "token", "--socket", daemon.socket, stdin=token_server.api_token.encode()
    )
    assert login.returncode == 0, login.stderr + daemon.log().encode()
    assert nix_conf.read_text().startswith("sandbox = false\n!include ")
    state = json.loads((await cli("status", "--json", "--socket", daemon.socket)).stdout)
    assert state["nix"]["in_effect"] is True and state["last_error"] is None
    logout = await cli("logout", "--socket", daemon.socket)
    assert logout.returncode == 0, logout.stderr
    assert nix_conf.read_text() == "sandbox = false\n"
    assert await daemon.stop() == 0
    assert "Traceback" not in daemon.log() and "Operation not permitted" not in daemon.log()
