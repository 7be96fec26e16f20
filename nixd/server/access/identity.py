"""Who a request is: the identity value the policy engine decides on and the audit log names.

An :class:`Identity` is what a credential proved, never the credential itself: a ``kind``
(how it was proved), a ``subject`` (who, unique within the kind) and ``attributes`` (facts
the proof established, e.g. ``org``, ``repository_id``). Policies match kinds and
attributes; access tokens carry the attributes as claims, never permissions, so a policy
change applies to tokens already issued.

Kinds:

``token``      a long-lived API credential created by ``nixd-server token create``
``user``       a person who logged in interactively
``github``     a GitHub Actions OIDC token
``gitlab``     a GitLab CI OIDC token
``aws``        an AWS principal proved through STS
``anonymous``  no credential at all (:func:`anonymous`)

An identity is rendered as ``kind:subject`` (:meth:`Identity.render`) in logs, the audit log
and API answers; it holds no secret, so rendering it is always safe.

Attribute values are a string or a list of strings (e.g. ``groups``); the mapping is copied
and frozen at construction, so an identity is a hashable value that cannot change under a
policy decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

KINDS = frozenset({"token", "user", "github", "gitlab", "aws", "anonymous"})
"""Every identity kind the server knows; the policy engine refuses subjects of other kinds."""

AttributeValue = str | list[str]


def _freeze(attributes: Mapping[str, AttributeValue]) -> Mapping[str, AttributeValue]:
    frozen: dict[str, AttributeValue] = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"identity attribute names must be non-empty strings, got {key!r}")
        if isinstance(value, str):
            frozen[key] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            frozen[key] = list(value)
        else:
            raise ValueError(
                f"identity attribute {key!r} must be a string or a list of strings, "
                f"got {type(value).__name__}"
            )
    return MappingProxyType(frozen)


@dataclass(frozen=True, slots=True)
class Identity:
    """A proven identity: ``kind`` (one of :data:`KINDS`), ``subject``, ``attributes``."""

    kind: str
    subject: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown identity kind {self.kind!r} (known: {', '.join(sorted(KINDS))})"
            )
        if not isinstance(self.subject, str) or not self.subject:
            raise ValueError(f"identity subject must be a non-empty string, got {self.subject!r}")
        object.__setattr__(self, "attributes", _freeze(self.attributes))

    def render(self) -> str:
        """``kind:subject``: the one way an identity appears in logs and answers."""
        return f"{self.kind}:{self.subject}"

    def __str__(self) -> str:
        return self.render()

    def __hash__(self) -> int:
        items = tuple(
            sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.attributes.items())
        )
        return hash((self.kind, self.subject, items))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return (
            self.kind == other.kind
            and self.subject == other.subject
            and dict(self.attributes) == dict(other.attributes)
        )

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (``kind``, ``subject``, ``attributes``), e.g. for token status."""
        return {
            "kind": self.kind,
            "subject": self.subject,
            "attributes": {
                k: list(v) if isinstance(v, list) else v for k, v in self.attributes.items()
            },
        }


_ANONYMOUS = Identity(kind="anonymous", subject="anonymous")


def anonymous() -> Identity:
    """The identity of a request that carried no credential (``anonymous:anonymous``)."""
    return _ANONYMOUS
