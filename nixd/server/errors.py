"""The one place that decides what a client of the cache server sees when something fails.

Every error a handler raises to answer a client is a :class:`ServerError` and carries its
answer: ``status`` (HTTP) and ``code`` (a stable slug for JSON bodies and the audit log),
as attic's ``ServerError`` does. :func:`into_client` reads them and turns any exception into
a status, headers and a body that is safe to show; for a 5xx the real cause is logged here,
server-side only, under a request id the client sees. The tree (``tests/server/
test_errors.py`` walks every exception class of the server and checks it is named here,
with the status it really gets)::

    ServerError                         500 internal             a 5xx shows the request id only
    ├── BadRequest                      400 invalid_request      a body or parameter is malformed
    │   └── BadUpload                   400 bad_upload           an upload's bytes or narinfo lie
    ├── Unauthenticated                 401 unauthenticated      no credential; WWW-Authenticate
    ├── CredentialRejected              401 invalid_credential   an API token (access.credentials)
    │   ├── MalformedCredential         401 malformed_credential
    │   ├── UnknownCredential           401 unknown_credential
    │   ├── RevokedCredential           401 revoked_credential
    │   └── ExpiredCredential           401 expired_credential
    ├── InvalidAccessToken              401 invalid_token        an access token (access.tokens)
    ├── AccessTokenExpired              401 token_expired        past exp + leeway (access.tokens)
    ├── ExchangeRejected                401 rejected             (login.exchange) per instance:
    │                                                            401, 403 or 502, its own code
    ├── RefreshRejected                 401 invalid_grant        a refresh credential (login.device)
    ├── SignInRejected                  401 invalid_sign_in      name/password (login.accounts)
    ├── Forbidden                       403 forbidden            known caller, not allowed
    ├── NotFound                        404 not_found            absent or invisible: same answer
    │   └── NoRelease                   404 not_found            a flake the caller may read has
    │                                                            no release matching (says which)
    ├── CredentialNotFound              404 credential_not_found an admin named no such credential
    ├── MethodNotAllowed                405 method_not_allowed
    ├── Conflict                        409 conflict             the slice holds the path otherwise
    ├── TooLarge                        413 too_large            an upload past the limit
    ├── UnsupportedCompression          415 unsupported_compression
    ├── Throttled                       429 too_many_requests    with Retry-After (sign-in, codes)
    ├── AuditError                      503 audit_unavailable    no line, no answer (access.audit)
    ├── StorageUnavailable              503 storage_unavailable  the blob store (a bucket) does not
    │                                                            answer, denies or is missing;
    │                                                            nothing partial is kept, Nix
    │                                                            retries (operational)
    ├── UpstreamUnavailable             503 upstream_unavailable pull-through: the upstream cache
    │                                                            is slow or down; never a 404,
    │                                                            which Nix would remember
    └── StorageFull                     507 insufficient_storage the disk (or quota) is full: the
                                                                 upload is dropped, Nix retries;
                                                                 the message is shown (operational)

Errors that are not ServerErrors are answered by their :mod:`nixd.errors` base (the
classes in the rooms the server's HTTP layer does not own, and dependencies' errors after
translation)::

    FormatError                         400 bad_request          bad Nix data from the client
    TokenExpired                        401 token_expired
    AuthError                           401 invalid_credential
    ConfigError                         500 configuration_error  never the client's to fix
    StoreError                          500 internal             (storage.store) opening the store
    DatabaseError                       500 internal             (storage.db) the database failed
    sqlite3.OperationalError            503 database_unavailable the metadata database is out of
                                                                 reach or locked past its timeout
                                                                 (either engine: storage.sql)
    PathConflict                        500 internal             (storage.store) the app answers
                                                                 it as Conflict before it gets here
    MetadataError                       400 bad_request          (flakes.metadata) a publish's
                                                                 metadata JSON, naming the field
    FlakeStoreError                     500 internal             (flakes.releases)
    VersionTaken                        500 internal             (flakes.releases) the app answers
                                                                 it as Conflict before it gets here
    UpstreamError                       500 internal             (mirror.upstream) an upstream
    Absent                              500 internal             gave no verified path; pull-
    Refused                             500 internal             through answers them as 404, or
    Unavailable                         500 internal             as UpstreamUnavailable (503)
    BlobMissing                         500 internal             (storage.blobs) a stored NAR's
                                                                 blob is gone; a download answers
                                                                 it as NotFound (logged as an error)
    anything else                       500 internal

How the real Nix client reacts (NIX-PROTOCOL.md) shaped the choices: 401/403/404 on a read
are "not present" (and remembered for an hour), other 4xx are hard errors, 5xx are retried.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3

from nixd.errors import AuthError, ConfigError, FormatError, NixdError, TokenExpired

log = logging.getLogger(__name__)

WWW_AUTHENTICATE = 'Basic realm="nixd", Bearer'


class ServerError(NixdError):
    """Base of errors a handler raises to answer a client: its status and code go with it.

    ``status`` and ``code`` are class attributes that a subclass (or, where one class has
    several answers, an instance) sets. For a 4xx, ``str(exc)`` is shown to the client;
    a subclass whose message could tell more than the caller may know sets ``detail``,
    the fixed text shown instead. A 5xx never shows its message, unless the class is
    ``operational``: a condition of the server's surroundings (a full disk) rather than a
    fault, whose message says what to fix and holds nothing of anyone's; it is shown, and
    logged as one WARNING line without a traceback (a traceback would say "bug").
    """

    status: int = 500
    code: str = "internal"
    detail: str | None = None
    operational: bool = False

    def headers(self) -> dict[str, str]:
        """Headers the answer needs besides the body's (``Retry-After`` …)."""
        return {}


