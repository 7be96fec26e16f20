"""RFC 9110 14.2 ``Range`` for one byte range: ``bytes=a-b``, ``bytes=a-``, ``bytes=-n``.

A server MAY ignore ``Range`` (RFC 9110 14.2), and a full 200 is always a correct answer
to a GET, so :func:`parse_range` turns everything it does not serve into None ("send the
whole file"): a malformed value, another unit, several ranges, a range that starts past
the end, numbers beyond any file size (bounded before conversion, nixd.bounds). It never
yields a 416, so no header a client sends can make a download fail where a plain GET
would succeed. Nix's own retry after a cut transfer asks ``bytes=<received>-``, which is
always inside the file.
"""

from __future__ import annotations

import re

from nixd.bounds import parse_uint
from nixd.errors import FormatError

__all__ = ["MAX_POSITION", "ByteRange", "parse_range"]

MAX_POSITION = (1 << 63) - 1
"""The largest byte position any file can have (``off_t``); longer numbers are ignored."""

_SPEC = re.compile(rb"[ \t]*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)=[ \t]*([0-9]*)-([0-9]*)[ \t]*")


class ByteRange:
    """A satisfiable range of a file of ``size`` bytes: ``[start, stop)``."""

    __slots__ = ("size", "start", "stop")

    def __init__(self, start: int, stop: int, size: int) -> None:
        self.start = start
        self.stop = stop
        self.size = size

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def content_range(self) -> bytes:
        """The ``Content-Range`` value of a 206 for this range."""
        return b"bytes %d-%d/%d" % (self.start, self.stop - 1, self.size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteRange) and (self.start, self.stop, self.size) == (
            other.start,
            other.stop,
            other.size,
        )

    def __hash__(self) -> int:
        return hash((self.start, self.stop, self.size))

    def __repr__(self) -> str:
        return f"ByteRange({self.start}, {self.stop}, size={self.size})"


def parse_range(value: bytes | str | None, size: int) -> ByteRange | None:
    """The one range ``value`` asks for in a file of ``size`` bytes, or None: send it all."""
    if value is None or size <= 0:
        return None
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    m = _SPEC.fullmatch(raw)
    if m is None or m.group(1).lower() != b"bytes":
        return None
    first, last = m.group(2), m.group(3)
    try:
        if first:
            start = parse_uint(first, limit=MAX_POSITION, what="range start")
            if start >= size:
                return None
            if not last:
                return ByteRange(start, size, size)
            end = parse_uint(last, limit=MAX_POSITION, what="range end")
            if end < start:
                return None
            return ByteRange(start, min(end + 1, size), size)
        if not last:
            return None
        suffix = parse_uint(last, limit=MAX_POSITION, what="range suffix")
    except FormatError:
        return None
    if suffix == 0:
        return None
    return ByteRange(max(0, size - suffix), size, size)
