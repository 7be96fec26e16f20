"""nix.conf text: the fragment nixd owns and the one line it adds to the user's file.

Nix 2.8 reads a config file (libutil/config.cc, ``applyConfig``) line by line, split at
``\\n`` only; everything from the first ``#`` on a line is a comment; the rest is split
at whitespace (space, tab, ``\\r``) and must be ``name = value...`` (the value words are
re-joined with single spaces) or ``include PATH`` / ``!include PATH`` with exactly one
path, relative to the including file's directory. There is no line continuation and no
quoting. A missing ``include`` file is an error, a missing ``!include`` file is skipped
and an unreadable one is skipped silently either way. Settings apply in file order and an
included file applies where its line stands, so a later ``substituters = ...`` would
drop what an earlier ``extra-substituters`` added: nixd's line goes at the end.

The model: nixd writes its settings to a fragment file it owns wholly, and adds to the
main nix.conf exactly one ``!include`` line carrying a marker comment. The marker also
records what else was added (a newline the file lacked, or the file itself), so
:func:`remove_include` gives back the original bytes.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nixd.errors import FormatError

MARKER = "nixd: managed include, removed by `nixd logout`"
_FLAG_NEWLINE = "+newline"
_FLAG_CREATED = "+created"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_MARKER_RE = re.compile(r"#\s*" + re.escape(MARKER) + r"(?:\s*\[(?P<flags>[^\]]*)\])?\s*$")
_EMPTY: Mapping[str, str] = types.MappingProxyType({})
_WS = re.compile(r"[ \t\r]+")


def _tokens(line: str) -> list[str]:
    """Nix's words of one line: comment cut at ``#``, split at space, tab and ``\r``."""
    return [t for t in _WS.split(line.split("#", 1)[0].rstrip("\n")) if t]


@dataclass(frozen=True, slots=True)
class ConfLine:
    """One meaningful line of a nix.conf: a setting or an include."""

    line: int
    name: str
    """The setting name, or ``include`` / ``!include``."""
    value: str


def parse_nix_conf(text: str, *, source: str = "<nix.conf>") -> list[ConfLine]:
    """Parse as Nix 2.8 does (without following includes); FormatError where Nix errors."""
    result: list[ConfLine] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        tokens = _tokens(raw)
        if not tokens:
            continue
        where = f"{source}:{number}"
        if len(tokens) < 2:
            raise FormatError(f"illegal configuration line {raw!r}", where=where)
        if tokens[0] in ("include", "!include"):
            if len(tokens) != 2:
                raise FormatError(f"illegal configuration line {raw!r}", where=where)
            result.append(ConfLine(number, tokens[0], tokens[1]))
            continue
        if tokens[1] != "=":
            raise FormatError(f"illegal configuration line {raw!r}", where=where)
        result.append(ConfLine(number, tokens[0], " ".join(tokens[2:])))
    return result


def find_setting(text: str, name: str, *, source: str = "<nix.conf>") -> str | None:
    """The value the last ``name = ...`` line of ``text`` sets (includes not followed)."""
    value = None
    for line in parse_nix_conf(text, source=source):
        if line.name == name:
            value = line.value
    return value


def check_word(what: str, value: str) -> str:
    """A value Nix reads back as exactly one word: no whitespace, ``#`` or control."""
    if not value:
        raise FormatError(f"{what} is empty")
    if any(ch.isspace() or ord(ch) < 0x20 or ch in "#\x7f" for ch in value):
        raise FormatError(f"{what} {value!r} contains whitespace, '#' or a control character")
    return value


def _check_text(what: str, value: str) -> str:
    """A value of several words: one line, no ``#``, no control characters."""
    if any((ord(ch) < 0x20 and ch != "\t") or ch in "#\x7f" for ch in value):
        raise FormatError(f"{what} {value!r} contains a newline, '#' or a control character")
    return " ".join(t for t in _WS.split(value) if t)


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name == "include":
        raise FormatError(f"{name!r} is not a nix.conf setting name")
    return name


