"""``nixd key``: make and convert the signing keys a Nix binary cache uses.

The keys are Nix's own format (see :mod:`nixd.nix.signing`), so ``nixd key generate``
can stand in for ``nix key generate-secret`` and ``nixd key public`` for
``nix key convert-secret-to-public``, on machines that have nixd but no Nix. Output
ends in a newline, which Nix ignores when it reads a key file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nixd.errors import FormatError, NixdError
from nixd.nix.signing import SecretKey

EPILOG_GENERATE = """\
examples:
  nixd key generate cache.example.org-1 > secret.key
  nixd key generate cache.example.org-1 --secret-out /etc/nixd/secret.key \\
      --public-out public.key

The name identifies the key in signatures and in `trusted-public-keys`; by convention
it is the cache's host name and a number, so that keys can be rotated.
"""

EPILOG_PUBLIC = """\
examples:
  nixd key public < secret.key
  nixd key public /etc/nixd/secret.key >> trusted-keys
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    key = sub.add_parser(
        "key",
        help="generate and convert Nix signing keys",
        description="Generate and convert Ed25519 signing keys in the format Nix uses\n"
        "(`name:base64`) for binary cache signatures.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    key_sub = key.add_subparsers(dest="key_command", required=True)

    generate = key_sub.add_parser(
        "generate",
        help="generate a secret signing key",
        description="Generate a new secret key and print it to stdout (or write it to\n"
        "--secret-out). Like `nix key generate-secret --key-name NAME`.",
        epilog=EPILOG_GENERATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("name", metavar="NAME", help="the key's name, e.g. cache.example.org-1")
    generate.add_argument(
        "--secret-out",
        metavar="FILE",
        help="write the secret key to FILE (created with mode 0600; never overwritten) "
        "instead of stdout, and print the public key",
    )
    generate.add_argument(
        "--public-out", metavar="FILE", help="also write the matching public key to FILE"
    )
    generate.add_argument(
        "--json",
        action="store_true",
        help='print {"name", "publicKey"} (and "secretKey" unless --secret-out) as JSON',
    )
    generate.set_defaults(func=run_generate)

    public = key_sub.add_parser(
        "public",
        help="print the public key of a secret key",
        description="Read a secret key from FILE or stdin and print its public key.\n"
        "Like `nix key convert-secret-to-public`.",
        epilog=EPILOG_PUBLIC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    public.add_argument("file", metavar="FILE", nargs="?", help="secret key file (default: stdin)")
    public.add_argument("--json", action="store_true", help='print {"name", "publicKey"} as JSON')
    public.set_defaults(func=run_public)


def run_generate(args: argparse.Namespace) -> int:
    key = SecretKey.generate(args.name)
    public = key.public().render() + "\n"
    if args.secret_out:
        _write_secret(args.secret_out, key.render() + "\n")
    if args.public_out:
        with open(args.public_out, "w", encoding="ascii") as f:
            f.write(public)
    if args.json:
        data = {"name": args.name, "publicKey": key.public().render()}
        if not args.secret_out:
            data["secretKey"] = key.render()
        print(json.dumps(data))
    else:
        sys.stdout.write(public if args.secret_out else key.render() + "\n")
    return 0


def run_public(args: argparse.Namespace) -> int:
    if args.file:
        with open(args.file, encoding="utf-8", errors="replace") as f:
            text = f.read()
        where = args.file
    else:
        text = sys.stdin.read()
        where = "stdin"
    try:
        key = SecretKey.parse(text)
    except FormatError as exc:
        raise FormatError(exc.message, where=where) from None
    rendered = key.public().render()
    if args.json:
        print(json.dumps({"name": rendered.partition(":")[0], "publicKey": rendered}))
    else:
        sys.stdout.write(rendered + "\n")
    return 0


def _write_secret(path: str, text: str) -> None:
    """Create ``path`` 0600 and exclusively, so an existing key is never clobbered."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise NixdError(f"{path} already exists; not overwriting a secret key") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
