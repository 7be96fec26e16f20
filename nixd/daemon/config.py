"""The daemon's configuration: one TOML file read into frozen, typed sections.

The file (``/etc/nixd/config.toml`` by default) has four sections, all optional::

    [daemon]   control_socket, state_dir, control_group, shutdown_grace, log_level
    [server]   url, trusted_keys            (the nixd cache server; its keys are pinned at login)
    [proxy]    listen, store_dir, store_max_bytes, negative_ttl, prefetch,
               prefetch_concurrency, offline_after, offline_probe, token_wait,
               flakes, flakes_max_bytes   (private flakes for local users, see
                                           nixd.proxy.flakes),
               [[proxy.upstreams]]
               (url, priority, trusted_keys, auth, netrc_file, foreign_urls)
    [nix]      nix_conf, fragment, netrc, additional_netrc_sources, restart_nix_daemon,
               nix_daemon_unit        (restarted over the system D-Bus when the fragment changes),
               nix_conf_managed_by    ("auto", "nixd" or "external": who edits nix.conf,
                                       see nixd.daemon.nixsetup)
    [push]     to, compression, jobs, retries, upstream_keys, store   (``nixd push``)

No file at all is the same as an empty one: the daemon runs on the defaults
(:func:`load_config` with ``missing_ok``), so a fresh install starts before anyone has
written ``/etc/nixd/config.toml``; creating the file later is picked up as a reload.

Every path is configurable, so tests and the demo run unprivileged inside a temp dir.
:func:`load_config` is the single parser: it refuses unknown keys and wrong types, and every
error names ``file:key`` so a reload that fails can say exactly what to fix while the old
config stays in force.

A reload must never be able to stop the daemon, whatever an editor leaves in the file
(containment, DESIGN.md): :func:`load_config` raises nothing but :class:`ConfigError` —
not for bytes that are not UTF-8, a file over :data:`MAX_CONFIG_BYTES`, TOML nested past
Python's recursion limit, an integer of thousands of digits, a URL ``urlsplit`` chokes on
(``http://[::1``) or a port out of range. Everything later stages build from the config
(the proxy's upstreams) is checked here too, so a config that loads can be applied.
"""

from __future__ import annotations

import grp
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

from nixd.bounds import parse_uint
from nixd.daemon.nixsetup import MANAGED_BY, ManagedBy
from nixd.errors import ConfigError, FormatError
from nixd.nix.signing import PublicKey
from nixd.proxy.config import (
    FOREIGN_URLS,
    MAX_PREFETCH_CONCURRENCY,
    ForeignUrls,
    UpstreamConfig,
)
from nixd.proxy.credential import origin_of