class BadRequest(ServerError):
    """A request body or parameter is malformed: deep or invalid JSON, too big, wrong types.

    Token endpoints answer a malformed request 400 ``invalid_request`` (RFC 6749 §5.2), also
    when the body is too big: nothing a client must send there is near the limit.
    """

    status = 400
    code = "invalid_request"


class BadUpload(BadRequest):
    """An upload was refused: its bytes, or its narinfo, are not what they claim."""

    code = "bad_upload"


class Unauthenticated(ServerError, AuthError):
    """No usable credential on a request that needs one."""

    status = 401
    code = "unauthenticated"


class Forbidden(ServerError):
    """A known identity asked for something the policy does not allow (writes, admin)."""

    status = 403
    code = "forbidden"


class NotFound(ServerError):
    """Absent, or present but invisible to this caller (the two must look the same)."""

    status = 404
    code = "not_found"
    detail: str | None = "not found"


class NoRelease(NotFound):
    """A flake the caller may read has no release of that version or matching that
    constraint. Only ever raised after the read was allowed, so its message (which names
    the flake and what was asked) tells the caller nothing it may not know."""

    detail = None


class MethodNotAllowed(ServerError):
    """The URL exists but does not take this method."""

    status = 405
    code = "method_not_allowed"


class Conflict(ServerError):
    """An upload would replace what a slice already holds, and the caller may not."""

    status = 409
    code = "conflict"


class TooLarge(ServerError):
    """An upload is bigger than ``storage.max_upload_bytes``."""

    status = 413
    code = "too_large"


class UnsupportedCompression(ServerError):
    """An upload's compression cannot be decoded here."""

    status = 415
    code = "unsupported_compression"


class Throttled(ServerError):
    """Too many attempts (sign-in, user-code guesses) or too much anonymous state.

    ``retry_after`` is how many seconds until the caller may try again; it is sent as
    ``Retry-After`` (whole seconds, at least 1).
    """

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str = "too many requests", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def retry_after_seconds(self) -> int:
        """``retry_after`` as the header says it: whole seconds, rounded up, at least 1."""
        if not math.isfinite(self.retry_after):
            return 86400
        return max(1, math.ceil(self.retry_after))

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_seconds)}


