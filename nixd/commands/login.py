"""``nixd login token`` and ``nixd logout``: change the machine's login, via the daemon.

The API token is read from a file or stdin and sent over the control socket; it never
appears on a command line. The daemon exchanges it, pins the server's keys and sets up Nix.
"""

from __future__ import annotations

import argparse
import time

from nixd.auth.token import read_api_token
from nixd.commands._common import add_daemon_options
from nixd.daemon.client import call, socket_path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    login = sub.add_parser("login", help="log this machine in (needs root or the nixd group)")
    methods = login.add_subparsers(dest="method", metavar="METHOD", required=True)
    token = methods.add_parser("token", help="log in with an API token (from a file or stdin)")
    token.add_argument(
        "--token-file", metavar="FILE", help="read the API token from FILE (default: stdin)"
    )
    token.add_argument("--server", metavar="URL", help="the nixd server (default from the config)")
    add_daemon_options(token)
    token.set_defaults(func=run_login_token)

    logout = sub.add_parser("logout", help="log out and remove what nixd added to Nix's config")
    add_daemon_options(logout)
    logout.set_defaults(func=run_logout)


def run_login_token(args: argparse.Namespace) -> int:
    secret = read_api_token(args.token_file)
    body = {"method": "token", "token": secret, "server": args.server}
    answer = call(
        socket_path(args.socket, args.config), "POST", "/login", body, config_arg=args.config
    )
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(answer["token_expires_at"]))
    print(f"logged in as {answer['identity']} at {answer['server']} (token valid until {expires})")
    return 0


def run_logout(args: argparse.Namespace) -> int:
    answer = call(
        socket_path(args.socket, args.config), "POST", "/logout", {}, config_arg=args.config
    )
    who = answer.get("logged_out")
    print(f"logged out {who}" if who else "was not logged in")
    return 0
