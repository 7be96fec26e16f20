"""Start-up of the proxy's local store with many kept NARs.

Usage: ``python bench/store_startup.py DIR [N]``. Makes DIR a store with N (default
100,000) NARs of 1-4 KiB and their narinfos if it is not one yet, then times opening it
(``LocalStore(...)``: what the proxy does before it answers) and, when the store has it,
the background ``reconcile`` with the longest time the event loop was held in one go
(a ticker task's worst lateness). Run it with this tree and with an older one on
``PYTHONPATH`` to compare; the page cache is left as it is (state it when quoting).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

import trio

from nixd.nix import base32
from nixd.proxy.localstore import LocalStore
from nixd.proxy.metrics import Metrics


def populate(root: Path, n: int) -> None:
    store = LocalStore(root, 1 << 50, Metrics())  # creates the layout and the schema
    store.close()
    db = sqlite3.connect(root / "index.sqlite")
    rows, infos = [], []
    for i in range(n):
        hash_part = base32.encode(i.to_bytes(20, "big"))
        key = f"{hash_part}-{base32.encode(i.to_bytes(32, 'big'))}.nar.zst"
        size = 1024 + i % 3072
        with open(root / "nar" / key, "wb") as f:
            f.write(b"\0" * size)
        rows.append((key, size, time.time() - n + i))
        infos.append((hash_part, key, b"StorePath: ...\n"))
    db.executemany("INSERT INTO nars(key, size, atime) VALUES (?, ?, ?)", rows)
    db.executemany("INSERT INTO narinfos(hash_part, key, text) VALUES (?, ?, ?)", infos)
    db.commit()
    db.close()


async def reconcile(store: LocalStore) -> tuple[float, float]:
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        while True:
            before = time.monotonic()
            await trio.sleep(0.001)
            worst = max(worst, time.monotonic() - before - 0.001)

    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await store.reconcile()
        nursery.cancel_scope.cancel()
    return time.monotonic() - start, worst


def main() -> None:
    root = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    if not (root / "index.sqlite").exists():
        print(f"making a store with {n} NARs in {root} ...")
        populate(root, n)
    (root / "tmp" / "left-over.part").write_bytes(b"x")
    start = time.monotonic()
    store = LocalStore(root, 1 << 50, Metrics())
    opened = time.monotonic() - start
    print(f"open: {opened:.3f} s for {len(os.listdir(root / 'nar'))} NAR files")
    if hasattr(store, "reconcile"):
        took, worst = trio.run(reconcile, store)
        print(f"background reconcile: {took:.3f} s, loop held at most {worst * 1000:.1f} ms")
    store.close()


if __name__ == "__main__":
    main()
