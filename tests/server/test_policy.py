"""The policy engine: matching, precedence, conditions, file errors with lines, reloading."""

from __future__ import annotations

import fnmatch
import logging
import os
import warnings
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest
import trio

from nixd.errors import ConfigError
from nixd.server.access.identity import Identity, anonymous
from nixd.server.access.policy import (
    DEFAULT_DENY,
    PolicyHolder,
    _compile_glob,
    load_policy,
    parse_policy,
)

POLICY = """\
[public]
resources = ["acme/oss-*"]

[[rule]]
id = "acme-read"
effect = "allow"
subjects = [
  { kind = "token", org = "acme" },
  { kind = "github", repository_owner = ["acme", "acme-labs"], ref = "refs/heads/*" },
]
actions = ["cache:read"]
resources = ["acme/*"]

[[rule]]
id = "ci-push"
effect = "allow"
subjects = [{ kind = "token", org = "acme", subject = "ci-*" }]
actions = ["cache:read", "cache:write"]
resources = ["acme/app", "acme/lib-[ab]"]
conditions = { source_ips = ["127.0.0.1/32", "::1/128"] }

[[rule]]
id = "no-secrets-for-ci"
effect = "deny"
subjects = [{ kind = "*", subject = "ci-*" }]
actions = ["*"]
resources = ["acme/secret"]

[[rule]]
id = "admins"
effect = "allow"
subjects = [{ kind = "user", groups = "admin" }]
actions = ["*"]
resources = ["*"]
"""

ACME_TOKEN = Identity("token", "laptop", {"org": "acme"})
ACME_CI = Identity("token", "ci-main", {"org": "acme"})
OTHER_ORG = Identity("token", "ci-main", {"org": "evil"})


@pytest.fixture
def policy():
    return parse_policy(POLICY, source="policy.toml")


def test_attribute_match_allows_and_other_org_is_default_denied(policy):
    d = policy.decide(ACME_TOKEN, "cache:read", "acme/app", "127.0.0.1")
    assert (d.allowed, d.rule) == (True, "acme-read")
    d = policy.decide(OTHER_ORG, "cache:read", "acme/app", "127.0.0.1")
    assert (d.allowed, d.rule) == (False, DEFAULT_DENY)
    assert "no rule allows" in d.reason


def test_action_not_listed_is_denied(policy):
    d = policy.decide(ACME_TOKEN, "cache:write", "acme/app", "127.0.0.1")
    assert (d.allowed, d.rule) == (False, DEFAULT_DENY)


def test_list_of_values_any_may_match_and_all_keys_must(policy):
    gh = Identity(
        "github", "repo:acme-labs/x", {"repository_owner": "acme-labs", "ref": "refs/heads/main"}
    )
    assert policy.decide(gh, "cache:read", "acme/x", None).allowed
    tag = Identity("github", "repo:acme/x", {"repository_owner": "acme", "ref": "refs/tags/v1"})
    assert not policy.decide(tag, "cache:read", "acme/x", None).allowed
    no_ref = Identity("github", "repo:acme/x", {"repository_owner": "acme"})
    assert not policy.decide(no_ref, "cache:read", "acme/x", None).allowed


def test_identity_list_attribute_matches_if_any_element_does(policy):
    user = Identity("user", "alice", {"groups": ["dev", "admin"]})
    assert policy.decide(user, "cache:admin", "any/thing", None).rule == "admins"
    plain = Identity("user", "bob", {"groups": ["dev", "ops"]})
    assert not policy.decide(plain, "cache:admin", "any/thing", None).allowed


def test_globs_are_case_sensitive_and_stay_within_a_segment(policy):
    assert policy.decide(ACME_CI, "cache:write", "acme/lib-a", "127.0.0.1").allowed
    assert not policy.decide(ACME_CI, "cache:write", "acme/lib-c", "127.0.0.1").allowed
    assert not policy.decide(ACME_TOKEN, "cache:read", "ACME/app", None).allowed
    upper = Identity("token", "laptop", {"org": "ACME"})
    assert not policy.decide(upper, "cache:read", "acme/app", None).allowed
    # "acme/*" must not reach into something that is not an org/project pair
    assert not policy.decide(ACME_TOKEN, "cache:read", "acme/app/x", None).allowed


