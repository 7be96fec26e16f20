"""Configuration of the local proxy substituter: what to listen on, where to keep NARs,
which upstream caches to ask and which keys to trust for each.

The daemon builds these values from its TOML config and the login state; tests build them
directly. They are frozen and validated on construction, so a running proxy never sees a
half-valid config: :meth:`ProxyHandle.update_upstreams` swaps the whole tuple at once.

An upstream URL may carry ``user:password@``: those are the upstream's credential
(:mod:`nixd.proxy.credential`), never part of what is requested or shown —
:attr:`UpstreamConfig.display_url` is what status, metrics, logs and errors name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from nixd.errors import ConfigError, FormatError
from nixd.nix.signing import PublicKey
from nixd.proxy.credential import origin_of, redact_url, strip_userinfo, userinfo_of

AuthMode = Literal["nixd", "none", "netrc"]
AUTH_MODES: tuple[AuthMode, ...] = ("nixd", "none", "netrc")
ForeignUrls = Literal["refuse", "anonymous"]
FOREIGN_URLS: tuple[ForeignUrls, ...] = ("refuse", "anonymous")
MAX_PREFETCH_CONCURRENCY = 64
MAX_PREFETCH_AHEAD = 65536


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    """One cache the proxy fetches from.

    ``priority`` follows Nix: the lower number wins among verified answers; ties keep
    config order. ``trusted_keys`` are ``name:base64`` public keys; a narinfo from this
    upstream is served only with a valid signature by one of them (none: nothing is served).
    """

    url: str
    priority: int = 40
    trusted_keys: tuple[str, ...] = ()
    auth: AuthMode = "none"
    netrc_file: str | None = None
    timeout: float = 30.0
    """Seconds to wait for a connection, a response or the next chunk of a body."""
    offline_after: int = 2
    """Consecutive failures to connect after which the upstream counts as unreachable:
    requests are then answered at once, without trying to connect (see
    :mod:`nixd.proxy.upstream`, "Unreachable upstreams")."""
    offline_probe: float = 2.0
    """Seconds an unreachable upstream is left alone before one request tries it again."""
    token_wait: float = 5.0
    """Most seconds a request waits for the daemon's access token while it is being
    renewed (``auth = "nixd"``) before it is answered as a transient failure."""
    foreign_urls: ForeignUrls = "refuse"
    """What to do with a narinfo ``URL`` that is absolute and on another origin, and with a
    redirect to another origin.

    ``refuse`` (the default): that narinfo, or that redirect, is an upstream error (503
    to Nix). The URL field is not signed and a redirect is not either, so anyone who can
    change the answer (the upstream, or a man in the middle of ``http://``) could
    otherwise make the root daemon request any URL, other loopback services included.
    ``anonymous``: fetch it and follow them, without credentials (for caches that hand
    NARs to a CDN or to presigned object-store URLs), accepting that risk.
    """

    def __post_init__(self) -> None:
        shown = redact_url(self.url)
        try:
            origin_of(self.url)
        except FormatError as exc:
            raise ConfigError(f"upstream url {shown!r}: {exc}") from None
        if urlsplit(self.url).scheme not in ("http", "https"):  # upper case: Nix would not
            raise ConfigError(f"upstream url {shown!r} is not an http(s) URL")
        if self.auth not in AUTH_MODES:
            raise ConfigError(f"upstream {shown}: auth must be one of {', '.join(AUTH_MODES)}")
        if self.auth == "netrc" and not self.netrc_file:
            raise ConfigError(f"upstream {shown}: auth 'netrc' needs netrc_file")
        if self.auth != "none" and userinfo_of(self.url) is not None:
            raise ConfigError(
                f"upstream {shown}: credentials in the URL and auth {self.auth!r}: pick one"
            )
        if self.foreign_urls not in FOREIGN_URLS:
            raise ConfigError(
                f"upstream {shown}: foreign_urls must be one of {', '.join(FOREIGN_URLS)}"
            )
        for key in self.trusted_keys:
            try:
                PublicKey.parse(key)
            except FormatError as exc:
                raise ConfigError(f"upstream {shown}: trusted key {key!r}: {exc}") from exc
        if not self.timeout > 0:
            raise ConfigError(f"upstream {shown}: timeout must be positive")
        if self.offline_after < 1 or not self.offline_probe > 0:
            raise ConfigError(
                f"upstream {shown}: offline_after must be at least 1, offline_probe positive"
            )
        if not self.token_wait >= 0:
            raise ConfigError(f"upstream {shown}: token_wait must not be negative")

    @property
    def base_url(self) -> str:
        """The URL to request under: no credentials, no trailing slash (names follow ``/``)."""
        return strip_userinfo(self.url).rstrip("/")

    @property
    def display_url(self) -> str:
        """The URL as status, metrics, logs and errors show it (credentials ``***``)."""
        return redact_url(self.url).rstrip("/")

    def public_keys(self) -> tuple[PublicKey, ...]:
        return tuple(PublicKey.parse(k) for k in self.trusted_keys)


@dataclass(frozen=True, kw_only=True)
class FlakesConfig:
    """Flake requests served to local users without the secret (:mod:`nixd.proxy.flakes`)."""

    server_url: str | None = None
    """The base URL of the server this machine is logged in to; None: not logged in
    (requests are answered 503 saying so)."""
    max_bytes: int = 256 << 20
    """Largest answer passed on (the server's own bound on a release tarball is the same)."""
    timeout: float = 30.0
    """Seconds for the connection, the answer's head, and each read of its body."""
    token_wait: float = 5.0
    """Most seconds a request waits for a token being renewed (as for upstreams)."""

    def __post_init__(self) -> None:
        if self.server_url is not None:
            shown = redact_url(self.server_url)
            try:
                origin_of(self.server_url)
            except FormatError as exc:
                raise ConfigError(f"flakes server url {shown!r}: {exc}") from None
        if self.max_bytes < 1:
            raise ConfigError("proxy flakes_max_bytes must be positive")
        if not self.timeout > 0 or not self.token_wait >= 0:
            raise ConfigError("proxy flakes timeout must be positive, token_wait not negative")


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """The whole proxy: listener, local secret, local store and upstreams."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    secret_file: str
    store_dir: str
    store_max_bytes: int = 10 * 1024**3
    negative_ttl: float = 30.0
    upstreams: tuple[UpstreamConfig, ...] = field(default_factory=tuple)
    positive_ttl: float = 300.0
    """Seconds a verified upstream narinfo is answered from memory before asking again."""
    priority: int = 30
    """The ``Priority`` announced in ``nix-cache-info`` (lower is preferred by Nix)."""
    resumes: int = 8
    """Times one NAR download the upstream cut is resumed (``Range``) before it fails."""
    resume_delay: float = 0.25
    """Seconds before the first resume; doubled for each next one, at most 8 s. With the
    defaults the attempts span about 30 s: an upstream restart, not an outage."""
    prefetch: bool = True
    """Fetch the narinfos and small NARs of a resolved narinfo's references ahead of Nix
    (:mod:`nixd.proxy.prefetch`). Off also when ``positive_ttl`` is 0 (nothing could be
    kept until Nix asks)."""
    prefetch_concurrency: int = 8
    """Prefetch fetches in flight at most: fewer than Nix's ``http-connections`` (25), whose
    own requests go to the upstreams beside them."""
    prefetch_ahead: int = 1024
    """Things (narinfos, small NARs) fetched ahead of Nix and not yet asked for, at most:
    the global bound on what a narinfo's references can make the proxy fetch."""
    flakes: FlakesConfig | None = None
    """Serve ``/f/...`` and ``/api/v1/flakes...`` to local users without the secret,
    forwarded as this machine's login (:mod:`nixd.proxy.flakes`); None: they need the
    secret like every other request (and are answered 404)."""

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port <= 65535:
            raise ConfigError(f"proxy listen_port {self.listen_port} is not a port")
        if self.store_max_bytes < 0:
            raise ConfigError("proxy store_max_bytes must not be negative")
        if self.negative_ttl < 0 or self.positive_ttl < 0:
            raise ConfigError("proxy cache TTLs must not be negative")
        if self.resumes < 0 or self.resume_delay < 0:
            raise ConfigError("proxy resumes and resume_delay must not be negative")
        if not 1 <= self.prefetch_concurrency <= MAX_PREFETCH_CONCURRENCY:
            raise ConfigError(
                f"proxy prefetch_concurrency must be between 1 and {MAX_PREFETCH_CONCURRENCY}"
            )
        if not 1 <= self.prefetch_ahead <= MAX_PREFETCH_AHEAD:
            raise ConfigError(f"proxy prefetch_ahead must be between 1 and {MAX_PREFETCH_AHEAD}")
