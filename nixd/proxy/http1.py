"""Strict, sans-I/O parsing of HTTP/1.1 request heads for the proxy front.

The front only ever serves Nix (curl) on loopback: GET/HEAD with small heads on
keep-alive connections. A general parser (h11) costs more per request than the whole
narinfo answer, so this one does only what that needs, strictly:

- a head is the request line and header lines, CRLF-terminated, ending in an empty
  line; at most :data:`MAX_HEAD` bytes (else 431); anything malformed is 400 (the
  connection is then closed, so a parse error never desynchronises a pipeline);
- ``HTTP/1.1`` (``Host`` required) and ``HTTP/1.0`` (no keep-alive: closed after the
  response); other versions are 505;
- request bodies only with ``Content-Length`` (up to :data:`MAX_BODY`, else 413);
  ``Transfer-Encoding`` is refused (501), since no GET/HEAD carries one.

:func:`parse_head` turns one complete head into a :class:`RequestHead`; the caller
finds the head's end (``b"\\r\\n\\r\\n"``) and skips the body's ``content_length`` bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 16384
"""Largest request line + headers accepted (431 beyond)."""
MAX_BODY = 1 << 16
"""Largest request body accepted (413 beyond); bodies are read and dropped."""

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
_HEADER = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*([\x21-\x7e\x80-\xff]*(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)[ \t]*"
)
_VERSION_LIKE = re.compile(rb"[^ ]+ [^ ]+ HTTP/\d\.\d")


class BadRequest(Exception):
    """The request cannot be served; ``status`` is what to answer before closing."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    """Lower-cased names; a repeated header keeps its last value (Content-Length excepted)."""
    keep_alive: bool
    """False for HTTP/1.0 and for ``Connection: close``."""
    content_length: int


def parse_head(head: bytes) -> RequestHead:
    """Parse a complete head (without its final empty line's CRLF CRLF), or BadRequest."""
    if len(head) > MAX_HEAD:
        raise BadRequest(431, "request head too large")
    lines = head.split(b"\r\n")
    first = 0
    while first < len(lines) - 1 and not lines[first]:
        first += 1  # RFC 9112 2.2: ignore empty lines before the request line
    m = _REQUEST_LINE.fullmatch(lines[first])
    if m is None:
        if _VERSION_LIKE.fullmatch(lines[first]):
            raise BadRequest(505, "HTTP version not supported")
        raise BadRequest(400, "malformed request line")
    method, target, minor = m.group(1), m.group(2), m.group(3)
    headers: dict[bytes, bytes] = {}
    content_length: bytes | None = None
    for line in lines[first + 1 :]:
        h = _HEADER.fullmatch(line)
        if h is None:
            raise BadRequest(400, "malformed header line")
        name = h.group(1).lower()
        value = h.group(2)
        if name == b"content-length":
            if not value.isdigit() or (content_length is not None and value != content_length):
                raise BadRequest(400, "bad Content-Length")
            content_length = value
        headers[name] = value
    if b"transfer-encoding" in headers:
        raise BadRequest(501, "request bodies with Transfer-Encoding are not supported")
    length = int(content_length) if content_length is not None else 0
    if length > MAX_BODY:
        raise BadRequest(413, "request body too large")
    connection = headers.get(b"connection", b"").lower()
    if minor == b"1":
        if b"host" not in headers:
            raise BadRequest(400, "HTTP/1.1 request without Host")
        keep_alive = b"close" not in _tokens(connection)
    else:
        keep_alive = False
    return RequestHead(method, target, headers, keep_alive, length)


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip() for t in value.split(b",")] if value else []
