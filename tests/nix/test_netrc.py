"""netrc parsing and rendering, checked against literal fixtures and the real curl."""

from __future__ import annotations

import base64
import contextlib
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.nix.netrc import (
    MAX_LINE_BYTES,
    NetrcEntry,
    lookup,
    merge_netrc,
    parse_netrc,
    render_netrc,
)

# --- parsing -----------------------------------------------------------------------------


def test_one_line_and_multi_line_blocks() -> None:
    text = (
        "machine a.example login alice password s3cret\n"
        "machine b.example\n"
        "    login bob\n"
        "    password hunter2\n"
        "    account acct\n"
        "default login anonymous password guest\n"
    )
    assert parse_netrc(text) == [
        NetrcEntry("a.example", "alice", "s3cret"),
        NetrcEntry("b.example", "bob", "hunter2", "acct"),
        NetrcEntry(None, "anonymous", "guest"),
    ]


def test_comments_only_at_token_start() -> None:
    text = (
        "# a comment line\n"
        "machine h login u password pass#word # the rest is a comment: login x\n"
        "  # machine evil login e password e\n"
    )
    assert parse_netrc(text) == [NetrcEntry("h", "u", "pass#word")]


def test_quoted_values_and_escapes() -> None:
    text = 'machine h login "user name" password "a\\"b\\\\c\\nd\\te\\qf"\n'
    assert parse_netrc(text) == [NetrcEntry("h", "user name", 'a"b\\c\nd\teqf')]


def test_curl_skips_the_character_after_a_closing_quote() -> None:
    # curl steps over one character after the closing quote, even a non-blank one.
    assert parse_netrc('machine h login "u"Xpassword p\n') == [NetrcEntry("h", "u", "p")]


def test_keywords_are_case_insensitive() -> None:
    assert parse_netrc("MACHINE h LOGIN u Password p\nDEFAULT login d password q") == [
        NetrcEntry("h", "u", "p"),
        NetrcEntry(None, "d", "q"),
    ]


def test_macdef_body_is_skipped_until_an_empty_line() -> None:
    text = (
        "macdef init\n"
        "machine evil login e password e\n"
        "cd /pub\n"
        "\n"
        "machine h login u password p\n"
        "macdef other\n"
        "machine evil2 login e password e\n"
    )
    assert parse_netrc(text) == [NetrcEntry("h", "u", "p")]


def test_crlf_file() -> None:
    text = "machine h\r\n  login u\r\n  password p\r\nmachine g login v password q\r\n"
    assert parse_netrc(text) == [NetrcEntry("h", "u", "p"), NetrcEntry("g", "v", "q")]


def test_values_after_both_credentials_are_ignored() -> None:
    # curl stops reading a matching block once it has a login and a password.
    assert parse_netrc("machine h login a login b password p login c password q") == [
        NetrcEntry("h", "b", "p")
    ]


def test_words_outside_a_block_are_ignored() -> None:
    assert parse_netrc("login x password y port 21\nmachine h login u") == [
        NetrcEntry("h", "u", None)
    ]


def test_overlong_line_is_skipped_like_curl() -> None:
    long = "machine long login u password " + "x" * MAX_LINE_BYTES
    text = f"{long}\nmachine h login u password p\n"
    assert parse_netrc(text) == [NetrcEntry("h", "u", "p")]


def test_bytes_input() -> None:
    assert parse_netrc(b"machine h login u password p\n") == [NetrcEntry("h", "u", "p")]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('machine h login u password "unterminated\n', "f:1"),
        ('machine h\nlogin u password "bad\\\n', "f:2"),
        ("machine h login u password\n", "f:1"),
        ("machine h login \nu password p\n", "f:1"),
        ("machine h login machine password p\n", "f:1"),
        ("machine h\nlogin u\npassword default\n", "f:3"),
        ("machine h login u account password\n", "f:1"),
        ("machine h login u\nmacdef init\n", "f:2"),
        ("machine h login u password a\0b\n", "f:1"),
    ],
)
def test_malformed_or_ambiguous_files_are_rejected_with_where(text: str, where: str) -> None:
    with pytest.raises(FormatError) as info:
        parse_netrc(text, source="f")
    assert info.value.where == where


def test_non_utf8_is_a_format_error() -> None:
    with pytest.raises(FormatError):
        parse_netrc(b"machine h login u password \xff\n", source="f")


@given(st.text(alphabet=st.sampled_from(list(' \t\r\n"\\#mMachinedfultlogpswrc'))))
@settings(max_examples=300, deadline=None)
def test_parse_raises_only_format_error_on_netrc_like_text(text: str) -> None:
    with contextlib.suppress(FormatError):
        parse_netrc(text)


