"""The errors of the HTTP layer: a refused request and a malformed response.

:class:`BadRequest` carries the status the front answers before it closes the
connection; :class:`BadResponse` is an :class:`~nixd.errors.UpstreamError`, so a client
that gets one from the response-head parser reports a transient upstream failure
without translating it.
"""

from __future__ import annotations

from nixd.errors import NixdError, UpstreamError


class BadRequest(NixdError):
    """A request head that is refused; ``status`` is the answer before closing."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BadResponse(UpstreamError):
    """A response head from a peer that does not parse, or is ambiguous, or too large."""


class BodyTooLarge(BadResponse):
    """A response announced (``Content-Length``) or sent a body above the caller's bound."""


class ResponseStateError(RuntimeError):
    """A handler used its :class:`~nixd.http.serve.Responder` out of order (a bug)."""
