"""bench/proxy_bench.py runs end to end at tiny sizes and reports every figure it promises.

Only that the figures are there and well formed: a benchmark's numbers on a busy machine
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

from tests.realnix import nix_available

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.realnix
def test_proxy_bench_quick_run_reports_every_figure(tmp_path: Path) -> None:
    if not nix_available():
        pytest.fail("the real `nix` is required (apt-get install nix-bin)")
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is required (scripts/setup installs it)")
    if os.geteuid() != 0:
        pytest.skip("the benchmark runs Nix single-user as root")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "bench" / "proxy_bench.py"), "--quick",
            "--big-mib", "2", "--closure", "8", "--shootout-mib", "4", "--shootout-paths", "8",
            "--connections", "1", "--wrk-duration", "1s", "--no-drop-caches",
            "--work", str(tmp_path / "work"), "--json", str(out),
        ],
        capture_output=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(
            f"proxy_bench failed ({proc.returncode}):\n{proc.stdout.decode()}\n"
            f"{proc.stderr.decode()[-6000:]}"
        )
    result = json.loads(out.read_text())
    text = proc.stdout.decode()

    config = result["config"]
    assert config["page_cache_dropped"] is False
    assert config["server"]["workers"] >= 1
    assert "durable_reads" in config["server"]["audit"]
    upstream = config["proxy_config"]["upstreams"][0]
    assert upstream["auth"] == "nixd" and upstream["url"].endswith("/cache")

    rows = {(r["workload"], r["source"], r["phase"]): r for r in result["summary"]}
    passes = {
        "nginx-direct": ("nix", "nginx-direct"),
        "nginx-rproxy": ("nix", "nginx-rproxy", "nginx-direct"),
        "proxy": ("nix", "proxy", "nixd-server"),
    }
    for workload in ("big", "closure", "shootout"):
        for source, phase in (
            ("nginx-direct", "cold"), ("nginx-direct", "warm"), ("nginx-rproxy", "cold"),
            ("proxy", "cold"), ("proxy", "warm"),
        ):  # fmt: skip
            row = rows[(workload, source, phase)]
            assert row["wall_s"] > 0 and math.isfinite(row["x_direct"])
            assert set(row["cost"]) == set(passes[source])
            for cost in row["cost"].values():
                assert cost["cpu_s_per_gib"] >= 0
                assert "cpu_us_per_req" in cost
            assert row["cost"][source]["requests"] > 0  # the first hop answered Nix
        # a cold proxy fetched from the nixd-server; a warm one answered from its store
        assert rows[(workload, "proxy", "cold")]["cost"]["nixd-server"]["requests"] > 0
        assert rows[(workload, "proxy", "cold")]["upstream_bytes"] > 0
        for phase in ("cold", "warm"):
            row = rows[(workload, "proxy", phase)]
            assert row["proxy_cpu_after_s"] >= 0
            assert row["proxy_kinds"]["nar"]["count"] > 0
            assert row["proxy_kinds"]["narinfo"]["mean_ms"] > 0

    medians = result["narinfo_medians"]
    assert set(medians) == {"proxy", "nixd-server", "nginx-direct"}
    for m in medians.values():
        assert m["req_s"] > 0 and m["p99_ms"] >= m["p50_ms"] > 0
        assert m["cpu_us_per_req"] > 0
    assert medians["proxy"]["upstream_requests"] == 0  # warm: answered from memory

    targets = result["targets"]
    assert len(targets) == 10
    assert all(isinstance(t["pass"], bool) for t in targets)
    assert text.count("PASS") + text.count("MISS") >= len(targets)
    assert "CPU-s/GiB" in text and "CPU-us/req" in text
