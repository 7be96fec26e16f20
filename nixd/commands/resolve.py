"""``nixd resolve ORG/FLAKE/VERSION#OUTPUT``: the store path CI recorded for an output.

Nothing is evaluated here. ``nixd publish --include-output ATTR`` recorded, in CI, the
store path of each named output of a release; the server answers
``GET /api/v1/flakes/ORG/FLAKE/releases/VERSION-OR-CONSTRAINT/outputs/ATTR`` with that
path, the release the version (or constraint) picked, and the size of the output's
closure — and only when every path of that closure is in a slice the caller may read
(409 naming the missing paths otherwise; ``?check=1`` answers 200 with ``complete`` and
``missing`` instead, which ``--check`` prints). An output that was not recorded is a 404
that says so.

The question is asked the way ``nixd flake`` asks (:mod:`nixd.commands.flake`): through
the local daemon's proxy, as this machine's login, with no token handled here; or with
``--server`` directly, anonymously or as the API token of ``--token-file``. A deploy-only
token (``nixd-server token create --deploy``) may resolve its outputs and nothing else.

:func:`resolve` is what ``nixd apply`` uses too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from nixd import exitcodes
from nixd.commands.flake import FlakeQueryError, _options
from nixd.errors import ConfigError

MAX_REF = 1024
MAX_SHOWN_MISSING = 20
"""Missing paths printed in text; --json has the server's whole list."""

HELP = """\
Print the store path that CI recorded for an output of a published release, without
evaluating anything: ORG/FLAKE/VERSION#OUTPUT, where VERSION is an exact version (0.2.1)
or a constraint (0.2.*, ~1.2, ^1, *), picking the newest release it matches.

The server answers only when the output's whole closure is in a slice the caller may
read, so what it resolves can be fetched; otherwise it names the missing paths (exit 1).
--check reports completeness instead of failing: "complete" or the missing paths.

Outputs are recorded at publish time (nixd publish --include-output ATTR); an output that
was not recorded is an error that says so.
"""

EPILOG = """\
examples:
  nixd resolve acme/tool/0.2.1#packages.x86_64-linux.default
  nixd resolve 'acme/systems/1.*#nixosConfigurations.web1.config.system.build.toplevel'
  nixd resolve acme/tool/0.2.1#packages.x86_64-linux.default --check
  nixd resolve acme/tool/0.*#packages.x86_64-linux.default --json | jq -r .closure.nar_size
  nixd resolve acme/tool/0.2.1#packages.x86_64-linux.default \\
      --server https://cache.example.com --token-file /etc/nixd/deploy-token

--json prints the server's answer: org, name, version, output, store_path,
closure {paths, nar_size}, complete, missing, slice.
"""


@dataclass(frozen=True)
class FlakeRef:
    """``ORG/FLAKE/VERSION-OR-CONSTRAINT#OUTPUT`` (``output`` empty when not given)."""

    org: str
    name: str
    version: str
    output: str = ""

    def __str__(self) -> str:
        return f"{self.org}/{self.name}/{self.version}" + (f"#{self.output}" if self.output else "")

    def with_output(self, output: str) -> FlakeRef:
        return FlakeRef(self.org, self.name, self.version, output)

    def api_path(self, *, check: bool = False) -> str:
        """The resolve route of the server (and of the proxy, which forwards it)."""
        safe = "*^"
        return (
            f"/api/v1/flakes/{quote(self.org, safe='')}/{quote(self.name, safe='')}"
            f"/releases/{quote(self.version, safe=safe)}/outputs/{quote(self.output, safe='')}"
            + ("?check=1" if check else "")
        )


def parse_ref(text: str, *, need_output: bool = True) -> FlakeRef:
    """Parse ``ORG/FLAKE/VERSION[#OUTPUT]`` (ConfigError naming what is wrong)."""
    if len(text) > MAX_REF:
        raise ConfigError(f"the reference is longer than {MAX_REF} characters")
    if not text.isprintable():
        raise ConfigError("the reference has control characters")
    release, sep, output = text.partition("#")
    parts = release.split("/")
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ConfigError(
            f"{text!r} is not ORG/FLAKE/VERSION#OUTPUT (VERSION may be a constraint: 1.*)"
        )
    if sep and not output:
        raise ConfigError(f"{text!r}: nothing after '#' (the output attribute)")
    if need_output and not output:
        raise ConfigError(f"{text!r} names no output: ORG/FLAKE/VERSION#OUTPUT")
    if output and ("#" in output or "/" in output or "" in output.split(".")):
        raise ConfigError(f"{output!r} is not an output attribute path (a.b.c)")
    return FlakeRef(parts[0], parts[1], parts[2], output)


@dataclass(frozen=True)
class Resolution:
    """What the server answered for an output."""

    ref: FlakeRef
    version: str
    output: str
    store_path: str
    paths: int
    nar_size: int
    complete: bool
    missing: tuple[str, ...] = ()
    missing_count: int = 0
    answer: dict[str, Any] = field(default_factory=dict)
    """The server's JSON answer, as --json prints it."""


class ResolveError(FlakeQueryError):
    """The server refused or failed to resolve; ``missing`` when the closure is incomplete."""

    def __init__(self, message: str, code: int, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message, code)
        self.missing = missing


def _text(value: object, default: str) -> str:
    """A value from the server as one printable line (no control characters)."""
    if not isinstance(value, str) or not value:
        return default
    return "".join(c if c.isprintable() else " " for c in value[:MAX_REF])


