"""Start-up time of the ``nixd`` command against ``python -c pass`` in the same run.

Runs, interleaved N times: ``python -c pass`` (the floor: the interpreter's own start),
``nixd --version``, ``nixd status --json`` against no daemon (a socket path that does not
exist: exit 6, the JSON error on stdout), ``nixd nar hash`` of a small tree, and
``nixd --help`` (which imports every command module, for comparison). Each command runs
as ``python -m nixd.cli`` with the interpreter of this venv, so the console script's own
overhead is the same for every row. Prints medians as a Markdown table with the ratio
against the floor, and the cumulative import time of the three fast commands from
``python -X importtime`` (top modules), which says where the time goes.

    .venv/bin/python bench/cli_bench.py [--runs 15]

The target on the 2-core development machine is under 0.3 s wall clock for the three
fast commands. No test asserts a time: a busy machine would make that flaky.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def import_top(cmd: list[str], env: dict[str, str], top: int = 5) -> list[tuple[int, str]]:
    """The ``top`` slowest top-level imports (cumulative µs) of one run of ``cmd``."""
    proc = subprocess.run(
        [PY, "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True, check=False
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cumulative, name = line.removeprefix("import time:").split("|")
        if not name.startswith("  "):  # one space: imported at top level, not nested
            rows.append((int(cumulative), name.strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp, "tree")
        (tree / "sub").mkdir(parents=True)
        for i in range(20):
            (tree / "sub" / f"f{i}").write_bytes(os.urandom(512))
        env = dict(os.environ, NIXD_CONTROL_SOCKET=str(Path(tmp, "no-daemon.sock")))
        nixd = [PY, "-m", "nixd.cli"]
        cases = {
            "python -c pass": [PY, "-c", "pass"],
            "nixd --version": [*nixd, "--version"],
            "nixd status --json (no daemon)": [*nixd, "status", "--json"],
            "nixd nar hash (21 files)": [*nixd, "nar", "hash", str(tree)],
            "nixd --help (every module)": [*nixd, "--help"],
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for cmd in cases.values():  # warm the page cache and .pyc files
            timed(cmd, env)
        for _ in range(args.runs):
            for name, cmd in cases.items():
                times[name].append(timed(cmd, env))
        floor = statistics.median(times["python -c pass"])
        print(f"median of {args.runs} interleaved runs; python: {PY}\n")
        print("| command | median s | min s | ratio to python -c pass |")
        print("|---|---:|---:|---:|")
        for name, samples in times.items():
            med = statistics.median(samples)
            print(f"| {name} | {med:.3f} | {min(samples):.3f} | {med / floor:.1f}x |")
        print("\nslowest top-level imports (cumulative, one run of -X importtime):")
        for name, cmd in list(cases.items())[1:4]:
            tops = ", ".join(f"{mod} {us / 1000:.1f} ms" for us, mod in import_top(cmd, env))
            print(f"- {name}: {tops}")


if __name__ == "__main__":
    main()
