"""The daemon process: one trio nursery holding every long-running part.

Start-up order: signals are handled first (so SIGTERM during start-up is clean), then the
refresher (with the saved login, if any), the proxy, the control socket; the Nix
integration is (re)written, and only then is systemd told ``READY=1``. Listeners come
from socket activation when systemd (or launchd, for ``proxy``) passes them, named
``control`` and ``proxy``, otherwise they are bound from the config.

- SIGTERM/SIGINT: ``STOPPING=1``, the control socket closes, the proxy gets
  ``daemon.shutdown_grace`` seconds for in-flight downloads, then everything is cancelled.
- SIGUSR2 (``nixd daemon --restart``): restart in place, the listening sockets kept open
  across an ``exec`` of the same command line (:mod:`nixd.daemon.handoff`, which also
  says how a restart is survived under systemd and launchd). The control socket closes
  first, the proxy drains as for SIGTERM, then the new image starts on the same sockets.
- No config file: the defaults (every section is optional); the file appearing later is a
  change like any other.
- SIGHUP, or a change of the config file seen by watchfiles: the config is re-read. A valid
  one is applied in place (upstreams, keys, control group, Nix integration) without
  touching in-flight downloads; an invalid one is logged with file:key and the old config
  stays, and ``status`` says why (``config_error``) until a reload succeeds. Any exception
  while loading or checking the new config is such a refusal: a reload never ends the
  daemon. Settings that need a restart (socket paths, listen address, state dir) are
  reported as such.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
import watchfiles

from nixd import __version__, systemd
from nixd.auth import methods
from nixd.auth.methods import LoginMethod
from nixd.auth.model import AccessToken
from nixd.auth.token import exchange_json, fetch_cache_keys, fetch_token_status
from nixd.daemon import dbus, handoff
from nixd.daemon.config import Config, load_config, upstream_config
from nixd.daemon.control import (
    ApiError,
    ControlServer,
    Peer,
    Route,
    open_control_listener,
    serve_control,
)
from nixd.daemon.nixsetup import ApplyResult, NixSetup, NixSetupConfig, NixState
from nixd.daemon.push import Pusher
from nixd.daemon.refresher import Refresher
from nixd.daemon.state import (
    LoginState,
    clear_state,
    ensure_proxy_secret,
    load_state,
    save_state,
)
from nixd.errors import ConfigError, LoginFailed, NixdError
from nixd.proxy.config import FlakesConfig, ProxyConfig, UpstreamConfig
from nixd.proxy.credential import redact_url, strip_userinfo
from nixd.proxy.server import ProxyHandle, serve_proxy

log = logging.getLogger(__name__)

HTTP_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def configure_logging(level: str) -> None:
    """Journald when stderr is the journal, plain stderr lines otherwise."""
    root = logging.getLogger()
    handler = systemd.journald_handler()
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("nixd: %(levelname)s: %(name)s: %(message)s"))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # the CLI's quiet default (nixd.cliutil: nixd.* at WARNING) is not the daemon's
    logging.getLogger("nixd").setLevel(logging.NOTSET)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


class Daemon:
    """The daemon's state and the control API handlers."""

    def __init__(self, config: Config, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http
        self.refresher = Refresher(on_token=self._on_token)
        self.login_state: LoginState | None = None
        self.proxy_handle: ProxyHandle | None = None
        self.proxy_url: str | None = None
        self.proxy_error: str | None = None
        self.last_error: str | None = None
        self.config_error: str | None = None
        """Why the last reload was refused; None once one succeeded."""
        self.nix_result: ApplyResult | None = None
        """What the last write of the Nix integration did (None: not written yet)."""
        self.nix_problem: str | None = None
        """Why Nix does not use nixd's settings, with what to do; None when it does."""
        self.restart_refusals = 0
        # why the last restart in place was refused: kept apart from last_error, which
        # the config watcher may overwrite before ``nixd daemon --restart`` reads it
        self.restart_error: str | None = None
        """In-place restarts refused (SIGUSR2 with a config or command that would not
        start); ``nixd daemon --restart`` watches it to stop waiting."""
        self.started_at = time.time()
        self._admin_lock = trio.Lock()
        self._nix_lock = trio.Lock()
        self.expiry_changed = trio.Event()
        methods.load_builtin_methods()  # before READY: the first login is not slowed
        self.unit_restarter = dbus.UnitRestarter()
        self.pusher = Pusher(self)
        self.control = ControlServer(
            {
                ("GET", "/status"): Route(self.status, privileged=False),
                ("GET", "/version"): Route(self.version, privileged=False),
                # answered only to those who may log in: the CLI asks before a browser flow
                ("GET", "/login"): Route(self.may_login, privileged=True),
                ("POST", "/login"): Route(self.login, privileged=True, takes_body=True),
                ("POST", "/logout"): Route(self.logout, privileged=True),
                ("POST", "/push"): Route(self.pusher.api_push, privileged=True, takes_body=True),
                ("POST", "/push/job"): Route(self.pusher.api_job, privileged=True, takes_body=True),
                ("GET", "/push"): Route(self.pusher.api_status, privileged=True),
            },
            group=config.daemon.control_group,
        )

    @property
    def push_server(self) -> str | None:
        """The server pushes go to: the one logged in to (:mod:`nixd.daemon.push`)."""
        return self.login_state.server_url if self.login_state else None

    @property
    def push_tokens(self) -> Refresher:
        return self.refresher

    # -- login state -----------------------------------------------------------------------

    async def _exchange(self, server: str, method: LoginMethod) -> AccessToken:
        """One exchange with a fresh body from ``method`` (login and every renewal)."""
        body = await method.exchange_body(self.http)
        token, answer = await exchange_json(self.http, server, body)
        if method.accept(answer):  # e.g. a rotated refresh credential
            log.debug("the %s login method's state changed; saved with the token", method.name)
        return token

    def _renewer(self, server: str, method: LoginMethod) -> Callable[[], Awaitable[AccessToken]]:
        async def renew() -> AccessToken:
            return await self._exchange(server, method)

        return renew

    def _keep_fresh(self, server: str, method: LoginMethod, token: AccessToken | None) -> None:
        """Hand the login to the refresher, with when (and why) its renewals must stop."""
        until = method.renewable_until
        self.refresher.set_login(
            self._renewer(server, method),
            token,
            renewable_until=until,
            expired_message=None if until is None else methods.expiry_warning(method, until),
        )

    async def _display_identity(self, server: str, token: AccessToken) -> str:
        """``github:owner/repo@ref`` from the server's token status; the raw identity if not.

        Only CI identities have subjects worth rewriting: the others are shown as they are.
        """
        if token.identity.partition(":")[0] not in methods.RENDERED_KINDS:
            return token.identity
        try:
            shown = methods.render_identity(await fetch_token_status(self.http, server, token))
        except NixdError as exc:
            log.warning("cannot ask %s who the token names: %s", redact_url(server), exc)
            shown = None
        return shown or token.identity

    def restore_login(self) -> None:
        state = load_state(self.config.state_file)
        if state is None:
            return
        self.login_state = state
        self._keep_fresh(state.server_url, state.method, state.token)
        self._login_changed()
        log.info(
            "restored the login of %s at %s", self._identity() or "?", redact_url(state.server_url)
        )

    def _identity(self) -> str | None:
        if self.login_state is not None and self.login_state.display_identity:
            return self.login_state.display_identity
        token = self.refresher.token or (self.login_state.token if self.login_state else None)
        return token.identity if token else None

    def _login_changed(self) -> None:
        self.expiry_changed.set()
        self.expiry_changed = trio.Event()

    async def watch_expiry(self) -> None:
        """Log, ahead of time, that a login's credential cannot be renewed past its expiry."""
        while True:
            changed = self.expiry_changed
            state = self.login_state
            if state is None or state.method.renewable_until is None:
                await changed.wait()
                continue
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when, changed, nursery.cancel_scope)
                await methods.warn_before_expiry(state.method, _log_warning)
                await changed.wait()

    async def _on_token(self, token: AccessToken) -> None:
        state = self.login_state
        if state is None:
            return
        self.login_state = dataclasses.replace(state, token=token)
        await trio.to_thread.run_sync(save_state, self.config.state_file, self.login_state)
        await self.apply_nix()

    # -- proxy and Nix integration ---------------------------------------------------------

    def proxy_config(self, config: Config | None = None) -> ProxyConfig:
        """What the proxy is given, from ``config`` (default: the one in force)."""
        c = config or self.config
        upstreams = []
        if self.login_state is not None:
            keys = tuple(dict.fromkeys(self.login_state.pinned_keys + c.server.trusted_keys))
            upstreams.append(
                UpstreamConfig(
                    # the access token is this upstream's credential, never the URL's
                    url=strip_userinfo(self.login_state.server_url) + "/cache",
                    priority=30,
                    trusted_keys=keys,
                    auth="nixd",
                    netrc_file=None,
                )
            )
        upstreams.extend(upstream_config(u) for u in c.proxy.upstreams)
        # How an unreachable upstream and a token being renewed are met: the same for all.
        upstreams = [
            dataclasses.replace(
                u,
                offline_after=c.proxy.offline_after,
                offline_probe=c.proxy.offline_probe,
                token_wait=c.proxy.token_wait,
            )
            for u in upstreams
        ]
        return ProxyConfig(
            listen_host=c.proxy.listen_host,
            listen_port=c.proxy.listen_port,
            secret_file=c.proxy_secret_file,
            store_dir=c.proxy.store_dir,
            store_max_bytes=c.proxy.store_max_bytes,
            negative_ttl=c.proxy.negative_ttl,
            prefetch=c.proxy.prefetch,
            prefetch_concurrency=c.proxy.prefetch_concurrency,
            upstreams=tuple(upstreams),
            flakes=self.flakes_config(c),
        )

    def flakes_config(self, c: Config) -> FlakesConfig | None:
        """The proxy's flake routes: to the logged-in server; None when turned off."""
        if not c.proxy.flakes:
            return None
        state = self.login_state
        return FlakesConfig(
            server_url=strip_userinfo(state.server_url) if state is not None else None,
            max_bytes=c.proxy.flakes_max_bytes,
            token_wait=c.proxy.token_wait,
        )

    def update_proxy(self) -> None:
        if self.proxy_handle is not None:
            config = self.proxy_config()
            self.proxy_handle.update_upstreams(config.upstreams)
            self.proxy_handle.update_flakes(config.flakes)

    def nix_setup(self) -> NixSetup:
        n = self.config.nix
        return NixSetup(
            NixSetupConfig(
                nix_conf=Path(n.nix_conf),
                fragment=Path(n.fragment),
                netrc=Path(n.netrc),
                additional_netrc_sources=tuple(Path(p) for p in n.additional_netrc_sources),
                managed_by=n.nix_conf_managed_by,
            )
        )

    def nix_state(self) -> NixState | None:
        """What Nix should be told now; None when there is nothing to tell (logged out)."""
        state = self.login_state
        if state is None or self.proxy_url is None:
            return None
        c = self.config
        keys = state.pinned_keys + c.server.trusted_keys
        for u in c.proxy.upstreams:
            keys += u.trusted_keys
        token = self.refresher.token
        host = urlsplit(state.server_url).hostname
        return NixState(
            proxy_url=self.proxy_url,
            proxy_secret=ensure_proxy_secret(c.proxy_secret_file),
            trusted_public_keys=tuple(dict.fromkeys(keys)),
            server_credentials=((host, token.value),) if host and token else (),
        )

    async def apply_nix(self) -> str | None:
        """(Re)write the managed netrc and nix.conf fragment; errors are logged, not raised.

        Returns why Nix does not use nixd's settings, with what to do (None when it does,
        or when logged out): ``login`` hands it to the CLI, ``status`` shows it.
        """
        async with self._nix_lock:
            try:
                result = await trio.to_thread.run_sync(self._apply_nix_sync)
            except (NixdError, OSError) as exc:
                self.last_error = f"could not write the Nix configuration: {exc}"
                self.nix_problem = self.last_error
                log.error("%s", self.last_error)
                return self.nix_problem
            self.nix_result = result
            problem = None if result is None else result.problem
            if problem is not None and problem != self.nix_problem:  # once, not per renewal
                log.error("%s", problem)
            elif problem is None and self.nix_problem is not None and result is not None:
                log.info("Nix now reads nixd's settings")
            self.nix_problem = problem
            if result is not None and result.restart_needed:
                await self.restart_nix_daemon()
            return self.nix_problem

    def _apply_nix_sync(self) -> ApplyResult | None:
        state = self.nix_state()
        if state is None:
            return None
        return self.nix_setup().apply(state)

    async def remove_nix(self, setup: NixSetup | None = None) -> None:
        async with self._nix_lock:
            target = setup or self.nix_setup()
            try:
                changed = await trio.to_thread.run_sync(target.remove)
            except (NixdError, OSError) as exc:
                self.last_error = f"could not remove the Nix configuration: {exc}"
                log.error("%s", self.last_error)
                return
            self.nix_result = None
            self.nix_problem = None
            if changed:
                await self.restart_nix_daemon()

    async def restart_nix_daemon(self) -> None:
        """nix-daemon reads nix.conf only at start: ask systemd (D-Bus) to restart it."""
        if self.config.nix.restart_nix_daemon:
            await self.unit_restarter.try_restart(self.config.nix.nix_daemon_unit)

    # -- control API -----------------------------------------------------------------------

    async def version(self, _peer: Peer | None, _body: Any) -> dict[str, Any]:
        return {"version": __version__}

    async def status(self, _peer: Peer | None, _body: Any) -> dict[str, Any]:
        c = self.config
        token = self.refresher.token
        state = self.login_state
        proxy: dict[str, Any] = {"url": self.proxy_url, "error": self.proxy_error}
        upstream_health: dict[str, Any] = {}
        store_bytes = 0
        if self.proxy_handle is not None:
            extra = self.proxy_handle.status()
            upstream_health = {str(u.get("url")): u for u in extra.pop("upstreams", [])}
            store_bytes = int(extra.pop("store_bytes", 0))
            for key in ("store_dir", "store_max_bytes", "url"):
                extra.pop(key, None)
            proxy.update(extra)
        upstreams = []
        for u in self.proxy_config().upstreams:
            shown = u.display_url  # the status is world-readable: no credentials
            entry: dict[str, Any] = {"url": shown, "priority": u.priority, "auth": u.auth}
            if shown in upstream_health:
                entry.update({k: v for k, v in upstream_health[shown].items() if k not in entry})
            upstreams.append(entry)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "generation": handoff.generation(),
            "restart_refusals": self.restart_refusals,
            "restart_error": self.restart_error,
            "config": c.path,
            "started_at": self.started_at,
            "logged_in": state is not None,
            "server": redact_url(state.server_url) if state else None,
            "identity": self._identity() if state else None,
            "token_identity": token.identity if token else None,
            "method": state.method.name if state else None,
            "renewal": state.method.describe() if state else None,
            "renewable_until": state.method.renewable_until if state else None,
            "warning": methods.expiry_warning(state.method) if state else None,
            "token_expires_at": token.expires_at if token else None,
            "token_valid": bool(token and not token.expired()),
            "last_refresh": self.refresher.last_refresh,
            "renewals": self.refresher.renewals,
            "next_refresh": self.refresher.next_refresh,
            "last_error": self.refresher.last_error or self.last_error,
            "config_error": self.config_error,
            "pinned_keys": list(state.pinned_keys) if state else [],
            "proxy": proxy,
            "upstreams": upstreams,
            "store": {
                "dir": c.proxy.store_dir,
                "bytes_used": store_bytes,
                "max_bytes": c.proxy.store_max_bytes,
            },
            "nix": self._nix_status(),
        }

    def _nix_status(self) -> dict[str, Any]:
        n = self.config.nix
        result = self.nix_result
        written = result is not None or self.nix_problem is not None
        return {
            "nix_conf": n.nix_conf,
            "fragment": n.fragment,
            "netrc": n.netrc,
            "managed_by": n.nix_conf_managed_by,
            "include_file": result.include_file if result is not None else None,
            # None while logged out: nothing is written, so nothing can be in effect
            "in_effect": (self.nix_problem is None) if written else None,
            "problem": self.nix_problem,
        }

    async def may_login(self, _peer: Peer | None, _body: Any) -> dict[str, Any]:
        """Reached only by a peer that may log in (the route is privileged)."""
        return {"allowed": True}

    async def login(self, peer: Peer | None, body: Any) -> dict[str, Any]:
        """``{"method": name, "server": url, "params": {...}}``: exchange, pin keys, set up Nix.

        The method's params may hold secrets (an API token, a CI request token): they are
        kept in the 0600 state file and never logged. The older ``{"method": "token",
        "token": ...}`` form is still accepted.
        """
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "expected a JSON object")
        name = body.get("method")
        if not isinstance(name, str) or name not in methods.names():
            known = ", ".join(methods.names())
            raise ApiError(400, "bad_request", f"unknown login method {name!r} (known: {known})")
        params = body.get("params")
        if params is None and name == "token" and "token" in body:
            params = {"token": body["token"]}
        if not isinstance(params, dict):
            raise ApiError(400, "bad_request", '"params" must be a JSON object')
        server = body.get("server") or self.config.server.url
        if not isinstance(server, str) or not server.startswith(("http://", "https://")):
            raise ApiError(
                400, "bad_request", "no server URL: pass --server or set server.url in the config"
            )
        server = server.rstrip("/")
        try:
            method = methods.from_params(name, params, server)
        except LoginFailed as exc:
            raise ApiError(400, "bad_request", str(exc)) from exc
        async with self._admin_lock:
            token = await self._exchange(server, method)
            keys = await fetch_cache_keys(self.http, server)
            shown = await self._display_identity(server, token)
            state = LoginState(server, method, keys, token, time.time(), shown)
            await trio.to_thread.run_sync(save_state, self.config.state_file, state)
            self.login_state = state
            self._keep_fresh(server, method, token)
            self._login_changed()
            self.last_error = None
            self.update_proxy()
            problem = await self.apply_nix()
        log.info(
            "logged in as %s at %s with %s (by uid %s)",
            shown,
            redact_url(server),
            name,
            peer.uid if peer else "?",
        )
        if warning := methods.expiry_warning(method):
            log.warning("%s", warning)
        return {
            "identity": shown,
            "token_identity": token.identity,
            "method": name,
            "renewal": method.describe(),
            "warning": methods.expiry_warning(method),
            "server": server,
            "token_expires_at": token.expires_at,
            "pinned_keys": list(keys),
            "nix": self._nix_status() | {"in_effect": problem is None, "problem": problem},
        }

    async def logout(self, peer: Peer | None, _body: Any) -> dict[str, Any]:
        async with self._admin_lock:
            was = self._identity()
            self.refresher.clear()
            self.login_state = None
            self._login_changed()
            await trio.to_thread.run_sync(clear_state, self.config.state_file)
            self.update_proxy()
            await self.remove_nix()
        log.info("logged out %s (by uid %s)", was or "nobody", peer.uid if peer else "?")
        return {"logged_out": was}

    # -- reload ----------------------------------------------------------------------------

    async def reload(self, reason: str) -> bool:
        """Re-read the config; keep the old one if the new one is invalid."""
        path = self.config.path
        if path is None:
            return False
        try:
            new = await trio.to_thread.run_sync(
                functools.partial(load_config, path, missing_ok=True)
            )
            self.proxy_config(new)  # everything applied below must build from it
        except Exception as exc:  # containment: any failure is a refusal, never the end
            if not isinstance(exc, ConfigError):
                log.error("config reload (%s): unexpected error", reason, exc_info=exc)
                exc = ConfigError(f"{path}: {type(exc).__name__}: {exc}")
            self.config_error = f"config not reloaded: {exc}"
            self.last_error = self.config_error
            log.error("config reload (%s) refused, keeping the old config: %s", reason, exc)
            systemd.notify("STATUS=config reload failed; running with the old config")
            return False
        self.config_error = None
        if new == self.config:
            if self.last_error is not None and self.last_error.startswith("config not reloaded"):
                self.last_error = None
            return True
        old = self.config
        needs_restart = [
            name
            for name, a, b in (
                ("daemon.control_socket", old.daemon.control_socket, new.daemon.control_socket),
                ("daemon.state_dir", old.daemon.state_dir, new.daemon.state_dir),
                (
                    "proxy.listen",
                    (old.proxy.listen_host, old.proxy.listen_port),
                    (new.proxy.listen_host, new.proxy.listen_port),
                ),
                ("proxy.store_dir", old.proxy.store_dir, new.proxy.store_dir),
            )
            if a != b
        ]
        if needs_restart:
            log.warning("config: %s change(s) take effect on restart", ", ".join(needs_restart))
            new = dataclasses.replace(
                new,
                daemon=dataclasses.replace(
                    new.daemon,
                    control_socket=old.daemon.control_socket,
                    state_dir=old.daemon.state_dir,
                ),
                proxy=dataclasses.replace(
                    new.proxy,
                    listen_host=old.proxy.listen_host,
                    listen_port=old.proxy.listen_port,
                    store_dir=old.proxy.store_dir,
                ),
            )
        if old.nix != new.nix:
            await self.remove_nix(self.nix_setup())
        self.config = new
        self.control.group = new.daemon.control_group
        self.last_error = None
        try:
            self.update_proxy()
        except Exception as exc:  # checked above; should it still fail, the daemon stays
            self.last_error = f"config reloaded, but the proxy kept its upstreams: {exc}"
            log.error("%s", self.last_error, exc_info=exc)
        await self.apply_nix()
        log.info("config reloaded (%s)", reason)
        systemd.notify(f"STATUS={self.status_line()}")
        return True

    def status_line(self) -> str:
        who = self._identity()
        proxy = self.proxy_url or "no proxy"
        return f"{'logged in as ' + who if who else 'not logged in'}; proxy {proxy}"

    # -- tasks -----------------------------------------------------------------------------

    async def watch_config(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Reload on changes of the config file; started once the watch is in place."""
        path = self.config.path
        if path is None:
            task_status.started()
            return
        target = Path(path)  # absolute: load_config made it so

        def only_config(_change: watchfiles.Change, changed: str) -> bool:
            return Path(changed) == target

        started = False
        warned = False
        while True:
            try:
                watching = False
                async for changes in watchfiles.awatch(
                    target.parent,
                    watch_filter=only_config,
                    recursive=False,
                    debounce=200,
                    step=50,
                    rust_timeout=250,
                    yield_on_timeout=True,
                ):
                    if not watching:
                        # the first (possibly empty) yield means the watch is set up; a
                        # change made between loading the config and now would be missed:
                        # look once
                        watching = True
                        if not started:
                            started = True
                            task_status.started()
                        await self.reload("config file changed")
                    elif changes:
                        await self.reload("config file changed")
            except Exception as exc:  # containment: a failed watch must not end the daemon
                if not warned:  # e.g. no /etc/nixd yet: said once, retried quietly
                    warned = True
                    log.warning("cannot watch %s (%s); retrying, SIGHUP reloads", target, exc)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(5)

    async def watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def run_proxy(
        self, listeners: list[trio.SocketListener] | None, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await trio.to_thread.run_sync(ensure_proxy_secret, self.config.proxy_secret_file)
        async with trio.open_nursery() as nursery:
            handle: ProxyHandle = await nursery.start(
                functools.partial(
                    serve_proxy, self.proxy_config(), self.refresher, listeners=listeners
                )
            )
            self.proxy_handle = handle
            self.proxy_url = handle.url
            log.info("proxy listening on %s", self.proxy_url)
            task_status.started()


def _log_warning(message: str) -> None:
    log.warning("%s", message)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _proxy_listeners(sockets: list[Any]) -> list[trio.SocketListener]:
    return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]


def _activated_sockets() -> dict[str, list[Any]]:
    activated = systemd.listen_fds()
    if "proxy" not in activated and (launchd := handoff.launchd_sockets("proxy")):
        activated["proxy"] = launchd
    if activated:
        log.info("socket activation: %s", ", ".join(sorted(activated)))
    return activated


async def _prepare_handoff(
    daemon: Daemon, control: trio.SocketListener, proxy: list[trio.SocketListener]
) -> handoff.Handoff | None:
    """The handoff for an in-place restart, or None (logged) when it would not come back.

    A socket whose address the config file now changes (the settings a reload leaves
    for a restart) is not handed on: the new image binds the new address itself.
    """
    config = daemon.config
    try:
        new = config
        if config.path is not None:
            new = await trio.to_thread.run_sync(
                functools.partial(load_config, config.path, missing_ok=True)
            )
        named: list[tuple[str, trio.socket.SocketType]] = []
        if new.daemon.control_socket == config.daemon.control_socket:
            named.append(("control", control.socket))
        else:
            log.info("restart in place: the control socket moves to %s", new.daemon.control_socket)
        old_listen = (config.proxy.listen_host, config.proxy.listen_port)
        if (new.proxy.listen_host, new.proxy.listen_port) == old_listen:
            named += [("proxy", p.socket) for p in proxy]
        else:
            host, port = new.proxy.listen_host, new.proxy.listen_port
            log.info("restart in place: the proxy moves to %s:%d", host, port)
        return handoff.prepare(named, handoff.restart_command())
    except (ConfigError, OSError) as exc:
        daemon.restart_refusals += 1
        daemon.restart_error = f"restart in place refused: {exc}"
        daemon.last_error = daemon.restart_error
        log.error("restart in place refused, still running: %s", exc)
        return None


async def run_daemon(config: Config) -> handoff.Handoff | None:
    """Run the daemon until SIGTERM/SIGINT (None) or SIGUSR2 (the handoff to ``exec``).

    See the module docstring.
    """
    activated = _activated_sockets()
    restart: handoff.Handoff | None = None
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False) as http:
        daemon = Daemon(config, http)
        with trio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2
        ) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.refresher.run)
                await nursery.start(daemon.pusher.run)
                nursery.start_soon(daemon.watch_expiry)
                wake = dbus.SystemBusWatcher(dbus.RefreshOnWake(daemon.refresher))
                await nursery.start(wake.run)
                daemon.restore_login()
                proxy_scope = trio.CancelScope()
                if "proxy" in activated:
                    proxy_listeners = await _proxy_listeners(activated["proxy"])
                else:  # bound here, not in the proxy, so a restart in place can keep them
                    proxy_listeners = await trio.open_tcp_listeners(
                        config.proxy.listen_port, host=config.proxy.listen_host
                    )

                async def proxy_task(*, task_status: trio.TaskStatus[None]) -> None:
                    with proxy_scope:
                        await daemon.run_proxy(proxy_listeners, task_status=task_status)

                await nursery.start(proxy_task)
                if "control" in activated:
                    control_listener = trio.SocketListener(
                        trio.socket.from_stdlib_socket(activated["control"][0])
                    )
                else:
                    control_listener = await open_control_listener(config.daemon.control_socket)
                control_scope = trio.CancelScope()

                async def control_task(*, task_status: trio.TaskStatus[None]) -> None:
                    with control_scope:
                        await serve_control(
                            daemon.control, control_listener, task_status=task_status
                        )

                await nursery.start(control_task)
                await daemon.apply_nix()
                await nursery.start(daemon.watch_config)
                interval = systemd.watchdog_interval()
                if interval:
                    nursery.start_soon(daemon.watchdog, interval)
                systemd.notify("READY=1", f"STATUS={daemon.status_line()}")
                log.info(
                    "nixd %s ready (generation %d); control socket %s",
                    __version__,
                    handoff.generation(),
                    config.daemon.control_socket,
                )

                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await daemon.reload("SIGHUP")
                        continue
                    if signum == signal.SIGUSR2:
                        restart = await _prepare_handoff(daemon, control_listener, proxy_listeners)
                        if restart is None:
                            continue
                        log.info("SIGUSR2: restarting in place; the sockets stay open")
                        break
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    break
                if restart is not None:
                    systemd.notify(
                        "RELOADING=1",
                        f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                        "STATUS=restarting in place",
                    )
                else:
                    systemd.notify("STOPPING=1", "STATUS=shutting down")
                control_scope.cancel()
                await _stop_proxy(daemon, proxy_scope, daemon.config.daemon.shutdown_grace)
                nursery.cancel_scope.cancel()
    log.info("restarting in place" if restart is not None else "stopped")
    return restart


async def _stop_proxy(daemon: Daemon, scope: trio.CancelScope, grace: float) -> None:
    """Let in-flight downloads finish for up to ``grace`` seconds, then cut them."""
    handle = daemon.proxy_handle
    if handle is not None:
        with trio.move_on_after(grace) as waited:
            await handle.drain()
        if waited.cancelled_caught:
            log.warning("in-flight downloads did not finish within %.0f s; cutting them", grace)
    scope.cancel()
