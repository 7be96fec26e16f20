"""The sans-I/O core of nixd.http: request reader, response-head parser, Range.

Literal cases for each refusal, and h11 as the oracle: a hypothesis differential test in
which a head is accepted only if h11 accepts it, and read the same way.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixd.errors import UpstreamError
from nixd.http import (
    BadRequest,
    BadResponse,
    BodyTooLarge,
    ByteRange,
    Limits,
    RequestReader,
    ResponseReader,
    parse_range,
    parse_request_head,
    parse_response_head,
)

LIMITS = Limits()
GOOD = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/7.8 Nix/2.8"

# -- requests -----------------------------------------------------------------------------


def test_parses_a_nix_request() -> None:
    head = parse_request_head(GOOD + b"\r\nAuthorization:  Basic  abc= \r\nX-Empty:", LIMITS)
    assert (head.method, head.target, head.version) == (b"GET", b"/nix-cache-info", b"1.1")
    assert head.headers[b"authorization"] == b"Basic  abc="
    assert head.headers[b"x-empty"] == b""
    assert head.headers[b"user-agent"] == b"curl/7.8 Nix/2.8"
    assert head.keep_alive and head.content_length == 0 and not head.expect_continue


def test_repeated_fields_are_joined_not_overridden() -> None:
    head = parse_request_head(GOOD + b"\r\nAuthorization: a\r\nauthorization: b", LIMITS)
    assert head.headers[b"authorization"] == b"a, b"
    assert head.fields[-2:] == [(b"authorization", b"a"), (b"authorization", b"b")]


def test_keep_alive_content_length_and_expect() -> None:
    assert not parse_request_head(GOOD + b"\r\nConnection: Keep-Alive, Close", LIMITS).keep_alive
    http10 = parse_request_head(b"HEAD /x.narinfo HTTP/1.0", LIMITS)
    assert http10.method == b"HEAD" and not http10.keep_alive and http10.version == b"1.0"
    put = parse_request_head(
        b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\ncontent-length: 5\r\n"
        b"Expect: 100-Continue",
        LIMITS,
    )
    assert put.content_length == 5 and put.expect_continue
    assert [f for f in put.fields if f[0] == b"content-length"] == [(b"content-length", b"5")]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"", 400),
        (b"\r\nGET /x HTTP/1.1\r\nHost: x", 400),  # an empty line before the request line
        (b"GET /x HTTP/1.1", 400),  # no Host
        (b"GET /x HTTP/1.1\r\nHost: x\r\nHost: y", 400),
        (b"GET  /x HTTP/1.1\r\nHost: x", 400),
        (b"GET /x y HTTP/1.1\r\nHost: x", 400),
        (b"GET /x\x01y HTTP/1.1\r\nHost: x", 400),  # control byte in the target
        (b"GET /x\x7f HTTP/1.1\r\nHost: x", 400),
        (b"GET /x HTTP/1.1\r\nHost : x", 400),  # space before the colon
        (b"GET /x HTTP/1.1\r\nHost: x\r\n folded", 400),  # obs-fold
        (b"GET /x HTTP/1.1\r\nHost: x\r\nX: a\x00b", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nX: a\x01b", 400),  # h11 would let this through
        (b"GET /x HTTP/1.1\r\nHost: x\nX: y", 400),  # bare LF inside
        (b"GET /x HTTP/1.1\nHost: x", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\rX: y", 400),  # bare CR
        (b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: -1", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2", 400),  # Latin-1 superscript 2
        (b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: \xd9\xa3", 400),  # Arabic-Indic 3
        (b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1,1", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000, 413),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577", 413),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", 501),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3", 400),
        (b"GET /x HTTP/2.0\r\nHost: x", 505),
        (b"GET /x HTTP/0.9\r\nHost: x", 505),
        (GOOD + b"\r\nX: " + b"a" * LIMITS.max_head_bytes, 431),
        (GOOD + b"\r\nX: y" * LIMITS.max_header_count, 431),
    ],
)
def test_refused_heads(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request_head(head, LIMITS)
    assert caught.value.status == status


def test_reader_pipelining_bodies_and_split_reads() -> None:
    reader = RequestReader(LIMITS)
    data = (
        b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    for i in range(0, len(data), 7):
        reader.feed(data[i : i + 7])
    first = reader.next_head()
    assert first is not None and first.target == b"/a" and reader.body_remaining == 5
    with pytest.raises(RuntimeError):
        reader.next_head()
    assert reader.next_body(3) + reader.next_body() == b"hello"
    assert reader.next_body() == b""
    second = reader.next_head()
    assert second is not None and second.target == b"/b"
    assert reader.next_head() is None and reader.buffered == 0


def test_reader_refuses_early() -> None:
    """A head over the limit in one read, a bare LF before the end: refused at once."""
    small = Limits(max_head_bytes=64)
    reader = RequestReader(small)
    reader.feed(b"GET /" + b"a" * 80 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(BadRequest) as caught:
        reader.next_head()
    assert caught.value.status == 431
    reader = RequestReader(small)
    reader.feed(b"GET /" + b"a" * 80)
    with pytest.raises(BadRequest):
        reader.next_head()
    reader = RequestReader(LIMITS)
    reader.feed(b"GET / HTTP/1.1\r\n")
    assert reader.next_head() is None
    reader.feed(b"Host: x\n")
    with pytest.raises(BadRequest) as caught:
        reader.next_head()
    assert caught.value.status == 400


# -- h11 as the oracle ---------------------------------------------------------------------

_PIECES = [
    b"GET",
    b"HEAD",
    b"PUT",
    b" ",
    b"  ",
    b"/",
    b"/nix-cache-info",
    b"/x?y=1",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"\r\n",
    b"\n",
    b"\r",
    b"Host: x",
    b"host:",
    b"Host: y",
    b"Content-Length: 3",
    b"Content-Length: 4",
    b"content-length:3",
    b"Content-Length: 3,3",
    b"Content-Length: \xb2",
    b"Transfer-Encoding: chunked",
    b"Connection: close",
    b"Expect: 100-continue",
    b"X: a b",
    b"X:\t\x80\xff ",
    b":",
    b"\t",
    b"\x00",
    b"\x01",
    b"\x7f",
]

_TARGET_BYTES = [b"/", b"a", b"%20", b"?", b"=", b"~", b"*"] * 6 + [b" ", b"\x00", b"\x7f", b"\x80"]
_NAMES = [b"X", b"Content-Length", b"content-length", b"A-b", b"Connection", b"Expect"] * 3
_NAMES += [b"Host", b"X y", b"Transfer-Encoding"]
_VALUE_BYTES = [b"a", b"3", b"4", b" ", b"\t", b",", b"\x80", b"\xff", b"close"] * 4
_VALUE_BYTES += [b"\x00", b"\x01", b"\x7f", b"\xb2", b"chunked", b"\r", b"\n"]

_noise_heads = st.one_of(
    st.lists(st.sampled_from(_PIECES), max_size=24).map(b"".join),
    st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=4)), max_size=16).map(b"".join),
)
"""Mostly garbage: checks that what we accept of it h11 accepts too."""

_request_heads = st.builds(
    lambda method, target, version, lines, eol: eol.join(
        [method + b" " + target + b" " + version, *lines]
    ),
    st.sampled_from([b"GET", b"HEAD", b"PUT", b"M-SEARCH", b"get"] * 2 + [b"G\x80T", b""]),
    st.lists(st.sampled_from(_TARGET_BYTES), min_size=1, max_size=12).map(b"".join),
    st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/1.2", b"http/1.1"]),
    st.lists(
        st.builds(
            lambda name, sep, value: name + sep + value,
            st.sampled_from(_NAMES),
            st.sampled_from([b":", b": ", b":\t"] * 4 + [b" :", b""]),
            st.lists(st.sampled_from(_VALUE_BYTES), max_size=8).map(b"".join),
        ),
        max_size=5,
    ).map(lambda lines: [b"Host: x", *lines]),
    st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r"]),
)
"""Mostly well-formed heads with one or two bad bytes: the parses are compared."""


def _h11_request(head: bytes) -> h11.Request | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"\r\n\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


@settings(max_examples=3000, deadline=None)
@given(st.one_of(_request_heads, _request_heads, _noise_heads))
def test_request_heads_agree_with_h11(head: bytes) -> None:
    try:
        ours = parse_request_head(head, LIMITS)
    except BadRequest:
        return
    theirs = _h11_request(head)
    assert theirs is not None, f"accepted what h11 refuses: {head!r}"
    assert ours.method == theirs.method
    assert ours.target == theirs.target
    assert ours.version == theirs.http_version
    assert ours.fields == [(name, value) for name, value in theirs.headers]


_STATUS_PIECES = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 200",
    b"HTTP/1.0 404 Not Found",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1 200 \x80\t",
    b"HTTP/1.1 200 O\x00",
    b"HTTP/1.1  200 OK",
    b"HTTP/3.0 200 OK",
]


_FIELD_PIECES = [b"", b" ", b"\t", b":", b",", b"\r", b"\n", b"\0", b"\x7f", b"\xb2", b"\xff", b"a"]
_FIELD_PIECES += [b"5"]
_GOOD_FIELD_NAMES = [b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection"]
_GOOD_FIELD_NAMES += [b"Content-Encoding", b"X-A", b"ETag"]
_GOOD_FIELD_VALUES = [b"5", b"05", b"5, 5", b"5,6", b"chunked", b"gzip", b"close", b"a  b"]
_GOOD_FIELD_VALUES += [b"keep-alive, close", b"\xe9", b"9" * 30, b""]
_status_lines = st.one_of(
    st.sampled_from(
        [b"HTTP/1.1 200 OK", b"HTTP/1.0 404 Not Found", b"HTTP/1.1 204", b"HTTP/1.1 200 ",
         b"HTTP/1.1 302 Found", b"HTTP/1.1 100 Continue", b"HTTP/1.1 200 \xe9t\xe9",
         b"HTTP/1.1 099 x", b"HTTP/1.1 000", b"HTTP/2.0 200 OK", b"HTTP/1.1  200 OK",
         b"http/1.1 200 OK", b"HTTP/1.1 2000", b"HTTP/1.1 \xb200 OK"]
    ),
    st.lists(st.sampled_from(_FIELD_PIECES), max_size=4).map(
        lambda pieces: b"HTTP/1.1 200 " + b"".join(pieces)
    ),
)  # fmt: skip
_field_lines = st.one_of(
    st.builds(
        lambda n, v: n + b": " + v,
        st.sampled_from(_GOOD_FIELD_NAMES),
        st.sampled_from(_GOOD_FIELD_VALUES),
    ),
    st.builds(
        lambda name, sep, value: name + sep + value,
        st.sampled_from([*_GOOD_FIELD_NAMES, b"Bad Name", b"", b"X\x00", b"\xe9t\xe9"]),
        st.sampled_from([b": ", b":", b" : ", b":\t"]),
        st.one_of(
            st.sampled_from(_GOOD_FIELD_VALUES),
            st.lists(st.sampled_from(_FIELD_PIECES), max_size=6).map(b"".join),
        ),
    ),
)
_response_heads = st.builds(
    lambda line, fields: b"\r\n".join([line, *fields]),
    _status_lines,
    st.lists(_field_lines, max_size=5),
)
"""Status lines and field lines of the shapes upstreams send, with the odd bad byte."""


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.builds(
            lambda line, rest: line + rest,
            st.sampled_from(_STATUS_PIECES),
            st.lists(st.sampled_from(_PIECES[11:]), max_size=12).map(b"".join),
        ),
        _response_heads,
    )
)
def test_response_heads_agree_with_h11(head: bytes) -> None:
    try:
        ours = parse_response_head(head)
    except BadResponse:
        return
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.receive_data(head + b"\r\n\r\n")
    try:
        theirs = conn.next_event()
    except h11.RemoteProtocolError:
        theirs = None
    assert isinstance(theirs, h11.Response | h11.InformationalResponse), head
    assert ours.status == theirs.status_code
    assert ours.reason == theirs.reason
    assert ours.version == theirs.http_version
    assert ours.fields == [(name, value) for name, value in theirs.headers]


# -- responses ----------------------------------------------------------------------------


def test_parses_a_response_head() -> None:
    head = parse_response_head(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/x-nix-narinfo\r\nContent-Length: 42", max_body=100
    )
    assert (head.status, head.reason, head.version) == (200, b"OK", b"1.1")
    assert head.content_length == 42 and not head.chunked and head.keep_alive
    assert head.header(b"content-type") == b"text/x-nix-narinfo"
    no_reason = parse_response_head(b"HTTP/1.0 404")
    assert no_reason.status == 404 and no_reason.reason == b"" and not no_reason.keep_alive
    chunked = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked")
    assert chunked.chunked and chunked.content_length is None and chunked.keep_alive
    close_delimited = parse_response_head(b"HTTP/1.1 200 OK")
    assert not close_delimited.keep_alive  # its body ends with the connection
    closing = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close")
    assert not closing.keep_alive
    listed = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: a, Close")
    assert not listed.keep_alive
    no_content = parse_response_head(b"HTTP/1.1 204 ")
    assert no_content.status == 204 and no_content.keep_alive
    twice = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5")
    assert twice.content_length == 5 and twice.fields == [(b"content-length", b"5")]


def test_identity_means_no_content_coding() -> None:
    def identity(fields: bytes) -> bool:
        return parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1" + fields).identity

    assert identity(b"")
    assert identity(b"\r\nContent-Encoding: identity")
    assert identity(b"\r\nContent-Encoding: Identity ")
    assert not identity(b"\r\nContent-Encoding: gzip")
    assert not identity(b"\r\nContent-Encoding: identity, gzip")
    assert not identity(b"\r\nContent-Encoding: identity\r\nContent-Encoding: br")


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 099 Low",  # h11 refuses a status below 100 too
        b"HTTP/1.1 000",
        b"HTTP/1.1 \xb200 OK",
        b"HTTP/2 200",
        b"HTTP/2.0 200 OK",
        b"ICY 200 OK",
        b"HTTP/1.1 200 OK\nContent-Length: 1",
        b"HTTP/1.1 200 OK\r\nX: a\rb",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b",
        b"HTTP/1.1 200 OK\r\nX: a\x01",
        b"HTTP/1.1 200 OK\r\nX: a\0b",
        b"HTTP/1.1 200 OK\r\n folded: value",
        b"HTTP/1.1 200 OK\r\nBad Name: value",
        b"HTTP/1.1 200 OK\r\nno colon",
        b"HTTP/1.1 200 OK\r\n: empty name",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2",  # Latin-1 superscript two: isdigit()
        "HTTP/1.1 200 OK\r\nContent-Length: \u0663".encode(),  # Arabic-Indic three
        b"HTTP/1.1 200 OK\r\nContent-Length: -5",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1_0",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5",  # h11 takes it; one reading is safer
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 100 + b"X: y",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000,
    ],
)
def test_refused_response_heads(head: bytes) -> None:
    with pytest.raises(BadResponse) as caught:
        parse_response_head(head)
    assert isinstance(caught.value, UpstreamError)


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_refused(data: bytes) -> None:
    try:
        head = parse_response_head(data)
    except BadResponse:
        return
    assert 100 <= head.status <= 999
    assert head.content_length is None or head.content_length >= 0


def test_content_length_is_bounded_before_conversion() -> None:
    with pytest.raises(BodyTooLarge):
        parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000)
    with pytest.raises(BodyTooLarge):
        parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 129", max_body=128)
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 128", max_body=128)


def test_response_reader() -> None:
    reader = ResponseReader(max_body=10)
    for part in (b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 5\r\n\r", b"\nhel"):
        reader.feed(part)
        got = reader.next_head()
    assert got is not None and got.content_length == 5
    assert reader.take_buffered() == b"hel"
    reader = ResponseReader(max_head_bytes=32)
    reader.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 40)
    with pytest.raises(BadResponse):
        reader.next_head()
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\n")
    with pytest.raises(BadResponse):
        reader.next_head()


# -- Range --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"bytes=0-9", ByteRange(0, 10, 100)),
        (b"bytes=10-", ByteRange(10, 100, 100)),
        (b"bytes=-10", ByteRange(90, 100, 100)),
        (b"bytes=-1000", ByteRange(0, 100, 100)),
        (b"bytes=90-1000", ByteRange(90, 100, 100)),
        (b"Bytes= 5-5 ", ByteRange(5, 6, 100)),
        (b"bytes = 5-5", None),
        ("bytes=1-2", ByteRange(1, 3, 100)),
        (None, None),
        (b"bytes=100-", None),  # past the end: ignored, a 200 (never a 416)
        (b"bytes=5-4", None),
        (b"bytes=-0", None),
        (b"bytes=-", None),
        (b"bytes=0-1,5-6", None),
        (b"items=0-1", None),
        (b"bytes=\xb2-", None),
        (b"bytes=+1-", None),
        (b"bytes=1_0-", None),
        (b"bytes=" + b"9" * 5000 + b"-", None),
        (b"bytes=0-" + b"9" * 5000, None),
        (b"bytes=-" + b"9" * 5000, None),
        (b"bytes=9223372036854775807-", None),
    ],
)
def test_range(value: bytes | str | None, expected: ByteRange | None) -> None:
    assert parse_range(value, 100) == expected


def test_range_content_range_and_empty_files() -> None:
    got = parse_range(b"bytes=10-19", 100)
    assert got is not None and got.length == 10 and got.content_range == b"bytes 10-19/100"
    assert parse_range(b"bytes=0-", 0) is None


@given(st.binary(max_size=40), st.integers(min_value=0, max_value=1 << 40))
def test_range_never_raises_and_stays_inside(value: bytes, size: int) -> None:
    got = parse_range(value, size)
    if got is not None:
        assert 0 <= got.start < got.stop <= size == got.size


def _outcome(head: bytes, blocks: dict[bytes, object] | None) -> object:
    try:
        req = parse_request_head(head, LIMITS, blocks)  # type: ignore[arg-type]
    except BadRequest as exc:
        return ("refused", exc.status, str(exc))
    return (
        req.method, req.target, req.version, req.headers, req.fields,
        req.keep_alive, req.content_length, req.expect_continue,
    )  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(_request_heads, _noise_heads),
    st.sampled_from(
        [
            b"GET /a HTTP/1.1",
            b"HEAD /b.narinfo HTTP/1.0",
            b"GET /c HTTP/2.0",
            b"GET  / HTTP/1.1",
            b"GET /\n HTTP/1.1",
            b"PUT /x?y HTTP/1.1",
            b"GET /" + b"x" * 20000 + b" HTTP/1.1",
        ]
    ),
)
def test_remembered_header_blocks_parse_as_without(head: bytes, line: bytes) -> None:
    """A reader's memory of header blocks changes no outcome: the same head, and the
    same block under another request line, parse (or are refused) as without it."""
    blocks: dict[bytes, object] = {}
    cut = head.find(b"\r\n")
    other = line + head[cut:] if cut >= 0 else line
    for h in (head, head, other, other, head):
        assert _outcome(h, blocks) == _outcome(h, None), h
