"""Deploy grants: what a deploy-only credential may read, as its identity states it.

A **deploy token** (``nixd-server token create ... --deploy ORG/FLAKE#OUTPUT
[--deploy-version CONSTRAINT]``) is an API token whose identity carries the attribute
``deploy``: one or more grants ``ORG/FLAKE#OUTPUT@CONSTRAINT`` (``@*`` when no constraint
was given). Like every attribute it is a fact about the caller, carried unchanged into
the claims of the access tokens it is exchanged for (``nixd login token``), so the scope
survives the exchange; the policy still decides (a deny rule on ``deploy:read`` for the
flake takes the grant away).

Such an identity is **deploy-only**: every action but ``deploy:read`` is refused to it
whatever the rules say (rule :data:`DEPLOY_ONLY`; an org's member rule matches its tokens
by ``org``, and must not give a kiosk the whole cache), so it reads exactly the closures
of the granted outputs and nothing else (:mod:`nixd.server.flakes.deploy`).

Only identities of kind ``token`` are read this way: the attribute comes from an admin's
``token create``, never from a claim of an outside issuer. A grant naming another
organization than the token's own is refused at creation and ignored if found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nixd.errors import ConfigError
from nixd.semver import Constraint, Version, VersionError, parse_constraint
from nixd.server.access.identity import Identity

ATTRIBUTE = "deploy"
"""The identity attribute holding the grants (a string or a list of strings)."""
DEPLOY_ONLY = "deploy-only"
"""The rule of every decision other than ``deploy:read`` for a deploy-only identity."""
DEPLOY_TOKEN = "deploy-token"  # noqa: S105 (a rule id, not a secret)
"""The rule of a ``deploy:read`` allowed by the identity's own grant (no rule matched)."""
MAX_GRANTS = 32
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_GRANT = re.compile(rf"({_NAME})/({_NAME})#([A-Za-z0-9_.'\"+-]{{1,256}})(?:@(.{{1,256}}))?")


@dataclass(frozen=True, slots=True)
class Grant:
    """One ``ORG/FLAKE#OUTPUT@CONSTRAINT``: that output of the releases matching."""

    org: str
    flake: str
    output: str
    constraint: Constraint

    @property
    def resource(self) -> str:
        return f"{self.org}/{self.flake}"

    def names(self, org: str, flake: str) -> bool:
        """Whether the grant is about flake ``org/flake`` (names compared ignoring case)."""
        return self.org.lower() == org.lower() and self.flake.lower() == flake.lower()

    def covers(self, org: str, flake: str, output: str, version: Version) -> bool:
        return self.names(org, flake) and self.output == output and self.constraint.matches(version)

    def __str__(self) -> str:
        return f"{self.org}/{self.flake}#{self.output}@{self.constraint}"


def parse_grant(text: str) -> Grant:
    """``ORG/FLAKE#OUTPUT[@CONSTRAINT]`` as a :class:`Grant`; ConfigError saying why not."""
    match = _GRANT.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"deploy grant {text[:300]!r}: expected ORG/FLAKE#OUTPUT[@CONSTRAINT], "
            "e.g. acme/site#nixosConfigurations.kiosk@1.*"
        )
    org, flake, output, constraint = match.groups()
    try:
        parsed = parse_constraint(constraint or "*")
    except VersionError as exc:
        raise ConfigError(f"deploy grant {text[:300]!r}: {exc}") from exc
    return Grant(org, flake, output, parsed)


def check_grants(value: object, org: str) -> list[str]:
    """The attribute value normalized (``...@*`` filled in), for a token of ``org``."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError("the deploy attribute is one or more ORG/FLAKE#OUTPUT grants")
    if len(texts) > MAX_GRANTS:
        raise ConfigError(f"a token holds at most {MAX_GRANTS} deploy grants")
    grants = [parse_grant(t) for t in texts]
    for grant in grants:
        if grant.org.lower() != org.lower():
            raise ConfigError(
                f"deploy grant {grant}: a token of {org} may only deploy flakes of {org}"
            )
    return [str(g) for g in grants]


def grants_of(identity: Identity | None) -> tuple[Grant, ...] | None:
    """The deploy grants of a deploy-only identity, or None if it is not one.

    A malformed or foreign grant is dropped (never widened): the identity stays
    deploy-only, with fewer grants.
    """
    if identity is None or identity.kind != "token":
        return None
    value = identity.attributes.get(ATTRIBUTE)
    if value is None:
        return None
    org = identity.attributes.get("org")
    texts = [value] if isinstance(value, str) else list(value)
    grants: list[Grant] = []
    for text in texts[:MAX_GRANTS]:
        try:
            grant = parse_grant(text)
        except ConfigError:
            continue
        if isinstance(org, str) and grant.org.lower() == org.lower():
            grants.append(grant)
    return tuple(grants)


def is_deploy_only(identity: Identity) -> bool:
    """One attribute lookup: whether ``identity`` is restricted to its deploy grants."""
    return identity.kind == "token" and ATTRIBUTE in identity.attributes
