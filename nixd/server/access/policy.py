"""The policy engine: who may do what to which slice, from a TOML file reloaded on change.

The model
    A request asks for an *action* on a *resource* (a slice, ``org/project``) on behalf of an
    :class:`~nixd.server.access.identity.Identity`, from a source address. The policy is a list of
    rules; a rule *matches* when one of its subjects matches the identity, the action is one
    of its actions, the resource matches one of its resource globs and every condition holds.
    **Deny beats allow**: any matching ``deny`` rule refuses; otherwise any matching ``allow``
    rule grants; otherwise the answer is no (rule ``default-deny``). Order does not matter.

    Policies decide on identity attributes, never on what a token claims to be allowed, so a
    changed policy applies at once to every token already issued.

The file (``policy.toml``)::

    [public]                        # optional: slices anyone may read, even without a token
    resources = ["acme/oss-*"]
    actions = ["cache:read"]        # optional; default ["cache:read"]; read actions only

    [[rule]]
    id = "acme-ci-push"             # required, unique; named in decisions and the audit log
    effect = "allow"                # "allow" or "deny"
    description = "CI pushes"       # optional
    subjects = [                    # any of these identities
      { kind = "token", org = "acme" },
      { kind = "github", repository_owner = "acme", ref = ["refs/heads/main", "refs/tags/*"] },
    ]
    actions = ["cache:read", "cache:write"]   # or ["*"]
    resources = ["acme/*"]          # org/project globs; "*" is every slice
    conditions = { source_ips = ["10.0.0.0/8", "::1/128"] }   # optional

Subjects
    ``kind`` is an identity kind (``token``, ``user``, ``github``, ``gitlab``, ``aws``,
    ``anonymous``), a list of kinds, or ``"*"`` for *anyone, including anonymous callers*.
    ``subject`` matches the identity's subject; every other key names an attribute. All keys
    listed must match. Values are case-sensitive fnmatch globs (``*``, ``?``, ``[...]``); a
    list of globs matches if any does; an identity attribute that is a list matches if any
    of its elements does; a missing attribute never matches. Match immutable ids
    (``repository_id``) rather than renameable names where an issuer provides them.

Actions
    ``cache:read``, ``cache:write``, ``cache:admin``, ``flake:read``, ``flake:publish``,
    ``deploy:read``; ``"*"`` is all of them. An unknown action is an error, not a no-op, so
    a typo cannot silently grant or deny nothing.

Conditions
    ``source_ips``: CIDRs (IPv4 or IPv6) the request must come from. IPv4-mapped IPv6
    addresses (``::ffff:127.0.0.1``) count as IPv4. A request with no known source address
    satisfies no ``source_ips`` condition.

Errors
    :func:`load_policy` refuses a broken file with :class:`~nixd.errors.ConfigError` saying
    ``file:line: what``: TOML syntax, an unknown key, a bad glob, CIDR, action or effect, a
    missing or duplicate ``id``. :class:`PolicyHolder` keeps the last good policy in force
    when the file on disk turns bad, and logs why.

API for the server
    ``holder = PolicyHolder(path)`` (raises ConfigError if the file is broken at start);
    ``holder.current`` (re-checks the file at most once a second); ``await holder.watch()``
    in a nursery for prompt reloads; ``policy.decide(identity, action, resource, source_ip)
    -> Decision``; ``policy.readable(identity, slices, source_ip)`` and
    ``policy.decide_any(...)`` for "visible if readable in at least one slice";
    ``policy.explain(...)`` for ``nixd-server policy explain``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import logging
import re
import sqlite3
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from nixd.errors import ConfigError
from nixd.server.access.identity import KINDS, Identity

log = logging.getLogger(__name__)

ACTIONS = (
    "cache:read",
    "cache:write",
    "cache:admin",
    "flake:read",
    "flake:publish",
    "deploy:read",
)
READ_ACTIONS = frozenset({"cache:read", "flake:read", "deploy:read"})
"""The only actions ``[public]`` may grant: nobody anonymous writes or administers."""

DEFAULT_DENY = "default-deny"
PUBLIC_RULE = "public"
PUBLIC_PROJECT_RULE = "public-project"
"""The rule a project's ``--public`` flag stands for: allow ``cache:read`` to anyone,
anonymous callers included, on that slice. It is an allow like any other, so a matching
deny rule still wins."""
PUBLIC_RULES = frozenset({PUBLIC_RULE, PUBLIC_PROJECT_RULE})
_RESERVED_IDS = frozenset({DEFAULT_DENY, PUBLIC_RULE, PUBLIC_PROJECT_RULE})
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._*?\[\]!-]+")
_RULE_KEYS = frozenset(
    {"id", "effect", "description", "subjects", "actions", "resources", "conditions"}
)
_CONDITION_KEYS = frozenset({"source_ips"})
_PUBLIC_KEYS = frozenset({"resources", "actions"})
_WATCH_POLL_MS = 300

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one question: ``allowed``, the ``rule`` id that decided, and why."""

    allowed: bool
    rule: str
    reason: str

    @property
    def effect(self) -> str:
        """``"allow"`` or ``"deny"``, as the audit log writes it."""
        return "allow" if self.allowed else "deny"


