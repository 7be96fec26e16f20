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

from tests.daemon.seccomp import unit_filter

REPO = Path(__file__).resolve().parents[2]


def _run_under_unit_filter(root: Path) -> dict[str, object]:
    allowed, number = unit_filter((REPO / "systemd" / "nixd.service").read_text())
    assert "fchown" not in allowed and "openat" in allowed  # the filter is what we think
    spec = json.dumps({"allow": allowed, "errno": number, "root": str(root)})
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
