"""Keep a large file's page cache footprint to a sliding window while it is written or read.

Filling page cache pages the kernel has not used recently is expensive on virtual
machines whose free memory is handed back to the host (about 4 CPU-s per GiB measured on
the benchmark VM, against 0.3 CPU-s for recycled pages). Streaming a NAR of several GiB
through the cache would pay that for every byte. Instead:

- :class:`Recycler` (writer side) starts writeback of each ``BLOCK`` as soon as it is
  written (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, asynchronous) and, once every
  reader is past a block by ``KEEP`` bytes, waits for its writeback and drops it
  (``POSIX_FADV_DONTNEED``): the freed pages are what the next writes reuse.
- :func:`drop_behind` (reader side) drops clean pages a ``sendfile`` has already sent.
- :func:`read_ahead` (reader side) asks for the next two blocks in the background before
  each ``sendfile``, since a NAR served from the store after the window above is mostly
  on disk, and a ``sendfile`` of uncached pages blocks the event loop on the disk. In
  ``bench/proxy_bench.py`` (1 GiB NAR served warm, http-connections 25) it took the warm
  copy from 3.98 s to 1.95-2.76 s (nginx with the file in its page cache: 1.2-1.6 s):
  the price of the window, which kept the cold copy at 2.4-3.2 proxy CPU-s per GiB
  against 4.2 without it.

Both are advisory: where ``sync_file_range`` or ``posix_fadvise`` is missing the file is
written normally. Dropped pages are re-read from disk by a late reader; correctness never
depends on the cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable

BLOCK = 16 << 20
"""Granularity of writeback and dropping."""
KEEP = 32 << 20
"""Bytes kept cached behind the slowest reader (and behind the writer without readers)."""
BIG = 64 << 20
"""Files smaller than this are left alone: they are cheap and likely read again soon."""

_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_sync_file_range = _load_sync_file_range()
_fadvise = getattr(os, "posix_fadvise", None)


class Recycler:
    """Writer-side window over ``fd``; call :meth:`written` after each write."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.enabled = _sync_file_range is not None and _fadvise is not None
        self._flushed = 0
        """Writeback has been started for ``[0, _flushed)``."""
        self._dropped = 0
        """``[0, _dropped)`` is out of the page cache."""

    def written(self, end: int, low_water: int) -> None:
        """``end`` bytes are written; every reader has sent ``[0, low_water)``."""
        if not self.enabled:
            return
        assert _sync_file_range is not None and _fadvise is not None
        while end - self._flushed >= BLOCK:
            _sync_file_range(self.fd, self._flushed, BLOCK, _WRITE)
            self._flushed += BLOCK
        limit = min(low_water, end) - KEEP
        while limit - self._dropped >= BLOCK and self._dropped + BLOCK <= self._flushed:
            # Writeback of this block started at least KEEP bytes ago: usually done.
            _sync_file_range(self.fd, self._dropped, BLOCK, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            with contextlib.suppress(OSError):
                _fadvise(self.fd, self._dropped, BLOCK, os.POSIX_FADV_DONTNEED)
            self._dropped += BLOCK


def drop_behind(fd: int, start: int, end: int, size: int) -> None:
    """Drop the clean cached pages of ``[start, end)`` of a file of ``size`` bytes."""
    if _fadvise is None or size < BIG or end <= start:
        return
    with contextlib.suppress(OSError):
        _fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


def read_ahead(fd: int, start: int, length: int, size: int) -> None:
    """Ask the kernel to read ``[start, start + length)`` of a file of ``size`` bytes in
    the background (``POSIX_FADV_WILLNEED``), so that the next ``sendfile`` of it finds
    it cached rather than blocking the event loop on the disk, as it otherwise would for
    a file whose pages :class:`Recycler` or :func:`drop_behind` dropped."""
    if _fadvise is None or size < BIG or start >= size:
        return
    with contextlib.suppress(OSError):
        _fadvise(fd, start, min(length, size - start), os.POSIX_FADV_WILLNEED)
