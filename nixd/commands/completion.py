"""``nixd completion SHELL`` and ``nixd man``: completions and the man page, from the parsers.

Both are generated at run time from :func:`nixd.cli.build_parser` (:mod:`nixd.clidoc`),
so they always match the installed version; packagers can write them at build time with
``scripts/manpages`` or these commands.
"""

from __future__ import annotations

import argparse
import os
import sys

from nixd import __version__

EPILOG_COMPLETION = """\
install:
  bash:  nixd completion bash > /etc/bash_completion.d/nixd   (or: source <(nixd completion bash))
  zsh:   nixd completion zsh > "${fpath[1]}/_nixd"            (or: source <(nixd completion zsh))
  fish:  nixd completion fish > ~/.config/fish/completions/nixd.fish
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, fish)",
        description="Print a completion script for SHELL, generated from nixd's own parsers.",
        epilog=EPILOG_COMPLETION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", metavar="SHELL", choices=("bash", "zsh", "fish"), help="the shell")
    p.set_defaults(func=run_completion)

    m = sub.add_parser(
        "man",
        help="print the nixd(1) man page (roff)",
        description="Print the nixd(1) man page, generated from nixd's own parsers "
        "(view it with `nixd man | man -l -`), or write it into a directory.",
    )
    m.add_argument(
        "--output-dir", metavar="DIR", help="write DIR/nixd.1 instead of printing the page"
    )
    m.set_defaults(func=run_man)


def run_completion(args: argparse.Namespace) -> int:
    from nixd import clidoc  # noqa: PLC0415
    from nixd.cli import build_parser  # noqa: PLC0415 - the whole tree, only here

    sys.stdout.write(clidoc.completion(args.shell, build_parser(), "nixd"))
    return 0


def run_man(args: argparse.Namespace) -> int:
    from nixd import clidoc, exitcodes  # noqa: PLC0415
    from nixd.cli import build_parser  # noqa: PLC0415

    page = clidoc.man(
        build_parser(),
        prog="nixd",
        version=__version__,
        exit_codes=exitcodes.TABLE,
        summary="log this machine in to a private Nix binary cache and serve it to Nix",
    )
    if args.output_dir:
        path = os.path.join(args.output_dir, "nixd.1")
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
        print(path)
    else:
        sys.stdout.write(page)
    return 0
