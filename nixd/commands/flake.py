"""``nixd flake list [ORG]`` and ``nixd flake show ORG/NAME``: the flakes one may read.

By default the question goes through the local daemon's proxy
(``http://127.0.0.1:PORT/api/v1/flakes...``), which any local user may ask without the
proxy's secret: it answers with what *this machine's* login may read (see
:mod:`nixd.proxy.flakes`), and no token is handled here. With ``--server URL`` the
command asks that server itself: anonymously (public flakes only), or as the identity of
an API token from ``--token-file``, exchanged in this process for an access token that
is never written anywhere.

Hidden and missing flakes look the same (404): the server tells nobody what exists
beyond what they may read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from urllib.parse import quote

from nixd import exitcodes
from nixd.commands._common import add_daemon_options
from nixd.errors import ConfigError, NixdError

MAX_ANSWER = 16 << 20
TIMEOUT = 60.0

HELP = """\
List the flakes this machine may read, with their latest versions.

Asks the server through the local nixd proxy (as this machine's login; any local user may
ask), or with --server directly (anonymously, or as the API token of --token-file).
"""

SHOW_HELP = """\
Show one flake: its visibility, description and every release (newest first), with the
commit, the ref, the NAR hash and store path of its source, and the recorded outputs.
"""

EPILOG = """\
examples:
  nixd flake list
  nixd flake list acme
  nixd flake show acme/tool
  nixd flake show acme/tool --json | jq -r '.releases[0].version'
  nixd flake list --server https://cache.example.com --token-file ~/.config/nixd/token

A flake that does not exist and one that may not be read are answered the same way.
"""


class FlakeQueryError(NixdError):
    """The server (or the proxy) refused or failed the question."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    group = sub.add_parser(
        "flake",
        help="list and show the flakes this machine may read",
        description="List and show the private and public flakes of the nixd server.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    flake_sub = group.add_subparsers(dest="flake_command", metavar="SUBCOMMAND", required=True)

    lst = flake_sub.add_parser(
        "list", help="list the flakes one may read", description=HELP, epilog=EPILOG,
        formatter_class=fmt,
    )  # fmt: skip
    lst.add_argument("org", nargs="?", metavar="ORG", help="only this organization's flakes")
    _options(lst)
    lst.set_defaults(func=run_list)

    show = flake_sub.add_parser(
        "show", help="show one flake and its releases", description=SHOW_HELP, epilog=EPILOG,
        formatter_class=fmt,
    )  # fmt: skip
    show.add_argument("flake", metavar="ORG/NAME", help="the flake")
    _options(show)
    show.set_defaults(func=run_show)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        metavar="URL",
        help="ask this server directly instead of through the local proxy",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="with --server: an API token to ask as (- for stdin; default: anonymously)",
    )
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    add_daemon_options(p)


def proxy_url(args: argparse.Namespace) -> str:
    """The local proxy's URL, from the daemon's status (which any user may read)."""
    from nixd.daemon.client import call, socket_path  # noqa: PLC0415

    status = call(socket_path(args.socket, args.config), "GET", "/status", config_arg=args.config)
    proxy = status.get("proxy") or {}
    url = proxy.get("url") if isinstance(proxy, dict) else None
    if not isinstance(url, str) or not url:
        why = proxy.get("error") if isinstance(proxy, dict) else None
        raise FlakeQueryError(
            f"the nixd daemon runs no proxy{f' ({why})' if why else ''}: pass --server URL",
            exitcodes.UNREACHABLE,
        )
    return url.rstrip("/")


async def _get(base: str, path: str, token_file: str | None) -> tuple[int, bytes]:
    import httpx  # noqa: PLC0415

    async with httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT)) as client:
        headers = {"Accept": "application/json"}
        if token_file:
            from nixd.auth.token import Credential, exchange, read_api_token  # noqa: PLC0415

            credential = Credential("token", read_api_token(token_file))
            token = await exchange(client, base, credential)
            headers["Authorization"] = f"Bearer {token.value}"
        try:
            async with client.stream("GET", base + path, headers=headers) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise FlakeQueryError(
                            f"{base}: the answer is larger than {MAX_ANSWER} bytes",
                            exitcodes.FAILURE,
                        )
                return response.status_code, bytes(body)
        except httpx.HTTPError as exc:
            raise FlakeQueryError(
                f"cannot reach {base}: {type(exc).__name__}", exitcodes.UNREACHABLE
            ) from exc