# --- globs -------------------------------------------------------------------------------


def _glob_regex(pattern: str, *, any_char: str = ".") -> str:
    """Translate an fnmatch glob (case-sensitive) to a regex; ValueError on an unclosed ``[``.

    fnmatch treats a lone ``[`` as a literal, which hides typos such as ``acme/[ab``; a
    policy is better refused than quietly matching nothing. ``any_char`` is what ``*`` and
    ``?`` may match (resource segments must not cross a ``/``).
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(f"{any_char}*")
        elif c == "?":
            out.append(any_char)
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                raise ValueError(f"unclosed '[' in glob {pattern!r}")
            body = pattern[i:j]
            i = j + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            if not body:
                raise ValueError(f"empty character class in glob {pattern!r}")
            body = "".join(
                c if c == "-" and 0 < k < len(body) - 1 and body[k - 1] != "-" else re.escape(c)
                for k, c in enumerate(body)
            )
            out.append(f"[{'^' if negate else ''}{body}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class _Glob:
    pattern: str
    regex: re.Pattern[str]

    def match(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None


def _compile_glob(pattern: str) -> _Glob:
    if not pattern:
        raise ValueError("empty glob")
    return _Glob(pattern, _compile(_glob_regex(pattern), pattern))


def _compile(regex: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(regex, re.DOTALL)
    except re.error as exc:  # e.g. a reversed range such as [z-a]
        raise ValueError(f"bad glob {pattern!r}: {exc.msg}") from exc


def _resource_regex(pattern: str) -> str:
    """Regex of an ``org/project`` glob, matched segment by segment (``*`` stops at ``/``)."""
    if pattern == "*":
        return "[^/]+/[^/]+"
    parts = pattern.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f'resource {pattern!r} is not an org/project glob (or "*")')
    for part in parts:
        if not _SEGMENT_RE.fullmatch(part):
            raise ValueError(
                f"resource {pattern!r}: {part!r} may hold only letters, digits, '.', '_', "
                "'-' and the glob characters * ? [ ] !"
            )
    regex = "/".join(_glob_regex(part, any_char="[^/]") for part in parts)
    _compile(regex, pattern)
    return regex


@dataclass(frozen=True, slots=True)
class _Resources:
    """A rule's resource globs, compiled into one regex."""

    patterns: tuple[str, ...]
    regex: re.Pattern[str]

    def match(self, resource: str) -> bool:
        return self.regex.fullmatch(resource) is not None


# --- rules -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subject:
    """One identity pattern: kinds (empty = any) and attribute globs, all of which must hold."""

    kinds: frozenset[str]
    subject: tuple[_Glob, ...]
    attributes: tuple[tuple[str, tuple[_Glob, ...]], ...]

    def mismatch(self, identity: Identity) -> str | None:
        """None if the identity matches, else what did not."""
        if self.kinds and identity.kind not in self.kinds:
            return f"kind {identity.kind!r} is not {' or '.join(sorted(self.kinds))}"
        if self.subject and not any(g.match(identity.subject) for g in self.subject):
            return f"subject {identity.subject!r} matches none of {_patterns(self.subject)}"
        for name, globs in self.attributes:
            value = identity.attributes.get(name)
            if value is None:
                return f"no attribute {name!r}"
            values = value if isinstance(value, list) else [value]
            if not any(g.match(v) for v in values for g in globs):
                return f"attribute {name}={value!r} matches none of {_patterns(globs)}"
        return None

    def describe(self) -> str:
        parts = [f"kind={'|'.join(sorted(self.kinds)) or '*'}"]
        if self.subject:
            parts.append(f"subject={_patterns(self.subject)}")
        parts += [f"{name}={_patterns(globs)}" for name, globs in self.attributes]
        return "{" + ", ".join(parts) + "}"


def _patterns(globs: Iterable[_Glob]) -> str:
    return "|".join(g.pattern for g in globs)


