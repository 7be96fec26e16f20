"""netrc files as curl (and so Nix) reads them.

Nix hands its ``netrc-file`` to libcurl, so the only reading that matters is curl's
(lib/netrc.c of curl 7.88, the version Nix 2.8 on Debian 12 links). Its model:

* The file is read line by line; a line longer than 4094 bytes is skipped whole.
* A line is split into tokens at blanks (space, tab). A token starting with ``#`` makes the
  rest of the line a comment. A token starting with ``"`` is a quoted string running to the
  next unescaped ``"``, where ``\\n``, ``\\r``, ``\\t`` are control characters and ``\\x``
  is ``x``; an unterminated quote makes curl fail the whole transfer. An unquoted token ends
  at any whitespace, so a line ending in a blank or in ``\\r\\n`` yields an extra empty
  token.
* Keywords are case-insensitive. ``machine NAME`` and ``default`` open a block; inside it
  ``login X`` and ``password X`` set credentials until both are known. ``macdef NAME``
  skips the following lines up to an empty line. curl ignores ``account`` and any other
  word; we keep ``account X`` when X is not itself a keyword, so what we parse and render
  means the same to curl.
* curl's reading depends on the host it looks up: for the host of a block, a value such as
  ``login machine`` is a login; for every other host the same word opens a block. Such
  files are ambiguous and rejected here, as are empty values and unterminated quotes.

A parsed file is a list of :class:`NetrcEntry` blocks, with ``machine=None`` for
``default``. :func:`render_netrc` writes one block per line and never quotes: a value that
would need quoting is refused with :class:`FormatError`, so nothing can smuggle a second
``machine`` line into a file nixd writes. :func:`merge_netrc` combines files with the
first entry per machine winning and ``default`` last (curl stops at the first match, and a
``default`` matches every host).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from nixd.errors import FormatError

#: Longest line curl's reader returns, in bytes without the newline (a 4096-byte buffer).
MAX_LINE_BYTES = 4094

_BLANK = " \t"
_SPACE = " \t\n\v\f\r"
#: Words that open a block or a macro in curl whatever the current block is.
_BLOCK_WORDS = frozenset({"machine", "default", "macdef"})
#: Words curl treats as keywords inside a block.
_FIELD_WORDS = frozenset({"login", "password", "machine"})


@dataclass(frozen=True, slots=True)
class NetrcEntry:
    """One ``machine`` block (``machine=None`` means ``default``)."""

    machine: str | None
    login: str | None = None
    password: str | None = None
    account: str | None = None

    @property
    def is_default(self) -> bool:
        return self.machine is None


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    line: int
    quoted: bool


def _lines(text: str, where: str) -> Iterator[tuple[int, str]]:
    """Lines (without ``\\n``) that curl's reader returns, with 1-based numbers."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    for number, line in enumerate(parts, start=1):
        if "\0" in line:
            raise FormatError("netrc contains a NUL byte", where=f"{where}:{number}")
        if len(line.encode()) > MAX_LINE_BYTES:
            # curl skips the whole line without a word; so do we.
            continue
        yield number, line


def _tokens(line: str, number: int, where: str) -> Iterator[_Token]:
    """curl's tokenizer for one line (the newline included, as curl sees it)."""
    buf = line + "\n"
    i = 0
    n = len(buf)
    while i < n:
        while i < n and buf[i] in _BLANK:
            i += 1
        if i >= n or buf[i] == "#":
            return
        if buf[i] != '"':
            end = i
            while end < n and buf[end] not in _SPACE:
                end += 1
            yield _Token(buf[i:end], number, quoted=False)
            i = end + 1
            continue
        out: list[str] = []
        j = i + 1
        escape = False
        closed = False
        while j < n:
            ch = buf[j]
            j += 1
            if escape:
                escape = False
                out.append({"n": "\n", "r": "\r", "t": "\t"}.get(ch, ch))
            elif ch == "\\":
                escape = True
            elif ch == '"':
                closed = True
                break
            else:
                out.append(ch)
        if not closed:
            raise FormatError("unterminated quoted string", where=f"{where}:{number}")
        yield _Token("".join(out), number, quoted=True)
        # curl steps over the character after the closing quote, whatever it is.
        i = j + 1


class _Stream:
    """curl's tokens of a whole file; the parser sets ``in_macro`` to skip a macro body."""

    def __init__(self, text: str, where: str) -> None:
        self.in_macro = False
        self._tokens = self._generate(text, where)

    def __iter__(self) -> Iterator[_Token]:
        return self._tokens

    def __next__(self) -> _Token:
        return next(self._tokens)

    def _generate(self, text: str, where: str) -> Iterator[_Token]:
        for number, line in _lines(text, where):
            if self.in_macro:
                if line == "" or line.startswith("\r"):
                    self.in_macro = False
                else:
                    continue
            for token in _tokens(line, number, where):
                if self.in_macro:
                    # curl also ends a macro on an empty token (a blank before the line end).
                    if token.text == "":
                        self.in_macro = False
                    continue
                yield token


class _Block:
    def __init__(self, machine: str | None) -> None:
        self.machine = machine
        self.login: str | None = None
        self.password: str | None = None
        self.account: str | None = None

    def entry(self) -> NetrcEntry:
        return NetrcEntry(self.machine, self.login, self.password, self.account)


