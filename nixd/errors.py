"""The one exception tree of nixd.

Every error nixd raises on purpose is a ``NixdError``; errors of dependencies (httpx,
PyJWT, botocore, OSError) are translated at the boundary with ``raise ... from exc``::

    NixdError
    ├── ConfigError          a config file or option is wrong (says file:key)
    ├── FormatError          bad Nix data: narinfo, NAR, key, store path, netrc (says where)
    ├── AuthError            identity could not be established or used
    │   ├── TokenExpired     the access token is past its expiry
    │   └── LoginFailed      a login flow ended without a token
    └── UpstreamError        a cache upstream failed us
        ├── UpstreamTimeout  it did not answer in time
        └── IntegrityError   it sent bytes that do not match what was signed
"""

from __future__ import annotations


class NixdError(Exception):
    """Base of every error nixd raises on purpose."""


class ConfigError(NixdError):
    """A configuration file or option is invalid."""


class FormatError(NixdError, ValueError):
    """Nix data (narinfo, NAR, key, store path, netrc, ...) is malformed.

    ``where`` says where: a line number, a byte offset, a path inside an archive.
    """

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class AuthError(NixdError):
    """An identity could not be established or used."""


class TokenExpired(AuthError):
    """The access token is past its expiry."""


class LoginFailed(AuthError):
    """A login flow ended without a token."""


class UpstreamError(NixdError):
    """A cache upstream failed."""


class UpstreamTimeout(UpstreamError):
    """A cache upstream did not answer in time."""


class IntegrityError(UpstreamError):
    """Bytes from an upstream do not match what was signed or announced."""