@dataclass(frozen=True, slots=True)
class Rule:
    """A parsed ``[[rule]]``; ``line`` is where it starts in ``source``."""

    id: str
    effect: str
    subjects: tuple[Subject, ...]
    actions: frozenset[str]
    resources: _Resources
    source_ips: tuple[IPNetwork, ...] | None
    description: str
    line: int

    @property
    def allow(self) -> bool:
        return self.effect == "allow"

    def mismatch(
        self, identity: Identity, action: str, resource: str, source: IPAddress | None
    ) -> str | None:
        """None if the rule applies to this request, else the first reason it does not."""
        if action not in self.actions:
            return f"action {action} is not one of {', '.join(sorted(self.actions))}"
        if not self.resources.match(resource):
            globs = ", ".join(self.resources.patterns)
            return f"resource {resource} matches none of {globs}"
        reasons = []
        for subject in self.subjects:
            why = subject.mismatch(identity)
            if why is None:
                break
            reasons.append(why)
        else:
            return "identity matches no subject: " + "; ".join(reasons)
        if self.source_ips is not None:
            if source is None:
                return "source address unknown; the rule requires one of its source_ips"
            if not any(source in net for net in self.source_ips):
                nets = ", ".join(str(n) for n in self.source_ips)
                return f"source {source} is not in {nets}"
        return None


