"""``nixd daemon``: run the daemon in the foreground (systemd/launchd start it this way)."""

from __future__ import annotations

import argparse

from nixd.daemon.config import DEFAULT_CONFIG_PATH, load_config

DESCRIPTION = """\
Run the nixd daemon in the foreground until SIGTERM or SIGINT.

The daemon keeps this machine's short-lived access token fresh, serves the local
verifying proxy substituter on loopback, writes the netrc and nix.conf include that Nix
needs, and answers `nixd login`, `nixd logout` and `nixd status` on its control socket.
Under systemd it reports readiness (Type=notify), takes its sockets by socket activation
and logs to the journal; SIGHUP reloads the config (so does editing the file).
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "daemon",
        help="run the nixd daemon in the foreground",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", default=DEFAULT_CONFIG_PATH, help=f"config file (default {DEFAULT_CONFIG_PATH})"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # trio and the daemon's modules are imported here, not at the top: every other
    # `nixd` command (nar, key, status, ...) starts faster without them
    import trio  # noqa: PLC0415

    from nixd.daemon.main import configure_logging, run_daemon  # noqa: PLC0415

    config = load_config(args.config)
    configure_logging("debug" if args.verbose else config.daemon.log_level)
    trio.run(run_daemon, config)
    return 0
