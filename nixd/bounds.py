"""Numbers, lengths and depths from outside, bounded before they are converted.

The containment rule (DESIGN.md) says one bad input ends only its own unit of work.
Python's own converters do not keep that promise on their own: ``int()`` accepts
non-ASCII digits (``"²".isdigit()`` is true, ``int("٣")`` is 3), underscores and
whitespace, and raises ``ValueError`` past 4,300 digits; ``json.loads`` raises
``RecursionError`` (not ``ValueError``) on deeply nested input. Every number, length
and nesting depth that arrives from a socket, a file or a peer goes through this
module, so each site states its bound once and gets a :class:`~nixd.errors.FormatError`
(a ``ValueError``) for anything outside it.
"""

from __future__ import annotations

import json
from typing import Any

from nixd.errors import FormatError

_DIGITS = frozenset(b"0123456789")


def parse_uint(text: str | bytes, *, limit: int, what: str) -> int:
    """The decimal number in ``text`` (ASCII digits only), at most ``limit``.

    Refuses empty text, signs, spaces, underscores and non-ASCII digits, and checks the
    length before converting, so no input can make the conversion itself expensive.
    """
    raw = text.encode("latin-1", "replace") if isinstance(text, str) else text
    if not raw or not all(c in _DIGITS for c in raw):
        raise FormatError(f"{what} is not a decimal number")
    if len(raw) > len(str(limit)) or int(raw) > limit:
        raise FormatError(f"{what} is larger than {limit}")
    return int(raw)


def check_json_depth(data: bytes | str, *, max_depth: int, what: str) -> None:
    """Refuse JSON text nested deeper than ``max_depth`` arrays/objects, without parsing it.

    A linear scan that skips string contents; ``json.loads`` recurses once per level and
    would raise ``RecursionError`` long before any schema check could run.
    """
    raw = data.encode() if isinstance(data, str) else data
    depth = 0
    in_string = False
    escaped = False
    for c in raw:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                raise FormatError(f"{what} is nested deeper than {max_depth} levels")
        elif c in (0x5D, 0x7D):
            depth -= 1


def load_json(data: bytes | str, *, max_bytes: int, max_depth: int, what: str) -> Any:
    """``json.loads`` for text from outside: size and depth bounded, any failure a FormatError."""
    if len(data) > max_bytes:
        raise FormatError(f"{what} is larger than {max_bytes} bytes")
    check_json_depth(data, max_depth=max_depth, what=what)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from exc
