"""A small real filesystem for tests of a full disk: a tmpfs of a chosen size.

Mounting needs CAP_SYS_ADMIN (the tests run as root); where it is refused the test is
skipped, never faked. A tmpfs can be made bigger in place (:func:`resize`), which is how
a test "makes room" without moving what is on it.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(path: Path, size: str, options: str = "") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (created; needs CAP_SYS_ADMIN, as root has)."""
    path.mkdir(exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size: str) -> None:
    """Give the tmpfs mounted at ``path`` a new size, keeping its files."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)
