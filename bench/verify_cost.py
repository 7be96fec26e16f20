"""CPU cost of verifying a streamed NAR in one pass, by where the work runs.

Feeds one zstd NAR file through what a proxy download does per batch (write to a temp
file, sha256 of the file, zstd decompression, sha256 of the NAR) in three ways:

- ``loop``: inline on the trio event loop (what blocks every other request);
- ``to_thread``: one ``trio.to_thread.run_sync`` per batch, the batch a view of a reused
  1 MiB buffer (the proxy's choice, :mod:`nixd.proxy.singleflight`);
- ``worker``: one long-lived thread per download fed through a bounded ``queue.Queue``
  (each batch copied out of the reused buffer), progress reported back to the loop with
  ``TrioToken.run_sync_soon``.

Batches are copied into the reused buffer first, as the upstream reader's ``recv_into``
does. Prints process CPU seconds (user + system, both threads) per GiB of file and the
wall time. Usage: ``python bench/verify_cost.py [NAR MiB] [rounds]``.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import resource
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable

import trio
import zstandard

from nixd.nix.hashes import Hash
from nixd.nix.narinfo import NarInfo
from nixd.nix.storepath import StorePath
from nixd.proxy.verify import NarVerifier

BATCH = 1 << 20
GiB = 1 << 30


def make_nar(mib: int) -> tuple[bytes, NarInfo]:
    """A NAR that compresses about 2.4:1 (random blocks between repeated text), its zstd
    file and a narinfo naming both."""
    rng = random.Random(1)
    parts = []
    size = 0
    text = b"some text that repeats, as binaries and docs do " * 80
    while size < mib << 20:
        part = rng.randbytes(4096) if rng.random() < 0.3 else text[: rng.randrange(1024, 4096)]
        parts.append(part)
        size += len(part)
    nar = b"".join(parts)
    file = zstandard.ZstdCompressor(level=3).compress(nar)
    info = NarInfo(
        store_path=StorePath.from_basename("0" * 32 + "-bench"),
        url="nar/x.nar.zst",
        compression="zstd",
        file_hash=Hash("sha256", hashlib.sha256(file).digest()),
        file_size=len(file),
        nar_hash=Hash("sha256", hashlib.sha256(nar).digest()),
        nar_size=len(nar),
        references=(),
        deriver=None,
        system=None,
        sigs=(),
        ca=None,
    )
    return file, info


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def batches(file: bytes, buffer: bytearray) -> AsyncIterator[memoryview]:
    """Yield views of ``buffer`` refilled from ``file`` (the upstream reader's pattern)."""
    view = memoryview(buffer)
    for start in range(0, len(file), BATCH):
        n = min(BATCH, len(file) - start)
        view[:n] = file[start : start + n]
        yield view[:n]
        await trio.lowlevel.checkpoint()


async def run_loop(file: bytes, info: NarInfo, fd: int) -> None:
    verifier = NarVerifier(info, "bench")
    async for chunk in batches(file, bytearray(BATCH)):
        verifier.feed(chunk)
        write_all(fd, chunk)
    verifier.finish()


async def run_to_thread(file: bytes, info: NarInfo, fd: int) -> None:
    verifier = NarVerifier(info, "bench")

    def absorb(chunk: memoryview) -> None:
        verifier.feed(chunk)
        write_all(fd, chunk)

    async for chunk in batches(file, bytearray(BATCH)):
        await trio.to_thread.run_sync(absorb, chunk)
    verifier.finish()


async def run_worker(file: bytes, info: NarInfo, fd: int) -> None:
    verifier = NarVerifier(info, "bench")
    work: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
    token = trio.lowlevel.current_trio_token()
    room = trio.Event()
    done = trio.Event()
    written = [0]
    failure: list[BaseException] = []

    def progress(n: int) -> None:
        written[0] += n
        room.set()

    def worker() -> None:
        try:
            while (chunk := work.get()) is not None:
                verifier.feed(chunk)
                write_all(fd, chunk)
                token.run_sync_soon(progress, len(chunk))
            verifier.finish()
        except BaseException as exc:  # reported to the loop
            failure.append(exc)
        token.run_sync_soon(done.set)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    async for chunk in batches(file, bytearray(BATCH)):
        data = bytes(chunk)
        while True:
            try:
                work.put_nowait(data)
                break
            except queue.Full:
                room = trio.Event()
                await room.wait()
    while True:
        try:
            work.put_nowait(None)
            break
        except queue.Full:
            room = trio.Event()
            await room.wait()
    await done.wait()
    thread.join()
    if failure:
        raise failure[0]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(
    design: Callable[[bytes, NarInfo, int], object], file: bytes, info: NarInfo
) -> tuple[float, float]:
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR", "/var/tmp")) as f:
        c0, t0 = cpu(), time.monotonic()
        trio.run(design, file, info, f.fileno())  # type: ignore[arg-type]
        return cpu() - c0, time.monotonic() - t0


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    file, info = make_nar(mib)
    print(
        f"NAR {info.nar_size / 2**20:.0f} MiB, zstd file {len(file) / 2**20:.0f} MiB; "
        f"load {os.getloadavg()[0]:.2f}; best of {rounds} interleaved rounds"
    )
    designs = {"loop": run_loop, "to_thread": run_to_thread, "worker": run_worker}
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, design in designs.items():
            spent, wall = measure(design, file, info)
            if name not in best or spent < best[name][0]:
                best[name] = (spent, wall)
    for name, (spent, wall) in best.items():
        print(
            f"{name:10s} {spent / len(file) * GiB:5.2f} CPU-s per GiB of file "
            f"({spent / info.nar_size * GiB:5.2f} per GiB of NAR), wall {wall:.2f} s"
        )


if __name__ == "__main__":
    main()
