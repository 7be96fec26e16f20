"""A short-lived memory of answers, so a burst of Nix requests asks upstreams once.

Nix asks for the same narinfo several times per path (HEAD twice, then GET); misses are
remembered for ``negative_ttl`` seconds and verified hits for ``positive_ttl``. Entries
are bounded in number; the oldest insertions go first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class TTLCache(Generic[V]):
    """Key → value with a per-cache lifetime and a size bound (insertion-order eviction)."""

    def __init__(self, ttl: float, max_entries: int = 65536) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            del self._data[key]
            return None
        return item[1]

    def put(self, key: str, value: V) -> None:
        if self.ttl <= 0:
            return
        self._data[key] = (time.monotonic() + self.ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def discard(self, key: str) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class NegativeCache(TTLCache[bool]):
    """Store-path hashes every upstream recently said it does not have."""

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def add(self, key: str) -> None:
        self.put(key, True)