class StorageFull(ServerError):
    """The server's disk or quota is full (ENOSPC, EDQUOT) while it stores an upload.

    The upload's temp file is removed and nothing is recorded; 507 is a 5xx, which Nix
    retries, and the answer names the cause instead of looking like a fault of the bytes.
    """

    status = 507
    code = "insufficient_storage"
    operational = True


class StorageUnavailable(ServerError):
    """The blob storage does not answer, refuses the server's credentials, or its bucket is
    missing (:mod:`nixd.server.storage.s3`).

    Like :class:`StorageFull` it is the surroundings, not a fault: the message names the
    store and the cause (never a credential), is shown to the client and logged as one
    WARNING. 503 is a 5xx, which Nix retries; an upload it cuts off leaves nothing stored.
    """

    status = 503
    code = "storage_unavailable"
    operational = True


class UpstreamUnavailable(ServerError):
    """A pull-through read (:mod:`nixd.server.mirror`) found no answer because an upstream
    cache did not answer in time, or answered 5xx.

    503, not 404: Nix remembers a 404 for an hour (``narinfo-cache-negative-ttl``) and
    retries a 5xx, and the path may well be there once the upstream is back. The message
    names the upstream (configured by the admin; nothing secret) and is shown.
    """

    status = 503
    code = "upstream_unavailable"
    operational = True


_FOREIGN: tuple[tuple[type[BaseException], int, str], ...] = (
    (FormatError, 400, "bad_request"),
    (TokenExpired, 401, "token_expired"),
    (AuthError, 401, "invalid_credential"),
    (ConfigError, 500, "configuration_error"),
    (sqlite3.OperationalError, 503, "database_unavailable"),
)


def answer_of(exc: BaseException) -> tuple[int, str]:
    """``(status, code)`` of ``exc``: its own, or its :mod:`nixd.errors` base's (the tree)."""
    if isinstance(exc, ServerError):
        return exc.status, exc.code
    for kind, status, code in _FOREIGN:
        if isinstance(exc, kind):
            return status, getattr(exc, "code", code) if status < 500 else code
    return 500, "internal"


def into_client(
    exc: BaseException, *, request_id: str, as_json: bool
) -> tuple[int, dict[str, str], bytes]:
    """Map ``exc`` to ``(status, headers, body)`` (the tree in the module docstring).

    A 401 carries ``WWW-Authenticate``, so a client knows to log in; a 5xx says only what
    kind of fault it was and the request id, and the cause is logged here (an
    ``operational`` one says its message, logged as a WARNING).
    """
    status, code = answer_of(exc)
    headers = exc.headers() if isinstance(exc, ServerError) else {}
    if status == 401:
        headers["www-authenticate"] = WWW_AUTHENTICATE
    if status >= 500 and isinstance(exc, ServerError) and exc.operational:
        message = f"{str(exc) or code.replace('_', ' ')} (request {request_id})"
        log.warning("request %s failed: %s", request_id, message)
    elif status >= 500:
        kind = "configuration error" if isinstance(exc, ConfigError) else "internal error"
        if (isinstance(exc, ServerError) or status == 503) and status != 500:
            kind = code.replace("_", " ")
        log.error("request %s failed: %s", request_id, kind, exc_info=exc)
        message = f"{kind} (request {request_id})"
    else:
        detail = exc.detail if isinstance(exc, ServerError) else None
        message = detail or str(exc) or code.replace("_", " ")
    if as_json:
        headers["content-type"] = "application/json"
        body = json.dumps({"error": code, "message": message}).encode()
    else:
        headers["content-type"] = "text/plain; charset=utf-8"
        body = f"{message}\n".encode()
    return status, headers, body
