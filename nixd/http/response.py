"""Response heads from bytes, for a client that reads an upstream's answers itself.

The same strictness as :mod:`nixd.http.request`, turned around: a response whose framing
two readers could disagree on is refused, not guessed at, because a client that reads
the wrong number of body bytes hands the rest of one answer to the next request on a
kept-alive connection (response splitting). Refused with
:class:`~nixd.http.errors.BadResponse` (an :class:`~nixd.errors.UpstreamError`):

- a status line that is not ``HTTP/1.x DDD [reason]`` or has a status below 100; a
  bare LF anywhere in the head, a bare CR, obs-fold, a malformed field line; more than
  ``max_header_count`` fields; a head larger than ``max_head_bytes``;
- ``Content-Length`` that is not ASCII digits, two different ones, or one together with
  ``Transfer-Encoding``; a ``Transfer-Encoding`` other than ``chunked``;
- a ``Content-Length`` above the caller's ``max_body`` (:class:`BodyTooLarge`): the
  number is bounded before it is converted, and a caller passes the size it expects
  (the narinfo's FileSize, the narinfo limit), so no body is buffered past it.

:class:`ResponseReader` is the buffering half (feed bytes, get the head, then the body
bytes that came with it); :func:`parse_response_head` parses one complete head.
"""

from __future__ import annotations

from nixd.bounds import parse_uint
from nixd.errors import FormatError
from nixd.http._grammar import BARE_LF, FIELD_LINE, STATUS_LINE, comma_tokens
from nixd.http.errors import BadResponse, BodyTooLarge

__all__ = [
    "MAX_CONTENT_LENGTH",
    "ResponseHead",
    "ResponseReader",
    "parse_response_head",
]

MAX_CONTENT_LENGTH = (1 << 63) - 1
"""The largest length any file on a POSIX system can have; the default bound."""
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_FIELDS = 100

_TERMINATOR = b"\r\n\r\n"


