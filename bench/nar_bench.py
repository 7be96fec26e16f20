"""NAR dump + NarHash throughput of nixd against `nix-store --dump | sha256sum`.

Builds two trees in a temporary directory (one big file; many small files), then, for
each, interleaves in every run: the reference pipeline, nixd in-process
(``hash_path``, and ``validate(dump())`` which also parses the stream as the server does
for uploads), and the ``nixd nar hash`` command as a child process whose peak RSS is read
from ``wait4``. Prints medians as a Markdown table, with the throughput ratio against the
reference of the same run. The page cache is warmed first, so this measures CPU, not disk.

    .venv/bin/python bench/nar_bench.py [--big-mib 1024] [--small-files 20000]
        [--small-mib 1024] [--runs 5] [--dir /tmp]

The data is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nixd.nix import nar
from nixd.nix.hashes import Hash

MiB = 1 << 20
NIXD = str(Path(sys.executable).with_name("nixd"))


def make_big(path: Path, size: int) -> None:
    block = bytearray(random.randbytes(MiB))
    with open(path, "wb") as f:
        for i in range(0, size, MiB):
            block[:8] = i.to_bytes(8, "little")  # no two blocks alike
            f.write(block[: min(MiB, size - i)])


def make_small(root: Path, count: int, total: int) -> None:
    rng = random.Random(1)
    pool = random.randbytes(4 * MiB)
    mean = total // count
    per_dir = 100
    for i in range(count):
        d = root / f"d{i // per_dir:04}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        size = min(int(rng.expovariate(1 / mean)), len(pool) - 1)
        off = rng.randrange(len(pool) - size)
        f = d / f"file-{i:05}"
        f.write_bytes(pool[off : off + size])
        if i % 10 == 0:
            f.chmod(0o755)


def reference(path: Path) -> str:
    out = subprocess.run(
        ["bash", "-c", f"set -o pipefail; nix-store --dump {shlex.quote(str(path))} | sha256sum"],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return out.split()[0]


def nix_hash_path(path: Path) -> str:
    """Nix's own NarHash computation (OpenSSL sha256, one process): a second, harder bar."""
    out = subprocess.run(
        [
            "nix",
            "--extra-experimental-features",
            "nix-command",
            "hash",
            "path",
            "--base16",
            str(path),
        ],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return out.strip()


def in_process(path: Path) -> str:
    digest, _ = nar.hash_path(path)
    return digest.digest.hex()


def dump_validate(path: Path) -> str:
    digest, _ = nar.validate(nar.dump(path))
    return digest.digest.hex()


_last_rss_kib = 0


def cli(path: Path) -> str:
    global _last_rss_kib  # noqa: PLW0603
    proc = subprocess.Popen([NIXD, "nar", "hash", str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out
    _last_rss_kib = usage.ru_maxrss
    return Hash.parse(out.split()[0]).digest.hex()


def timed(fn: Callable[[Path], str], path: Path) -> tuple[float, str]:
    t = time.perf_counter()
    result = fn(path)
    return time.perf_counter() - t, result


def bench(label: str, path: Path, runs: int) -> list[str]:
    size = sum(len(c) for c in nar.dump(path))  # also warms the page cache
    reference(path)
    methods: dict[str, Callable[[Path], str]] = {
        "nix-store --dump \\| sha256sum": reference,
        "nix hash path": nix_hash_path,
        "nixd hash_path (in-process)": in_process,
        "nixd validate(dump()) (in-process)": dump_validate,
        "`nixd nar hash` (process)": cli,
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    rss: list[int] = []
    for _ in range(runs):
        want = None
        for name, fn in methods.items():
            dt, digest = timed(fn, path)
            want = want or digest
            assert digest == want, f"{name} disagrees: {digest} != {want}"
            times[name].append(dt)
            if fn is cli:
                rss.append(_last_rss_kib)
    ref = statistics.median(times["nix-store --dump \\| sha256sum"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        extra = f", peak RSS {max(rss) / 1024:.1f} MiB" if name.startswith("`nixd nar") else ""
        rows.append(
            f"| {label} | {name} | {med:.3f} | {size / MiB / med:.0f} | {ref / med:.2f}{extra} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the one big file")
    parser.add_argument("--small-files", type=int, default=20000, help="number of small files")
    parser.add_argument("--small-mib", type=int, default=1024, help="total of the small files")
    parser.add_argument("--runs", type=int, default=5, help="runs per method (median)")
    parser.add_argument("--dir", default=None, help="where to create the data (default TMPDIR)")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="nar-bench-", dir=args.dir))
    try:
        print(f"building data in {base} ...", file=sys.stderr)
        make_big(base / "big", args.big_mib * MiB)
        make_small(base / "small", args.small_files, args.small_mib * MiB)
        rows = [
            "| tree | method | median s | MiB/s | x reference |",
            "|---|---|---|---|---|",
        ]
        rows += bench(f"1 file, {args.big_mib} MiB", base / "big", args.runs)
        rows += bench(f"{args.small_files} files, {args.small_mib} MiB", base / "small", args.runs)
        print("\n".join(rows))
    finally:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
