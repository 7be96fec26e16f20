"""The page cache window: blocks are dropped only behind readers, and bytes stay intact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nixd.proxy import pagecache


def test_recycler_drops_only_behind_the_slowest_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pagecache, "BLOCK", 64 << 10)
    monkeypatch.setattr(pagecache, "KEEP", 128 << 10)
    data = os.urandom(1 << 20)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        recycler = pagecache.Recycler(fd)
        if not recycler.enabled:
            pytest.skip("no sync_file_range on this platform")
        reader = 0
        for pos in range(0, len(data), 16 << 10):
            os.write(fd, data[pos : pos + (16 << 10)])
            reader = max(0, pos - (256 << 10))  # a reader 256 KiB behind the writer
            recycler.written(pos + (16 << 10), reader)
            assert recycler._dropped <= max(0, reader - (128 << 10))
        assert recycler._dropped >= len(data) - (512 << 10)
        recycler.written(len(data), len(data))  # the reader caught up
        assert recycler._dropped == len(data) - (128 << 10)
        assert os.pread(fd, len(data), 0) == data  # dropped pages come back from disk
    finally:
        os.close(fd)


def test_drop_behind_leaves_small_files_alone(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        pagecache.drop_behind(fd, 0, 4096, 4096)  # below BIG: a no-op, and never raises
        pagecache.drop_behind(fd, 0, 4096, pagecache.BIG)
        assert os.pread(fd, 4096, 0) == b"x" * 4096
    finally:
        os.close(fd)
