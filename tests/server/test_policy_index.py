"""The indexed policy decision equals a scan of every rule, for random rule sets."""

from __future__ import annotations

import json
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from nixd.server.access.identity import Identity
from nixd.server.access.policy import ACTIONS, Policy, Rule, parse_policy


class ScanningPolicy(Policy):
    """The same policy, deciding from every rule in order (no index)."""

    __slots__ = ()

    def candidates(self, identity: Identity, action: str, resource: str) -> Sequence[Rule]:
        return self.rules


NAMES = ["acme", "acme2", "ac", "other", "app", "apps", "lib", "x"]
RESOURCES = [
    "*",
    "acme/*",
    "acme/app",
    "acme/app*",
    "ac*/a?p",
    "acme/[al]*",
    "other/*",
    "*/app",
    "acme2/lib",
    "other/[!a]*",
]
SUBJECT_GLOBS = ["alice", "bob", "al*", "b?b", "ci-[0-9]", "ci-1", "*"]
KINDS = ["token", "user", "github", "anonymous"]

subject_table = st.fixed_dictionaries(
    {"kind": st.sampled_from([*KINDS, "*"])},
    optional={
        "subject": st.lists(st.sampled_from(SUBJECT_GLOBS), min_size=1, max_size=2),
        "role": st.sampled_from(["reader", "r*", "admin"]),
    },
)
rule_table = st.fixed_dictionaries(
    {
        "effect": st.sampled_from(["allow", "allow", "deny"]),
        "subjects": st.lists(subject_table, min_size=1, max_size=3),
        "actions": st.lists(st.sampled_from([*ACTIONS, "*"]), min_size=1, max_size=3),
        "resources": st.lists(st.sampled_from(RESOURCES), min_size=1, max_size=3),
    },
    optional={"source_ips": st.sampled_from([["127.0.0.0/8"], ["10.0.0.0/8", "::1/128"]])},
)
identities = st.builds(
    lambda kind, subject, role: Identity(kind, subject, {"role": role} if role is not None else {}),
    st.sampled_from(KINDS),
    st.sampled_from(["alice", "bob", "ci-1", "ci-7", "albert", "carol"]),
    st.one_of(st.none(), st.sampled_from(["reader", "admin", "rx"])),
)
requests = st.tuples(
    identities,
    st.sampled_from(ACTIONS),
    st.builds(lambda o, p: f"{o}/{p}", st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.sampled_from([None, "127.0.0.1", "10.1.2.3", "::1", "192.0.2.1"]),
    st.booleans(),
)


def policy_text(rules: list[dict[str, object]], public: list[str] | None) -> str:
    out = []
    for n, rule in enumerate(rules):
        out.append("[[rule]]")
        out.append(f'id = "r{n}"')
        out.append(f'effect = "{rule["effect"]}"')
        subjects = ", ".join(
            "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in s.items()) + "}"  # type: ignore[attr-defined]
            for s in rule["subjects"]  # type: ignore[attr-defined]
        )
        out.append(f"subjects = [{subjects}]")
        out.append(f"actions = {json.dumps(rule['actions'])}")
        out.append(f"resources = {json.dumps(rule['resources'])}")
        if "source_ips" in rule:
            out.append(f"conditions = {{ source_ips = {json.dumps(rule['source_ips'])} }}")
    if public:
        out.insert(0, f"[public]\nresources = {json.dumps(public)}\n")
    return "\n".join(out) + "\n"


@settings(max_examples=300, deadline=None)
@given(
    rules=st.lists(rule_table, max_size=25),
    public=st.one_of(st.none(), st.lists(st.sampled_from(RESOURCES), min_size=1, max_size=2)),
    asked=st.lists(requests, min_size=1, max_size=20),
)
def test_indexed_decision_equals_a_scan_of_every_rule(
    rules: list[dict[str, object]],
    public: list[str] | None,
    asked: list[tuple[Identity, str, str, str | None, bool]],
) -> None:
    indexed = parse_policy(policy_text(rules, public))
    scanning = ScanningPolicy(indexed.rules, indexed.source, indexed.digest)
    for identity, action, resource, source_ip, is_public in asked:
        got = indexed.decide(identity, action, resource, source_ip, public=is_public)
        want = scanning.decide(identity, action, resource, source_ip, public=is_public)
        assert got == want, (identity, action, resource, source_ip)


def test_a_cold_decision_checks_only_the_rules_that_could_apply() -> None:
    """10,000 per-project rules: a decision looks at the one whose prefix fits."""
    text = "".join(
        f'[[rule]]\nid = "p{n}"\neffect = "allow"\nsubjects = [{{ kind = "token" }}]\n'
        f'actions = ["cache:read"]\nresources = ["org{n}/*"]\n'
        for n in range(10_000)
    )
    policy = parse_policy(text)
    reader = Identity("token", "org77/ci", {})
    assert [r.id for r in policy.candidates(reader, "cache:read", "org77/app")] == ["p77"]
    assert policy.decide(reader, "cache:read", "org77/app", None).rule == "p77"
    assert policy.candidates(reader, "cache:write", "org77/app") == []
    assert not policy.decide(reader, "cache:read", "nobody/app", None).allowed