def test_deny_beats_allow_in_any_order(policy):
    admin_ci = Identity("user", "ci-bot", {"groups": "admin"})
    d = policy.decide(admin_ci, "cache:read", "acme/secret", None)
    assert (d.allowed, d.rule) == (False, "no-secrets-for-ci")
    reordered = parse_policy("\n".join(reversed(POLICY.split("\n\n"))), source="reordered.toml")
    d = reordered.decide(admin_ci, "cache:read", "acme/secret", None)
    assert (d.allowed, d.rule) == (False, "no-secrets-for-ci")


def test_empty_policy_denies_everything():
    policy = parse_policy("", source="empty.toml")
    d = policy.decide(ACME_TOKEN, "cache:read", "acme/app", None)
    assert (d.allowed, d.rule) == (False, DEFAULT_DENY)


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("::1", True),
        ("::2", False),
        ("::ffff:127.0.0.1", True),  # a dual-stack socket's view of 127.0.0.1
        ("not an address", False),
        (None, False),
    ],
)
def test_source_ip_condition(policy, source, allowed):
    d = policy.decide(ACME_CI, "cache:write", "acme/app", source)
    assert d.allowed is allowed
    assert d.rule == ("ci-push" if allowed else DEFAULT_DENY)


def test_ipv6_network_condition():
    policy = parse_policy(
        """
[[rule]]
id = "v6"
effect = "allow"
subjects = [{ kind = "token" }]
actions = ["cache:read"]
resources = ["*"]
conditions = { source_ips = ["fd00:1234::/32"] }
"""
    )
    assert policy.decide(ACME_TOKEN, "cache:read", "a/b", "fd00:1234:5::9").allowed
    assert not policy.decide(ACME_TOKEN, "cache:read", "a/b", "fd00:1235::9").allowed


def test_public_slices_and_anonymous(policy):
    d = policy.decide(anonymous(), "cache:read", "acme/oss-tools", None)
    assert (d.allowed, d.rule) == (True, "public")
    assert not policy.decide(anonymous(), "cache:write", "acme/oss-tools", None).allowed
    assert not policy.decide(anonymous(), "cache:read", "acme/app", None).allowed


def test_anonymous_subject_kind():
    policy = parse_policy(
        """
[[rule]]
id = "anon-docs"
effect = "allow"
subjects = [{ kind = "anonymous" }]
actions = ["flake:read"]
resources = ["docs/*"]
"""
    )
    assert policy.decide(anonymous(), "flake:read", "docs/site", None).allowed
    assert not policy.decide(ACME_TOKEN, "flake:read", "docs/site", None).allowed


def test_readable_and_decide_any(policy):
    slices = ["evil/x", "acme/secret", "acme/app", "acme/oss-a"]
    assert policy.readable(ACME_TOKEN, slices, None) == ["acme/secret", "acme/app", "acme/oss-a"]
    assert policy.readable(ACME_CI, slices, None) == ["acme/app", "acme/oss-a"]
    assert policy.readable(anonymous(), slices, None) == ["acme/oss-a"]
    d = policy.decide_any(ACME_CI, "cache:read", ["acme/secret", "acme/app"], None)
    assert (d.allowed, d.rule) == (True, "acme-read")
    d = policy.decide_any(ACME_CI, "cache:read", ["evil/x", "acme/secret"], None)
    assert (d.allowed, d.rule) == (False, "no-secrets-for-ci")
    d = policy.decide_any(ACME_CI, "cache:read", [], None)
    assert (d.allowed, d.rule) == (False, DEFAULT_DENY)


def test_unknown_action_in_a_question_is_an_error(policy):
    with pytest.raises(ValueError, match="unknown action"):
        policy.decide(ACME_TOKEN, "cache:reed", "acme/app", None)


def test_explain_names_the_decision_and_every_rule(policy):
    text = policy.explain(ACME_CI, "cache:read", "acme/secret", "127.0.0.1")
    assert "decision: deny" in text
    assert "rule:     no-secrets-for-ci" in text
    assert "*no-secrets-for-ci [deny, policy.toml:22]: MATCHES (deny)" in text
    assert "acme-read [allow, policy.toml:4]: MATCHES (allow)" in text
    assert "ci-push [allow, policy.toml:14]: no match: resource acme/secret" in text
    text = policy.explain(OTHER_ORG, "cache:write", "acme/app", "127.0.0.2")
    assert "decision: deny" in text and "default-deny" in text
    assert "source 127.0.0.2 is not in 127.0.0.1/32, ::1/128" not in text  # org fails first
    assert "attribute org='evil' matches none of acme" in text


