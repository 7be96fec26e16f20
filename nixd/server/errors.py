"""The one place that decides what a client of the cache server sees when something fails.

Handlers raise the errors below (or let a :mod:`nixd.errors` one through); :func:`into_client`
turns any exception into a status, headers and a body that is safe to show. The real cause
of an unexpected error is logged here, server-side only, under a request id the client sees.

How the real Nix client reacts (NIX-PROTOCOL.md) shaped the choices: 401/403/404 on a read
are "not present" (and remembered for an hour), other 4xx are hard errors, 5xx are retried.
"""

from __future__ import annotations

import json
import logging

from nixd.errors import AuthError, ConfigError, FormatError, NixdError, TokenExpired

log = logging.getLogger(__name__)

WWW_AUTHENTICATE = 'Basic realm="nixd", Bearer'


class ServerError(NixdError):
    """Base of errors a handler raises to answer a client; ``code`` is a stable slug."""

    code = "error"


class NotFound(ServerError):
    """Absent, or present but invisible to this caller (the two must look the same)."""

    code = "not_found"


class Unauthenticated(AuthError):
    """No usable credential on a request that needs one."""

    code = "unauthenticated"


class Forbidden(ServerError):
    """A known identity asked for something the policy does not allow (writes, admin)."""

    code = "forbidden"


class BadUpload(ServerError):
    """An upload was refused: its bytes, or its narinfo, are not what they claim."""

    code = "bad_upload"


class Conflict(ServerError):
    """An upload would replace what a slice already holds, and the caller may not."""

    code = "conflict"


class UnsupportedCompression(ServerError):
    """An upload's compression cannot be decoded here."""

    code = "unsupported_compression"


class TooLarge(ServerError):
    """An upload is bigger than ``storage.max_upload_bytes``."""

    code = "too_large"


class MethodNotAllowed(ServerError):
    code = "method_not_allowed"


def into_client(
    exc: BaseException, *, request_id: str, as_json: bool
) -> tuple[int, dict[str, str], bytes]:
    """Map ``exc`` to ``(status, headers, body)``.

    ======================== ====== ==============================================
    error                    status why
    ======================== ====== ==============================================
    NotFound                 404    invisible == absent; the body says nothing more
    Unauthenticated          401    with ``WWW-Authenticate``; Nix treats it as absent
    TokenExpired / AuthError 401    the credential was presented but is not good
    Forbidden                403    known caller, not allowed (uploads, admin)
    BadUpload, FormatError   400    a hard error for Nix; the message says what is wrong
    MethodNotAllowed         405
    Conflict                 409    the slice holds that path with other contents
    TooLarge                 413
    UnsupportedCompression   415
    anything else            500    cause logged here with the request id only
    ======================== ====== ==============================================

    ``ConfigError`` is a server fault too (500): it is never the client's to fix.
    """
    headers: dict[str, str] = {}
    if isinstance(exc, NotFound):
        status, code, message = 404, NotFound.code, "not found"
    elif isinstance(exc, Unauthenticated):
        status, code, message = 401, Unauthenticated.code, str(exc) or "authentication required"
        headers["www-authenticate"] = WWW_AUTHENTICATE
    elif isinstance(exc, TokenExpired):
        status, code, message = 401, "token_expired", str(exc) or "the access token has expired"
        headers["www-authenticate"] = WWW_AUTHENTICATE
    elif isinstance(exc, AuthError):
        status, code, message = 401, "invalid_credential", str(exc) or "credential not accepted"
        headers["www-authenticate"] = WWW_AUTHENTICATE
    elif isinstance(exc, Forbidden):
        status, code, message = 403, Forbidden.code, str(exc)
    elif isinstance(exc, BadUpload):
        status, code, message = 400, BadUpload.code, str(exc)
    elif isinstance(exc, FormatError):
        status, code, message = 400, "bad_request", str(exc)
    elif isinstance(exc, Conflict):
        status, code, message = 409, Conflict.code, str(exc)
    elif isinstance(exc, MethodNotAllowed):
        status, code, message = 405, MethodNotAllowed.code, str(exc) or "method not allowed"
    elif isinstance(exc, TooLarge):
        status, code, message = 413, TooLarge.code, str(exc)
    elif isinstance(exc, UnsupportedCompression):
        status, code, message = 415, UnsupportedCompression.code, str(exc)
    else:
        kind = "configuration error" if isinstance(exc, ConfigError) else "internal error"
        log.error("request %s failed: %s", request_id, kind, exc_info=exc)
        status, code, message = 500, "internal", f"{kind} (request {request_id})"
    if as_json:
        headers["content-type"] = "application/json"
        body = json.dumps({"error": code, "message": message}).encode()
    else:
        headers["content-type"] = "text/plain; charset=utf-8"
        body = f"{message}\n".encode()
    return status, headers, body
