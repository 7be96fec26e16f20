"""Semantic versions (SemVer 2.0) of flake releases, and the constraints that pick one.

A release is named by an exact version (``1.2.3``, ``1.2.3-rc.1``); a consumer names a
constraint (``1.*``, ``~1.2``, ``>=1.2 <2``) and is redirected to the newest release that
matches it. Ordering is SemVer 2.0 precedence (semver.org, section 11): numeric
major.minor.patch, a pre-release before its release, pre-release identifiers compared
one by one (numeric ones by value and below alphanumeric ones, a shorter list first).

Build metadata (``1.2.3+abc``) is refused: SemVer ignores it for precedence, so two
releases differing only by it would be two names for one place in the order, and a
release name must be one immutable thing.

Constraints follow npm's reading, which most people know:

- ``*``, ``x``: any release; ``1``, ``1.x``, ``1.*``: ``>=1.0.0 <2.0.0``; ``1.2.*``:
  ``>=1.2.0 <1.3.0``; a full version ``1.2.3`` or ``=1.2.3`` is that version only;
- ``~1.2`` / ``~1.2.3``: same minor (``>=1.2.3 <1.3.0``); ``~1``: same major;
- ``^1.2``: same major (``>=1.2.0 <2.0.0``), but for 0.x the left-most non-zero part is
  kept (``^0.2.3`` is ``>=0.2.3 <0.3.0``, ``^0.0.3`` is ``=0.0.3``);
- ``>=``, ``>``, ``<=``, ``<``, ``=`` with a full or partial version (``>1`` is ``>=2.0.0``,
  ``<=2.0`` is ``<2.1.0``); clauses separated by spaces and/or commas must all hold.

A pre-release matches only if some clause names a pre-release of the same
major.minor.patch (npm's rule): ``>=1.2`` never selects ``2.0.0-rc.1``, while
``>=2.0.0-rc.1`` does. So nobody is moved onto a pre-release they did not ask for.

Input comes from URLs, so it is bounded before anything is converted: at most
:data:`MAX_LENGTH` characters, numbers at most :data:`MAX_NUMBER`, at most
:data:`MAX_CLAUSES` clauses. Every refusal is a :class:`VersionError` saying why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from nixd.errors import FormatError

__all__ = [
    "MAX_CLAUSES",
    "MAX_LENGTH",
    "MAX_NUMBER",
    "Constraint",
    "Version",
    "VersionError",
    "is_exact",
    "parse_constraint",
    "parse_version",
    "version_from_tag",
]

MAX_LENGTH = 256
"""Longest version or constraint text accepted."""
MAX_NUMBER = 1 << 53
"""Largest number accepted in a version (exact in a JSON/JavaScript number)."""
MAX_CLAUSES = 16
"""Most clauses (comparisons) accepted in one constraint."""

_NUMBER_DIGITS = len(str(MAX_NUMBER))
_IDENT = re.compile(r"[0-9A-Za-z-]+")
_NUMERIC = re.compile(r"[0-9]+")
_ASCII_PRINTABLE = re.compile(r"[\x21-\x7e]*")


class VersionError(FormatError):
    """A version, tag or version constraint is malformed or out of bounds."""


@dataclass(frozen=True, slots=True)
class Version:
    """One SemVer 2.0 version without build metadata, ordered by precedence.

    ``prerelease`` holds the dot-separated identifiers as written (``("rc", "1")``);
    since numeric identifiers may not have leading zeros, equal precedence means equal
    fields, so ``==`` and the order agree.
    """

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for part in (self.major, self.minor, self.patch):
            if not isinstance(part, int) or isinstance(part, bool) or part < 0:
                raise VersionError(f"version parts must be non-negative integers, not {part!r}")
        for ident in self.prerelease:
            _check_identifier(ident, str(self))

    @property
    def core(self) -> tuple[int, int, int]:
        """``(major, minor, patch)``."""
        return (self.major, self.minor, self.patch)

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)

    def sort_key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        """A tuple ordered exactly as SemVer precedence orders versions."""
        pre = tuple(
            (0, int(i), "") if _NUMERIC.fullmatch(i) else (1, 0, i) for i in self.prerelease
        )
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def sort_text(self) -> str:
        """A string whose byte order (``COLLATE "C"`` in SQL) is SemVer precedence.

        For storing next to the version so a database can order releases: numbers are
        zero-padded, a release sorts after its pre-releases, and identifiers are joined by
        a space, which sorts below every character an identifier may hold.
        """
        core = f"{self.major:016d}.{self.minor:016d}.{self.patch:016d}"
        if not self.prerelease:
            return core + "~"
        parts = (f"0{int(i):016d}" if _NUMERIC.fullmatch(i) else f"1{i}" for i in self.prerelease)
        return core + "-" + " ".join(parts)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.sort_key() < other.sort_key()

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.sort_key() <= other.sort_key()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.sort_key() > other.sort_key()

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.sort_key() >= other.sort_key()

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return f"{core}-{'.'.join(self.prerelease)}" if self.prerelease else core


def _check_identifier(ident: str, whole: str) -> None:
    if not isinstance(ident, str) or not _IDENT.fullmatch(ident) or not ident.isascii():
        raise VersionError(
            f"pre-release identifier {ident!r} in {whole!r} must be non-empty [0-9A-Za-z-]"
        )
    if _NUMERIC.fullmatch(ident) and len(ident) > 1 and ident[0] == "0":
        raise VersionError(f"numeric pre-release identifier {ident!r} in {whole!r} has a leading 0")


def _bounded(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise VersionError(f"{what} must be text")
    if len(text) > MAX_LENGTH:
        raise VersionError(f"{what} is longer than {MAX_LENGTH} characters")
    return text


def _number(text: str, whole: str) -> int:
    if not _NUMERIC.fullmatch(text) or not text.isascii():
        raise VersionError(f"{text!r} in {whole!r} is not a number")
    if len(text) > 1 and text[0] == "0":
        raise VersionError(f"number {text!r} in {whole!r} has a leading 0")
    if len(text) > _NUMBER_DIGITS or int(text) > MAX_NUMBER:
        raise VersionError(f"number {text[:20]!r} in {whole!r} is larger than {MAX_NUMBER}")
    return int(text)


def _split_prerelease(text: str, whole: str) -> tuple[str, tuple[str, ...]]:
    if "+" in text:
        raise VersionError(f"version {whole!r} has build metadata (+...), which is not accepted")
    core, dash, pre = text.partition("-")
    if not dash:
        return core, ()
    idents = tuple(pre.split("."))
    for ident in idents:
        _check_identifier(ident, whole)
    return core, idents


def parse_version(text: str) -> Version:
    """Parse an exact SemVer 2.0 version such as ``1.2.3`` or ``1.0.0-rc.1``."""
    text = _bounded(text, "version")
    core, pre = _split_prerelease(text, text)
    parts = core.split(".")
    if len(parts) != 3:
        raise VersionError(f"version {text!r} is not MAJOR.MINOR.PATCH[-PRERELEASE]")
    major, minor, patch = (_number(p, text) for p in parts)
    return Version(major, minor, patch, pre)


def version_from_tag(tag: str) -> Version:
    """The version a git tag names: ``v1.2.3``, ``1.2.3`` or ``refs/tags/v1.2.3``."""
    tag = _bounded(tag, "tag")
    name = tag.removeprefix("refs/tags/")
    try:
        return parse_version(name[1:] if name[:1] in ("v", "V") else name)
    except VersionError as exc:
        raise VersionError(f"tag {tag!r} does not name a version (like v1.2.3): {exc}") from None


def is_exact(text: str) -> bool:
    """Whether ``text`` is an exact version (``1.2.3``) rather than a constraint."""
    try:
        parse_version(text)
    except VersionError:
        return False
    return True


# --------------------------------------------------------------------------- constraints

Op = Literal["<", "<=", ">", ">=", "="]
_CLAUSE = re.compile(r"(<=|>=|<|>|=|~|\^)?(.*)")
_WILD = frozenset({"*", "x", "X"})
_OPERATORS = frozenset({"<", "<=", ">", ">=", "=", "~", "^"})


@dataclass(frozen=True, slots=True)
class _Comparator:
    op: Op
    version: Version

    def holds(self, v: Version) -> bool:
        a, b = v.sort_key(), self.version.sort_key()
        if self.op == "<":
            return a < b
        if self.op == "<=":
            return a <= b
        if self.op == ">":
            return a > b
        if self.op == ">=":
            return a >= b
        return a == b


@dataclass(frozen=True, slots=True)
class Constraint:
    """A parsed constraint: all of its comparisons must hold. ``str()`` is its text."""

    text: str
    comparators: tuple[_Comparator, ...]

    def matches(self, version: Version) -> bool:
        """Whether ``version`` satisfies every clause (and the pre-release rule)."""
        if not all(c.holds(version) for c in self.comparators):
            return False
        if not version.prerelease:
            return True
        return any(
            c.version.prerelease and c.version.core == version.core for c in self.comparators
        )

    def best(self, versions: Iterable[Version]) -> Version | None:
        """The highest of ``versions`` that matches, or ``None``."""
        best: Version | None = None
        for v in versions:
            if self.matches(v) and (best is None or v > best):
                best = v
        return best

    @property
    def exact(self) -> Version | None:
        """The one version this constraint allows, if it is an exact one (``=1.2.3``)."""
        if len(self.comparators) == 1 and self.comparators[0].op == "=":
            return self.comparators[0].version
        return None

    def __str__(self) -> str:
        return self.text


def parse_constraint(text: str) -> Constraint:
    """Parse a constraint (see the module docstring for the grammar)."""
    text = _bounded(text, "version constraint")
    words = [c for c in re.split(r"[\s,]+", text) if c]
    clauses: list[str] = []
    for word in words:  # an operator alone takes the next word: ">= 1.2"
        if clauses and clauses[-1] in _OPERATORS:
            clauses[-1] += word
        else:
            clauses.append(word)
    if not clauses:
        raise VersionError("version constraint is empty")
    if len(clauses) > MAX_CLAUSES:
        raise VersionError(f"version constraint {text!r} has more than {MAX_CLAUSES} clauses")
    comparators: list[_Comparator] = []
    for clause in clauses:
        if not _ASCII_PRINTABLE.fullmatch(clause):
            raise VersionError(f"version constraint {text!r} has a character that is not ASCII")
        comparators.extend(_parse_clause(clause, text))
    return Constraint(text, tuple(comparators))


def _partial(text: str, whole: str) -> tuple[list[int], tuple[str, ...]]:
    """``1``, ``1.2``, ``1.x``, ``1.2.3-rc.1`` -> the given numbers and the pre-release."""
    core, pre = _split_prerelease(text, whole)
    parts = core.split(".")
    if len(parts) > 3:
        raise VersionError(f"{text!r} in {whole!r} has more than three parts")
    numbers: list[int] = []
    for i, part in enumerate(parts):
        if part in _WILD:
            if any(p not in _WILD for p in parts[i:]):
                raise VersionError(f"{text!r} in {whole!r} has a number after a wildcard")
            break
        numbers.append(_number(part, whole))
    if pre and len(numbers) < 3:
        raise VersionError(f"{text!r} in {whole!r} has a pre-release but no full version")
    return numbers, pre


def _version(numbers: list[int], pre: tuple[str, ...] = ()) -> Version:
    padded = [*numbers, 0, 0, 0][:3]
    return Version(padded[0], padded[1], padded[2], pre)


def _bump(numbers: list[int]) -> Version:
    """The first version above every version starting with ``numbers`` (non-empty)."""
    return _version([*numbers[:-1], numbers[-1] + 1])


def _parse_clause(clause: str, whole: str) -> list[_Comparator]:
    m = _CLAUSE.fullmatch(clause)
    assert m is not None  # the pattern matches any text
    op, rest = m.group(1), m.group(2)
    if not rest:
        raise VersionError(f"clause {clause!r} in {whole!r} has no version")
    numbers, pre = _partial(rest, whole)
    if op is None or op == "=":
        if not numbers:
            if op == "=":
                raise VersionError(f"clause {clause!r} in {whole!r} compares with a wildcard")
            return []  # `*`: anything (that is not a pre-release)
        if len(numbers) == 3:
            return [_Comparator("=", _version(numbers, pre))]
        return [_Comparator(">=", _version(numbers)), _Comparator("<", _bump(numbers))]
    if not numbers:
        raise VersionError(f"clause {clause!r} in {whole!r} compares with a wildcard")
    low = _version(numbers, pre)
    if op == "~":
        upper = numbers[:2] if len(numbers) >= 2 else numbers[:1]
        return [_Comparator(">=", low), _Comparator("<", _bump(upper))]
    if op == "^":
        # Keep the left-most non-zero part given (or the last part given, if all are 0).
        keep = next((i for i, n in enumerate(numbers) if n), len(numbers) - 1)
        return [_Comparator(">=", low), _Comparator("<", _bump(numbers[: keep + 1]))]
    if len(numbers) == 3:
        return [_Comparator(op, low)]  # type: ignore[arg-type]
    # A partial version stands for the whole range of versions starting with it.
    if op == ">":
        return [_Comparator(">=", _bump(numbers))]
    if op == ">=":
        return [_Comparator(">=", low)]
    if op == "<":
        return [_Comparator("<", low)]
    return [_Comparator("<", _bump(numbers))]  # "<="