# --- broken files: every error names file:line ---------------------------------------------

BROKEN = [
    # (replace this, with that, expected line, message fragment)
    (
        'actions = ["cache:read"]\n',
        'actions = ["cache:rread"]\n',
        11,
        "unknown action 'cache:rread'",
    ),
    ('effect = "deny"', 'effect = "dny"', 24, "effect must be"),
    ('"127.0.0.1/32"', '"127.0.0.1/8"', 20, "did you mean 127.0.0.0/8"),
    ('"::1/128"', '"::1/300"', 20, "bad CIDR '::1/300'"),
    ('"acme/lib-[ab]"', '"acme/lib-[ab"', 19, "unclosed '['"),
    ('resources = ["acme/*"]', 'resources = ["acme"]', 12, "not an org/project glob"),
    (
        'id = "admins"',
        'id = "acme-read"',
        30,
        "duplicate rule id 'acme-read' (first defined at line 5)",
    ),
    ('id = "admins"\n', "", 29, "needs an id"),
    ('id = "admins"', 'id = "default-deny"', 30, "bad rule id"),
    ('id = "admins"', "id = 7", 30, "id must be a string, got 7"),
    (
        'effect = "allow"\nsubjects = [{ kind = "user"',
        'effect = "allow"\nsubjcts = [{ kind = "user"',
        32,
        "unknown key 'subjcts'",
    ),
    (
        '{ kind = "user", groups = "admin" }',
        '{ kind = "robot" }',
        32,
        "unknown identity kind 'robot'",
    ),
    ('{ kind = "user", groups = "admin" }', '{ groups = "admin" }', 32, "needs a kind"),
    ('ref = "refs/heads/*"', "ref = 3", 9, "'ref' must be a glob"),
    ("conditions = { source_ips", "conditions = { source_ip", 20, "unknown condition 'source_ip'"),
    (
        'resources = ["acme/oss-*"]',
        'resources = ["acme/oss-*"]\nactions = ["cache:write"]',
        3,
        "not allowed here",
    ),
    ("[public]\n", "[public]\nfoo = 1\n", 2, "unknown key 'foo' in [public]"),
    ("[public]\n", "title = 'x'\n[public]\n", 1, "unknown top-level key 'title'"),
    (
        'actions = ["*"]\nresources = ["*"]',
        'actions = ["*"\nresources = ["*"]',
        34,
        "Unclosed array",
    ),  # seen on the next line
    ('id = "ci-push"', 'id = "ci-push', 15, "Illegal character"),
]


