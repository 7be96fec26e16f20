"""200 zstd NAR uploads through the app in-process, and the server's memory stays flat.

A reference cycle through zstandard's stream_writer (a C object the cycle collector
cannot see into) once kept every zstd upload alive whole, its compression and
decompression contexts included: ~0.85 MiB per ``nix copy --to ...?compression=zstd``
(see ``_Sink`` in :mod:`nixd.server.storage.store`). The leak was in C allocations, which
tracemalloc does not see (it traces Python's allocator only), so the measure here is the
process's resident set, read after a warm-up (thread pool, caches, malloc arenas) and
after the uploads, each time after a full collection. 200 leaked uploads would add
~170 MiB; the bound is far below that and far above what the warm process moves.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from pathlib import Path

import pytest

from nixd.nix import base32
from tests.server.appenv import Env, make_nar, upload

UPLOADS = 200
WARMUP = 20
MiB = 1 << 20
BOUND = 8 * MiB
"""Growth allowed over UPLOADS uploads: a 0.85 MiB-per-upload leak is ~170 MiB."""


def resident() -> int:
    """This process's resident set in bytes (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


async def upload_zstd(env: Env, tmp_path: Path, i: int) -> None:
    """One upload as ``nix copy --to '...?compression=zstd'`` makes it: NAR, then narinfo."""
    nar = make_nar(tmp_path / "nar", i.to_bytes(4, "big") + os.urandom(2048) + b"x" * 30_000)
    hash_part = base32.encode(hashlib.sha256(b"path %d" % i).digest()[:20])
    async with env.client(auth=env.member) as c:
        r = await upload(c, "acme/app", hash_part, nar, compression="zstd")
        assert r.status_code == 200, r.text


async def test_zstd_uploads_leave_the_memory_flat(
    env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # pytest keeps every log record it captures: two INFO lines an upload would be
    # measured as growth. Warnings and errors still show.
    caplog.set_level(logging.WARNING, logger="nixd")
    for i in range(WARMUP):
        await upload_zstd(env, tmp_path, i)
    gc.collect()
    before = resident()
    for i in range(WARMUP, WARMUP + UPLOADS):
        await upload_zstd(env, tmp_path, i)
    gc.collect()
    grown = resident() - before
    assert grown < BOUND, (
        f"{UPLOADS} zstd uploads grew the resident set by {grown / MiB:.1f} MiB "
        f"({grown / UPLOADS / 1024:.0f} KiB each)"
    )
