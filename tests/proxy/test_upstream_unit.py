"""The upstream client's pieces without a network: the raw path's response-head parser,
bounded decoding, the credential's origin binding, URL redaction, which narinfo URLs are
fetched, and the store's file modes under umask 000."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import os
import stat
import zlib
from pathlib import Path

import h11
import hypothesis.strategies as st
import pytest
import trio
from hypothesis import given, settings

from nixd.auth.model import AccessToken
from nixd.errors import ConfigError, UpstreamError
from nixd.proxy.config import UpstreamConfig
from nixd.proxy.credential import (
    BasicCredential,
    NetrcCredential,
    Origin,
    TokenCredential,
    origin_of,
    redact_url,
    strip_userinfo,
)
from nixd.proxy.localstore import LocalStore
from nixd.proxy.metrics import Metrics
from nixd.proxy.upstream import (
    MAX_HEAD,
    MAX_HEADERS,
    Upstream,
    _BoundedDecoder,
    file_limit,
    parse_response_head,
)
from tests.proxy.hostile import signed_path

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain"


def test_a_plain_head_parses() -> None:
    head = parse_response_head(OK, "u")
    assert (head.status, head.content_length, head.chunked) == (200, 5, False)
    assert head.keep_alive
    assert head.headers[b"content-type"] == b"text/plain" and head.identity
    assert not parse_response_head(b"HTTP/1.0 404 Not Found", "u").keep_alive
    closing = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close", "u")
    assert not closing.keep_alive
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5", "u").content_length == 5
    assert parse_response_head(b"HTTP/1.1 204 ", "u").status == 204
    chunked = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", "u")
    assert chunked.chunked and chunked.content_length is None


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2",  # Latin-1 superscript two: isdigit()
        "HTTP/1.1 200 OK\r\nContent-Length: \u0663".encode(),  # Arabic-Indic three
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000,
        b"HTTP/1.1 200 OK\r\nContent-Length: +5",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1_0",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 3",  # bare LF inside a line
        b"HTTP/1.1 200 OK\r\nX: a\rb",
        b"HTTP/1.1 200 OK\r\nX: a\0b",
        b"HTTP/1.1 200 OK\r\n folded: value",
        b"HTTP/1.1 200 OK\r\nBad Name: value",
        b"HTTP/1.1 200 OK\r\nno colon",
        b"HTTP/1.1 200 OK\r\n: empty name",
        b"HTTP/2 200 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 099 Low",
        b"HTTP/1.1 \xb200 OK",
        b"ICY 200 OK",
        b"",
        b"HTTP/1.1 200 OK" + b"\r\nX: y" * (MAX_HEADERS + 1),
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * MAX_HEAD,
    ],
)
def test_malformed_heads_are_upstream_errors(head: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_response_head(head, "u")


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_upstream_error(data: bytes) -> None:
    try:
        head = parse_response_head(data, "u")
    except UpstreamError:
        return
    assert 100 <= head.status <= 999
    assert head.content_length is None or head.content_length >= 0


def test_bounded_decoder_never_produces_more_than_asked() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))
    assert len(bomb) < 128 << 10
    decoder = _BoundedDecoder("gzip", "u")
    assert len(decoder.decode(bomb, 1000)) <= 1000
    assert _BoundedDecoder("identity", "u").decode(b"abc", 1) == b"abc"  # the caller cuts
    assert _BoundedDecoder("deflate", "u").decode(zlib.compress(b"hi"), 100) == b"hi"
    with pytest.raises(UpstreamError, match="unsupported"):
        _BoundedDecoder("br", "u")
    with pytest.raises(UpstreamError, match="does not decode"):
        _BoundedDecoder("gzip", "u").decode(b"not gzip at all", 100)


def test_origins_and_redaction() -> None:
    assert origin_of("HTTP://Cache.Example") == Origin("http", "cache.example", 80)
    assert origin_of("https://u:p@cache.example/x") == Origin("https", "cache.example", 443)
    assert origin_of("http://[::1]:8080/") == Origin("http", "::1", 8080)
    for bad in ("http://[::1", "http://h:99999", "ftp://h", "file:///etc/passwd", "nar/x"):
        with pytest.raises(ValueError):
            origin_of(bad)
    assert strip_userinfo("http://u:p@h:1/a?b") == "http://h:1/a?b"
    assert strip_userinfo("http://h/a@b") == "http://h/a@b"
    assert redact_url("http://u:p@h:1/a") == "http://***@h:1/a"
    assert redact_url("http://tok@h") == "http://***@h"
    assert redact_url("http://h/path@not-userinfo") == "http://h/path@not-userinfo"
    assert redact_url("http://u:p@[::1") == "http://***@[::1"  # unparseable, still redacted
    assert redact_url("no scheme u:p@h") == "no scheme u:p@h"


def test_config_never_shows_url_credentials() -> None:
    config = UpstreamConfig(url="https://ci:s3cret@cache.example/x/")
    assert config.base_url == "https://cache.example/x"
    assert config.display_url == "https://***@cache.example/x"
    with pytest.raises(ConfigError) as info:
        UpstreamConfig(url="https://ci:s3cret@cache.example", auth="nixd")
    assert "s3cret" not in str(info.value) and "pick one" in str(info.value)
    with pytest.raises(ConfigError) as info:
        UpstreamConfig(url="https://ci:s3cret@cache.example", trusted_keys=("bad",))
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError, match="foreign_urls"):
        UpstreamConfig(url="https://cache.example", foreign_urls="maybe")  # type: ignore[arg-type]


class Tokens:
    def __init__(self) -> None:
        self.value = "t1"
        self.refreshes = 0

    async def get(self) -> AccessToken:
        return AccessToken(self.value, expires_at=2e9, identity="token:x")

    async def refresh(self, stale: AccessToken | None) -> AccessToken:
        self.refreshes += 1
        await trio.sleep(0.01)
        self.value = f"t{self.refreshes + 1}"
        return await self.get()


async def test_credentials_answer_for_their_origin_only(tmp_path: Path) -> None:
    origin = origin_of("http://cache.example:8080/prefix")
    tokens = Tokens()
    token = TokenCredential(origin, tokens, trio.Lock())
    assert await token.header("http://cache.example:8080/x.narinfo") == "Bearer t1"
    assert await token.header("http://CACHE.example:8080/other/path") == "Bearer t1"
    for elsewhere in (
        "http://cache.example/x",  # port 80
        "https://cache.example:8080/x",  # scheme
        "http://cache.example.evil:8080/x",
        "http://127.0.0.1:8080/x",
        "not a url",
    ):
        assert await token.header(elsewhere) is None, elsewhere
    # A burst of 401s for the same token makes one renewal.
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(token.on_401, "Bearer t1")
    assert tokens.refreshes == 1
    assert await token.on_401("Bearer t1") == "Bearer t2"  # renewed meanwhile: no new one

    basic = BasicCredential(origin, "ci", "pw")
    expected = "Basic " + base64.b64encode(b"ci:pw").decode()
    assert await basic.header("http://cache.example:8080/a") == expected
    assert await basic.header("http://other:8080/a") is None
    assert await basic.on_401(expected) is None

    netrc = tmp_path / "netrc"
    netrc.write_text("default login any password everywhere\n")
    from_netrc = NetrcCredential(origin, str(netrc))
    assert await from_netrc.header("http://cache.example:8080/a") is not None
    # curl would send a `default` entry to every host; the credential does not.
    assert await from_netrc.header("http://other.example:8080/a") is None


def test_which_narinfo_urls_are_fetched(tmp_path: Path) -> None:
    def make(**kw: object) -> Upstream:
        config = UpstreamConfig(url="http://ci:pw@cache.example:8080/base/", **kw)  # type: ignore[arg-type]
        return Upstream(config, 0, None, trio.Lock(), Metrics())

    refusing, anonymous = make(), make(foreign_urls="anonymous")
    assert refusing.name == "http://***@cache.example:8080/base"
    for u in (refusing, anonymous):
        assert u.url_for("nar/x.nar") == "http://cache.example:8080/base/nar/x.nar"
        assert u.url_for("//evil/x") == "http://cache.example:8080/base/evil/x"
        assert u.url_for("http://u:p@cache.example:8080/y") == "http://cache.example:8080/y"
        for bad in ("file:///etc/shadow", "gopher://h/x", "http://[::1/x", "nar/a b", "nar/\u00e9"):
            with pytest.raises(UpstreamError):
                u.url_for(bad)
    with pytest.raises(UpstreamError, match="another origin"):
        refusing.url_for("http://127.0.0.1:631/admin")
    assert anonymous.url_for("http://u:p@cdn.example/n") == "http://cdn.example/n"


def test_file_limit(tmp_path: Path) -> None:
    info = signed_path(tmp_path).info
    assert file_limit(info) == info.file_size
    unsized = dataclasses.replace(info, file_size=None)
    assert file_limit(unsized) == info.nar_size
    compressed = dataclasses.replace(unsized, compression="xz")
    assert info.nar_size < file_limit(compressed) < info.nar_size * 2 + (1 << 20)


def test_store_modes_ignore_the_umask(tmp_path: Path) -> None:
    root = tmp_path / "cache" / "nixd" / "store"
    old = os.umask(0)
    try:
        store = LocalStore(root, 1 << 20, Metrics())
        signed = signed_path(tmp_path)
        key = f"{signed.hash_part}-{'0' * 52}.nar"
        store.admit_bytes(key, signed.nar, signed.hash_part, signed.narinfo())
        store.close()
    finally:
        os.umask(old)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(root) == 0o700 and mode(root / "nar") == 0o700 and mode(root / "tmp") == 0o700
    assert mode(tmp_path / "cache") == 0o755 and mode(tmp_path / "cache" / "nixd") == 0o755
    assert mode(root / "index.sqlite") == 0o600
    assert mode(root / "nar" / key) == 0o600
    for extra in root.glob("index.sqlite-*"):
        assert mode(extra) == 0o600, extra


def test_an_old_loose_index_is_tightened(tmp_path: Path) -> None:
    root = tmp_path / "store"
    LocalStore(root, 1 << 20, Metrics()).close()
    (root / "index.sqlite").chmod(0o644)
    LocalStore(root, 1 << 20, Metrics()).close()
    assert stat.S_IMODE((root / "index.sqlite").stat().st_mode) == 0o600


# -- h11 as the oracle ---------------------------------------------------------------------

_PIECES = st.sampled_from(
    [b"", b" ", b"\t", b":", b",", b"\r", b"\n", b"\0", b"\x7f", b"\xb2", b"\xff", b"a", b"5"]
)
_GOOD_NAMES = st.sampled_from(
    [b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection",
     b"Content-Encoding", b"X-A", b"ETag"]
)  # fmt: skip
_NAMES = st.one_of(_GOOD_NAMES, st.sampled_from([b"Bad Name", b"", b"X\x00", b"\xe9t\xe9"]))
_GOOD_VALUES = st.sampled_from(
    [b"5", b"05", b"5, 5", b"5,6", b"chunked", b"gzip", b"close", b"keep-alive, close",
     b"a  b", b"\xe9", b"9" * 30, b""]
)  # fmt: skip
_VALUES = st.one_of(_GOOD_VALUES, st.lists(_PIECES, max_size=6).map(b"".join))
_GOOD_STATUS = st.sampled_from(
    [b"HTTP/1.1 200 OK", b"HTTP/1.0 404 Not Found", b"HTTP/1.1 204", b"HTTP/1.1 200 ",
     b"HTTP/1.1 302 Found", b"HTTP/1.1 100 Continue", b"HTTP/1.1 200 \xe9t\xe9"]
)  # fmt: skip
_STATUS_LINES = st.one_of(
    _GOOD_STATUS,
    st.sampled_from([b"HTTP/1.1 099 x", b"HTTP/2.0 200 OK", b"HTTP/1.1  200 OK",
                     b"http/1.1 200 OK", b"HTTP/1.1 2000", b"HTTP/1.1 \xb200 OK"]),
    st.lists(_PIECES, max_size=4).map(lambda pieces: b"HTTP/1.1 200 " + b"".join(pieces)),
)  # fmt: skip
_HEADER_LINES = st.one_of(
    st.builds(lambda n, v: n + b": " + v, _GOOD_NAMES, _GOOD_VALUES),
    st.builds(
        lambda name, sep, value: name + sep + value,
        _NAMES,
        st.sampled_from([b": ", b":", b" : ", b":\t"]),
        _VALUES,
    ),
)


def _h11_reads(head: bytes) -> h11.Response | h11.InformationalResponse | None:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head + b"\r\n\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    assert isinstance(event, h11.Response | h11.InformationalResponse), event
    return event


@settings(max_examples=1000)
@given(_STATUS_LINES, st.lists(_HEADER_LINES, max_size=5))
def test_the_head_parser_accepts_only_what_h11_accepts_and_reads_it_alike(
    status_line: bytes, lines: list[bytes]
) -> None:
    head = b"\r\n".join([status_line, *lines])
    try:
        ours = parse_response_head(head, "u")
    except UpstreamError:
        return
    theirs = _h11_reads(head)
    assert theirs is not None, head
    assert ours.status == theirs.status_code
    assert ours.version == b"HTTP/" + theirs.http_version
    seen: dict[bytes, list[bytes]] = {}
    for name, value in theirs.headers:
        seen.setdefault(name, []).append(value)
    for name, value in ours.headers.items():
        if name == b"content-length":
            assert ours.content_length == int(seen[name][0])  # h11 keeps one, checked alike
        else:
            assert value == b", ".join(seen[name])
    assert ours.chunked == (b"transfer-encoding" in seen)
