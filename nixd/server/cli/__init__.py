"""``nixd-server``: one module per command group; :func:`main` is the entry point."""

from nixd.server.cli.main import main

__all__ = ["main"]
