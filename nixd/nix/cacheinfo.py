"""``nix-cache-info``: the file that makes a URL a binary cache.

Nix 2.8 (``BinaryCacheStore::init``) reads ``Key: value`` lines, trims the values, and
knows three keys: ``StoreDir`` (must equal the client's store dir), ``WantMassQuery``
(``1`` lets the client query many paths at once) and ``Priority`` (lower wins). Lines
without a colon and unknown keys are ignored, as Nix does. Where Nix would take the
last of two equal keys or read ``12abc`` as 12, this parser refuses, so that what it
reports is what the file unambiguously says. ``WantMassQuery`` is true only for ``1``.

A file that leaves a key out gets Nix's meaning: no ``StoreDir`` means the default
``/nix/store``, no ``WantMassQuery`` means false, no ``Priority`` is ``None`` (the
client's own default applies). Nix caches this file forever per cache URL, so a server
should keep what it renders stable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nixd.errors import FormatError
from nixd.nix.storepath import DEFAULT_STORE_DIR

_INT = re.compile(r"[+-]?[0-9]{1,10}")
_WHITESPACE = " \t\r\n"


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """What a cache announces; the defaults are what a nixd server serves."""

    store_dir: str = DEFAULT_STORE_DIR
    want_mass_query: bool = True
    priority: int | None = 40

    def __post_init__(self) -> None:
        if not self.store_dir.startswith("/") or any(c in self.store_dir for c in "\r\n"):
            raise FormatError(f"StoreDir {self.store_dir[:80]!r} is not an absolute path")
        if self.priority is not None and not -(2**31) <= self.priority < 2**31:
            raise FormatError(f"Priority {self.priority} does not fit a 32-bit int")

    @classmethod
    def parse(cls, text: str | bytes) -> CacheInfo:
        """Parse ``nix-cache-info``; raise :class:`FormatError` naming the bad line."""
        if isinstance(text, bytes):
            raw = text
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw.count(b"\n", 0, exc.start) + 1
                raise FormatError("nix-cache-info is not UTF-8", where=f"line {bad}") from None
        seen: dict[str, int] = {}
        store_dir, want_mass_query, priority = DEFAULT_STORE_DIR, False, None
        for lineno, line in enumerate(text.split("\n"), 1):
            name, colon, value = line.partition(":")
            if not colon:
                continue
            value = value.strip(_WHITESPACE)
            where = f"line {lineno}"
            if name not in ("StoreDir", "WantMassQuery", "Priority"):
                continue
            if name in seen:
                raise FormatError(f"duplicate {name} (first on line {seen[name]})", where=where)
            seen[name] = lineno
            if name == "StoreDir":
                if not value.startswith("/"):
                    raise FormatError(f"StoreDir {value[:80]!r} is not absolute", where=where)
                store_dir = value
            elif name == "WantMassQuery":
                want_mass_query = value == "1"
            else:
                if not _INT.fullmatch(value) or not -(2**31) <= int(value) < 2**31:
                    raise FormatError(f"Priority {value[:20]!r} is not an integer", where=where)
                priority = int(value)
        return cls(store_dir=store_dir, want_mass_query=want_mass_query, priority=priority)

    def render(self) -> str:
        """The file's text; keys left at Nix's defaults are left out, as Nix writes it."""
        out = f"StoreDir: {self.store_dir}\n"
        if self.want_mass_query:
            out += "WantMassQuery: 1\n"
        if self.priority is not None:
            out += f"Priority: {self.priority}\n"
        return out
