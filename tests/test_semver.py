"""SemVer 2.0 versions and constraints: semver.org's examples, npm's ranges, and bounds."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.semver import (
    MAX_CLAUSES,
    MAX_LENGTH,
    MAX_NUMBER,
    Version,
    VersionError,
    is_exact,
    parse_constraint,
    parse_version,
    version_from_tag,
)

# semver.org, section 11: each is lower than the next.
PRECEDENCE = [
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "2.0.0",
    "2.1.0",
    "2.1.1",
]


def test_semver_org_precedence_examples() -> None:
    versions = [parse_version(s) for s in PRECEDENCE]
    for a, b in itertools.pairwise(versions):
        assert a < b and b > a and a <= b and a != b
    assert sorted(reversed(versions)) == versions
    texts = sorted(v.sort_text() for v in versions)
    assert texts == [v.sort_text() for v in versions]
    assert [str(v) for v in versions] == PRECEDENCE


def test_parse_version_fields() -> None:
    assert parse_version("1.2.3") == Version(1, 2, 3)
    assert parse_version("0.0.0-rc.1") == Version(0, 0, 0, ("rc", "1"))
    assert parse_version("1.0.0-x-y.0a") == Version(1, 0, 0, ("x-y", "0a"))
    assert parse_version(str(MAX_NUMBER) + ".0.0").major == MAX_NUMBER


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "MAJOR.MINOR.PATCH"),
        ("1.2", "MAJOR.MINOR.PATCH"),
        ("1.2.3.4", "MAJOR.MINOR.PATCH"),
        ("v1.2.3", "not a number"),
        ("01.2.3", "leading 0"),
        ("1.2.3-01", "leading 0"),
        ("1.2.3-", "non-empty"),
        ("1.2.3-a..b", "non-empty"),
        ("1.2.3-a_b", "[0-9A-Za-z-]"),
        ("1.2.3+build.5", "build metadata"),
        ("1.2.3-rc+b", "build metadata"),
        ("-1.2.3", "MAJOR.MINOR.PATCH"),
        ("1.2.3 ", "not a number"),
        ("1.2.٣", "not a number"),
        ("1.2.²", "not a number"),
        ("1.2.1_0", "not a number"),
        (f"{MAX_NUMBER + 1}.0.0", "larger than"),
        ("9" * 5000 + ".0.0", "longer than"),
        ("1.2.3-" + "a" * MAX_LENGTH, "longer than"),
    ],
)
def test_bad_versions(text: str, why: str) -> None:
    with pytest.raises(VersionError, match=why.replace("[", r"\[").replace("]", r"\]")):
        parse_version(text)
    assert not is_exact(text)


def test_version_error_is_a_format_error() -> None:
    assert issubclass(VersionError, FormatError)
    with pytest.raises(ValueError):
        parse_version("nope")


def test_version_from_tag() -> None:
    assert version_from_tag("v1.2.3") == Version(1, 2, 3)
    assert version_from_tag("1.2.3") == Version(1, 2, 3)
    assert version_from_tag("refs/tags/v1.2.3-rc.1") == Version(1, 2, 3, ("rc", "1"))
    for bad in ("release-1", "vv1.2.3", "refs/heads/v1.2.3", "v1.2", "latest", "", "v"):
        with pytest.raises(VersionError, match="does not name a version"):
            version_from_tag(bad)


def test_version_fields_are_checked() -> None:
    with pytest.raises(VersionError):
        Version(-1, 0, 0)
    with pytest.raises(VersionError):
        Version(1, 0, 0, ("a.b",))
    with pytest.raises(VersionError):
        Version(1, 0, 0, ("",))


def test_is_exact() -> None:
    assert is_exact("1.2.3") and is_exact("1.2.3-rc.1")
    for c in ("1.*", "~1.2", "=1.2.3", "*", ">=1", "1.2"):
        assert not is_exact(c)


VERSIONS = [
    parse_version(s)
    for s in [
        "0.0.3",
        "0.0.4",
        "0.1.0",
        "0.2.3",
        "0.2.9",
        "0.3.0",
        "1.0.0",
        "1.2.0",
        "1.2.3-alpha",
        "1.2.3-beta",
        "1.2.3",
        "1.2.9",
        "1.3.0",
        "1.9.9",
        "2.0.0-rc.1",
        "2.0.0",
        "2.0.1",
        "3.0.0-alpha",
    ]
]

# constraint -> every version of VERSIONS it matches
_ALL = ["0.0.3", "0.0.4", "0.1.0", "0.2.3", "0.2.9", "0.3.0", "1.0.0", "1.2.0", "1.2.3"]
_ALL += ["1.2.9", "1.3.0", "1.9.9", "2.0.0", "2.0.1"]
RANGES: dict[str, list[str]] = {
    "*": _ALL,
    "x": _ALL,
    "1": ["1.0.0", "1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    "1.*": ["1.0.0", "1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    "1.x": ["1.0.0", "1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    "1.x.x": ["1.0.0", "1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    "1.2.*": ["1.2.0", "1.2.3", "1.2.9"],
    "1.2": ["1.2.0", "1.2.3", "1.2.9"],
    "0.*": ["0.0.3", "0.0.4", "0.1.0", "0.2.3", "0.2.9", "0.3.0"],
    "~1.2": ["1.2.0", "1.2.3", "1.2.9"],
    "~1.2.3": ["1.2.3", "1.2.9"],
    "~1": ["1.0.0", "1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    "^1.2": ["1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    "^1.2.3": ["1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    "^0.2.3": ["0.2.3", "0.2.9"],
    "^0.0.3": ["0.0.3"],
    "^0.0": ["0.0.3", "0.0.4"],
    "^0": ["0.0.3", "0.0.4", "0.1.0", "0.2.3", "0.2.9", "0.3.0"],
    ">=1.2 <2": ["1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    ">=1.2, <2": ["1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    ">= 1.2, < 2": ["1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    ">=1.2,<2": ["1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    "  >=1.2  ,  <2  ": ["1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"],
    ">1": ["2.0.0", "2.0.1"],
    ">1.2": ["1.3.0", "1.9.9", "2.0.0", "2.0.1"],
    ">1.2.3": ["1.2.9", "1.3.0", "1.9.9", "2.0.0", "2.0.1"],
    "<=2.0.0": _ALL[:-1],
    "<=0.2": ["0.0.3", "0.0.4", "0.1.0", "0.2.3", "0.2.9"],
    "<0.2": ["0.0.3", "0.0.4", "0.1.0"],
    "<0.2.3": ["0.0.3", "0.0.4", "0.1.0"],
    "=1.2.3": ["1.2.3"],
    "1.2.3": ["1.2.3"],
    "=1.2": ["1.2.0", "1.2.3", "1.2.9"],
    # Pre-releases only when a clause names one of the same major.minor.patch.
    "1.2.3-alpha": ["1.2.3-alpha"],
    ">=1.2.3-alpha <1.3": ["1.2.3-alpha", "1.2.3-beta", "1.2.3", "1.2.9"],
    ">1.2.3-alpha <=1.2.3": ["1.2.3-beta", "1.2.3"],
    "~1.2.3-beta": ["1.2.3-beta", "1.2.3", "1.2.9"],
    ">=2.0.0-rc.1": ["2.0.0-rc.1", "2.0.0", "2.0.1"],
    ">=2.0.0-rc.1 <3": ["2.0.0-rc.1", "2.0.0", "2.0.1"],
    "^2.0.0-rc.1": ["2.0.0-rc.1", "2.0.0", "2.0.1"],
    "2.*": ["2.0.0", "2.0.1"],
    "3.*": [],
    ">=3.0.0-alpha": ["3.0.0-alpha"],
}


@pytest.mark.parametrize("text", sorted(RANGES))
def test_ranges(text: str) -> None:
    c = parse_constraint(text)
    assert str(c) == text
    got = [str(v) for v in VERSIONS if c.matches(v)]
    assert got == RANGES[text]
    want = max((parse_version(s) for s in RANGES[text]), default=None)
    assert c.best(reversed(VERSIONS)) == want
    assert c.best(VERSIONS) == want


def test_exact_property() -> None:
    assert parse_constraint("1.2.3").exact == Version(1, 2, 3)
    assert parse_constraint("=1.2.3-rc.1").exact == Version(1, 2, 3, ("rc", "1"))
    assert parse_constraint("1.2").exact is None
    assert parse_constraint("*").exact is None


def test_best_of_nothing() -> None:
    assert parse_constraint("*").best([]) is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   ,  ", "empty"),
        (">=", "no version"),
        ("~", "no version"),
        (">*", "wildcard"),
        ("=*", "wildcard"),
        ("^x", "wildcard"),
        ("1.x.3", "number after a wildcard"),
        ("1.2.3.4", "more than three parts"),
        ("1.2-rc.1", "no full version"),
        ("1.2.3+b", "build metadata"),
        (">= ,", "no version"),
        (">= >= 1", "not a number"),
        ("1.2 || 2.0", "not a number"),
        ("v1.2.3", "not a number"),
        ("01.2", "leading 0"),
        ("~>1.2", "not a number"),
        ("1.2.3-é", "not ASCII"),
        (f"<{MAX_NUMBER + 1}", "larger than"),
        ("<" + "9" * 200, "larger than"),
        (" ".join(["<9"] * (MAX_CLAUSES + 1)), "more than 16 clauses"),
        ("*" + " " * MAX_LENGTH, "longer than"),
    ],
)
def test_bad_constraints(text: str, why: str) -> None:
    with pytest.raises(VersionError, match=why.replace("|", r"\|")):
        parse_constraint(text)


def test_bounds_at_the_edge() -> None:
    assert len(parse_constraint(" ".join(["<9"] * MAX_CLAUSES)).comparators) == MAX_CLAUSES
    c = parse_constraint(f">{MAX_NUMBER}")  # bumps past the bound internally, harmlessly
    assert not c.matches(Version(MAX_NUMBER, 5, 5))
    assert c.matches(Version(MAX_NUMBER + 1, 0, 0))
    text = "1.0.0-" + "a" * (MAX_LENGTH - 6)
    assert str(parse_version(text)) == text


# ------------------------------------------------------------------------- properties

_numbers = st.one_of(st.integers(0, 3), st.integers(0, MAX_NUMBER))
_ident = st.one_of(
    st.integers(0, 3).map(str),
    st.integers(0, MAX_NUMBER).map(str),
    st.from_regex(r"[0-9A-Za-z-]{0,3}[A-Za-z-][0-9A-Za-z-]{0,3}", fullmatch=True),
)
versions = st.builds(Version, _numbers, _numbers, _numbers, st.lists(_ident, max_size=3).map(tuple))


def _reference_less(a: Version, b: Version) -> bool:
    """semver.org section 11, written out as its text says."""
    if a.core != b.core:
        return a.core < b.core
    if not a.prerelease or not b.prerelease:
        return bool(a.prerelease) and not b.prerelease
    for x, y in zip(a.prerelease, b.prerelease, strict=False):
        if x == y:
            continue
        xn, yn = x.isdigit(), y.isdigit()
        if xn and yn:
            return int(x) < int(y)
        if xn != yn:
            return xn
        return x < y
    return len(a.prerelease) < len(b.prerelease)


@given(versions, versions, versions)
def test_order_is_total_and_semver(a: Version, b: Version, c: Version) -> None:
    assert (a < b) == _reference_less(a, b)
    assert sum([a < b, a == b, a > b]) == 1  # trichotomy
    assert (a <= b) == (a < b or a == b)
    if a <= b <= c:
        assert a <= c
    assert (a.sort_text() < b.sort_text()) == (a < b)
    assert (a.sort_text() == b.sort_text()) == (a == b)
    assert (hash(a) == hash(b)) or a != b


@given(versions)
def test_str_round_trips(v: Version) -> None:
    text = str(v)
    assert parse_version(text) == v
    assert is_exact(text)
    assert version_from_tag("v" + text) == v
    assert parse_constraint(text).exact == v
    assert parse_constraint(text).matches(v)


_clauses = st.lists(
    st.tuples(st.sampled_from(["", "=", ">", ">=", "<", "<=", "~", "^"]), versions),
    min_size=1,
    max_size=4,
)


@given(_clauses, st.lists(versions, max_size=12))
def test_best_is_max_matching(clauses: list[tuple[str, Version]], pool: list[Version]) -> None:
    text = " ".join(op + str(v) for op, v in clauses)
    c = parse_constraint(text)
    matching = [v for v in pool if c.matches(v)]
    assert c.best(pool) == (max(matching) if matching else None)
    for v in matching:
        if v.prerelease:
            assert any(w.core == v.core and w.prerelease for _, w in clauses)


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_version_error(text: str) -> None:
    for parse in (parse_version, parse_constraint, version_from_tag):
        with contextlib.suppress(VersionError):
            parse(text)  # type: ignore[operator]
