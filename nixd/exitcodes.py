"""The exit codes of ``nixd``, defined once: scripts branch on them, so each means one thing.

==== ================ ===========================================================
code name             when
==== ================ ===========================================================
0    OK               the command did what was asked
1    FAILURE          any other error (a config error, a file that cannot be read)
2    USAGE            the command line is wrong (argparse's own code)
3    NOT_LOGGED_IN    no login, or the token expired (``nixd status`` says which)
4    DENIED           refused: not root or the control group, or the server/browser
                      denied the login
5    VERIFICATION     data failed verification: a hash or signature does not match
                      what was signed, or a NAR being unpacked fails its strict checks
                      (tampered or truncated)
6    UNREACHABLE      the daemon, the cache server or an upstream could not be reached
                      or did not answer in time
130  INTERRUPTED      Ctrl-C
141  BROKEN_PIPE      the reader of stdout went away (``| head``), as SIGPIPE would
==== ================ ===========================================================

:func:`for_exception` is the one mapping from an error to its code; the CLI calls it for
every error it turns into a one-line message, so a new error class gets its code here or
falls to ``FAILURE``, never to a traceback. It looks at classes by module only when that
module is already imported, so mapping an error never imports httpx (start-up time).
"""

from __future__ import annotations

import sys

from nixd.errors import AuthError, IntegrityError, LoginFailed, UpstreamError

OK = 0
FAILURE = 1
USAGE = 2
NOT_LOGGED_IN = 3
DENIED = 4
VERIFICATION = 5
UNREACHABLE = 6
INTERRUPTED = 130
BROKEN_PIPE = 141

TABLE: tuple[tuple[int, str, str], ...] = (
    (OK, "ok", "success"),
    (FAILURE, "failure", "any other error"),
    (USAGE, "usage", "the command line is wrong"),
    (NOT_LOGGED_IN, "not-logged-in", "not logged in, or the token expired"),
    (DENIED, "denied", "refused: not root/the control group, or the login was denied"),
    (VERIFICATION, "verification", "a hash or signature did not match, or a NAR is corrupt"),
    (UNREACHABLE, "unreachable", "the daemon, the server or an upstream could not be reached"),
    (INTERRUPTED, "interrupted", "Ctrl-C"),
    (BROKEN_PIPE, "broken-pipe", "the reader of stdout went away"),
)
"""(code, name, meaning) of every exit code, for ``--help``, the man page and README."""

NAMES = {code: name for code, name, _ in TABLE}

_REFUSED_STATUS = {
    401: NOT_LOGGED_IN,
    403: DENIED,
    502: UNREACHABLE,
    503: UNREACHABLE,  # the daemon is too busy to take the request
    504: UNREACHABLE,
}
"""HTTP status of a control-socket error answer → exit code (see nixd.daemon.control)."""


def epilog() -> str:
    """The exit-code table as ``nixd --help`` shows it."""
    lines = ["exit codes:"]
    lines.extend(f"  {code:<4} {meaning}" for code, _, meaning in TABLE)
    return "\n".join(lines)


def for_exception(exc: BaseException) -> int:
    """The exit code for an error the CLI reports as one line."""
    client = sys.modules.get("nixd.daemon.client")
    if client is not None:
        if isinstance(exc, client.DaemonUnreachable):
            return UNREACHABLE
        if isinstance(exc, client.DaemonRefused):
            return _REFUSED_STATUS.get(exc.status, FAILURE)
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        return UNREACHABLE
    if isinstance(exc, IntegrityError):
        return VERIFICATION
    if isinstance(exc, UpstreamError):
        return UNREACHABLE
    if isinstance(exc, LoginFailed):
        return DENIED
    if isinstance(exc, AuthError):
        return NOT_LOGGED_IN
    if isinstance(exc, PermissionError):
        return DENIED
    if isinstance(exc, ConnectionError | TimeoutError):
        return UNREACHABLE
    return FAILURE