class ResponseHead:
    """One parsed response head; read-only by convention."""

    __slots__ = (
        "chunked",
        "content_length",
        "fields",
        "headers",
        "keep_alive",
        "reason",
        "status",
        "version",
    )

    def __init__(
        self,
        *,
        version: bytes,
        status: int,
        reason: bytes,
        headers: dict[bytes, bytes],
        fields: list[tuple[bytes, bytes]],
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self.version = version
        """``b"1.1"`` or ``b"1.0"``."""
        self.status = status
        self.reason = reason
        self.headers = headers
        """Lower-cased names; repeated fields joined with ``", "``."""
        self.fields = fields
        """Every field line in order (lower-cased name, value); a repeated identical
        ``Content-Length`` once."""
        self.content_length = content_length
        """None when absent (then the body is chunked or ends with the connection)."""
        self.chunked = chunked
        self.keep_alive = keep_alive
        """Whether the connection may carry another request after this answer: HTTP/1.1
        without ``Connection: close``, and a body whose end is known (length or chunked)."""

    def header(self, name: bytes) -> bytes | None:
        """The (joined) value of the lower-case field ``name``."""
        return self.headers.get(name)

    @property
    def identity(self) -> bool:
        """No content coding: the body is the representation's bytes as they are.

        A client that asked for ``Accept-Encoding: identity`` and hashes what it receives
        (a NAR file) checks this, since some stores send a coding whatever the request
        said; ``Content-Encoding: identity`` (any case) counts as none.
        """
        coding = self.headers.get(b"content-encoding")
        return coding is None or all(t in (b"", b"identity") for t in comma_tokens(coding))

    def __repr__(self) -> str:
        return f"ResponseHead({self.status}, HTTP/{self.version.decode()})"


def parse_response_head(
    head: bytes,
    *,
    max_body: int = MAX_CONTENT_LENGTH,
    max_head_bytes: int = MAX_RESPONSE_HEAD,
    max_header_count: int = MAX_RESPONSE_FIELDS,
) -> ResponseHead:
    """Parse one complete response head (without the final CRLF CRLF), or BadResponse."""
    if len(head) + 4 > max_head_bytes:
        raise BadResponse(f"response head larger than {max_head_bytes} bytes")
    lines = head.split(b"\r\n")
    if head.count(b"\n") != len(lines) - 1:
        raise BadResponse("a line of the response head ends in a bare LF")
    if len(lines) - 1 > max_header_count:
        raise BadResponse(f"more than {max_header_count} response header fields")
    m = STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise BadResponse("malformed status line")
    major, minor, code, reason = m.groups()
    if major != b"1" or minor not in (b"0", b"1"):
        raise BadResponse(f"HTTP/{major.decode()}.{minor.decode()} is not HTTP/1.x")
    status = int(code)  # three ASCII digits (the pattern)
    if status < 100:
        raise BadResponse(f"status {code.decode()} is below 100")
    headers: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        h = FIELD_LINE.fullmatch(line)
        if h is None:
            raise BadResponse("malformed response header field")
        name = h.group(1).lower()
        value = h.group(2)
        seen = headers.get(name)
        if seen is not None:
            if name == b"content-length":
                if value != seen:
                    raise BadResponse("two different Content-Length fields")
                continue
            headers[name] = seen + b", " + value
        else:
            headers[name] = value
        fields.append((name, value))
    length: int | None = None
    text = headers.get(b"content-length")
    encoding = headers.get(b"transfer-encoding")
    chunked = False
    if encoding is not None:
        if text is not None:
            raise BadResponse("Transfer-Encoding with Content-Length")
        if comma_tokens(encoding) != [b"chunked"]:
            raise BadResponse("a Transfer-Encoding other than chunked")
        chunked = True
    if text is not None:
        if not text.isdigit():  # ASCII only: b"\xb2" (Latin-1 superscript two) is not
            raise BadResponse("Content-Length is not a decimal number")
        try:
            length = parse_uint(text, limit=max_body, what="Content-Length")
        except FormatError as exc:
            raise BodyTooLarge(f"{exc} bytes") from None
    connection = headers.get(b"connection")
    keep_alive = (
        minor == b"1"
        and (connection is None or b"close" not in comma_tokens(connection))
        and (length is not None or chunked or status in (204, 304) or status < 200)
    )
    return ResponseHead(
        version=b"1." + minor,
        status=status,
        reason=reason or b"",
        headers=headers,
        fields=fields,
        content_length=length,
        chunked=chunked,
        keep_alive=keep_alive,
    )


class ResponseReader:
    """Buffers what a connection gave until a response head is complete.

    Use: ``feed`` each read, then ``next_head()`` until it returns a head (None: feed
    more); ``take_buffered()`` then gives the bytes that came after the head (the start
    of the body). ``max_body`` bounds the ``Content-Length`` of the next head.
    """

    __slots__ = ("_buf", "_scan", "max_body", "max_head_bytes", "max_header_count")

    def __init__(
        self,
        *,
        max_body: int = MAX_CONTENT_LENGTH,
        max_head_bytes: int = MAX_RESPONSE_HEAD,
        max_header_count: int = MAX_RESPONSE_FIELDS,
    ) -> None:
        self.max_body = max_body
        self.max_head_bytes = max_head_bytes
        self.max_header_count = max_header_count
        self._buf = bytearray()
        self._scan = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_head(self) -> ResponseHead | None:
        buf = self._buf
        end = buf.find(_TERMINATOR, self._scan)
        if end < 0:
            if len(buf) >= self.max_head_bytes:
                raise BadResponse(f"response head larger than {self.max_head_bytes} bytes")
            if BARE_LF.search(buf, max(0, self._scan - 1)):
                raise BadResponse("a line of the response head ends in a bare LF")
            self._scan = max(0, len(buf) - 3)
            return None
        head = bytes(buf[:end])
        del buf[: end + 4]
        self._scan = 0
        return parse_response_head(
            head,
            max_body=self.max_body,
            max_head_bytes=self.max_head_bytes,
            max_header_count=self.max_header_count,
        )

    def take_buffered(self) -> bytes:
        """Every byte received after the last head (and not taken yet)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data