@functools.lru_cache(maxsize=4096)
def _parse_ip(source_ip: str | None) -> IPAddress | None:
    if not source_ip:
        return None
    try:
        addr = ipaddress.ip_address(source_ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _known_action(action: str) -> str:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
    return action


_GLOB_CHARS = re.compile(r"[*?\[]")


def _literal_prefix(pattern: str) -> str:
    """What every string a glob matches starts with: the text before its first wildcard."""
    found = _GLOB_CHARS.search(pattern)
    return pattern if found is None else pattern[: found.start()]


def _literal_subjects(rule: Rule) -> frozenset[str] | None:
    """The only identity subjects ``rule`` can match, if its subjects name them literally.

    None when any of its subject patterns accepts other subjects (no ``subject`` key, or
    a glob with a wildcard).
    """
    names: set[str] = set()
    for subject in rule.subjects:
        if not subject.subject:
            return None
        for glob in subject.subject:
            if _literal_prefix(glob.pattern) != glob.pattern:
                return None
            names.add(glob.pattern)
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class _ActionIndex:
    """One action's rules, by position in the policy, found by resource and by subject."""

    by_prefix: dict[str, tuple[int, ...]]
    """Literal prefix of a resource pattern -> rules with such a pattern."""
    by_subject: dict[str, tuple[int, ...]]
    """Literal subject -> rules that can match only literally named subjects."""
    any_subject: tuple[int, ...]
    """Rules whose subject patterns accept more than literal names."""


def _build_index(rules: Sequence[Rule]) -> dict[str, _ActionIndex]:
    index: dict[str, _ActionIndex] = {}
    for action in ACTIONS:
        by_prefix: dict[str, list[int]] = {}
        by_subject: dict[str, list[int]] = {}
        any_subject: list[int] = []
        for position, rule in enumerate(rules):
            if action not in rule.actions:
                continue
            for prefix in {_literal_prefix(p) for p in rule.resources.patterns}:
                by_prefix.setdefault(prefix, []).append(position)  # "*": prefix ""
            names = _literal_subjects(rule)
            if names is None:
                any_subject.append(position)
            else:
                for name in names:
                    by_subject.setdefault(name, []).append(position)
        index[action] = _ActionIndex(
            {k: tuple(v) for k, v in by_prefix.items()},
            {k: tuple(v) for k, v in by_subject.items()},
            tuple(any_subject),
        )
    return index


@dataclass(frozen=True, slots=True)
class Policy:
    """An immutable, parsed policy. ``source`` names the file; ``digest`` is its sha256.

    **Indexed.** A decision does not look at every rule: per action, the rules are
    indexed by the literal prefix of each resource pattern (the text before its first
    wildcard; ``*`` is the empty prefix) and by literal subject names. A decision looks
    up the prefixes of its resource (one dictionary probe per character of the slice
    name) and the identity's subject, takes the
    smaller of the two candidate sets and checks only those rules, in policy order, with
    the same code as before. The index only ever leaves out rules that cannot match, so
    the answer is the one a scan of every rule gives (a property test holds it to that);
    what still scales with the rule count is a policy whose rules share both one
    resource prefix and wildcard subjects (e.g. thousands of ``*`` rules told apart by
    attribute only).
    """

    rules: tuple[Rule, ...]
    source: str = "<policy>"
    digest: str = ""
    _index: dict[str, _ActionIndex] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", _build_index(self.rules))

    def candidates(self, identity: Identity, action: str, resource: str) -> Sequence[Rule]:
        """The rules that may apply to this request, in policy order (a sound superset)."""
        index = self._index.get(action)
        if index is None:
            return ()
        by_prefix = index.by_prefix
        from_resource: list[int] = []
        for end in range(len(resource) + 1):
            found = by_prefix.get(resource[:end])
            if found is not None:
                from_resource.extend(found)
        from_subject = index.by_subject.get(identity.subject, ())
        if len(index.any_subject) + len(from_subject) < len(from_resource):
            chosen = [*index.any_subject, *from_subject]
        else:
            chosen = from_resource
        rules = self.rules
        return [rules[i] for i in sorted(set(chosen))]

    def decide(
        self,
        identity: Identity,
        action: str,
        resource: str,
        source_ip: str | None,
        *,
        public: bool = False,
    ) -> Decision:
        """Decide one request. ``action`` must be one of :data:`ACTIONS` (ValueError else).

        This is the one decision function: the server's requests and ``nixd-server policy
        explain`` both come here. ``public`` says the slice has the ``--public`` flag, which
        counts as one more allow rule (:data:`PUBLIC_PROJECT_RULE`, ``cache:read`` only):
        any matching deny still wins. When several allow rules match, the decision names
        an explicit rule before a public one, so callers can tell "readable because public"
        from "granted to this identity".
        """
        _known_action(action)
        return self._decide(identity, action, resource, _parse_ip(source_ip), public=public)

    def _decide(
        self,
        identity: Identity,
        action: str,
        resource: str,
        source: IPAddress | None,
        *,
        public: bool = False,
    ) -> Decision:
        allowed_by: Rule | None = None
        for rule in self.candidates(identity, action, resource):
            if rule.mismatch(identity, action, resource, source) is not None:
                continue
            if not rule.allow:
                return Decision(
                    False,
                    rule.id,
                    f"{identity.render()} {action} {resource}: denied by rule {rule.id!r}",
                )
            if allowed_by is None or (
                allowed_by.id in PUBLIC_RULES and rule.id not in PUBLIC_RULES
            ):
                allowed_by = rule
        if allowed_by is None and public and action == "cache:read":
            return Decision(
                True,
                PUBLIC_PROJECT_RULE,
                f"{identity.render()} {action} {resource}: the project is public",
            )
        if allowed_by is not None:
            return Decision(
                True,
                allowed_by.id,
                f"{identity.render()} {action} {resource}: allowed by rule {allowed_by.id!r}",
            )
        return Decision(
            False,
            DEFAULT_DENY,
            f"{identity.render()} {action} {resource}: no rule allows it",
        )

    def readable(
        self,
        identity: Identity,
        resources: Iterable[str],
        source_ip: str | None,
        *,
        action: str = "cache:read",
    ) -> list[str]:
        """The resources (in the order given) on which ``identity`` may do ``action``."""
        _known_action(action)
        source = _parse_ip(source_ip)
        return [r for r in resources if self._decide(identity, action, r, source).allowed]

    def decide_any(
        self,
        identity: Identity,
        action: str,
        resources: Sequence[str],
        source_ip: str | None,
    ) -> Decision:
        """Allowed if ``action`` is allowed on at least one of ``resources``.

        The decision names the first allowing rule; if none allows, the first explicit deny
        (or ``default-deny``). This is the "a path is visible if readable in one slice
        holding it" question, answered with one decision for the audit log.
        """
        _known_action(action)
        source = _parse_ip(source_ip)
        denied: Decision | None = None
        for resource in resources:
            decision = self._decide(identity, action, resource, source)
            if decision.allowed:
                return decision
            if denied is None or denied.rule == DEFAULT_DENY:
                denied = decision
        if denied is None:
            return Decision(False, DEFAULT_DENY, f"{identity.render()} {action}: no resource")
        return denied

    def explain(
        self,
        identity: Identity,
        action: str,
        resource: str,
        source_ip: str | None,
        *,
        public: bool = False,
    ) -> str:
        """A human account of one decision: the answer, the rule, and every rule's verdict."""
        decision = self.decide(identity, action, resource, source_ip, public=public)
        source = _parse_ip(source_ip)
        attrs = ", ".join(f"{k}={v!r}" for k, v in sorted(identity.attributes.items()))
        lines = [
            f"decision: {decision.effect}",
            f"rule:     {decision.rule}",
            f"reason:   {decision.reason}",
            f"identity: {identity.render()}" + (f" ({attrs})" if attrs else ""),
            f"action:   {action}",
            f"resource: {resource}",
            f"source:   {source_ip or '(unknown)'}",
            f"policy:   {self.source}" + (f" (sha256 {self.digest[:16]})" if self.digest else ""),
            "rules:",
        ]
        if not self.rules:
            lines.append("  (none: everything is denied)")
        for rule in self.rules:
            why = rule.mismatch(identity, action, resource, source)
            where = f"{self.source}:{rule.line}" if rule.line else self.source
            verdict = f"MATCHES ({rule.effect})" if why is None else f"no match: {why}"
            mark = "*" if rule.id == decision.rule else " "
            lines.append(f" {mark}{rule.id} [{rule.effect}, {where}]: {verdict}")
        if public:
            verdict = "MATCHES (allow)" if action == "cache:read" else "no match: cache:read only"
            mark = "*" if decision.rule == PUBLIC_PROJECT_RULE else " "
            lines.append(
                f" {mark}{PUBLIC_PROJECT_RULE} [allow, the project is --public]: {verdict}"
            )
        if decision.rule == DEFAULT_DENY:
            lines.append(f" *{DEFAULT_DENY}: no allow rule matched")
        return "\n".join(lines) + "\n"


# --- loading -----------------------------------------------------------------------------


class _Locator:
    """Find the line of a rule's key in the source text, for semantic errors.

    tomllib gives line numbers only for syntax errors; for "unknown action" the best line is
    the one holding that value inside the rule's table, found by scanning the text.
    """

    _HEADER = re.compile(r"^\s*\[")
    _RULE = re.compile(r"^\s*\[\[\s*rule\s*\]\]")
    _PUBLIC = re.compile(r"^\s*\[\s*public\s*\]")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.rule_starts = [i for i, line in enumerate(self.lines) if self._RULE.match(line)]
        self.public_start = next(
            (i for i, line in enumerate(self.lines) if self._PUBLIC.match(line)), None
        )

    def _block(self, start: int | None) -> tuple[int, int] | None:
        if start is None:
            return None
        end = start + 1
        while end < len(self.lines) and not self._HEADER.match(self.lines[end]):
            end += 1
        return start, end

    def _find(self, block: tuple[int, int] | None, key: str | None, needle: str | None) -> int:
        if block is None:
            return 0
        start, end = block
        key_line = start
        if key is not None:
            key_re = re.compile(rf"^\s*{re.escape(key)}\s*=|[{{,]\s*{re.escape(key)}\s*=")
            for i in range(start, end):
                if key_re.search(self.lines[i]):
                    key_line = i
                    break
        if needle is not None:
            for i in range(key_line, end):
                if needle in self.lines[i]:
                    return i + 1
        return key_line + 1

    def rule(self, index: int, key: str | None = None, needle: str | None = None) -> int:
        if index >= len(self.rule_starts):  # written as `rule = [{...}]`: best effort
            return self.top_key("rule") or 1
        return self._find(self._block(self.rule_starts[index]), key, needle)

    def public(self, key: str | None = None, needle: str | None = None) -> int:
        return self._find(self._block(self.public_start), key, needle)

    def top_key(self, key: str) -> int:
        key_re = re.compile(rf"^\s*(\[+\s*)?{re.escape(key)}\b")
        for i, line in enumerate(self.lines):
            if key_re.match(line):
                return i + 1
        return 0


class _Problem(Exception):
    """A semantic error inside one table, before its line is known."""

    def __init__(self, message: str, key: str | None = None, needle: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.needle = needle


def _string_list(value: Any, key: str, *, allow_str: bool = False) -> list[str]:
    if allow_str and isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _Problem(f"{key} must be a non-empty list of strings", key)
    return list(value)


def _parse_subject(raw: Any) -> Subject:
    if not isinstance(raw, dict):
        raise _Problem('each entry of subjects must be a table like { kind = "token" }', "subjects")
    if "kind" not in raw:
        raise _Problem('a subject needs a kind (an identity kind, or "*" for anyone)', "subjects")
    kinds: set[str] = set()
    for kind in _string_list(raw["kind"], "kind", allow_str=True):
        if kind == "*":
            continue
        if kind not in KINDS:
            raise _Problem(
                f'unknown identity kind {kind!r} (known: {", ".join(sorted(KINDS))}, or "*")',
                "subjects",
                f'"{kind}"',
            )
        kinds.add(kind)
    if "*" in _string_list(raw["kind"], "kind", allow_str=True):
        kinds = set()
    subject: tuple[_Glob, ...] = ()
    attributes: list[tuple[str, tuple[_Glob, ...]]] = []
    for name, value in raw.items():
        if name == "kind":
            continue
        if isinstance(value, str):
            patterns = [value]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            patterns = list(value)
        else:
            raise _Problem(
                f"subject attribute {name!r} must be a glob or a non-empty list of globs",
                "subjects",
                name,
            )
        globs = []
        for pattern in patterns:
            try:
                globs.append(_compile_glob(pattern))
            except ValueError as exc:
                raise _Problem(
                    f"subject attribute {name!r}: {exc}", "subjects", f'"{pattern}"'
                ) from exc
        if name == "subject":
            subject = tuple(globs)
        else:
            attributes.append((name, tuple(globs)))
    return Subject(frozenset(kinds), subject, tuple(attributes))


def _parse_actions(raw: Any, *, allowed: Iterable[str] = ACTIONS) -> frozenset[str]:
    allowed = tuple(allowed)
    actions: set[str] = set()
    for action in _string_list(raw, "actions"):
        if action == "*":
            actions.update(allowed)
        elif action in allowed:
            actions.add(action)
        else:
            known = ", ".join(allowed)
            what = "unknown" if action not in ACTIONS else "not allowed here"
            raise _Problem(
                f'{what} action {action!r} (known: {known}, or "*")', "actions", f'"{action}"'
            )
    return frozenset(actions)


def _parse_resources(raw: Any, key: str = "resources") -> _Resources:
    patterns = _string_list(raw, key)
    regexes = []
    for pattern in patterns:
        try:
            regexes.append(_resource_regex(pattern))
        except ValueError as exc:
            raise _Problem(str(exc), key, f'"{pattern}"') from exc
    combined = "|".join(f"(?:{r})" for r in regexes)
    return _Resources(tuple(patterns), re.compile(combined, re.DOTALL))


def _parse_conditions(raw: Any) -> tuple[IPNetwork, ...] | None:
    if not isinstance(raw, dict):
        raise _Problem("conditions must be a table like { source_ips = [...] }", "conditions")
    for key in raw:
        if key not in _CONDITION_KEYS:
            raise _Problem(
                f"unknown condition {key!r} (known: {', '.join(sorted(_CONDITION_KEYS))})",
                "conditions" if key == "conditions" else key,
                key,
            )
    if "source_ips" not in raw:
        return None
    nets: list[IPNetwork] = []
    for cidr in _string_list(raw["source_ips"], "source_ips"):
        try:
            nets.append(ipaddress.ip_network(cidr, strict=True))
        except ValueError as exc:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; did you mean {ipaddress.ip_network(cidr, strict=False)}?"
            raise _Problem(
                f"bad CIDR {cidr!r} in source_ips: {exc}{hint}", "source_ips", f'"{cidr}"'
            ) from exc
    return tuple(nets)


def _parse_rule(raw: Any, line: int) -> Rule:
    if not isinstance(raw, dict):
        raise _Problem("each rule must be a table ([[rule]])")
    for key in raw:
        if key not in _RULE_KEYS:
            raise _Problem(
                f"unknown key {key!r} in rule (known: {', '.join(sorted(_RULE_KEYS))})", key
            )
    rule_id = raw.get("id")
    if rule_id is None:
        raise _Problem("a rule needs an id (a string naming it in decisions and the audit log)")
    if not isinstance(rule_id, str):
        raise _Problem(f"id must be a string, got {rule_id!r}", "id")
    if not _ID_RE.fullmatch(rule_id) or rule_id in _RESERVED_IDS:
        raise _Problem(
            f"bad rule id {rule_id!r}: use letters, digits, '.', '_', '-', ':' "
            f"(not {' or '.join(sorted(_RESERVED_IDS))})",
            "id",
        )
    prefix = f"rule {rule_id!r}: "
    try:
        effect = raw.get("effect")
        if effect not in ("allow", "deny"):
            raise _Problem(f'effect must be "allow" or "deny", got {effect!r}', "effect")
        for key in ("subjects", "actions", "resources"):
            if key not in raw:
                raise _Problem(f"missing {key}", None)
        subjects_raw = raw["subjects"]
        if not isinstance(subjects_raw, list) or not subjects_raw:
            raise _Problem("subjects must be a non-empty list of tables", "subjects")
        subjects = tuple(_parse_subject(s) for s in subjects_raw)
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise _Problem("description must be a string", "description")
        return Rule(
            id=rule_id,
            effect=effect,
            subjects=subjects,
            actions=_parse_actions(raw["actions"]),
            resources=_parse_resources(raw["resources"]),
            source_ips=_parse_conditions(raw["conditions"]) if "conditions" in raw else None,
            description=description,
            line=line,
        )
    except _Problem as exc:
        raise _Problem(prefix + str(exc), exc.key, exc.needle) from None


def _public_rule(raw: Any, loc: _Locator) -> Rule:
    try:
        if not isinstance(raw, dict):
            raise _Problem("[public] must be a table")
        for key in raw:
            if key not in _PUBLIC_KEYS:
                raise _Problem(
                    f"unknown key {key!r} in [public] (known: {', '.join(sorted(_PUBLIC_KEYS))})",
                    key,
                )
        if "resources" not in raw:
            raise _Problem("[public] needs resources (the slices anyone may read)")
        actions = (
            _parse_actions(raw["actions"], allowed=sorted(READ_ACTIONS))
            if "actions" in raw
            else frozenset({"cache:read"})
        )
        resources = _parse_resources(raw["resources"])
    except _Problem as exc:
        raise _Problem(str(exc), exc.key, exc.needle) from None
    return Rule(
        id=PUBLIC_RULE,
        effect="allow",
        subjects=(Subject(frozenset(), (), ()),),
        actions=actions,
        resources=resources,
        source_ips=None,
        description="[public]: readable by anyone",
        line=loc.public(),
    )


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    """Parse policy text; ConfigError naming ``source:line`` on any problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_message(source, text, exc)) from exc
    loc = _Locator(text)
    for key in data:
        if key not in ("rule", "public"):
            raise ConfigError(
                f"{source}:{loc.top_key(key)}: unknown top-level key {key!r} "
                "(known: [[rule]], [public])"
            )
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{source}:{loc.top_key('rule')}: rules must be [[rule]] tables")
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_rules):
        line = loc.rule(index)
        try:
            rule = _parse_rule(raw, line)
        except _Problem as exc:
            raise ConfigError(f"{source}:{loc.rule(index, exc.key, exc.needle)}: {exc}") from None
        if rule.id in seen:
            raise ConfigError(
                f"{source}:{loc.rule(index, 'id')}: duplicate rule id {rule.id!r} "
                f"(first defined at line {seen[rule.id]})"
            )
        seen[rule.id] = loc.rule(index, "id")
        rules.append(rule)
    if "public" in data:
        try:
            rules.append(_public_rule(data["public"], loc))
        except _Problem as exc:
            raise ConfigError(f"{source}:{loc.public(exc.key, exc.needle)}: {exc}") from None
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Policy(rules=tuple(rules), source=source, digest=digest)


def _syntax_message(source: str, text: str, exc: tomllib.TOMLDecodeError) -> str:
    """``file:line:column: what`` from tomllib's "what (at line L, column C)"."""
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        return f"{source}:{match.group(1)}:{match.group(2)}: {message[: match.start()]}"
    match = re.search(r"\s*\(at end of document\)$", message)
    if match:
        last = max(1, len(text.splitlines()))
        return f"{source}:{last}: {message[: match.start()]} (at end of file)"
    return f"{source}: {message}"


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file; ConfigError (``file:line: what``) if it is unusable."""
    return parse_policy_bytes(read_policy_file(Path(path)), str(path))


def read_policy_file(path: Path) -> bytes:
    """A policy file's bytes; ConfigError saying why if it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no policy file (everything would be denied)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the policy: {exc.strerror}") from exc


def parse_policy_bytes(data: bytes, source: str) -> Policy:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 text") from exc
    return parse_policy(text, source=source)


# --- reloading ---------------------------------------------------------------------------


class PolicySource(Protocol):
    """Where a policy is kept other than a file (:mod:`nixd.server.access.shared_policy`)."""

    where: str

    def read(self) -> bytes | None:
        """The policy document, or None if there is none."""
        ...


class PolicyHolder:
    """The policy in force, reloaded when the file changes; a broken file never replaces it.

    With ``source`` (the policy kept in the PostgreSQL metadata database, shared by every
    instance) the document is read from there instead, and :meth:`watch` polls it every
    ``interval`` seconds (one small query); the same rules apply to a broken document.

    Two ways to notice a change, use either or both: :attr:`current` re-reads the file at
    most once per ``interval`` seconds (a read and a sha256 of a small file: cheaper and
    more robust than trusting mtime, which can stay equal across a quick rewrite), and
    :meth:`watch`, run in a nursery, reloads as soon as the file system reports a change
    (editors and ``mv`` replace the file, so the directory is watched).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        source: PolicySource | None = None,
    ) -> None:
        self.path = Path(path)
        self.source = source
        self.where = source.where if source is not None else str(self.path)
        self.interval = interval
        self._clock = clock
        data = self._read()
        if data is None:
            raise ConfigError(f"{self.where}: no policy file (everything would be denied)")
        self._policy = parse_policy_bytes(data, self.where)
        self._digest = self._policy.digest
        self._bad_digest: str | None = None
        self._checked = clock()
        self._watching = False
        self._local_digest = self._file_digest() if source is not None else None
        self.last_error: str | None = None
        """Why the file on disk is not in force (None when it is)."""
        log.info("policy %s loaded: %d rules", self.where, len(self._policy.rules))

    @property
    def current(self) -> Policy:
        """The policy in force, after a cheap check for a changed file.

        While :meth:`watch` runs, the check is its job (in a worker thread), so a request
        never reads, hashes or parses the file on the event loop.
        """
        if not self._watching:
            self.maybe_reload()
        return self._policy

    def _file_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def _note_local_edit(self) -> None:
        """With ``source``: say once per edit that the file changed but is not in force.

        Why: an operator used to a single box edits ``policy.toml`` and expects it to apply;
        on a shared database it does not, and a WARNING in the log says what to run.
        """
        digest = self._file_digest()
        if digest is None or digest == self._local_digest:
            return
        self._local_digest = digest
        if digest != self._digest:
            log.warning(
                "%s changed, but the policy in force is %s: `nixd-server policy apply` "
                "puts the file in force on every instance",
                self.path,
                self.where,
            )

    def _read(self) -> bytes | None:
        if self.source is not None:
            return self.source.read()
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the policy: {exc.strerror}") from exc

    def maybe_reload(self) -> bool:
        """Reload if ``interval`` has passed since the last check; True if the policy changed."""
        now = self._clock()
        if now - self._checked < self.interval:
            return False
        self._checked = now
        return self.reload()

    def reload(self) -> bool:
        """Re-read the file now; True if a new policy is in force.

        A missing, unreadable or broken file leaves the old policy in force; the error is
        logged once per distinct file content and kept in :attr:`last_error`.
        """
        if self.source is not None:
            self._note_local_edit()
        try:
            data = self._read()
        except ConfigError as exc:
            return self._refuse(str(exc), None)
        except sqlite3.Error as exc:  # the database: the policy in force stays
            # logged once per outage, not once a second: "unavailable" stands for the content
            return self._refuse(f"{self.where}: cannot read the policy: {exc}", "unavailable")
        if data is None:
            return self._refuse(f"{self.where}: policy file is missing", "missing")
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            self.last_error = None
            self._bad_digest = None  # a later failure is news again
            return False
        if digest == self._bad_digest:
            return False
        try:
            policy = parse_policy_bytes(data, self.where)
        except ConfigError as exc:
            return self._refuse(str(exc), digest)
        self._policy = policy
        self._digest = digest
        self._bad_digest = None
        self.last_error = None
        log.info(
            "policy %s reloaded: %d rules (sha256 %s)",
            self.where,
            len(policy.rules),
            digest[:16],
        )
        return True

    def _refuse(self, message: str, digest: str | None) -> bool:
        if digest is None or digest != self._bad_digest:
            log.error("policy not reloaded, the previous policy stays in force: %s", message)
        self._bad_digest = digest
        self.last_error = message
        return False

    async def watch(self) -> None:
        """Reload whenever the file changes; runs until cancelled (start it in a nursery).

        Every reload (read, sha256, parse: milliseconds for a large policy) runs in a
        worker thread, one at a time; the event loop only swaps the finished
        :class:`Policy` in (one reference assignment). Besides the file system's
        events, the file is checked every ``interval`` seconds, as :attr:`current` would.
        """
        lock = trio.Lock()

        async def reload() -> None:
            async with lock:
                self._checked = self._clock()
                await trio.to_thread.run_sync(self.reload)

        if self.source is not None:  # nothing to watch: ask every interval
            self._watching = True
            try:
                while True:
                    await trio.sleep(self.interval)
                    await reload()
            finally:
                self._watching = False

        import watchfiles  # noqa: PLC0415 (only the server's watcher needs it)

        target = self.path.resolve()
        directory = target.parent

        def _ours(_change: watchfiles.Change, changed: str) -> bool:
            return Path(changed).name == target.name

        async def poll() -> None:
            while True:
                await trio.sleep(self.interval)
                await reload()

        self._watching = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                # rust_timeout bounds how long a cancel waits for the watcher thread.
                async for _changes in watchfiles.awatch(
                    directory,
                    watch_filter=_ours,
                    debounce=200,
                    step=50,
                    rust_timeout=_WATCH_POLL_MS,
                    recursive=False,
                ):
                    await reload()
        finally:
            self._watching = False
