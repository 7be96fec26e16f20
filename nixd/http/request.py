"""Request heads and ``Content-Length`` bodies from bytes: the sans-I/O request reader.

:class:`RequestReader` is fed what the socket gave and hands back complete
:class:`RequestHead` values, then the body's bytes; it does no I/O and knows no clock
(the front owns the deadlines). It is strict where a lax reading would let two parties
disagree about where a request ends (request smuggling) or let a peer make a number
expensive. Every refusal is a :class:`~nixd.http.errors.BadRequest` with its status,
after which the front answers once and closes, so a pipeline never desynchronises:

=========================================================  ======
head                                                       status
=========================================================  ======
not ``method SP target SP HTTP/x.y`` (control bytes or     400
spaces in the target, anything before the request line)
a line ending in a bare LF (anywhere in the head), a       400
bare CR, obs-fold (a line starting with SP/HTAB), a
malformed field line, bytes outside VCHAR/obs-text
HTTP/1.1 without ``Host``, or more than one ``Host``       400
``Content-Length`` not ASCII digits (``²``, ``-1``,        400
``1,1``), or two different ones
``Transfer-Encoding`` together with ``Content-Length``     400
``Transfer-Encoding`` alone (no request we serve has one)  501
``Content-Length`` above ``max_body_bytes`` (any number    413
of digits: bounded before conversion, nixd.bounds)
head above ``max_head_bytes`` (also when it came in one    431
read) or more than ``max_header_count`` lines
a version other than HTTP/1.0 and HTTP/1.1                 505
=========================================================  ======

Every head this reader accepts, h11 accepts too and reads the same way (method, target,
version, header list); the differential test in ``tests/http`` holds it to that.

Cost, measured on the 2-core development machine for a 200-byte Nix narinfo request
(``timeit``, best of 5): feeding and reading one head ~5.6 µs (:func:`parse_request_head`
alone ~5.3 µs; the proxy's previous, laxer parser ~4.9 µs); h11 ~24 µs for the same head
with a fresh ``Connection``, and ~121 µs per request inside a server loop (DESIGN.md).
The strictness costs ~0.5 µs a head.

A client sends the same header lines on every request of a connection (Nix: ``Host``,
``User-Agent``, ``Accept``, ``Authorization``), so a :class:`RequestReader` remembers
what its last few valid header blocks parsed to (:data:`BLOCK_CACHE` of them): a head
whose block it has seen costs the request line's match only. Only blocks that parsed
without a refusal are kept, and every check that depends on the request line or the
version runs each time, so a head is accepted, refused and read exactly as without it.
"""

from __future__ import annotations

from nixd.bounds import parse_uint
from nixd.errors import FormatError
from nixd.http._grammar import BARE_LF, FIELD_LINE, REQUEST_LINE, comma_tokens
from nixd.http.errors import BadRequest
from nixd.http.limits import Limits

__all__ = ["RequestHead", "RequestReader", "parse_request_head"]

_TERMINATOR = b"\r\n\r\n"
BLOCK_CACHE = 8
"""Header blocks a reader remembers (see the module docstring)."""

_Block = tuple[dict[bytes, bytes], list[tuple[bytes, bytes]], int, bool, bool, bool]
"""What a valid header block parsed to: headers, fields, content length, ``Host`` seen,
``Connection: close``, ``Expect: 100-continue``."""


class RequestHead:
    """One parsed request head; read-only by convention (a plain slotted class: cheap)."""

    __slots__ = (
        "content_length",
        "expect_continue",
        "fields",
        "headers",
        "keep_alive",
        "method",
        "target",
        "version",
    )

    def __init__(
        self,
        *,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: dict[bytes, bytes],
        fields: list[tuple[bytes, bytes]],
        keep_alive: bool,
        content_length: int,
        expect_continue: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        """``b"1.1"`` or ``b"1.0"``."""
        self.headers = headers
        """Lower-cased names; a repeated field's values joined with ``", "`` (RFC 9110
        5.3), so no later line silently overrides an earlier one."""
        self.fields = fields
        """Every field line in order as (lower-cased name, value); a repeated identical
        ``Content-Length`` appears once (as h11 reports it)."""
        self.keep_alive = keep_alive
        """False for HTTP/1.0 and for ``Connection: close``."""
        self.content_length = content_length
        self.expect_continue = expect_continue
        """``Expect: 100-continue``: the client waits for an interim answer."""

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, HTTP/{self.version.decode()})"


def parse_request_head(
    head: bytes, limits: Limits, blocks: dict[bytes, _Block] | None = None
) -> RequestHead:
    """Parse one complete head (without the final CRLF CRLF), or raise BadRequest.

    ``blocks`` is a reader's memory of header blocks (module docstring): looked up, and
    given what this head's block parsed to.
    """
    cut = head.find(b"\r\n")
    if blocks is not None and cut >= 0:
        hit = blocks.get(head[cut:])
        if hit is not None and len(head) + 4 <= limits.max_head_bytes:
            line = head[:cut]
            m = None if b"\n" in line else REQUEST_LINE.fullmatch(line)
            if m is not None:
                method, target, major, minor = m.groups()
                headers, fields, length, has_host, close, expect = hit
                if major == b"1" and (minor == b"0" or (minor == b"1" and has_host)):
                    return RequestHead(
                        method=method,
                        target=target,
                        version=b"1." + minor,
                        headers=dict(headers),
                        fields=list(fields),
                        keep_alive=minor == b"1" and not close,
                        content_length=length,
                        expect_continue=expect,
                    )
        # anything else: the whole parse below, which refuses as it always does
    req = _parse_request_head(head, limits)
    if blocks is not None and cut >= 0:
        if len(blocks) >= BLOCK_CACHE:
            blocks.clear()
        connection = req.headers.get(b"connection")
        blocks[head[cut:]] = (
            dict(req.headers),
            list(req.fields),
            req.content_length,
            b"host" in req.headers,
            connection is not None and b"close" in comma_tokens(connection),
            req.expect_continue,
        )
    return req