@pytest.mark.parametrize(("old", "new", "line", "fragment"), BROKEN)
def test_broken_file_names_file_and_line(tmp_path, old, new, line, fragment):
    assert old in POLICY
    path = tmp_path / "policy.toml"
    path.write_text(POLICY.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert fragment in message


def test_inline_rule_array_errors_still_have_a_line(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('# x\nrule = [{ id = "a", effect = "maybe" }]\n')
    with pytest.raises(ConfigError, match=r"policy.toml:2: rule 'a': effect must be"):
        load_policy(path)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="no policy file"):
        load_policy(tmp_path / "absent.toml")
    path = tmp_path / "policy.toml"
    path.write_bytes(b"# ok\n# \xff\n")
    with pytest.raises(ConfigError, match=r"policy.toml:2: not UTF-8"):
        load_policy(path)


# --- reloading -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _allow_read(rule_id: str, resource: str) -> str:
    return f"""
[[rule]]
id = "{rule_id}"
effect = "allow"
subjects = [{{ kind = "token" }}]
actions = ["cache:read"]
resources = ["{resource}"]
"""


def test_reload_keeps_old_policy_on_broken_file_and_picks_up_a_valid_change(tmp_path, caplog):
    path = tmp_path / "policy.toml"
    path.write_text(_allow_read("one", "acme/a"))
    clock = FakeClock()
    holder = PolicyHolder(path, clock=clock)
    assert holder.current.decide(ACME_TOKEN, "cache:read", "acme/a", None).rule == "one"

    path.write_text(_allow_read("two", "acme/b").replace('"cache:read"', '"cache:raed"'))
    assert holder.current.decide(ACME_TOKEN, "cache:read", "acme/a", None).rule == "one"
    clock.now += 1.5  # the file is re-checked at most once a second
    with caplog.at_level(logging.ERROR, logger="nixd.server.access.policy"):
        policy = holder.current
    assert policy.decide(ACME_TOKEN, "cache:read", "acme/a", None).rule == "one"
    assert f"{path}:6: rule 'two': unknown action 'cache:raed'" in holder.last_error
    assert "previous policy stays in force" in caplog.text
    assert f"{path}:6:" in caplog.text

    caplog.clear()
    clock.now += 1.5
    with caplog.at_level(logging.ERROR, logger="nixd.server.access.policy"):
        holder.current  # noqa: B018
    assert caplog.text == ""  # the same broken content is reported once

    path.write_text(_allow_read("two", "acme/b"))
    clock.now += 1.5
    policy = holder.current
    assert holder.last_error is None
    assert policy.decide(ACME_TOKEN, "cache:read", "acme/b", None).rule == "two"
    assert not policy.decide(ACME_TOKEN, "cache:read", "acme/a", None).allowed


def test_reload_sees_a_same_size_same_mtime_rewrite(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(_allow_read("one", "acme/a"))
    st = path.stat()
    clock = FakeClock()
    holder = PolicyHolder(path, clock=clock)
    path.write_text(_allow_read("one", "acme/b"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    clock.now += 1.5
    assert holder.current.decide(ACME_TOKEN, "cache:read", "acme/b", None).allowed


def test_missing_file_keeps_policy_and_broken_start_is_refused(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(_allow_read("one", "acme/a"))
    clock = FakeClock()
    holder = PolicyHolder(path, clock=clock)
    path.unlink()
    clock.now += 2
    assert holder.current.decide(ACME_TOKEN, "cache:read", "acme/a", None).allowed
    assert "missing" in (holder.last_error or "")
    path.write_text("[[rule]\n")
    with pytest.raises(ConfigError, match=r"policy.toml:1:"):
        PolicyHolder(path)


async def test_watch_reloads_on_atomic_replace(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(_allow_read("one", "acme/a"))
    holder = PolicyHolder(path, interval=3600)  # only the watcher may notice
    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder.watch)
        await trio.sleep(0.3)  # let the watcher start
        tmp = tmp_path / "policy.toml.new"
        tmp.write_text(_allow_read("two", "acme/b"))
        tmp.rename(path)
        with trio.fail_after(10):
            while holder.current.rules[0].id != "two":  # noqa: ASYNC110 (polling is the API)
                await trio.sleep(0.05)
        # a broken replacement is refused by the watcher too
        tmp.write_text("[[rule]]\nid = 1\n")
        tmp.rename(path)
        with trio.fail_after(10):
            while holder.last_error is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert holder.current.rules[0].id == "two"
        nursery.cancel_scope.cancel()


def test_identity_renders_kind_subject_only():
    ident = Identity("token", "ci", {"org": "acme", "groups": ("a", "b")})
    assert ident.render() == "token:ci" == str(ident)
    assert ident == Identity("token", "ci", {"groups": ["a", "b"], "org": "acme"})
    assert hash(ident) == hash(Identity("token", "ci", {"groups": ["a", "b"], "org": "acme"}))
    assert anonymous().render() == "anonymous:anonymous"
    with pytest.raises(ValueError, match="unknown identity kind"):
        Identity("robot", "x")
    with pytest.raises(TypeError):
        ident.attributes["org"] = "evil"  # type: ignore[index]


def test_policy_file_line_numbers_refer_to_real_lines(tmp_path: Path):
    # sanity for the BROKEN table: the expected lines are where the edits land
    lines = POLICY.splitlines()
    assert lines[3] == "[[rule]]" and lines[13] == "[[rule]]"
    assert lines[21] == "[[rule]]" and lines[29] == 'id = "admins"'


# --- globs agree with fnmatch ------------------------------------------------------------------

_GLOB_CHARS = "ab-!^[]*?\\"


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(
    pattern=st.text(alphabet=_GLOB_CHARS, min_size=1, max_size=8),
    value=st.text(alphabet="ab-!^[]\\", max_size=6),
)
def test_glob_matches_like_fnmatchcase(pattern, value):
    try:
        glob = _compile_glob(pattern)
    except ValueError:
        # refused: an unclosed "[" (fnmatch would take it literally) or a reversed range
        assert "[" in pattern
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the oracle's own regex may warn about "--"
        expected = fnmatch.fnmatchcase(value, pattern)
    assert glob.match(value) is expected
