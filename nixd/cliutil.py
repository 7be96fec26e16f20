"""What the ``nixd`` and ``nixd-server`` entry points share: run a parsed command.

Errors that nixd raises on purpose, and OS errors, become one line on stderr and exit
code 1, never a traceback; Ctrl-C is exit code 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from nixd.errors import NixdError


def run_command(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, log_format: str
) -> int:
    """Parse ``argv`` and call the chosen command's ``func``; return the exit code."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=log_format)
    try:
        code: int = args.func(args)
    except (NixdError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