def parse_netrc(text: str | bytes, *, source: str = "<netrc>") -> list[NetrcEntry]:
    """Parse a netrc file into its blocks, in file order.

    Raises :class:`FormatError` (``source:line``) where curl would fail or where curl's
    reading would depend on the host looked up.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as exc:
            raise FormatError(f"netrc is not UTF-8: {exc.reason}", where=source) from exc
    entries: list[NetrcEntry] = []
    block: _Block | None = None
    stream = _Stream(text, source)

    def value_after(keyword: _Token, forbidden: frozenset[str]) -> _Token:
        token = next(stream, None)
        if token is None:
            raise FormatError(
                f"{keyword.text!r} at the end of the file has no value",
                where=f"{source}:{keyword.line}",
            )
        if token.text == "":
            raise FormatError(
                f"empty value after {keyword.text!r} (a trailing blank or \\r?)",
                where=f"{source}:{token.line}",
            )
        if token.text.lower() in forbidden:
            raise FormatError(
                f"value {token.text!r} after {keyword.text!r} is a netrc keyword; curl would "
                "read it differently for other hosts",
                where=f"{source}:{token.line}",
            )
        return token

    for token in stream:
        word = token.text.lower()
        if word == "machine":
            if block is not None:
                entries.append(block.entry())
            block = _Block(value_after(token, frozenset()).text)
        elif word == "default":
            if block is not None:
                entries.append(block.entry())
            block = _Block(None)
        elif word == "macdef":
            if block is not None:
                if block.login is None or block.password is None:
                    raise FormatError(
                        "macdef inside an incomplete machine block; curl would read the "
                        "macro as that machine's credentials",
                        where=f"{source}:{token.line}",
                    )
                entries.append(block.entry())
                block = None
            stream.in_macro = True
        elif block is None or token.text == "":
            # Outside a block curl ignores every other word, as it does empty tokens.
            continue
        elif word in ("login", "password"):
            value = value_after(token, _BLOCK_WORDS).text
            if block.login is not None and block.password is not None:
                continue  # curl stops reading once both are known
            if word == "login":
                block.login = value
            else:
                block.password = value
        elif word == "account":
            # curl ignores "account" and reads its value as an ordinary word.
            peek = next(stream, None)
            if peek is None:
                break
            if peek.text.lower() in _BLOCK_WORDS | _FIELD_WORDS:
                raise FormatError(
                    f"account value {peek.text!r} is a netrc keyword; curl would read it as one",
                    where=f"{source}:{peek.line}",
                )
            if peek.text and block.account is None:
                block.account = peek.text
        # Any other word inside a block is ignored by curl.
    if block is not None:
        entries.append(block.entry())
    return entries


def _check_value(kind: str, value: str, *, keywords: frozenset[str]) -> None:
    if value == "":
        raise FormatError(f"netrc {kind} is empty")
    if any(ch.isspace() or ord(ch) < 0x20 or ch == "\x7f" for ch in value):
        raise FormatError(f"netrc {kind} {_shown(kind, value)} contains whitespace or a control")
    if value.startswith("#"):
        raise FormatError(f"netrc {kind} {_shown(kind, value)} starts with '#' (a comment)")
    if '"' in value:
        raise FormatError(f"netrc {kind} {_shown(kind, value)} contains a double quote")
    if value.lower() in keywords:
        raise FormatError(f"netrc {kind} {_shown(kind, value)} is a netrc keyword")


def _shown(kind: str, value: str) -> str:
    """Never echo a password into an error message."""
    return "(hidden)" if kind == "password" else repr(value)


def render_netrc(entries: Iterable[NetrcEntry]) -> str:
    """One line per entry, ``default`` where it stands; refuses anything curl would misread."""
    lines: list[str] = []
    for entry in entries:
        if entry.machine is None:
            parts = ["default"]
        else:
            _check_value("machine", entry.machine, keywords=frozenset())
            parts = ["machine", entry.machine]
        for kind, value in (
            ("login", entry.login),
            ("password", entry.password),
            ("account", entry.account),
        ):
            if value is None:
                continue
            forbidden = _BLOCK_WORDS | (_FIELD_WORDS if kind == "account" else frozenset())
            _check_value(kind, value, keywords=forbidden)
            parts += [kind, value]
        line = " ".join(parts)
        if len(line.encode()) > MAX_LINE_BYTES:
            raise FormatError(
                f"netrc line for {entry.machine or 'default'} is longer than "
                f"{MAX_LINE_BYTES} bytes; curl would skip it"
            )
        lines.append(line + "\n")
    return "".join(lines)


def merge_netrc(*sources: Sequence[NetrcEntry]) -> list[NetrcEntry]:
    """Concatenate ``sources`` keeping the first entry per machine and one ``default``, last.

    Machines compare case-insensitively, as curl matches them. A later block for the same
    machine is dropped even where curl would have taken a missing password from it.
    """
    merged: list[NetrcEntry] = []
    seen: set[str] = set()
    default: NetrcEntry | None = None
    for source in sources:
        for entry in source:
            if entry.machine is None:
                if default is None:
                    default = entry
                continue
            key = entry.machine.lower()
            if key not in seen:
                seen.add(key)
                merged.append(entry)
    if default is not None:
        merged.append(default)
    return merged


def lookup(entries: Iterable[NetrcEntry], host: str) -> NetrcEntry | None:
    """The entry curl would use for ``host``: the first matching machine or default.

    Exact for blocks that carry both login and password; for an incomplete block curl
    would read on into the next blocks, which this does not model.
    """
    for entry in entries:
        if entry.machine is None or entry.machine.lower() == host.lower():
            return entry
    return None