@given(st.one_of(st.text(), st.binary()))
@settings(max_examples=300, deadline=None)
def test_parse_raises_only_format_error_on_anything(text: str | bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_netrc(text)


# --- rendering ---------------------------------------------------------------------------


def test_render_one_line_per_entry_default_where_it_stands() -> None:
    entries = [NetrcEntry("127.0.0.1", "nixd", "sekrit"), NetrcEntry(None, "a", "b", "c")]
    assert render_netrc(entries) == (
        "machine 127.0.0.1 login nixd password sekrit\ndefault login a password b account c\n"
    )


@pytest.mark.parametrize(
    "entry",
    [
        NetrcEntry("h", "u", "p\nmachine evil login e password e"),
        NetrcEntry("h", "u", "two words"),
        NetrcEntry("h", "u", "tab\there"),
        NetrcEntry("h", "u", "cr\r"),
        NetrcEntry("h", "u", 'quo"te'),
        NetrcEntry("h", "u", ""),
        NetrcEntry("h", "", "p"),
        NetrcEntry("", "u", "p"),
        NetrcEntry("h x", "u", "p"),
        NetrcEntry("h", "u", "#comment"),
        NetrcEntry("h", "default", "p"),
        NetrcEntry("h", "u", "MACHINE"),
        NetrcEntry("h", "u", "p", "login"),
        NetrcEntry("h", "u", "x" * MAX_LINE_BYTES),
    ],
)
def test_render_refuses_values_curl_would_misread(entry: NetrcEntry) -> None:
    with pytest.raises(FormatError):
        render_netrc([entry])


def test_render_error_never_shows_the_password() -> None:
    with pytest.raises(FormatError) as info:
        render_netrc([NetrcEntry("h", "u", "top secret")])
    assert "secret" not in str(info.value)


_word = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20).filter(
    lambda s: '"' not in s and not s.startswith("#") and not any(c.isspace() for c in s)
)


@given(
    st.lists(
        st.builds(
            NetrcEntry,
            st.one_of(st.none(), _word),
            st.one_of(st.none(), _word),
            st.one_of(st.none(), _word),
            st.one_of(st.none(), _word),
        ),
        max_size=5,
    )
)
@settings(max_examples=300, deadline=None)
def test_render_parse_round_trip(entries: list[NetrcEntry]) -> None:
    try:
        text = render_netrc(entries)
    except FormatError:
        return
    assert parse_netrc(text) == entries


# --- merging -----------------------------------------------------------------------------


def test_merge_first_wins_per_machine_and_default_goes_last() -> None:
    ours = [NetrcEntry("127.0.0.1", "nixd", "s")]
    user = parse_netrc(
        "default login anon password a\n"
        "machine 127.0.0.1 login other password o\n"
        "machine cache.example login u password p\n"
    )
    other = parse_netrc("machine CACHE.example login x password y\ndefault login z password z")
    assert merge_netrc(ours, user, other) == [
        NetrcEntry("127.0.0.1", "nixd", "s"),
        NetrcEntry("cache.example", "u", "p"),
        NetrcEntry(None, "anon", "a"),
    ]
    assert merge_netrc() == []


def test_lookup_first_match_or_default() -> None:
    entries = parse_netrc("machine A login a password 1\ndefault login d password 2")
    assert lookup(entries, "a") == NetrcEntry("A", "a", "1")
    assert lookup(entries, "b") == NetrcEntry(None, "d", "2")
    assert lookup(entries[:1], "b") is None


# --- against the real curl (what Nix uses to read netrc) ---------------------------------


class _AuthEcho(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def auth_echo() -> Iterator[tuple[int, list[str | None]]]:
    if shutil.which("curl") is None:
        pytest.fail("curl is required")
    _AuthEcho.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthEcho)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], _AuthEcho.seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _curl_credentials(netrc: Path, port: int, seen: list[str | None]) -> tuple[str, str] | None:
    """What curl sends to 127.0.0.1:port with this netrc file, as (login, password)."""
    seen.clear()
    proc = subprocess.run(
        ["curl", "-sS", "--netrc-file", str(netrc), f"http://127.0.0.1:{port}/"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(seen) == 1
    header = seen[0]
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    assert scheme == "Basic"
    login, _, password = base64.b64decode(value).decode().partition(":")
    return login, password


@pytest.mark.parametrize(
    "text",
    [
        "machine 127.0.0.1 login nixd password s3cr3t-_.~+/=\n",
        "machine other login x password y\nmachine 127.0.0.1\n  login u\n  password p\n",
        'machine 127.0.0.1 login "user" password "sp ace\\"q"\n',
        "# c\nmachine 127.0.0.1 login u password pa#ss # comment\n",
        "macdef m\nmachine 127.0.0.1 login evil password evil\n\n"
        "machine 127.0.0.1 login u password p\n",
        "machine 127.0.0.1\r\n login u\r\n password p\r\n",
        "machine other login x password y\ndefault login d password dp\n",
        "MACHINE 127.0.0.1 LOGIN u PASSWORD p\n",
        "machine other login x password y\n",
    ],
)
def test_parse_matches_what_curl_sends(
    tmp_path: Path, auth_echo: tuple[int, list[str | None]], text: str
) -> None:
    port, seen = auth_echo
    netrc = tmp_path / "netrc"
    netrc.write_text(text)
    entry = lookup(parse_netrc(text), "127.0.0.1")
    expected = None if entry is None else (entry.login, entry.password)
    assert _curl_credentials(netrc, port, seen) == expected


def test_rendered_merge_is_read_by_curl(
    tmp_path: Path, auth_echo: tuple[int, list[str | None]]
) -> None:
    port, seen = auth_echo
    user = parse_netrc("default login anon password a\nmachine 127.0.0.1 login theirs password t\n")
    merged = merge_netrc([NetrcEntry("127.0.0.1", "nixd", "Zm9v-YmFy_0123")], user)
    netrc = tmp_path / "netrc"
    netrc.write_text(render_netrc(merged))
    assert _curl_credentials(netrc, port, seen) == ("nixd", "Zm9v-YmFy_0123")
    # With only the user's entries, curl falls to their default, which we kept last.
    netrc.write_text(render_netrc(merge_netrc([NetrcEntry("x", "y", "z")], user[:1])))
    assert _curl_credentials(netrc, port, seen) == ("anon", "a")
