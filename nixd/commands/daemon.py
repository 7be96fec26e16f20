"""``nixd daemon``: run the daemon in the foreground (systemd/launchd start it this way)."""

from __future__ import annotations

import argparse

import trio

from nixd.daemon.config import DEFAULT_CONFIG_PATH, load_config
from nixd.daemon.main import configure_logging, run_daemon


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("daemon", help="run the nixd daemon in the foreground")
    p.add_argument(
        "--config", default=DEFAULT_CONFIG_PATH, help=f"config file (default {DEFAULT_CONFIG_PATH})"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging("debug" if args.verbose else config.daemon.log_level)
    trio.run(run_daemon, config)
    return 0
