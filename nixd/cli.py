"""The ``nixd`` command line: parse, call, print.

Each command group lives in its own module under :mod:`nixd.commands` with a
``register(subparsers)`` function that adds its parsers and sets ``func``; a ``func`` takes
the parsed arguments and returns the exit code (:mod:`nixd.exitcodes`). Errors that nixd
raises on purpose are printed as one line on stderr, never as a traceback
(:mod:`nixd.cliutil`).

**Registering a command** is one line in :data:`COMMANDS`: the command's name and the
module under :mod:`nixd.commands` whose ``register`` adds it (one module may add several,
as ``login`` adds ``login`` and ``logout``).

**Start-up time.** Only the module of the command being run is imported: ``nixd
--version`` imports no command at all, ``nixd nar hash`` neither httpx nor trio. Every
module is imported only when the whole tree is needed: ``nixd --help``, an unknown
command (so argparse can list the choices), ``nixd completion`` and ``nixd man``.
Command modules import their heavy dependencies inside the functions that need them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence

from nixd import __version__, exitcodes
from nixd.cliutil import run_command

COMMANDS: dict[str, str] = {
    "login": "login",
    "logout": "login",
    "status": "status",
    "version": "status",
    "daemon": "daemon",
    "nar": "nar",
    "key": "key",
    "push": "push",
    "watch-store": "push",
    "post-build-hook": "push",
    "publish": "publish",
    "flake": "flake",
    "completion": "completion",
    "man": "completion",
}
"""Command name → module under :mod:`nixd.commands` that registers it (in --help order)."""

DESCRIPTION = (
    "nixd makes a private, identity-aware Nix binary cache just work on this machine: "
    "log in with the identity you have, and a local verifying proxy substituter "
    "serves `nix` with short-lived tokens kept fresh by the daemon."
)

EPILOG = f"""\
Every command that prints data takes --json: one JSON document on stdout, and on an
error {{"error": {{"code": N, "kind": "...", "message": "..."}}}} on stdout instead of a
line on stderr. Library log lines appear only with -v (-vv: debug).

{exitcodes.epilog()}
"""

GLOBAL_FLAGS = frozenset({"-v", "--verbose", "-vv", "-vvv"})


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the given commands registered (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="nixd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nixd {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log what nixd and its libraries do (-vv: debug messages)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = COMMANDS.keys() if commands is None else set(commands)
    modules = dict.fromkeys(COMMANDS[name] for name in COMMANDS if name in wanted)
    for module in modules:
        importlib.import_module(f"nixd.commands.{module}").register(sub)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv``, or None when the whole tree is needed (help, typo)."""
    for arg in argv:
        if arg in GLOBAL_FLAGS:
            continue
        if arg.startswith("-"):
            return None  # --help, --version or an option argparse will explain
        return arg if arg in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--version"]:
        print(f"nixd {__version__}")  # the fastest path: not even a parser
        return 0
    command = command_of(args)
    parser = build_parser(None if command is None else [command])
    return run_command(parser, args, log_format="nixd: %(levelname)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
