"""The ``nixd`` command line: parse, call, print.

Each command group lives in its own module under :mod:`nixd.commands` with a
``register(subparsers)`` function that adds its parser and sets ``func``. A ``func`` takes
the parsed arguments and returns the exit code. Errors that nixd raises on purpose are
printed as one line on stderr, never as a traceback (:mod:`nixd.cliutil`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nixd import __version__
from nixd.cliutil import run_command

COMMAND_MODULES = ("nar", "key", "daemon", "login", "status", "push")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nixd",
        description=(
            "nixd makes a private, identity-aware Nix binary cache just work on this machine: "
            "log in with the identity you have, and a local verifying proxy substituter "
            "serves `nix` with short-lived tokens kept fresh by the daemon."
        ),
    )
    parser.add_argument("--version", action="version", version=f"nixd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"nixd.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, log_format="nixd: %(levelname)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
