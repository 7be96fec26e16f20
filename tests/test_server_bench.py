"""bench/server_bench.py --backends runs every storage configuration end to end at tiny
sizes and reports every figure it promises.

Only that the figures are there and well formed, and that (c) either ran on S3 or was
skipped because the server refused its config: a benchmark's numbers on a busy machine
say nothing a test could assert (no timed assertions).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pgcluster import require_pg
from tests.realnix import nix_available

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("up closure s", "down closure s", "up big s", "down big s", "hit req/s")


@pytest.mark.realnix
def test_server_bench_backends_quick_run_reports_every_configuration(tmp_path: Path) -> None:
    if not nix_available():
        pytest.fail("the real `nix` is required (apt-get install nix-bin)")
    if shutil.which("wrk") is None:
        pytest.fail("wrk is required (scripts/setup installs it)")
    require_pg()
    if os.geteuid() != 0:
        pytest.skip("the benchmark runs Nix single-user as root")
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "bench" / "server_bench.py"), "--backends",
            "--big-mib", "2", "--closure", "8", "--runs", "1", "--wrk-runs", "1",
            "--wrk-duration", "1s",
        ],
        capture_output=True, timeout=900, check=False, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "BENCH_DIR": str(tmp_path / "bench")},
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(
            f"server_bench failed ({proc.returncode}):\n{proc.stdout.decode()}\n"
            f"{proc.stderr.decode()[-6000:]}"
        )
    result = json.loads((tmp_path / "bench" / "results-backends.json").read_text())
    text = proc.stdout.decode()

    ran = set(result["runs"])
    assert {"a", "b", "d"} <= ran
    if "c" in ran:
        assert "blobs S3" in result["configs"]["c"]
        assert "blobs S3" in result["configs"]["d"]
    else:  # the server of this tree does not take s3:// blobs: (c) says why it is skipped
        assert "storage" in result["skipped"]["c"]
        assert "SKIPPED" in text
    assert "2 instance(s)" in result["configs"]["d"]
    assert "metadata SQLite" in result["configs"]["a"]
    assert "metadata PostgreSQL" in result["configs"]["b"]
    for config in ran:
        figures = result["runs"][config]
        for metric in FIGURES:
            assert all(v > 0 and math.isfinite(v) for v in figures[metric]), (config, metric)
        assert figures["hit CPU-us/req"][0] > 0
        assert figures["hit cores nixd-server"][0] > 0
        assert figures["hit cores wrk"][0] > 0
        if config != "a":
            assert "hit cores PostgreSQL" in figures
            assert figures["up closure CPU-s PostgreSQL"][0] > 0  # the records went there
    assert "x one instance" in text and "CPU while wrk ran" in text
