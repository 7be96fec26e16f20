"""Options shared by the commands that talk to the daemon."""

from __future__ import annotations

import argparse


def add_daemon_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the daemon's config file (to find its control socket)")
    p.add_argument("--socket", help="the daemon's control socket (default from the config)")
