"""``nixd nar`` as a user runs it: a real process, pipes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nixd import exitcodes
from tests.nix.test_nar import build_tree, snapshot
from tests.realnix import RealNix

NIXD = [sys.executable, "-m", "nixd.cli"]


def nixd(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*NIXD, *args], input=input, capture_output=True, timeout=60, check=False)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    build_tree(root)
    return root


def assert_one_line_error(
    proc: subprocess.CompletedProcess[bytes], *needles: str, code: int = exitcodes.FAILURE
) -> str:
    assert proc.returncode == code
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("nixd: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err
    return err


def test_dump_equals_nix_store_dump(real_nix: RealNix, tree: Path) -> None:
    proc = nixd("nar", "dump", str(tree))
    assert proc.returncode == 0, proc.stderr
    ref = real_nix.run(["nix-store", "--dump", str(tree)], store=False).stdout
    assert proc.stdout == ref


def test_hash_equals_nix_hash_path(real_nix: RealNix, tree: Path) -> None:
    proc = nixd("nar", "hash", str(tree))
    assert proc.returncode == 0, proc.stderr
    want = real_nix.run(["nix", "hash", "path", "--base32", str(tree)]).stdout.decode().strip()
    size = len(real_nix.run(["nix-store", "--dump", str(tree)], store=False).stdout)
    assert proc.stdout.decode() == f"sha256:{want} {size}\n"

    proc = nixd("nar", "hash", "--json", str(tree))
    assert json.loads(proc.stdout) == {"narHash": f"sha256:{want}", "narSize": size}


def test_restore_from_stdin(real_nix: RealNix, tree: Path, tmp_path: Path) -> None:
    data = real_nix.run(["nix-store", "--dump", str(tree)], store=False).stdout
    proc = nixd("nar", "restore", str(tmp_path / "out"), input=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == proc.stderr == b""
    assert snapshot(tmp_path / "out") == snapshot(tree)


def test_restore_of_a_broken_nar_says_where_and_cleans_up(tree: Path, tmp_path: Path) -> None:
    data = nixd("nar", "dump", str(tree)).stdout
    dest = tmp_path / "out"
    proc = nixd("nar", "restore", str(dest), input=data[:20000])
    assert_one_line_error(
        proc,
        "NAR byte 20000",
        "truncated",
        "removed the partial tree",
        code=exitcodes.VERIFICATION,
    )
    assert not dest.exists()

    proc = nixd("nar", "restore", str(dest), input=data + b"\0")
    assert_one_line_error(
        proc, f"NAR byte {len(data)}", "trailing bytes", code=exitcodes.VERIFICATION
    )
    assert not dest.exists()

    dest.mkdir()
    (dest / "x").write_bytes(b"")
    proc = nixd("nar", "restore", str(dest), input=data)
    assert_one_line_error(proc, "not an empty directory")
    assert [p.name for p in dest.iterdir()] == ["x"]


def test_errors_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(nixd("nar", "hash", str(tmp_path / "missing")), "missing")
    (tmp_path / "fifo").mkdir()
    fifo = tmp_path / "fifo" / "p"
    os.mkfifo(fifo)
    assert_one_line_error(nixd("nar", "dump", str(tmp_path / "fifo")), str(fifo), "fifo")


def test_dump_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"\0" * (8 << 20))
    with subprocess.Popen(
        [*NIXD, "nar", "dump", str(big)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(1000)
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 141
    assert err == b""


@pytest.mark.parametrize("sub", [[], ["dump"], ["hash"], ["restore"]])
def test_help(sub: list[str]) -> None:
    proc = nixd("nar", *sub, "--help")
    assert proc.returncode == 0
    assert b"usage: nixd nar" in proc.stdout
    assert b"examples:" in proc.stdout or not sub
