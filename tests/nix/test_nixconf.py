"""nix.conf fragment and include line: literal fixtures, hypothesis, and the real Nix."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.nix.nixconf import (
    MARKER,
    ConfLine,
    ensure_include,
    find_setting,
    has_include,
    parse_nix_conf,
    remove_include,
    render_nix_conf_fragment,
)
from tests.realnix import RealNix

FRAG = "/etc/nix/nixd.conf"
KEY = "cache.example-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="

# --- parsing -----------------------------------------------------------------------------


def test_parse_settings_includes_comments() -> None:
    text = (
        "# comment\n"
        "substituters = https://a.example  https://b.example # trailing\n"
        "\n"
        "   \t\n"
        "sandbox = false\r\n"
        "!include other.conf\n"
        "include /abs.conf\n"
        "empty =\n"
    )
    assert parse_nix_conf(text) == [
        ConfLine(2, "substituters", "https://a.example https://b.example"),
        ConfLine(5, "sandbox", "false"),
        ConfLine(6, "!include", "other.conf"),
        ConfLine(7, "include", "/abs.conf"),
        ConfLine(8, "empty", ""),
    ]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("lonely\n", "f:1"),
        ("sandbox=false\n", "f:1"),
        ("a = b\nx y z\n", "f:2"),
        ("include a b\n", "f:1"),
        ("a = b \\\n  continued\n", "f:2"),
    ],
)
def test_parse_illegal_lines(text: str, where: str) -> None:
    with pytest.raises(FormatError) as info:
        parse_nix_conf(text, source="f")
    assert info.value.where == where


def test_find_setting_takes_the_last() -> None:
    text = "netrc-file = /a\nnetrc-file = /b # later wins\n"
    assert find_setting(text, "netrc-file") == "/b"
    assert find_setting(text, "substituters") is None


# --- fragment ----------------------------------------------------------------------------


def test_fragment_exact_text() -> None:
    text = render_nix_conf_fragment(
        ["http://127.0.0.1:37123"], [KEY, "other-1:abc="], "/etc/nix/nixd.netrc"
    )
    assert text == (
        "# Written by nixd; edits are overwritten. Remove with `nixd logout`.\n"
        "extra-substituters = http://127.0.0.1:37123\n"
        f"extra-trusted-public-keys = {KEY} other-1:abc=\n"
        "netrc-file = /etc/nix/nixd.netrc\n"
    )


def test_fragment_for_a_daemon_and_extra_settings() -> None:
    text = render_nix_conf_fragment(
        ["http://127.0.0.1:1"],
        [],
        "/n",
        {"narinfo-cache-negative-ttl": "30", "extra-experimental-features": "a  b"},
        trusted_substituters=True,
    )
    assert "extra-trusted-substituters = http://127.0.0.1:1\n" in text
    assert "extra-trusted-public-keys" not in text
    assert text.endswith("narinfo-cache-negative-ttl = 30\nextra-experimental-features = a b\n")


@pytest.mark.parametrize(
    ("subs", "keys", "netrc", "extra"),
    [
        (["http://x\nnetrc-file = /evil"], [], "/n", {}),
        (["http://x y"], [], "/n", {}),
        (["http://x#frag"], [], "/n", {}),
        ([""], [], "/n", {}),
        ([], ["k:v\n"], "/n", {}),
        ([], [], "relative/netrc", {}),
        ([], [], "/with space", {}),
        ([], [], "/n", {"bad name": "x"}),
        ([], [], "/n", {"include": "/x"}),
        ([], [], "/n", {"!include": "/x"}),
        ([], [], "/n", {"a": "b\nnetrc-file = /evil"}),
        ([], [], "/n", {"a": "b # c"}),
    ],
)
def test_fragment_rejects_injection(
    subs: list[str], keys: list[str], netrc: str, extra: dict[str, str]
) -> None:
    with pytest.raises(FormatError):
        render_nix_conf_fragment(subs, keys, netrc, extra)


# --- include line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "original",
    [
        "",
        "sandbox = false\n",
        "sandbox = false",
        "a = b\n\n\n",
        "# only a comment",
        "weird\r\nbytes \udcff = x\n",
    ],
)
def test_ensure_then_remove_restores_exactly(original: str) -> None:
    added = ensure_include(original, FRAG)
    assert added.startswith(original)
    assert added.count("!include") == 1
    assert ensure_include(added, FRAG) == added
    assert has_include(added, FRAG)
    assert remove_include(added) == original


def test_created_file_is_removed_again() -> None:
    added = ensure_include(None, FRAG)
    assert added == f"!include {FRAG} # {MARKER} [+created]\n"
    assert remove_include(added) is None
    # The user wrote into the file since: it stays, without our line.
    assert remove_include(added + "sandbox = false\n") == "sandbox = false\n"


def test_stale_fragment_path_is_rewritten_in_place() -> None:
    text = ensure_include("a = b\n", "/old/nixd.conf") + "c = d\n"
    updated = ensure_include(text, FRAG)
    assert updated == f"a = b\n!include {FRAG} # {MARKER}\nc = d\n"
    assert remove_include(updated) == "a = b\nc = d\n"


def test_duplicate_nixd_lines_collapse_to_one() -> None:
    line = f"!include {FRAG} # {MARKER}\n"
    assert ensure_include(f"a = b\n{line}x = y\n{line}", FRAG) == f"a = b\n{line}x = y\n"


def test_user_include_of_the_fragment_is_respected() -> None:
    text = f"include {FRAG}\n"
    assert ensure_include(text, FRAG) == text
    assert remove_include(text) == text


def test_added_newline_stays_when_the_user_appended_after_us() -> None:
    added = ensure_include("a = b", FRAG) + "c = d\n"
    assert remove_include(added) == "a = b\nc = d\n"


def test_a_setting_mentioning_the_marker_is_not_ours() -> None:
    text = f"a = b # {MARKER}\n"
    assert remove_include(text) == text
    assert ensure_include(text, FRAG).count("!include") == 1


def test_ensure_rejects_bad_fragment_paths() -> None:
    for bad in ("relative.conf", "/with space", "/x#y", "/x\n"):
        with pytest.raises(FormatError):
            ensure_include("", bad)


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_ensure_remove_round_trip_on_any_text(original: str) -> None:
    if MARKER in original:
        return
    added = ensure_include(original, FRAG)
    assert ensure_include(added, FRAG) == added
    assert remove_include(added) == original


# --- the real Nix reads it ---------------------------------------------------------------


def _show_config(real_nix: RealNix) -> dict[str, str]:
    out = real_nix.run(["nix", "show-config"], store=False, env={"NIX_USER_CONF_FILES": ""})
    config = {}
    for line in out.stdout.decode().splitlines():
        name, _, value = line.partition(" = ")
        config[name] = value
    return config


@pytest.mark.parametrize(
    "tail",
    ["", "substituters = https://cache.example\n", "# no newline at the end"],
)
def test_nix_reads_the_include_and_fragment(real_nix: RealNix, tail: str) -> None:
    conf_dir = Path(real_nix.env["NIX_CONF_DIR"])
    main = conf_dir / "nix.conf"
    main.write_text(main.read_text() + tail)
    original = main.read_text()
    fragment = conf_dir / "nixd.conf"
    fragment.write_text(
        render_nix_conf_fragment(
            ["http://127.0.0.1:41234"],
            [KEY],
            str(conf_dir / "nixd.netrc"),
            trusted_substituters=True,
        )
    )
    main.write_text(ensure_include(original, str(fragment)))
    config = _show_config(real_nix)
    assert "http://127.0.0.1:41234" in config["substituters"].split()
    assert config["substituters"].split().count("http://127.0.0.1:41234") == 1
    assert config["trusted-substituters"] == "http://127.0.0.1:41234"
    assert KEY in config["trusted-public-keys"].split()
    assert config["netrc-file"] == str(conf_dir / "nixd.netrc")

    # A missing fragment (crash between writes, or logout half done) never breaks Nix.
    fragment.unlink()
    assert "http://127.0.0.1:41234" not in _show_config(real_nix)["substituters"]

    restored = remove_include(main.read_text())
    assert restored == original
    main.write_text(restored)
    _show_config(real_nix)
