"""``nixd nar``: write, hash and unpack NAR archives, byte-compatible with Nix.

These are the same operations the proxy and the server use on NARs in flight
(:mod:`nixd.nix.nar`), exposed so that a user can check what nixd computes against
``nix-store --dump`` and ``nix hash path``, or unpack a NAR from a cache by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

from nixd import exitcodes
from nixd.errors import FormatError, NixdError
from nixd.nix import nar

EPILOG_NAR = """\
A NAR (Nix ARchive) is the canonical serialisation of a file system tree: regular
files (with only the executable bit kept), symlinks and directories with entries
sorted by name. Its sha256 is the NarHash that a binary cache's narinfo signs.
"""

EPILOG_DUMP = """\
examples:
  nixd nar dump ./result > result.nar
  nixd nar dump /nix/store/...-hello-2.12 | zstd > hello.nar.zst
  cmp <(nixd nar dump ./tree) <(nix-store --dump ./tree)

PATH is not followed if it is a symlink: the archive then holds that symlink. Fifos,
sockets and device files cannot be archived and are an error.
"""

EPILOG_HASH = """\
examples:
  nixd nar hash ./result
      sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s 226552
  nixd nar hash --json /nix/store/...-hello-2.12

The hash equals `nix hash path --base32 PATH` and the size equals
`nix-store --dump PATH | wc -c`; together they are the NarHash and NarSize of a narinfo.
"""

EPILOG_RESTORE = """\
examples:
  nixd nar restore ./out < result.nar
  zstd -dc hello.nar.zst | nixd nar restore ./hello

DEST must not exist, or be an empty directory when the archive is a directory. The
archive is checked strictly as it is read (bad magic, unsorted or duplicate names,
names such as `..` or with `/`, non-zero padding, truncation, trailing bytes ...);
on any error the message gives the byte offset and the path inside the archive, and
whatever was unpacked is removed again if this command created DEST. Nothing is ever
written outside DEST. Modes are those `nix-store --restore` gives: 0755 for
directories and executables, 0644 for other files.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser(
        "nar",
        help="write, hash and unpack NAR archives",
        description="Write, hash and unpack NAR archives exactly as Nix does.",
        epilog=EPILOG_NAR,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    nar_sub = group.add_subparsers(dest="nar_command", metavar="SUBCOMMAND", required=True)

    dump = nar_sub.add_parser(
        "dump",
        help="write the NAR of a path to stdout",
        description="Serialise the file system tree at PATH as a NAR and write it to "
        "stdout, streaming in constant memory. Byte-identical to `nix-store --dump PATH`.",
        epilog=EPILOG_DUMP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dump.add_argument("path", metavar="PATH", help="file, directory or symlink to archive")
    dump.set_defaults(func=run_dump)

    hash_ = nar_sub.add_parser(
        "hash",
        help="print the NarHash and NarSize of a path",
        description="Print the sha256 (in Nix's base32) and the size in bytes of the NAR "
        "of PATH, without writing the NAR anywhere.",
        epilog=EPILOG_HASH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hash_.add_argument("path", metavar="PATH", help="file, directory or symlink to hash")
    hash_.add_argument(
        "--json",
        action="store_true",
        help='print {"narHash": "sha256:...", "narSize": N} instead of "HASH SIZE"',
    )
    hash_.set_defaults(func=run_hash)

    restore = nar_sub.add_parser(
        "restore",
        help="unpack a NAR from stdin",
        description="Read a NAR from stdin, check it strictly, and unpack it at DEST. "
        "Like `nix-store --restore DEST`, but it rejects any archive that is not "
        "exactly what `nix-store --dump` writes.",
        epilog=EPILOG_RESTORE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    restore.add_argument("dest", metavar="DEST", help="where to create the unpacked tree")
    restore.set_defaults(func=run_restore)


def run_dump(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    if out.isatty():
        raise NixdError("refusing to write a binary NAR to a terminal; redirect stdout")
    try:
        for chunk in nar.dump(args.path):
            out.write(chunk)
        out.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's own flush at
        # exit from complaining about the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
        return exitcodes.BROKEN_PIPE
    return 0


def run_hash(args: argparse.Namespace) -> int:
    digest, size = nar.hash_path(args.path)
    if args.json:
        print(json.dumps({"narHash": str(digest), "narSize": size}))
    else:
        print(f"{digest} {size}")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    stdin = sys.stdin.buffer
    if stdin.isatty():
        raise NixdError("refusing to read a NAR from a terminal; redirect stdin")
    existed = os.path.lexists(args.dest)
    try:
        nar.restore(_read_chunks(stdin.fileno()), args.dest)
    except (NixdError, OSError) as exc:
        if existed:
            note = "; DEST existed before, so anything unpacked into it was left in place"
        else:
            note = "; removed the partial tree" if not os.path.lexists(args.dest) else ""
        print(f"nixd: error: restoring {args.dest}: {exc}{note}", file=sys.stderr)
        # an archive that fails the strict checks is corrupt or tampered with
        return exitcodes.VERIFICATION if isinstance(exc, FormatError) else exitcodes.FAILURE
    return 0


def _read_chunks(fd: int) -> Iterator[bytes]:
    while chunk := os.read(fd, nar.CHUNK_SIZE):
        yield chunk
