"""Login methods: how the daemon proves the machine's identity, again and again.

A :class:`LoginMethod` holds whatever a login produced that lets the daemon obtain a
*fresh* exchange body for ``POST /api/v1/token/exchange`` without the user: an API token
(``token``), the GitHub Actions ID-token request URL and its bearer (``github-action``), a
GitLab job's ID token (``gitlab-pipeline``), the AWS credential chain's settings (``aws``)
or a rotating refresh credential (``device``). The daemon calls
:meth:`LoginMethod.exchange_body` at login and at every renewal, so each method decides
what "renewing" means: re-sending the same secret, fetching a new ID token, re-signing an
STS request.

Methods live in a registry keyed by name. The daemon builds one from the ``params`` of a
``POST /login`` (:func:`from_params`) and from ``state.json`` after a restart
(:func:`from_state`); :meth:`LoginMethod.to_state` is what gets persisted (0600; it may
hold secrets, ``repr`` must not show them). A new method registers itself with
:func:`register`; :func:`load_builtin_methods` imports the built-in ones.

Some credentials cannot be renewed forever (a GitLab ID token has an ``exp``):
:attr:`LoginMethod.renewable_until` says until when, and :func:`expiry_warning` phrases
the warning that ``nixd status`` and the log show before that moment.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx
import trio

from nixd.errors import LoginFailed

#: warn this many seconds before a credential that cannot be renewed expires
WARN_BEFORE = 600.0

BUILTIN_MODULES = (
    "nixd.auth.token",
    "nixd.auth.github_action",
    "nixd.auth.gitlab_pipeline",
    "nixd.auth.aws",
    "nixd.auth.device",
)


@runtime_checkable
class LoginMethod(Protocol):
    """One way of obtaining exchange bodies; see the module docstring."""

    name: str

    def describe(self) -> str:
        """How the access token is renewed, for ``nixd status`` (never a secret)."""
        ...

    async def exchange_body(self, client: httpx.AsyncClient) -> dict[str, Any]:
        """A fresh body for ``POST /api/v1/token/exchange``.

        Raises :class:`~nixd.errors.LoginFailed` when the method can no longer produce
        one (retrying won't help), :class:`~nixd.errors.UpstreamError` or
        :class:`~nixd.errors.AuthError` for failures worth retrying.
        """
        ...

    def accept(self, answer: Mapping[str, Any]) -> bool:
        """Look at the server's exchange answer (e.g. a rotated refresh credential).

        Returns True when the method's state changed and must be persisted.
        """
        ...

    @property
    def renewable_until(self) -> float | None:
        """Unix time after which no exchange body can be produced; None = no limit."""
        ...

    def to_state(self) -> dict[str, Any]:
        """JSON-able state to persist (0600), read back by the class's ``from_state``."""
        ...


class MethodFactory(Protocol):
    """What the registry holds: a class (or factory) building a :class:`LoginMethod`."""

    name: str

    def from_params(self, params: Mapping[str, Any], server_url: str) -> LoginMethod:
        """Build from ``POST /login`` params; raise LoginFailed for bad params."""
        ...

    def from_state(self, data: Mapping[str, Any]) -> LoginMethod:
        """Build from :meth:`LoginMethod.to_state`; raise ValueError/KeyError if damaged."""
        ...


_REGISTRY: dict[str, MethodFactory] = {}


def register(factory: MethodFactory) -> MethodFactory:
    """Make a login method known by its ``name``; usable as a class decorator."""
    _REGISTRY[factory.name] = factory
    return factory


def load_builtin_methods() -> None:
    """Import the built-in methods so they register (a missing optional one is skipped)."""
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def names() -> list[str]:
    load_builtin_methods()
    return sorted(_REGISTRY)


def factory(name: str) -> MethodFactory:
    load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise LoginFailed(f"unknown login method {name!r} (known: {known})") from None


def from_params(name: str, params: Mapping[str, Any], server_url: str) -> LoginMethod:
    """The method ``name`` built from a login request's ``params``."""
    return factory(name).from_params(params, server_url)


def from_state(name: str, data: Mapping[str, Any]) -> LoginMethod:
    """The method ``name`` built from its persisted state."""
    return factory(name).from_state(data)


def param(params: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    """A string parameter of a login request, or LoginFailed saying which one is wrong."""
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise LoginFailed(f"login parameter {key!r} is missing")
        return None
    if not isinstance(value, str):
        raise LoginFailed(f"login parameter {key!r} must be a string")
    return value


def default_audience(server_url: str) -> str:
    """The audience asked for when none is given: the server's URL (``scheme://host[:port]``).

    The server's ``[[github]]``/``[[aws]]`` ``audience`` must be set to the same value (or
    ``--audience`` given), e.g. ``https://cache.example.com``.
    """
    parts = urlsplit(server_url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else server_url


def expiry_warning(method: LoginMethod, now: float | None = None) -> str | None:
    """A warning when ``method``'s credential expires within :data:`WARN_BEFORE` (or has)."""
    until = method.renewable_until
    if until is None:
        return None
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(until))
    if now >= until:
        return (
            f"the {method.name} credential expired at {stamp}; the access token cannot be "
            f"renewed: run `nixd login {method.name}` again with a new one"
        )
    if now >= until - WARN_BEFORE:
        return (
            f"the {method.name} credential expires at {stamp} (in {until - now:.0f}s) and "
            "cannot be renewed; access stops when the current access token expires after "
            f"that: run `nixd login {method.name}` again with a new one"
        )
    return None


class SimpleMethod:
    """Defaults for methods without rotating state or an expiry."""

    name = ""

    def accept(self, answer: Mapping[str, Any]) -> bool:
        return False

    @property
    def renewable_until(self) -> float | None:
        return None

    def __repr__(self) -> str:
        return f"<login method {self.name}>"


#: identity kinds whose display form is built from attributes: the repository attribute
RENDERED_KINDS = {"github": "repository", "gitlab": "project_path"}


def render_identity(status: Mapping[str, Any]) -> str | None:
    """A readable identity from ``GET /api/v1/token/status``: ``github:owner/repo@ref``.

    GitHub and GitLab subjects are long claim strings; their attributes say the same more
    readably. Other kinds render as ``kind:subject`` (``aws:arn:...``, ``user:alice``).
    None when the answer lacks a kind or subject.
    """
    kind, subject = status.get("kind"), status.get("subject")
    attrs = status.get("attributes")
    attrs = attrs if isinstance(attrs, Mapping) else {}
    if not isinstance(kind, str) or not isinstance(subject, str):
        return None
    repo_key = RENDERED_KINDS.get(kind)
    if repo_key and isinstance(attrs.get(repo_key), str):
        ref = attrs.get("ref")
        return f"{kind}:{attrs[repo_key]}" + (f"@{ref}" if isinstance(ref, str) and ref else "")
    return f"{kind}:{subject}"


async def warn_before_expiry(
    method: LoginMethod,
    warn: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.time,
    max_sleep: float = 60.0,
) -> None:
    """Call ``warn`` :data:`WARN_BEFORE` before ``method`` stops renewing, and at that time.

    Sleeps in steps of at most ``max_sleep`` on the wall ``clock`` (a suspended machine
    notices on resume); returns after the second warning, at once for methods without
    an expiry.
    """
    until = method.renewable_until
    if until is None:
        return
    for moment in (until - WARN_BEFORE, until):
        while (remaining := moment - clock()) > 0:  # noqa: ASYNC110 - a wall clock
            await trio.sleep(min(remaining, max_sleep))
        if message := expiry_warning(method, clock()):
            warn(message)
