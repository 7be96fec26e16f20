"""The README's main command, end to end: server, daemon, proxy and the real `nix`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.realnix import nix_available

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.realnix
def test_demo_substitutes_through_the_proxy(tmp_path: Path) -> None:
    if not nix_available():
        pytest.fail("the real `nix` is required (apt-get install nix-bin)")
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--summary", str(summary)],
        capture_output=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        pytest.fail(f"demo failed ({proc.returncode}):\n{out}\n{proc.stderr.decode()}")
    result = json.loads(summary.read_text())
    assert len(result["closure"]) == 3
    # the first fresh store got the whole closure through the proxy, from the server
    assert result["substituted"] == result["closure"]
    # the second, with the server stopped, from the proxy's verified local store
    assert result["substituted_offline"] == result["closure"]
    assert result["greeting"] == "hello from a private cache"
    status = result["status"]
    assert status["logged_in"] and status["identity"] == "token:acme/laptop"
    # no token, API or access, is printed or logged anywhere
    for secret in result["secrets"]:
        assert secret not in out
        for log in result["logs"].values():
            assert secret not in log
