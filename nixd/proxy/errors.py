"""What Nix sees when something goes wrong: the one place that maps outcomes to statuses.

Internal code raises :mod:`nixd.errors` classes (or :class:`NotFound` /
:class:`BadRequest` / :class:`UpstreamUnreachable` from here); the HTTP front calls
:func:`status_for` once per failed request. Nothing else in the proxy picks an error
status.

How Nix 2.8 reads a status decides everything here (its ``filetransfer.cc``,
``http-binary-cache-store.cc``, ``store-api.cc``, ``substitution-goal.cc``; each line below
was also seen with the Nix 2.8 of the test machine, a trivial derivation built with the
proxy as its only substituter):

- 404/410 (and 401/403/407) on a narinfo: "not there"; Nix builds at once, or asks the
  next substituter, and writes a negative entry into its narinfo cache
  (``binary-cache-v6.sqlite``, table ``NARs``, ``present = 0``) that it trusts for
  ``narinfo-cache-negative-ttl`` (3600 s by default).
- 408, 429 and every 5xx but 501/505/511: transient: retried 5 times (250 ms doubling,
  ~4.5 s), then an error. Other 4xx, 501, 505, 511: an error at once. Neither is written
  to the narinfo cache, but an error on a narinfo fails the build: "unable to download
  ...: HTTP error 503" after ~4.5 s, or "HTTP error 418" at once (what magic-nix-cache
  answers when its GitHub cache fails, after writing ``fallback = true`` into nix.conf).
  With ``--fallback`` it is worse on 2.8: the error disables the substituter for 60 s
  (``maybeDisable``), and the next lookup in that process throws ``SubstituterDisabled``
  out of a ``noexcept`` function: ``nix-build`` aborts ("terminate called after throwing
  an instance of 'nix::SubstituterDisabled'"). So no error status lets a build go on.
- 404 on a NAR whose narinfo Nix already has: ``SubstituteGone``, "as if the substitute
  never existed": Nix builds (no ``--fallback`` needed) and remembers nothing, since NARs
  are not in its cache.

Hence, for an upstream that cannot be reached, 404 (:class:`UpstreamUnreachable`): the
only answer that lets Nix build, or fetch from another substituter, at once. The proxy
itself does not remember it as a miss (its negative cache holds only real 404s), and
nixd's Nix configuration sets ``narinfo-cache-negative-ttl = 0`` so that Nix does not
either: the proxy answers real misses from its own negative cache in microseconds, so
Nix's hour-long one buys nothing and would hide paths that appear upstream once it is
back. Everything that may pass in seconds (a token being renewed, an upstream that
answers 5xx, a timeout of an upstream that is reachable, a reset) stays 503, which
Nix retries.
"""

from __future__ import annotations

import logging

from nixd.errors import AuthError, IntegrityError, NixdError, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)


class NotFound(NixdError):
    """No upstream has the file (each answered 404/410, or only with an untrusted narinfo)."""


class UpstreamUnreachable(UpstreamError):
    """An upstream cannot be reached: connect refused or timed out, its name does not
    resolve, or it is offline after repeated failures (see :mod:`nixd.proxy.upstream`)."""


def worst_error(errors: list[Exception]) -> Exception:
    """The failure to answer with when several upstreams failed one request: any other
    error before :class:`UpstreamUnreachable`, so that an upstream that is merely offline
    never turns another's transient failure into a 404."""
    return min(errors, key=lambda e: isinstance(e, UpstreamUnreachable))


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
    upstream unreachable: connect       404     Nix builds or asks the next substituter
    refused or timed out, name does             at once (an error would fail the build,
    not resolve, offline after                  see the module doc); not kept in the
    repeated failures                           proxy's negative cache; Nix's is off
    (UpstreamUnreachable)                       (``narinfo-cache-negative-ttl = 0``)
    upstream timeout (UpstreamTimeout)  503     transient, retried (and counted towards
                                                the upstream being offline)
    upstream reset, 5xx                 503     transient, retried
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
    if isinstance(exc, UpstreamUnreachable):
        return 404, f"upstream unreachable, not remembered as absent: {exc}\n"
    if isinstance(exc, UpstreamTimeout):
        return 503, "upstream timed out\n"
    if isinstance(exc, IntegrityError):
        return 502, "upstream sent data that failed verification\n"
    if isinstance(exc, UpstreamError):
        return 503, "upstream unavailable\n"
    log.error("unexpected error in the proxy", exc_info=exc)
    return 500, "internal error\n"