def render_nix_conf_fragment(
    substituters: Sequence[str],
    trusted_public_keys: Sequence[str],
    netrc_file: str,
    extra: Mapping[str, str] = _EMPTY,
    *,
    trusted_substituters: bool = False,
) -> str:
    """The fragment nixd includes: its substituters, pinned keys and netrc file.

    ``trusted_substituters`` also lists the substituters as ``extra-trusted-substituters``,
    for a nix-daemon's config, so unprivileged users may name them too.
    """
    subs = [check_word("substituter", s) for s in substituters]
    keys = [check_word("trusted public key", k) for k in trusted_public_keys]
    netrc = check_word("netrc-file", netrc_file)
    if not netrc.startswith("/"):
        raise FormatError(f"netrc-file {netrc!r} must be an absolute path")
    lines = ["# Written by nixd; edits are overwritten. Remove with `nixd logout`."]
    if subs:
        lines.append(f"extra-substituters = {' '.join(subs)}")
        if trusted_substituters:
            lines.append(f"extra-trusted-substituters = {' '.join(subs)}")
    if keys:
        lines.append(f"extra-trusted-public-keys = {' '.join(keys)}")
    lines.append(f"netrc-file = {netrc}")
    for name, value in extra.items():
        lines.append(f"{_check_name(name)} = {_check_text(name, value)}".rstrip())
    return "\n".join(lines) + "\n"


def _split_lf(text: str) -> list[str]:
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _marker_flags(line: str) -> set[str] | None:
    """The flags of a nixd include line, or None when ``line`` is not one."""
    if "#" not in line:
        return None
    tokens = _tokens(line)
    if len(tokens) != 2 or tokens[0] != "!include":
        return None
    match = _MARKER_RE.search(line.rstrip("\n"))
    if match is None:
        return None
    return set((match.group("flags") or "").split())


def _include_line(fragment: str, flags: set[str]) -> str:
    tag = f" [{' '.join(sorted(flags))}]" if flags else ""
    return f"!include {fragment} # {MARKER}{tag}\n"


def has_include(text: str, fragment: str) -> bool:
    """Whether ``text`` includes ``fragment`` already (nixd's line or the user's own)."""
    for line in _split_lf(text):
        tokens = _tokens(line)
        if len(tokens) == 2 and tokens[0] in ("include", "!include") and tokens[1] == fragment:
            return True
    return False


def ensure_include(text: str | None, fragment: str) -> str:
    """``text`` with exactly one nixd ``!include fragment`` line; unchanged if present.

    ``text=None`` means the main nix.conf does not exist yet. Every byte of the user's
    text is kept; the line is appended at the end so that it wins over earlier settings.
    A stale nixd line (another fragment path) is rewritten in place; duplicates dropped.
    """
    check_word("fragment path", fragment)
    if not fragment.startswith("/"):
        raise FormatError(f"fragment path {fragment!r} must be absolute")
    if text is None:
        return _include_line(fragment, {_FLAG_CREATED})
    lines = _split_lf(text)
    ours = [i for i, line in enumerate(lines) if _marker_flags(line) is not None]
    if ours:
        first = ours[0]
        flags = _marker_flags(lines[first]) or set()
        if len(ours) > 1:
            # Keep the flags of the last copy: it sits where the file's end was.
            flags |= _marker_flags(lines[ours[-1]]) or set()
        wanted = _include_line(fragment, flags)
        if len(ours) == 1 and lines[first] == wanted:
            return text
        for i in reversed(ours[1:]):
            del lines[i]
        lines[first] = wanted
        return "".join(lines)
    if has_include(text, fragment):
        return text
    if text and not text.endswith("\n"):
        return text + "\n" + _include_line(fragment, {_FLAG_NEWLINE})
    return text + _include_line(fragment, set())


def remove_include(text: str) -> str | None:
    """``text`` without nixd's include line(s); None when nixd created the file itself.

    Undoes :func:`ensure_include` exactly: the newline nixd added to a file that ended
    without one goes too, as long as nixd's line is still the last one.
    """
    lines = _split_lf(text)
    result: list[str] = []
    created = False
    for i, line in enumerate(lines):
        flags = _marker_flags(line)
        if flags is None:
            result.append(line)
            continue
        created |= _FLAG_CREATED in flags
        is_last = i == len(lines) - 1
        if _FLAG_NEWLINE in flags and is_last and result and result[-1].endswith("\n"):
            result[-1] = result[-1][:-1]
    out = "".join(result)
    if created and out == "":
        return None
    return out
