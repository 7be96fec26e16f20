"""``nixd-server user add|disable|logout``: local accounts for the interactive login."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from nixd.errors import ConfigError
from nixd.server.login.accounts import AccountStore, read_new_password
from nixd.server.login.device import revoke_refresh
from nixd.server.storage.db import Connection


def register_cli(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_state: Callable[[argparse.ArgumentParser], None],
    open_state: Callable[[argparse.Namespace], tuple[Any, Connection]],
    audit: Callable[..., None],
) -> None:
    """``nixd-server user add|disable|logout``; the password never comes from argv."""
    user = sub.add_parser("user", help="local user accounts (interactive login)").add_subparsers(
        dest="user_command", metavar="ACTION", required=True
    )

    def add(args: argparse.Namespace) -> int:
        password = read_new_password()
        config, conn = open_state(args)
        try:
            account = AccountStore(conn).create(args.org, args.name, password)
        finally:
            conn.close()
        audit(config, "admin:user.add", f"{account.org}/*", user=account.name)
        print(f"created user {account.name} in {account.org}")
        return 0

    def disable(args: argparse.Namespace) -> int:
        config, conn = open_state(args)
        try:
            account = AccountStore(conn).disable(args.name)
        finally:
            conn.close()
        audit(config, "admin:user.disable", f"{account.org}/*", user=account.name)
        print(f"disabled user {account.name}: no sign-in, no renewal of existing logins")
        return 0

    def logout(args: argparse.Namespace) -> int:
        config, conn = open_state(args)
        try:
            account = AccountStore(conn).get(args.name)
            if account is None:
                raise ConfigError(f"no user named {args.name!r}")
            count = revoke_refresh(conn, account)
        finally:
            conn.close()
        audit(config, "admin:user.logout", f"{account.org}/*", user=account.name, count=count)
        print(f"revoked {count} refresh credential(s) of {account.name}")
        return 0

    p = user.add_parser("add", help="create a user; the password is read from a prompt or stdin")
    add_state(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=add)
    p = user.add_parser("disable", help="stop a user from signing in and renewing")
    add_state(p)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=disable)
    p = user.add_parser("logout", help="revoke every interactive login (refresh credential)")
    add_state(p)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=logout)
