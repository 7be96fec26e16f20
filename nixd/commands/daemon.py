"""``nixd daemon``: run the daemon in the foreground (systemd/launchd start it this way)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from nixd import exitcodes
from nixd.daemon.client import DEFAULT_CONFIG_PATH, DaemonUnreachable, call, socket_path

DESCRIPTION = """\
Run the nixd daemon in the foreground until SIGTERM or SIGINT.

The daemon keeps this machine's short-lived access token fresh, serves the local
verifying proxy substituter on loopback, writes the netrc and nix.conf include that Nix
needs, and answers `nixd login`, `nixd logout` and `nixd status` on its control socket.
Under systemd it reports readiness (Type=notify), takes its sockets by socket activation
and logs to the journal; SIGHUP reloads the config (so does editing the file).

`nixd daemon --restart` (or SIGUSR2) restarts the running daemon in place, for an upgrade
or a change that needs a restart: its sockets stay open across the restart, so Nix never
finds the proxy's port closed. Under systemd or launchd, their own restart does the same
through socket activation.
"""

RESTART_WAIT = 120.0
"""Seconds `--restart` waits for the new image to answer (the grace, then start-up)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "daemon",
        help="run the nixd daemon in the foreground",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG_PATH,
        help=f"config file (default {DEFAULT_CONFIG_PATH}; without one, the defaults)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="restart the running daemon in place, keeping its sockets open (SIGUSR2)",
    )
    p.add_argument("--socket", help="the running daemon's control socket (with --restart)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.restart:
        return restart(args)
    # trio and the daemon's modules are imported here, not at the top: every other
    # `nixd` command (nar, key, status, ...) starts faster without them
    import trio  # noqa: PLC0415

    from nixd.daemon.config import load_config  # noqa: PLC0415
    from nixd.daemon.main import configure_logging, run_daemon  # noqa: PLC0415

    config = load_config(args.config, missing_ok=True)  # no file: the defaults
    configure_logging("debug" if args.verbose else config.daemon.log_level)
    if not os.path.exists(args.config):
        logging.getLogger("nixd.daemon").info(
            "no config file at %s: running on the defaults", config.path
        )
    handoff = trio.run(run_daemon, config)
    if handoff is not None:
        handoff.exec()  # returns only by raising: the daemon exits with the error
    return 0


def restart(args: argparse.Namespace) -> int:
    """Ask the running daemon to restart in place and wait until the new image answers."""
    socket = socket_path(args.socket, args.config)
    before = call(socket, "GET", "/status", config_arg=args.config)
    pid = before.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        raise DaemonUnreachable(f"the daemon at {socket} did not say its pid")
    try:
        os.kill(pid, signal.SIGUSR2)
    except OSError as exc:
        raise DaemonUnreachable(f"cannot signal the daemon (pid {pid}): {exc.strerror}") from exc
    deadline = time.monotonic() + RESTART_WAIT
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            now = call(socket, "GET", "/status", config_arg=args.config)
        except DaemonUnreachable:
            continue  # between the two images: the socket queues, a timeout may show here
        if now.get("started_at") != before.get("started_at"):
            print(
                f"nixd daemon (pid {pid}) restarted in place, generation "
                f"{now.get('generation')}; its sockets stayed open"
            )
            return 0
        if now.get("restart_refusals") != before.get("restart_refusals"):
            why = now.get("restart_error") or now.get("last_error")
            print(f"nixd: {why}; the daemon keeps running", file=sys.stderr)
            return exitcodes.FAILURE
    print(f"nixd: the daemon (pid {pid}) did not restart; see its log", file=sys.stderr)
    return exitcodes.FAILURE