def _parse_request_head(head: bytes, limits: Limits) -> RequestHead:
    if len(head) + 4 > limits.max_head_bytes:
        raise BadRequest(431, "request head too large")
    lines = head.split(b"\r\n")
    if head.count(b"\n") != len(lines) - 1:
        raise BadRequest(400, "a line ends in a bare LF")
    if len(lines) - 1 > limits.max_header_count:
        raise BadRequest(431, "too many header fields")
    m = REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise BadRequest(400, "malformed request line")
    method, target, major, minor = m.groups()
    if major != b"1" or minor not in (b"0", b"1"):
        raise BadRequest(505, "HTTP version not supported")
    headers: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        h = FIELD_LINE.fullmatch(line)
        if h is None:
            raise BadRequest(400, "malformed header field")
        name = h.group(1).lower()
        value = h.group(2)
        seen = headers.get(name)
        if seen is not None:
            if name == b"content-length":
                if value != seen:
                    raise BadRequest(400, "two different Content-Length fields")
                continue
            if name == b"host":
                raise BadRequest(400, "more than one Host field")
            headers[name] = seen + b", " + value
        else:
            headers[name] = value
        fields.append((name, value))
    length = 0
    text = headers.get(b"content-length")
    if b"transfer-encoding" in headers:
        if text is not None:
            raise BadRequest(400, "Transfer-Encoding with Content-Length")
        raise BadRequest(501, "request bodies with Transfer-Encoding are not supported")
    if text is not None:
        if not text.isdigit():  # bytes.isdigit is ASCII-only: b"\xb2" is not a digit
            raise BadRequest(400, "Content-Length is not a decimal number")
        try:
            length = parse_uint(text, limit=limits.max_body_bytes, what="Content-Length")
        except FormatError as exc:
            raise BadRequest(413, str(exc)) from None
    version = b"1." + minor
    if minor == b"1":
        if b"host" not in headers:
            raise BadRequest(400, "HTTP/1.1 request without Host")
        connection = headers.get(b"connection")
        keep_alive = connection is None or b"close" not in comma_tokens(connection)
    else:
        keep_alive = False
    expect = headers.get(b"expect")
    return RequestHead(
        method=method,
        target=target,
        version=version,
        headers=headers,
        fields=fields,
        keep_alive=keep_alive,
        content_length=length,
        expect_continue=expect is not None and expect.lower() == b"100-continue",
    )


class RequestReader:
    """Bytes in, request heads and body bytes out (jeepney's ``Parser`` shape).

    Alternates between two states: reading a head (:meth:`next_head`) and, after a head
    with a body, handing out its ``content_length`` bytes (:meth:`next_body`). Bytes after
    the current request stay buffered for the next one (pipelining).
    """

    __slots__ = ("_blocks", "_buf", "_limits", "_scan", "body_remaining")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._buf: bytes | bytearray = b""
        self._scan = 0
        """Where the search for the head's end resumes (bytes before it were searched)."""
        self.body_remaining = 0
        """Bytes of the current request's body not yet handed out."""
        self._blocks: dict[bytes, _Block] = {}

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if not self._buf:
            self._buf = data  # the common case, one read per request: no copy
            return
        if isinstance(self._buf, bytes):
            self._buf = bytearray(self._buf)
        self._buf += data

    def next_head(self) -> RequestHead | None:
        """The next complete head, None until one is in, or BadRequest."""
        if self.body_remaining:
            raise RuntimeError("the current request's body has not been read")
        buf = self._buf
        end = buf.find(_TERMINATOR, self._scan)
        if end < 0:
            if len(buf) >= self._limits.max_head_bytes:
                raise BadRequest(431, "request head too large")
            if BARE_LF.search(buf, max(0, self._scan - 1)):
                raise BadRequest(400, "a line ends in a bare LF")
            self._scan = max(0, len(buf) - 3)
            return None
        head = bytes(buf[:end])
        self._buf = buf[end + 4 :]
        self._scan = 0
        req = parse_request_head(head, self._limits, self._blocks)
        self.body_remaining = req.content_length
        return req

    def next_body(self, max_bytes: int = 1 << 20) -> bytes:
        """Up to ``max_bytes`` of the current body that are buffered (b"": feed more)."""
        take = min(self.body_remaining, len(self._buf), max_bytes)
        if not take:
            return b""
        buf = self._buf
        chunk = bytes(buf[:take])
        self._buf = buf[take:]
        self.body_remaining -= take
        return chunk
