"""What Nix sees when something goes wrong: the one place that maps outcomes to statuses.

Internal code raises :mod:`nixd.errors` classes (or :class:`NotFound` /
:class:`BadRequest` from here); the HTTP front calls :func:`status_for` once per failed
request. Nothing else in the proxy picks an error status.
"""

from __future__ import annotations

import logging

from nixd.errors import AuthError, IntegrityError, NixdError, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)


class NotFound(NixdError):
    """No upstream has the file (each answered 404/410, or only with an untrusted narinfo)."""


class BadRequest(NixdError):
    """The request itself is malformed (a path the binary cache protocol does not have)."""


def status_for(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and a short body for ``exc``, as Nix 2.8 will read them.

    How Nix treats statuses (NIX-PROTOCOL.md) and therefore what we answer:

    ==================================  ======  ============================================
    outcome                             status  why
    ==================================  ======  ============================================
    every upstream said 404/410, or     404     Nix: "not present", cached as absent for
    only untrusted narinfos exist               ``narinfo-cache-negative-ttl`` (1 h); it
                                                falls back to building or other caches
    request path not in the protocol    400     not retried
    upstream token expired/rejected     503     transient, retried with backoff. Never
    (AuthError), upstream 401/403               401/403/404: Nix would remember the path as
                                                absent for an hour
    upstream timeout (UpstreamTimeout)  503     transient, retried
    upstream unreachable, reset, 5xx    503     transient, retried
    malformed or oversized answer       503     transient: an upstream fault (a narinfo
    (UpstreamError): narinfo that does          that does not parse is not a signed
    not parse, bad response head, a             statement that the path is absent); a
    redirect to another origin, a               verified answer from another upstream
    narinfo URL refused by foreign_urls         still wins
    NAR bytes do not match the signed   502     transient (Nix retries); the bytes already
    narinfo, or a body larger than its          sent are cut off so the transfer fails
    narinfo promised (IntegrityError)
    anything unexpected                 500     transient; logged with a traceback; the
                                                request ends, the proxy keeps serving
    ==================================  ======  ============================================

    The missing local secret is answered 401 by the front directly: that caller is a
    local user without access, and Nix caching "absent" for them is the intended result.
    """
    if isinstance(exc, NotFound):
        return 404, "not found\n"
    if isinstance(exc, BadRequest):
        return 400, f"bad request: {exc}\n"
    if isinstance(exc, AuthError):
        return 503, "upstream authentication unavailable, retry later\n"
    if isinstance(exc, UpstreamTimeout):
        return 503, "upstream timed out\n"
    if isinstance(exc, IntegrityError):
        return 502, "upstream sent data that failed verification\n"
    if isinstance(exc, UpstreamError):
        return 503, "upstream unavailable\n"
    log.error("unexpected error in the proxy", exc_info=exc)
    return 500, "internal error\n"