DEFAULT_CONFIG_PATH = "/etc/nixd/config.toml"
DEFAULT_CONTROL_SOCKET = "/run/nixd/nixd.sock"
DEFAULT_PROXY_PORT = 6493
"""The proxy's port on loopback: "nixd" on a phone keypad (N=6 I=4 X=9 D=3).

Not 37515 (the previous default), which is magic-nix-cache's and flakehub-cache-action's:
both in one CI job collided. 6493 is no default of another Nix cache tool (nix-serve and
harmonia 5000, attic 8080, ncps 8501), is not in netbase's /etc/services, and lies below
every ephemeral port range (Linux 32768-60999, IANA and macOS 49152-65535), so no
outgoing connection can be holding it when the daemon starts. systemd/nixd-proxy.socket
and launchd/org.nixd.daemon.plist name the same port (tests/daemon/test_units.py).
"""
MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (a real one is a few KiB)."""

AuthMode = Literal["nixd", "none", "netrc"]
_AUTH_MODES: tuple[AuthMode, ...] = ("nixd", "none", "netrc")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DaemonSection:
    control_socket: str = DEFAULT_CONTROL_SOCKET
    state_dir: str = "/var/lib/nixd"
    #: members of this group (besides root) may log in and out; None = root only
    control_group: str | None = None
    #: seconds in-flight downloads get to finish on SIGTERM before they are cut
    shutdown_grace: float = 10.0
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class ServerSection:
    #: base URL of the nixd cache server, e.g. https://cache.example.org (login may set it)
    url: str | None = None
    #: keys trusted in addition to those pinned from the server at login
    trusted_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamSection:
    url: str
    priority: int = 50
    trusted_keys: tuple[str, ...] = ()
    auth: AuthMode = "none"
    netrc_file: str | None = None
    #: a narinfo URL on another origin: "refuse", or "anonymous" (fetched without credentials)
    foreign_urls: ForeignUrls = "refuse"


@dataclass(frozen=True, slots=True)
class ProxySection:
    listen_host: str = "127.0.0.1"
    listen_port: int = DEFAULT_PROXY_PORT
    store_dir: str = "/var/cache/nixd/store"
    store_max_bytes: int = 10 * 1024**3
    negative_ttl: float = 30.0
    #: fetch the narinfos and small NARs of a closure ahead of Nix (nixd.proxy.prefetch)
    prefetch: bool = True
    prefetch_concurrency: int = 8
    #: failed connects in a row after which an upstream is offline (answered at once)
    offline_after: int = 2
    #: seconds between two tries of an offline upstream
    offline_probe: float = 2.0
    #: seconds a request waits for a token being renewed before it is answered 503
    token_wait: float = 5.0
    #: serve /f/... and /api/v1/flakes... to local users without the secret, as this
    #: machine's login (nixd.proxy.flakes)
    flakes: bool = True
    #: largest flake answer (a release tarball) the proxy passes on
    flakes_max_bytes: int = 256 << 20
    upstreams: tuple[UpstreamSection, ...] = ()


@dataclass(frozen=True, slots=True)
class NixSection:
    nix_conf: str = "/etc/nix/nix.conf"
    fragment: str = "/etc/nix/nixd.conf"
    netrc: str = "/etc/nix/nixd-netrc"
    additional_netrc_sources: tuple[str, ...] = ()
    restart_nix_daemon: bool = True
    #: the systemd unit asked to restart (TryRestartUnit) after the fragment changed
    nix_daemon_unit: str = "nix-daemon.service"
    #: who edits nix.conf: "nixd" adds the include line, "external" (NixOS, nix-darwin,
    #: configuration management) never touches it, "auto" picks per machine
    nix_conf_managed_by: ManagedBy = "auto"


PUSH_COMPRESSIONS = ("zstd", "xz", "none")


@dataclass(frozen=True, slots=True)
class PushSection:
    """``nixd push`` / ``watch-store`` / the post-build hook (:mod:`nixd.daemon.push`)."""

    #: the slice pushed to without ``--to``: ``org/project``
    to: str | None = None
    compression: str = "zstd"
    #: paths uploaded at once, and attempts per request before a path fails
    jobs: int = 4
    retries: int = 4
    #: keys of upstream caches besides the proxy's upstreams': paths they signed are skipped
    upstream_keys: tuple[str, ...] = ()
    #: a chroot store's root (``nix --store DIR``); None: the system store
    store: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    path: str | None = None
    daemon: DaemonSection = field(default_factory=DaemonSection)
    server: ServerSection = field(default_factory=ServerSection)
    proxy: ProxySection = field(default_factory=ProxySection)
    nix: NixSection = field(default_factory=NixSection)
    push: PushSection = field(default_factory=PushSection)

    @property
    def proxy_secret_file(self) -> str:
        return str(Path(self.daemon.state_dir) / "proxy-secret")

    @property
    def state_file(self) -> str:
        return str(Path(self.daemon.state_dir) / "state.json")

    @property
    def push_queue(self) -> str:
        """Where the post-build hook appends paths for the daemon to push."""
        return str(Path(self.daemon.state_dir) / "push-queue")


class _Section:
    """Reads typed values out of one TOML table and remembers which keys were used."""

    def __init__(self, file: str, prefix: str, table: Any) -> None:
        self.file = file
        self.prefix = prefix
        if not isinstance(table, dict):
            raise ConfigError(f"{file}:{prefix.rstrip('.')}: expected a table")
        self.table: dict[str, Any] = table
        self.seen: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.file}:{self.prefix}{key}"

    def get(
        self,
        key: str,
        kind: type[T],
        default: T,
        check: Callable[[T], str | None] = (lambda _v: None),
    ) -> T:
        self.seen.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(
                f"{self.where(key)}: expected {kind.__name__}, got {type(value).__name__}"
            )
        problem = check(cast(T, value))
        if problem:
            raise ConfigError(f"{self.where(key)}: {problem}")
        return cast(T, value)

    def opt_str(self, key: str, default: str | None = None) -> str | None:
        self.seen.add(key)
        if key not in self.table:
            return default
        return self.get(key, str, "")

    def strings(self, key: str) -> tuple[str, ...]:
        values = self.get(key, list, [])
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise ConfigError(f"{self.where(key)}[{i}]: expected a string")
        return tuple(values)

    def keys(self, key: str) -> tuple[str, ...]:
        """A list of Nix public keys (``name:base64``), each checked."""
        values = self.strings(key)
        for i, v in enumerate(values):
            try:
                PublicKey.parse(v)
            except FormatError as exc:
                raise ConfigError(f"{self.where(key)}[{i}]: {exc}") from exc
        return values

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise ConfigError(f"{self.where(unknown[0])}: unknown key")


def _nonempty(v: str) -> str | None:
    return None if v else "must not be empty"


def _absolute(v: str) -> str | None:
    if "\0" in v:
        return "must not contain a NUL character"
    return None if v.startswith("/") else "must be an absolute path"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be positive"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must not be negative"


def _prefetch_concurrency(v: int) -> str | None:
    if 1 <= v <= MAX_PREFETCH_CONCURRENCY:
        return None
    return f"must be between 1 and {MAX_PREFETCH_CONCURRENCY}"


def _offline_after(v: int) -> str | None:
    return None if 1 <= v <= 1000 else "must be between 1 and 1000"


def _offline_probe(v: float) -> str | None:
    return None if 0 < v <= 3600 else "must be more than 0 and at most 3600 (seconds)"


def _token_wait(v: float) -> str | None:
    return None if 0 <= v <= 300 else "must be between 0 and 300 (seconds)"


def _http_url(v: str) -> str | None:
    try:
        origin_of(v)
    except FormatError as exc:
        return f"must be an http:// or https:// URL ({exc})"
    if urlsplit(v).scheme not in ("http", "https"):
        return "must be an http:// or https:// URL (in lower case)"
    return None


def _log_level(v: str) -> str | None:
    ok = ("debug", "info", "warning", "error")
    return None if v.lower() in ok else f"must be one of {', '.join(ok)}"


def _unit_name(v: str) -> str | None:
    ok = v.endswith(".service") and "/" not in v and len(v) > len(".service")
    return None if ok else "must be a systemd service name like nix-daemon.service"


def _parse_listen(where: str, value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = parse_uint(port_text, limit=65535, what="port")
    except FormatError:
        port = -1
    if not sep or not host or port < 0 or any(c in host for c in "[]/\0 "):
        raise ConfigError(f"{where}: expected HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PROXY_PORT})")
    return host, port


def parse_config(data: Mapping[str, Any], file: str = "<config>") -> Config:
    """Build a :class:`Config` from parsed TOML; errors say ``file:key``."""
    top = _Section(file, "", dict(data))
    for name in ("daemon", "server", "proxy", "nix", "push"):
        top.get(name, dict, {})
    top.finish()

    d = _Section(file, "daemon.", data.get("daemon", {}))
    group = d.opt_str("control_group")
    if group is not None:
        try:
            grp.getgrnam(group)
        except (KeyError, ValueError):  # ValueError: a NUL inside the name
            raise ConfigError(f"{d.where('control_group')}: no such group {group!r}") from None
    daemon = DaemonSection(
        control_socket=d.get("control_socket", str, DEFAULT_CONTROL_SOCKET, _absolute),
        state_dir=d.get("state_dir", str, "/var/lib/nixd", _absolute),
        control_group=group,
        shutdown_grace=d.get("shutdown_grace", float, 10.0, _non_negative),
        log_level=d.get("log_level", str, "info", _log_level).lower(),
    )
    d.finish()

    s = _Section(file, "server.", data.get("server", {}))
    url = s.opt_str("url")
    if url is not None and (problem := _http_url(url)):
        raise ConfigError(f"{s.where('url')}: {problem}")
    server = ServerSection(
        url=url.rstrip("/") if url else None, trusted_keys=s.keys("trusted_keys")
    )
    s.finish()

    p = _Section(file, "proxy.", data.get("proxy", {}))
    host, port = _parse_listen(
        p.where("listen"), p.get("listen", str, f"127.0.0.1:{DEFAULT_PROXY_PORT}")
    )
    upstreams = []
    for i, table in enumerate(p.get("upstreams", list, [])):
        u = _Section(file, f"proxy.upstreams[{i}].", table)
        auth = u.get(
            "auth", str, "none", lambda v: None if v in _AUTH_MODES else f"one of {_AUTH_MODES}"
        )
        netrc_file = u.opt_str("netrc_file")
        if netrc_file is not None and (problem := _absolute(netrc_file)):
            raise ConfigError(f"{u.where('netrc_file')}: {problem}")
        foreign = u.get(
            "foreign_urls",
            str,
            "refuse",
            lambda v: None if v in FOREIGN_URLS else f"one of {FOREIGN_URLS}",
        )
        upstream = UpstreamSection(
            url=u.get("url", str, "", lambda v: _nonempty(v) or _http_url(v)).rstrip("/"),
            priority=u.get("priority", int, 50, _non_negative),
            trusted_keys=u.keys("trusted_keys"),
            auth=cast(AuthMode, auth),
            netrc_file=netrc_file,
            foreign_urls=cast(ForeignUrls, foreign),
        )
        if not upstream.url:
            raise ConfigError(f"{u.where('url')}: required")
        if auth == "netrc" and netrc_file is None:
            raise ConfigError(f'{u.where("netrc_file")}: required when auth = "netrc"')
        u.finish()
        try:  # what the proxy will build from it must build
            upstream_config(upstream)
        except ConfigError as exc:
            raise ConfigError(f"{u.where('url')}: {exc}") from None
        upstreams.append(upstream)
    proxy = ProxySection(
        listen_host=host,
        listen_port=port,
        store_dir=p.get("store_dir", str, "/var/cache/nixd/store", _absolute),
        store_max_bytes=p.get("store_max_bytes", int, 10 * 1024**3, _positive),
        negative_ttl=p.get("negative_ttl", float, 30.0, _non_negative),
        prefetch=p.get("prefetch", bool, True),
        prefetch_concurrency=p.get("prefetch_concurrency", int, 8, _prefetch_concurrency),
        offline_after=p.get("offline_after", int, 2, _offline_after),
        offline_probe=p.get("offline_probe", float, 2.0, _offline_probe),
        token_wait=p.get("token_wait", float, 5.0, _token_wait),
        flakes=p.get("flakes", bool, True),
        flakes_max_bytes=p.get("flakes_max_bytes", int, 256 << 20, _positive),
        upstreams=tuple(upstreams),
    )
    p.finish()

    n = _Section(file, "nix.", data.get("nix", {}))
    sources = n.strings("additional_netrc_sources")
    for i, src in enumerate(sources):
        if problem := _absolute(src):
            raise ConfigError(f"{n.where('additional_netrc_sources')}[{i}]: {problem}")
    nix = NixSection(
        nix_conf=n.get("nix_conf", str, "/etc/nix/nix.conf", _absolute),
        fragment=n.get("fragment", str, "/etc/nix/nixd.conf", _absolute),
        netrc=n.get("netrc", str, "/etc/nix/nixd-netrc", _absolute),
        additional_netrc_sources=sources,
        restart_nix_daemon=n.get("restart_nix_daemon", bool, True),
        nix_daemon_unit=n.get("nix_daemon_unit", str, "nix-daemon.service", _unit_name),
        nix_conf_managed_by=cast(
            ManagedBy,
            n.get(
                "nix_conf_managed_by",
                str,
                "auto",
                lambda v: None if v in MANAGED_BY else f"one of {', '.join(MANAGED_BY)}",
            ),
        ),
    )
    n.finish()
    return Config(
        path=None if file == "<config>" else file,
        daemon=daemon,
        server=server,
        proxy=proxy,
        nix=nix,
        push=_push_section(_Section(file, "push.", data.get("push", {}))),
    )


def _slice_name(v: str) -> str | None:
    org, sep, project = v.partition("/")
    ok = sep and org and project and "/" not in project
    ok = ok and all(c.isascii() and (c.isalnum() or c in "._-") for c in org + project)
    return None if ok else "must be ORG/PROJECT (letters, digits, '.', '_', '-')"


def _push_section(u: _Section) -> PushSection:
    to = u.opt_str("to")
    if to is not None and (problem := _slice_name(to)):
        raise ConfigError(f"{u.where('to')}: {problem}")
    store = u.opt_str("store")
    if store is not None and (problem := _absolute(store)):
        raise ConfigError(f"{u.where('store')}: {problem}")
    section = PushSection(
        to=to,
        compression=u.get(
            "compression",
            str,
            "zstd",
            lambda v: None if v in PUSH_COMPRESSIONS else f"one of {PUSH_COMPRESSIONS}",
        ),
        jobs=u.get("jobs", int, 4, lambda v: None if 1 <= v <= 64 else "must be 1..64"),
        retries=u.get("retries", int, 4, lambda v: None if 1 <= v <= 20 else "must be 1..20"),
        upstream_keys=u.keys("upstream_keys"),
        store=store,
    )
    u.finish()
    return section


def upstream_config(u: UpstreamSection) -> UpstreamConfig:
    """The proxy's view of a configured upstream (raises ConfigError, never shows secrets)."""
    return UpstreamConfig(
        url=u.url,
        priority=u.priority,
        trusted_keys=u.trusted_keys,
        auth=u.auth,
        netrc_file=u.netrc_file,
        foreign_urls=u.foreign_urls,
    )


def load_config(path: str | Path, *, missing_ok: bool = False) -> Config:
    """Read and check the config file at ``path``.

    A missing file is an error, or with ``missing_ok`` the defaults (every section is
    optional), remembering ``path`` so that the daemon watches for the file to appear.
    Raises only :class:`ConfigError`, whatever the file holds (see the module docstring).
    """
    file = os.path.abspath(path)
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if missing_ok:
            return Config(path=file)
        raise ConfigError(f"{file}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{file}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{file}: line {line}: not UTF-8 (byte {raw[exc.start]:#04x})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{file}: invalid TOML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    try:
        return parse_config(data, file)
    except ConfigError:
        raise
    except (ValueError, TypeError, RecursionError) as exc:
        raise ConfigError(f"{file}: {type(exc).__name__}: {str(exc)[:200]}") from None
