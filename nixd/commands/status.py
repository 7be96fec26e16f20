"""``nixd status`` and ``nixd version``: what the daemon is doing (never a token).

``nixd status`` exits 0 only when logged in with a valid token, so a script or a CI step
can gate on it: ``NOT_LOGGED_IN`` (3) when nobody is logged in or the token expired,
``UNREACHABLE`` (6) when the daemon does not answer (:mod:`nixd.exitcodes`). The status
is printed either way.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from nixd import __version__, exitcodes
from nixd.commands._common import add_daemon_options
from nixd.daemon.client import DaemonUnreachable, call, socket_path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser(
        "status",
        help="show the login, the proxy and the upstreams",
        description="Show the login, the proxy and the upstreams. Exit 0 when logged in "
        "with a valid token, 3 when not logged in or the token expired, 6 when the daemon "
        "cannot be reached.",
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    add_daemon_options(status)
    status.set_defaults(func=run_status)

    version = sub.add_parser("version", help="print the versions of this CLI and the daemon")
    version.add_argument("--json", action="store_true", help="print the versions as JSON")
    add_daemon_options(version)
    version.set_defaults(func=run_version)


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    delta = ts - time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    rel = f"in {delta:.0f}s" if delta >= 0 else f"{-delta:.0f}s ago"
    return f"{stamp} ({rel})"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def render(status: dict[str, Any]) -> str:
    lines = []
    if status.get("logged_in"):
        lines.append(f"logged in as:   {status.get('identity')} at {status.get('server')}")
        if status.get("method"):
            lines.append(f"login method:   {status['method']}")
        if status.get("renewal"):
            lines.append(f"renewal:        {status['renewal']}")
        if status.get("warning"):
            lines.append(f"WARNING:        {status['warning']}")
        valid = "valid" if status.get("token_valid") else "EXPIRED"
        lines.append(f"token:          {valid}, expires {_when(status.get('token_expires_at'))}")
        lines.append(f"next refresh:   {_when(status.get('next_refresh'))}")
    else:
        lines.append("logged in as:   nobody (run `nixd login METHOD`)")
    lines.append(f"last refresh:   {_when(status.get('last_refresh'))}")
    lines.append(f"last error:     {status.get('last_error') or 'none'}")
    if status.get("config_error"):
        lines.append(f"CONFIG:         {status['config_error']} (running with the old config)")
    nix = status.get("nix") or {}
    if nix.get("in_effect") is False:
        lines.append(f"NIX:            {nix.get('problem')}")
    elif nix.get("in_effect"):
        where = nix.get("include_file") or f"{nix.get('nix_conf')}, managed elsewhere"
        lines.append(f"nix:            uses nixd (the include is in {where})")
    proxy = status.get("proxy") or {}
    lines.append(f"proxy:          {proxy.get('url') or proxy.get('error') or 'not running'}")
    store = status.get("store") or {}
    lines.append(
        f"local store:    {_size(int(store.get('bytes_used', 0)))} of "
        f"{_size(int(store.get('max_bytes', 0)))} in {store.get('dir')}"
    )
    passed = int(proxy.get("passthrough_total") or 0)
    if passed:
        free = _size(int(proxy.get("store_free_bytes") or 0))
        lines.append(
            f"WARNING:        {passed} NAR transfer(s) streamed through without being kept: "
            f"the local store could not hold them ({free} free on its disk)"
        )
    upstreams = status.get("upstreams") or []
    lines.append(f"upstreams:      {len(upstreams) or 'none'}")
    for u in upstreams:
        healthy = u.get("healthy")
        health = "health unknown" if healthy is None else ("healthy" if healthy else "failing")
        if u.get("last_error") and not healthy:
            health += f": {u['last_error']}"
        lines.append(
            f"  - {u.get('url')} (priority {u.get('priority')}, auth {u.get('auth')}, {health})"
        )
    keys = status.get("pinned_keys") or []
    lines.append(f"pinned keys:    {', '.join(keys) if keys else 'none'}")
    lines.append(f"daemon:         nixd {status.get('version')}, pid {status.get('pid')}")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    status = call(socket_path(args.socket, args.config), "GET", "/status", config_arg=args.config)
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else render(status))
    return exit_code(status)


def exit_code(status: dict[str, Any]) -> int:
    """0 when logged in with a valid token, else :data:`~nixd.exitcodes.NOT_LOGGED_IN`."""
    if status.get("logged_in") is True and status.get("token_valid") is True:
        return exitcodes.OK
    return exitcodes.NOT_LOGGED_IN


def run_version(args: argparse.Namespace) -> int:
    daemon_version: str | None = None
    try:
        daemon = call(
            socket_path(args.socket, args.config), "GET", "/version", config_arg=args.config
        )
        daemon_version = str(daemon.get("version"))
    except DaemonUnreachable:
        pass
    if args.json:
        print(json.dumps({"cli": __version__, "daemon": daemon_version}))
    else:
        print(f"nixd {__version__}")
        print(f"daemon: nixd {daemon_version}" if daemon_version else "daemon: not running")
    return 0