def _store_path(value: object) -> str | None:
    """``value`` if it is exactly a store path (``/nix/store/<hash>-<name>``), else None:
    what apply fetches and runs programs from, so no ``..`` or deeper path gets through."""
    from nixd.errors import FormatError  # noqa: PLC0415
    from nixd.nix.storepath import StorePath  # noqa: PLC0415

    if not isinstance(value, str) or len(value) > MAX_REF:
        return None
    try:
        return StorePath.parse(value).path()
    except FormatError:
        return None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _missing(body: dict[str, Any]) -> tuple[str, ...]:
    raw = body.get("missing")
    if not isinstance(raw, list):
        return ()
    return tuple(p for p in map(_store_path, raw[:10_000]) if p is not None)


def _message(body: object, raw: bytes, status: int) -> str:
    if isinstance(body, dict):
        for key in ("message", "error"):
            if isinstance(body.get(key), str) and body[key]:
                return "".join(c if c.isprintable() else " " for c in body[key])[:1000]
    text = raw.decode(errors="replace").strip()[:500]
    return "".join(c if c.isprintable() else " " for c in text) or f"HTTP {status}"


def base_of(args: argparse.Namespace) -> str:
    """The server (``--server``) or the local proxy that answers for this machine."""
    from nixd.commands.flake import proxy_url  # noqa: PLC0415

    if args.server:
        base = str(args.server).rstrip("/")
        if not base.startswith(("https://", "http://")):
            raise ConfigError(f"--server {args.server!r} is not an http(s) URL")
        return base
    if args.token_file:
        raise ConfigError("--token-file needs --server (the proxy asks as this machine)")
    return proxy_url(args)


def resolve(args: argparse.Namespace, ref: FlakeRef, *, check: bool = False) -> Resolution:
    """Ask the server for ``ref``'s recorded output (ResolveError when it will not say)."""
    import trio  # noqa: PLC0415

    from nixd.commands.flake import _get  # noqa: PLC0415

    base = base_of(args)
    status, raw = trio.run(_get, base, ref.api_path(check=check), args.token_file)
    try:
        body: object = json.loads(raw)
    except ValueError:
        body = None
    message = _message(body, raw, status)
    if status == 200 and isinstance(body, dict):
        path = _store_path(body.get("store_path"))
        if path is None:
            raise ResolveError(f"{base}: the answer has no valid store path", exitcodes.FAILURE)
        closure = body.get("closure") if isinstance(body.get("closure"), dict) else {}
        assert isinstance(closure, dict)
        missing = _missing(body)
        return Resolution(
            ref=ref,
            version=_text(body.get("version"), ref.version),
            output=_text(body.get("output"), ref.output),
            store_path=path,
            paths=_int(closure.get("paths")),
            nar_size=_int(closure.get("nar_size")),
            complete=body.get("complete") is True,
            missing=missing,
            missing_count=max(_int(body.get("missing_count")), len(missing)),
            answer=body,
        )
    if status == 409 and isinstance(body, dict):
        raise ResolveError(message, exitcodes.FAILURE, _missing(body))
    if status == 404:
        if isinstance(body, dict) and "recorded" in message:
            raise ResolveError(message, exitcodes.FAILURE)
        raise ResolveError(
            f"no release of {ref.org}/{ref.name} matching {ref.version} with output "
            f"{ref.output} (or it may not be read from here)",
            exitcodes.FAILURE,
        )
    if status == 401:
        raise ResolveError(
            f"{base} answers this only to a logged-in caller ({message}): pass --token-file, "
            "or ask through this machine's proxy (without --server)",
            exitcodes.NOT_LOGGED_IN,
        )
    if status == 403:
        raise ResolveError(f"{base}: refused: {message}", exitcodes.DENIED)
    code = exitcodes.UNREACHABLE if status in (502, 503, 504) else exitcodes.FAILURE
    raise ResolveError(f"{base}: HTTP {status}: {message}", code)


def missing_lines(missing: tuple[str, ...], count: int) -> list[str]:
    lines = [f"  {p}" for p in missing[:MAX_SHOWN_MISSING]]
    if count > len(lines):
        lines.append(f"  ... and {count - len(lines)} more (--json lists what the server sent)")
    return lines


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "resolve",
        help="print the store path CI recorded for a release's output (no evaluation)",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "ref",
        metavar="ORG/FLAKE/VERSION#OUTPUT",
        help="the release (an exact version or a constraint) and the output attribute",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="report whether the output's closure is complete (and what is missing) "
        "instead of failing when it is not",
    )
    _options(p)
    p.set_defaults(func=run)


def _fail(args: argparse.Namespace, exc: FlakeQueryError) -> int:
    from nixd.cliutil import error_json  # noqa: PLC0415

    missing: tuple[str, ...] = getattr(exc, "missing", ())
    if args.json:
        error = json.loads(error_json(exc.code, str(exc)))
        if missing:
            error["error"]["missing"] = list(missing)
        print(json.dumps(error))
    else:
        lines = [f"nixd: error: {exc}"]
        if missing:
            lines += ["missing from the cache:", *missing_lines(missing, len(missing))]
        print("\n".join(lines), file=sys.stderr)
    return exc.code


def run(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    try:
        found = resolve(args, ref, check=args.check)
    except FlakeQueryError as exc:  # ResolveError, or no proxy to ask
        return _fail(args, exc)
    if args.json:
        print(json.dumps(found.answer, indent=1, sort_keys=True))
    elif args.check:
        head = f"{found.store_path} ({found.ref.org}/{found.ref.name} {found.version})"
        if found.complete:
            print(f"{head}: complete, {found.paths} paths, {found.nar_size} bytes")
        else:
            print(f"{head}: INCOMPLETE, {found.missing_count} paths missing:")
            print("\n".join(missing_lines(found.missing, found.missing_count)))
    else:
        print(found.store_path)
    if args.check and not found.complete:
        return exitcodes.FAILURE
    return exitcodes.OK
