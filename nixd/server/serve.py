"""Running the cache server: build its services from a state directory, serve with Hypercorn.

:func:`serve` is the whole life of a server process, in the trio/hypercorn shape: an outer
nursery holding the policy watcher, the signal watcher and Hypercorn; readiness reported
with ``task_status.started(bound_urls)`` once every listener is bound (and the URLs written
to ``server.address_file`` for whoever started the process); SIGTERM/SIGINT set a shutdown
event, Hypercorn stops accepting, in-flight NAR streams get ``graceful_timeout`` seconds,
then everything is cancelled and the database closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from nixd.nix.nar import NarParser
from nixd.server.app import CacheApp, Services
from nixd.server.audit import AuditLog
from nixd.server.config import ServerConfig
from nixd.server.credentials import CredentialStore
from nixd.server.db import open_db
from nixd.server.keys import ServerKeys
from nixd.server.policy import PolicyHolder
from nixd.server.store import Store
from nixd.server.tokens import TokenIssuer

log = logging.getLogger(__name__)


@contextlib.contextmanager
def open_services(config: ServerConfig) -> Iterator[Services]:
    """Everything the app needs, opened from the state directory; closed on exit."""
    conn = open_db(config.database_path)
    with contextlib.ExitStack() as stack:
        stack.callback(conn.close)
        store = Store.open(conn, config.blobs_path, zstd_level=config.storage.zstd_level)
        keys = ServerKeys.load(config.state_dir)
        issuer = TokenIssuer(
            keys.jwt,
            config.tokens.issuer,
            config.tokens.audience,
            float(config.tokens.access_ttl),
        )
        policy = PolicyHolder(config.policy_path)
        audit = AuditLog(config.audit_path)
        stack.callback(audit.close)
        yield Services(
            store=store,
            credentials=CredentialStore(conn),
            issuer=issuer,
            keys=keys,
            policy=policy,
            audit=audit,
            max_upload_bytes=config.storage.max_upload_bytes,
            nar_checker=NarParser,
        )


def hypercorn_config(config: ServerConfig, listen: Sequence[str]) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = list(listen)
    hc.graceful_timeout = config.server.graceful_timeout
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.keep_alive_timeout = 75
    hc.h11_max_incomplete_size = 64 * 1024
    hc.backlog = 1024
    hc.include_server_header = False
    return hc


async def serve(
    config: ServerConfig,
    *,
    listen: Sequence[str] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation); ``started`` gets the bound URLs."""
    binds = list(listen or config.server.listen)
    with open_services(config) as services:
        app = CacheApp(services)
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, shutdown)
            await _start_policy(nursery, services.policy)
            urls: list[str] = await nursery.start(
                partial(_run_hypercorn, app, hypercorn_config(config, binds), shutdown, nursery)
            )
            log.info("serving on %s", ", ".join(urls))
            if config.address_path is not None:
                _write_address(config.address_path, urls)
            task_status.started(urls)


async def _run_hypercorn(
    app: CacheApp,
    hc: HypercornConfig,
    shutdown: trio.Event,
    nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn returns after draining in-flight requests; then stop the helpers too."""
    await hypercorn_serve(app, hc, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]
    nursery.cancel_scope.cancel()


async def _start_policy(nursery: trio.Nursery, policy: PolicyHolder) -> None:
    watch = getattr(policy, "watch", None)
    if watch is not None:
        nursery.start_soon(watch)


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            shutdown.set()
            return


def _write_address(path: Path, urls: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{u}\n" for u in urls))
    os.replace(tmp, path)
