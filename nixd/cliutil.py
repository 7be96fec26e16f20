"""What the ``nixd`` and ``nixd-server`` entry points share: logging and running a command.

**Logging.** A command's output is for people and scripts, so by default only warnings
and errors are logged (as ``prog: LEVEL: message`` on stderr), and a library's own lines
(httpx's ``INFO: HTTP Request: ...``, one per poll of an interactive login) never appear:
``nixd status --json 2>&1 | jq`` works. ``-v`` shows nixd's and the libraries' INFO lines,
``-vv`` everything. A program that runs as a service (``nixd-server``) passes
``own_level=INFO`` so its own INFO lines stay, libraries still quiet; the daemon sets up
its own handlers (journald) once started.

**Errors.** Errors nixd raises on purpose, and OS errors, become one line on stderr and
the exit code of :func:`nixd.exitcodes.for_exception`, never a traceback; Ctrl-C is 130.
A command run with ``--json`` gets the error as a JSON document on stdout instead, so a
script reading stdout always reads JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from nixd import exitcodes
from nixd.errors import NixdError

QUIET_LIBRARIES = ("httpx", "httpcore", "watchfiles", "botocore", "urllib3")
"""Loggers kept at WARNING unless -v, even under a service that logs its own INFO lines."""


def configure_logging(verbosity: int, *, log_format: str, own_level: int = logging.WARNING) -> None:
    """Set up stderr logging for a command: see the module docstring for the levels."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(log_format))
    root.addHandler(handler)
    if verbosity >= 2:
        root.setLevel(logging.DEBUG)
        levels = dict.fromkeys((*QUIET_LIBRARIES, "nixd"), logging.NOTSET)
    elif verbosity == 1:
        root.setLevel(logging.INFO)
        levels = dict.fromkeys((*QUIET_LIBRARIES, "nixd"), logging.NOTSET)
    else:
        root.setLevel(logging.WARNING)
        levels = dict.fromkeys(QUIET_LIBRARIES, logging.WARNING)
        levels["nixd"] = own_level
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def error_json(code: int, message: str) -> str:
    """The ``--json`` form of an error (one line)."""
    kind = exitcodes.NAMES.get(code, "failure")
    return json.dumps({"error": {"code": code, "kind": kind, "message": message}})


def run_command(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    log_format: str,
    own_level: int = logging.WARNING,
) -> int:
    """Parse ``argv`` and call the chosen command's ``func``; return the exit code."""
    args = parser.parse_args(argv)
    configure_logging(int(args.verbose), log_format=log_format, own_level=own_level)
    try:
        code: int = args.func(args)
    except (NixdError, OSError) as exc:
        code = exitcodes.for_exception(exc)
        if getattr(args, "json", False):
            print(error_json(code, str(exc)))
        else:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    return code
