"""The proxy's on-disk store of verified NARs and their narinfos, with LRU eviction.

Layout under ``store_dir``::

    index.sqlite    nars(key, size, atime) and narinfos(hash_part, key, text)
    nar/<key>       NAR files exactly as the upstream sent them (compressed)
    tmp/            downloads in flight; emptied at start

Nothing here takes its mode from the umask: directories are made 0700 (missing parents
0755) and ``index.sqlite`` is created 0600 before SQLite opens it (SQLite gives its WAL and
shared-memory files the database's mode), so a daemon run with ``UMask=0000`` keeps a
store no other user can write into — a writable ``nar/`` would be served unverified.

A NAR enters only through :meth:`LocalStore.admit`, after its decompressed NarHash/NarSize
matched a signed narinfo, by an atomic rename from ``tmp/`` followed by the index row, so a
crash leaves either no row (the file is swept at the next start) or a complete file. At
start the index is trusted (read into memory, no file is stat'ed, so the proxy answers at
once with 100k kept NARs); a row whose file is missing is dropped when a request finds it
so (the request goes upstream), and :meth:`LocalStore.reconcile`, run in the background
after start, reconciles the index and the directory both ways. Eviction drops the least
recently served NARs (and their narinfos) until the total is under ``max_bytes``, and
:meth:`LocalStore.can_hold` / :meth:`LocalStore.make_room` evict to free space on the
filesystem for a download (never when evicting every NAR would not free enough).

SQLite calls are short local operations made on the event loop thread; the database runs
in WAL mode without fsync per commit: losing the last few atime updates in a power cut is
harmless, and a lost row only makes the proxy fetch the NAR again.

Hits cost no SQLite statement: the NAR sizes are mirrored in memory, and access times are
collected in memory and written in one transaction at most every ``FLUSH_INTERVAL``
seconds, before any eviction, and at :meth:`LocalStore.close`. NARs of at most ``SMALL``
bytes are kept in a bounded in-memory LRU too (:meth:`LocalStore.small_nar`), so a warm hit
on one is a dict lookup and one socket write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import trio

from nixd.dirs import make_dirs
from nixd.errors import ConfigError
from nixd.proxy.metrics import Metrics
from nixd.proxy.verify import parse_nar_key

log = logging.getLogger(__name__)

SMALL = 64 << 10
"""NARs up to this size are served from memory (and fetched whole, see the server)."""
MEMORY_BYTES = 32 << 20
"""Bound on the bytes of small NARs kept in memory."""
FLUSH_INTERVAL = 5.0
"""Seconds access times may stay in memory before they are written to the index."""
ROOM_MARGIN = 1 << 20
"""Free bytes left on the store's filesystem beyond a download's size (metadata, the index)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nars (
    key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    atime REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS nars_atime ON nars(atime);
CREATE TABLE IF NOT EXISTS narinfos (
    hash_part TEXT PRIMARY KEY,
    key TEXT NOT NULL REFERENCES nars(key) ON DELETE CASCADE,
    text BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS narinfos_key ON narinfos(key);
"""


def _private_file(path: Path, *, create: bool) -> None:
    """Make ``path`` mode 0600 (creating it empty if ``create``), whatever the umask."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class LocalStore:
    """Verified NARs on disk under a size cap; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int, metrics: Metrics) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.nar_dir = self.root / "nar"
        self.tmp_dir = self.root / "tmp"
        try:
            for directory in (self.root, self.nar_dir, self.tmp_dir):
                make_dirs(directory)
            index = self.root / "index.sqlite"
            _private_file(index, create=True)
            for suffix in ("-wal", "-shm"):  # left by an older version, maybe 0644
                _private_file(index.with_name(index.name + suffix), create=False)
            self.db = sqlite3.connect(index, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"proxy store {self.root}: cannot open: {exc}") from exc
        self.total_bytes = 0
        self._sizes: dict[str, int] = {}
        """key -> size of every NAR in the index (mirror of the ``nars`` table)."""
        self._touched: dict[str, float] = {}
        """Access times not yet written to the index."""
        self._flushed_at = time.monotonic()
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_bytes = 0
        self._recover()

    def _recover(self) -> None:
        """Empty tmp/ and trust the index: its rows are read into memory, nothing is
        stat'ed: with 100k NARs it opens in ~0.12 s, where listing and statting every
        file took 1.25 s with the cache warm (``bench/store_startup.py``), 6.5 s cold.

        Rows whose file went away are found lazily (:meth:`drop_missing`, when serving)
        and by :meth:`reconcile` in the background.
        """
        with os.scandir(self.tmp_dir) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        for key, size in self.db.execute("SELECT key, size FROM nars"):
            self._sizes[key] = size
        self.total_bytes = sum(self._sizes.values())
        self._update_gauge()
        self.evict()

    def _listing(self) -> dict[str, int]:
        """In a worker thread: name -> size of every file in nar/."""
        found: dict[str, int] = {}
        with os.scandir(self.nar_dir) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        found[entry.name] = entry.stat(follow_symlinks=False).st_size
        return found

    async def reconcile(self) -> None:
        """Reconcile the index with nar/ both ways, without holding up requests.

        The directory is listed and stat'ed in a worker thread; what it found is then
        applied on the event loop in slices. Everything is re-checked at the moment it is
        applied, since NARs are admitted and evicted meanwhile: a row is dropped only if
        its file is (still) missing or of the wrong size, a file removed only if no row
        names it (admission renames the file and writes its row in one step on the loop).
        """
        try:
            await self._reconcile()
        except (OSError, sqlite3.Error) as exc:  # containment: serving goes on regardless
            log.warning("proxy store: could not reconcile the index with nar/: %s", exc)

    async def _reconcile(self) -> None:
        listing = await trio.to_thread.run_sync(self._listing)
        dropped = removed = 0
        for i, (key, size) in enumerate(list(self._sizes.items())):
            if i % 1000 == 999:
                await trio.lowlevel.checkpoint()
            if listing.get(key) == size or self._sizes.get(key) != size:
                continue
            try:
                if os.stat(self.nar_dir / key).st_size == size:
                    continue
            except FileNotFoundError:
                pass
            self.drop_missing(key)
            dropped += 1
        for i, name in enumerate(listing):
            if i % 1000 == 999:
                await trio.lowlevel.checkpoint()
            if name not in self._sizes:
                with contextlib.suppress(OSError):
                    os.unlink(self.nar_dir / name)
                removed += 1
        # No sweep of narinfos without their NAR row: the foreign key cascades every
        # delete, and such a narinfo would only send its request upstream (the server
        # finds no NAR row); a sweep would hold the loop ~0.1 s at 100k rows.
        if dropped or removed:
            log.warning(
                "proxy store: dropped %d index entries without their file, removed %d "
                "files without an entry",
                dropped, removed,
            )  # fmt: skip

    def drop_missing(self, key: str) -> None:
        """Forget a NAR whose file is missing or wrong (found when serving or reconciling);
        its file, if any, is removed. Requests for it go upstream again."""
        size = self._sizes.pop(key, None)
        if size is None:
            return
        log.warning("proxy store: dropping index entry %s (file missing or wrong)", key)
        try:
            self.db.execute("DELETE FROM narinfos WHERE key = ?", (key,))
            self.db.execute("DELETE FROM nars WHERE key = ?", (key,))
        except sqlite3.Error as exc:  # the row stays; found again after a restart
            log.warning("proxy store: could not drop the row of %s: %s", key, exc)
        self._touched.pop(key, None)
        self._forget(key)
        with contextlib.suppress(OSError):
            os.unlink(self.nar_dir / key)
        self.total_bytes -= size
        self._update_gauge()

    def close(self) -> None:
        self.flush()
        self.db.close()

    def flush(self) -> None:
        """Write the access times collected in memory to the index, in one transaction."""
        self._flushed_at = time.monotonic()
        if not self._touched:
            return
        touched, self._touched = self._touched, {}
        rows = [(atime, key) for key, atime in touched.items() if key in self._sizes]
        try:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("UPDATE nars SET atime = ? WHERE key = ?", rows)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            # A full disk (SQLITE_FULL) must not fail the hit that triggered the flush:
            # the times stay in memory for the next try.
            self._touched = {**touched, **self._touched}
            log.info("proxy store: access times not written yet: %s", exc)

    def _touch(self, key: str) -> None:
        self._touched[key] = time.time()
        if time.monotonic() - self._flushed_at >= FLUSH_INTERVAL:
            self.flush()

    def new_temp(self) -> Path:
        return self.tmp_dir / f"{uuid.uuid4().hex}.part"

    def narinfo(self, hash_part: str) -> bytes | None:
        """The stored (already rewritten) narinfo text for a path, if its NAR is here."""
        row = self.db.execute(
            "SELECT text FROM narinfos WHERE hash_part = ?", (hash_part,)
        ).fetchone()
        return bytes(row[0]) if row else None

    def nar(self, key: str, *, touch: bool = True) -> tuple[Path, int] | None:
        """Path and size of a stored NAR; ``touch`` marks it recently used."""
        size = self._sizes.get(key)
        if size is None:
            return None
        if touch:
            self._touch(key)
        return self.nar_dir / key, size

    def small_nar(self, key: str) -> bytes | None:
        """The bytes of a stored NAR of at most ``SMALL`` bytes (marked recently used).

        None if the NAR is not here, is larger, or its file went away.
        """
        size = self._sizes.get(key)
        if size is None or size > SMALL:
            return None
        data = self._memory.get(key)
        if data is None:
            try:
                with open(self.nar_dir / key, "rb") as f:
                    data = f.read(SMALL + 1)
            except FileNotFoundError:
                self.drop_missing(key)
                return None
            if len(data) != size:
                self.drop_missing(key)
                return None
            self._remember(key, data)
        else:
            self._memory.move_to_end(key)
        self._touch(key)
        return data

    def _remember(self, key: str, data: bytes) -> None:
        if len(data) > SMALL or key in self._memory:
            return
        self._memory[key] = data
        self._memory_bytes += len(data)
        while self._memory_bytes > MEMORY_BYTES:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= len(old)

    def _forget(self, key: str) -> None:
        data = self._memory.pop(key, None)
        if data is not None:
            self._memory_bytes -= len(data)

    def admit_bytes(self, key: str, data: bytes, hash_part: str, narinfo_text: bytes) -> bool:
        """:meth:`admit` for a verified NAR held in memory (a small one)."""
        temp = self.new_temp()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        try:
            kept = self.admit(key, temp, hash_part, narinfo_text)
        finally:
            temp.unlink(missing_ok=True)
        if kept and key in self._sizes:
            self._remember(key, data)
        return kept

    def admit(self, key: str, temp: Path, hash_part: str, narinfo_text: bytes) -> bool:
        """Move a verified download into the store; False if it cannot fit at all."""
        if parse_nar_key(key) is None:
            raise ValueError(f"not a proxy NAR name: {key!r}")
        size = temp.stat().st_size
        if size > self.max_bytes:
            log.info("proxy store: %s (%d bytes) is larger than the cap; not kept", key, size)
            return False
        target = self.nar_dir / key
        existing = self.nar(key, touch=False)
        if existing is None:
            os.replace(temp, target)
        else:
            os.unlink(temp)
        try:
            self.db.execute("BEGIN")
            try:
                if existing is None:
                    self.db.execute(
                        "INSERT OR REPLACE INTO nars(key, size, atime) VALUES (?, ?, ?)",
                        (key, size, time.time()),
                    )
                self.db.execute(
                    "INSERT OR REPLACE INTO narinfos(hash_part, key, text) VALUES (?, ?, ?)",
                    (hash_part, key, narinfo_text),
                )
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except BaseException:
            if existing is None:  # no row names it (a full disk): do not leave it taking room
                with contextlib.suppress(OSError):
                    os.unlink(target)
            raise
        if existing is None:
            self._sizes[key] = size
            self.total_bytes += size
        self.evict(keep=key)
        self._update_gauge()
        return True

    def evict(self, keep: str | None = None) -> None:
        """Drop least recently used NARs until the total fits under the cap."""
        if self.total_bytes > self.max_bytes:
            self.flush()
        while self.total_bytes > self.max_bytes and self._evict_oldest(keep):
            pass
        self._update_gauge()

    def _evict_oldest(self, keep: str | None = None) -> bool:
        """Drop the least recently used NAR (not ``keep``); False if there is none."""
        row = self.db.execute(
            "SELECT key, size FROM nars WHERE key != ? ORDER BY atime LIMIT 1",
            (keep or "",),
        ).fetchone()
        if row is None:
            return False
        key, size = row
        # The file first: on a full disk, its room is what lets SQLite write the delete.
        # Should the delete still fail, the row outlives its file, which the index
        # tolerates (found missing when served, or by reconcile).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.nar_dir / key)
        if self._sizes.pop(key, None) is not None:
            self.total_bytes -= size
        self._touched.pop(key, None)
        self._forget(key)
        self.metrics.inc("nixd_proxy_store_evictions_total")
        log.debug("proxy store: evicted %s (%d bytes)", key, size)
        try:
            self.db.execute("DELETE FROM narinfos WHERE key = ?", (key,))
            self.db.execute("DELETE FROM nars WHERE key = ?", (key,))
        except sqlite3.Error as exc:
            log.warning("proxy store: evicted %s but could not drop its row: %s", key, exc)
            return False  # the same row would come first again
        return True

    def free_bytes(self) -> int:
        """Bytes free for the proxy on the store's filesystem (0 if it cannot be asked)."""
        try:
            st = os.statvfs(self.tmp_dir)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def can_hold(self, size: int) -> bool:
        """Whether a download of ``size`` bytes can be written and kept: not larger than
        the cap, and room on the filesystem, evicting NARs by LRU to make it if needed."""
        if size > self.max_bytes:
            return False
        free = self.free_bytes()
        if free >= size + ROOM_MARGIN:
            return True
        if free + self.total_bytes < size + ROOM_MARGIN:
            return False  # evicting everything would not do: keep what is kept
        self.flush()
        while self.free_bytes() < size + ROOM_MARGIN:
            if not self._evict_oldest():
                self._update_gauge()
                return False
        self._update_gauge()
        return True

    def make_room(self, size: int) -> bool:
        """A write just failed with a full disk: evict NARs (LRU) until ``size`` bytes
        are free. False when none are free and there is nothing left to evict, or when
        evicting everything would not make enough room (then nothing is evicted)."""
        free = self.free_bytes()
        if free + self.total_bytes < size + ROOM_MARGIN:
            return False
        self.flush()
        evicted = False
        while self.free_bytes() < size + ROOM_MARGIN and self._evict_oldest():
            evicted = True
        self._update_gauge()
        return evicted or self.free_bytes() > 0

    def nar_keys(self) -> list[str]:
        """Stored NAR names, least recently used first."""
        self.flush()
        return [r[0] for r in self.db.execute("SELECT key FROM nars ORDER BY atime")]

    def _update_gauge(self) -> None:
        self.metrics.set("nixd_proxy_store_bytes", self.total_bytes)