def query(args: argparse.Namespace, path: str, missing: str) -> dict[str, Any]:
    """GET ``path`` from the server or the proxy; the JSON answer, or FlakeQueryError."""
    import trio  # noqa: PLC0415

    if args.server:
        base = args.server.rstrip("/")
        if not base.startswith(("https://", "http://")):
            raise ConfigError(f"--server {args.server!r} is not an http(s) URL")
    else:
        if args.token_file:
            raise ConfigError("--token-file needs --server (the proxy asks as this machine)")
        base = proxy_url(args)
    status, raw = trio.run(_get, base, path, args.token_file)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if status == 200 and isinstance(body, dict):
        return body
    if isinstance(body, dict) and body.get("message"):
        message = str(body["message"])
    else:
        message = raw.decode(errors="replace").strip()[:500] or f"HTTP {status}"
    if status == 404:
        raise FlakeQueryError(missing, exitcodes.FAILURE)
    if status == 401:
        raise FlakeQueryError(
            f"{base} answers this only to a logged-in caller ({message}): pass --token-file, "
            "or ask through this machine's proxy (without --server)",
            exitcodes.NOT_LOGGED_IN,
        )
    code = {401: exitcodes.NOT_LOGGED_IN, 403: exitcodes.DENIED}.get(status)
    if status in (502, 503, 504):
        code = exitcodes.UNREACHABLE
    raise FlakeQueryError(f"{base}: HTTP {status}: {message}", code or exitcodes.FAILURE)


def _fail(args: argparse.Namespace, exc: FlakeQueryError) -> int:
    from nixd.cliutil import error_json  # noqa: PLC0415

    if args.json:
        print(error_json(exc.code, str(exc)))
    else:
        print(f"nixd: error: {exc}", file=sys.stderr)
    return exc.code


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _text(value: object) -> str:
    """A value from the server as one printable line (no control characters)."""
    if value is None:
        return ""
    return "".join(c if c.isprintable() else " " for c in str(value))


def _when(value: object) -> str:
    if isinstance(value, int | float):
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(value))
    return _text(value)


def render_list(body: dict[str, Any]) -> str:
    flakes = [f for f in body.get("flakes") or [] if isinstance(f, dict)]
    if not flakes:
        return "no flakes"
    rows = [["FLAKE", "VISIBILITY", "LATEST", "DESCRIPTION"]]
    for f in flakes:
        latest = f.get("latest")
        if isinstance(latest, dict):
            latest = latest.get("version")
        rows.append(
            [
                f"{_text(f.get('org'))}/{_text(f.get('name'))}",
                _text(f.get("visibility")),
                _text(latest) or "-",
                _text(f.get("description")),
            ]
        )
    return _table(rows)


def render_show(body: dict[str, Any]) -> str:
    lines = [
        f"flake:        {_text(body.get('org'))}/{_text(body.get('name'))}",
        f"visibility:   {_text(body.get('visibility'))}",
        f"description:  {_text(body.get('description')) or '-'}",
    ]
    releases = [r for r in body.get("releases") or [] if isinstance(r, dict)]
    if not releases:
        lines.append("releases:     none")
        return "\n".join(lines)
    lines.append(f"releases:     {len(releases)}")
    rows = [["VERSION", "PUBLISHED (UTC)", "COMMIT", "REF", "NAR HASH"]]
    for r in releases:
        rows.append(
            [
                _text(r.get("version")),
                _when(r.get("published_at")),
                _text(r.get("commit"))[:12],
                _text(r.get("ref")),
                _text(r.get("nar_hash")),
            ]
        )
    lines.append(_table(rows))
    latest = releases[0]
    if latest.get("store_path"):
        lines.append(f"source of {_text(latest.get('version'))}: {_text(latest['store_path'])}")
    outputs = latest.get("outputs")
    if isinstance(outputs, dict):
        for attr, path in sorted(outputs.items()):
            lines.append(f"  {_text(attr)}: {_text(path)}")
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    path = "/api/v1/flakes"
    if args.org:
        path += "?org=" + quote(args.org, safe="")
    try:
        body = query(args, path, "no such organization, or none of its flakes may be read")
    except FlakeQueryError as exc:
        return _fail(args, exc)
    print(json.dumps(body, indent=1, sort_keys=True) if args.json else render_list(body))
    return exitcodes.OK


def run_show(args: argparse.Namespace) -> int:
    org, sep, name = args.flake.partition("/")
    if not sep or not org or not name or "/" in name:
        raise ConfigError(f"{args.flake!r} is not ORG/NAME")
    path = f"/api/v1/flakes/{quote(org, safe='')}/{quote(name, safe='')}"
    try:
        body = query(args, path, f"no flake {org}/{name} (or it may not be read from here)")
    except FlakeQueryError as exc:
        return _fail(args, exc)
    print(json.dumps(body, indent=1, sort_keys=True) if args.json else render_show(body))
    return exitcodes.OK
