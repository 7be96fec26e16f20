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
from nixd.daemon.config import DEFAULT_CONFIG_PATH, load_config
from nixd.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    login = sub.add_parser("login", help="log this machine in (needs root or the nixd group)")
    # No METHOD: interactive login (device code, approved in a browser).
    login.add_argument("--server", metavar="URL", help="the nixd server (default from the config)")
    add_daemon_options(login)
    login.set_defaults(func=run_login_interactive)
    methods = login.add_subparsers(dest="method", metavar="METHOD", required=False)
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


def run_login_interactive(args: argparse.Namespace) -> int:
    """``nixd login``: show a code, wait for its approval in a browser, hand over to the daemon."""
    from nixd.auth.device import interactive_login  # noqa: PLC0415 - only this command needs it

    server = args.server or server_url(args.config)
    refresh = interactive_login(server)
    body = {"method": "device", "server": server, "params": {"refresh_token": refresh}}
    answer = call(
        socket_path(args.socket, args.config), "POST", "/login", body, config_arg=args.config
    )
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(answer["token_expires_at"]))
    print(f"logged in as {answer['identity']} at {answer['server']} (token valid until {expires})")
    return 0


def server_url(config_arg: str | None) -> str:
    """The server of the daemon's config, for commands that talk to it themselves."""
    config = load_config(config_arg or DEFAULT_CONFIG_PATH)
    if not config.server.url:
        raise ConfigError("no server URL: pass --server or set server.url in the daemon config")
    return config.server.url.rstrip("/")


def run_logout(args: argparse.Namespace) -> int:
    answer = call(
        socket_path(args.socket, args.config), "POST", "/logout", {}, config_arg=args.config
    )
    who = answer.get("logged_out")
    print(f"logged out {who}" if who else "was not logged in")
    return 0
