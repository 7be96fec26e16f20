"""The cache server's configuration: ``STATE_DIR/config.toml`` into frozen dataclasses.

Everything the server keeps lives in one state directory; relative paths in the config are
relative to it. The file is nested by section and every key is known: an unknown key, a
wrong type or a bad value is a :class:`~nixd.errors.ConfigError` that says ``file:key``::

    [server]
    listen = ["127.0.0.1:8080"]     # host:port, [v6]:port, or fd://N; sockets passed by
                                    # socket activation (LISTEN_FDS) take its place
    graceful_timeout = 10.0         # seconds in-flight NAR streams get on shutdown
    address_file = "run/address"    # where `serve` writes the bound address ("" = none)
    workers = 1                     # processes accepting on the same sockets
    metrics = "loopback"            # who may read /metrics: "loopback", "public" or "off"
    access_log = true               # one line per request (logger nixd.server.http.access)
    public_url = ""                 # the server's URL as clients reach it, for the links
                                    # it writes (flake redirects); "" = from the Host header

    [storage]
    database = "server.db"          # SQLite (WAL): narinfos, slices, credentials, keys;
                                    # or PostgreSQL, a libpq URL without a password:
                                    # "postgresql://nixd@db.example/nixd" or
                                    # "postgresql:///nixd?host=/run/postgresql" (peer auth);
                                    # passwords from PGPASSFILE/~/.pgpass or PGPASSWORD
    blobs = "blobs"                 # NAR files, zstd, named by their FileHash: a directory,
                                    # or S3-compatible storage "s3://BUCKET/optional/prefix"
    zstd_level = 3
    max_upload_bytes = 68719476736  # largest NAR (uncompressed) accepted by a PUT

    [storage.s3]                    # only with blobs = "s3://..." (nixd.server.storage.s3);
                                    # credentials from the AWS chain, never from here
    endpoint_url = ""               # "" = AWS; R2, MinIO, Garage: their URL
    region = ""                     # "" = the AWS chain's (AWS_REGION, the profile)
    addressing_style = "auto"       # "path", "virtual" or "auto"
    part_size = 16777216            # multipart part size, also the most one upload holds
                                    # in memory (5 MiB .. 5 GiB; x 10000 >= max_upload_bytes)
    redirect = false                # NAR GETs answered 302 to a presigned bucket URL
    redirect_ttl = 600              # seconds a presigned URL is good for

    [tokens]
    issuer = "nixd-server"
    audience = "nixd"
    access_ttl = 3600               # seconds an exchanged access token lives

    [policy]
    file = "policy.toml"

    [audit]
    file = "audit.log"              # unused with a PostgreSQL database: the log is its table
    durable_reads = true            # false: allowed reads are answered before their line
                                    # is fsynced (denials, uploads, admin: always durable)

    [device]                        # interactive login (`nixd login`, nixd.server.login.device)
    code_ttl = 600                  # seconds a user code may wait for approval
    interval = 5                    # seconds between the client's polls
    refresh_ttl = 2592000           # an unused refresh credential expires after (30 days)
    refresh_reuse_grace = 30        # seconds a just-rotated credential may be retried once
    public_url = ""                 # how browsers reach the server (default: the Host
                                    # header); https:// makes the session cookie Secure
    signin_free_attempts = 5        # wrong passwords per account, and per address, before
                                    # each further one backs off (login.throttle)
    code_free_guesses = 5           # wrong user codes per session and account, likewise
    backoff = 2.0                   # seconds of the first back-off; doubles each failure
    backoff_max = 900.0             # the longest back-off (15 min)
    failure_window = 3600.0         # failures are forgotten after this long without one
    code_max_wrong_guesses = 1000   # wrong codes entered server-wide while a code waits
                                    # before it dies (bounds any code's chance of a guess)
    codes_per_source = 10           # pending device codes per address (IPv6: per /64)
    max_pending_codes = 10000       # pending device codes in all
    sessions_per_account = 10       # signed-in web sessions per account (oldest go first)

    [flakes]                        # private flakes (nixd.server.flakes)
    max_tarball_bytes = 268435456   # largest flake source tarball a publish may send

    [gc]                            # retention and GC (nixd.server.storage.gc)
    interval = 86400.0              # seconds between the server's own GC runs (0 = never)
    grace = 86400.0                 # nothing younger is collected: uploads in flight
    access_flush = 60.0             # seconds read times are kept in memory before written

    [[retention]]                   # per slice; the first entry whose glob matches decides,
    slice = "acme/ci-*"             # a slice no entry matches keeps everything
    days = 30                       # closures read (or uploaded) in the last 30 days, and/or
    releases = 10                   # the closures of the 10 latest releases; or keep = "all"

    [[github]]                      # trust GitHub Actions ID tokens (nixd.server.login.oidc);
    org = "acme"                    # one entry per org; [[gitlab]] has the same keys
    audience = "https://cache.example"  # the `aud` jobs must request (required)
    owner_ids = ["1001"]            # repository_owner_id (GitLab: namespace_id); "*" = any
    issuer = "https://token.actions.githubusercontent.com"  # default; GHES/self-managed differ

    [[aws]]                         # trust AWS principals proved through STS (login.aws)
    org = "acme"
    audience = "https://cache.example"  # value of the signed X-Nixd-Server-Audience header
    accounts = ["123456789012"]     # AWS account ids that belong to acme; "*" = any
    sts_endpoint = "https://sts.amazonaws.com"
    region = "us-east-1"            # the SigV4 scope region the endpoint expects
    max_skew = 300.0                # seconds X-Amz-Date may be off

    [[mirror]]                      # an upstream binary cache (nixd.server.mirror)
    name = "nixos"                  # how status, provenance and the audit log name it
    url = "https://cache.nixos.org"
    public_keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
    priority = 100                  # lower is asked first
    slices = ["acme/*"]             # "org/project" or "org/*" that may use it (default none)
    max_concurrency = 8             # requests in flight to it
    requests_per_second = 50.0      # 0 = no rate limit
    timeout = 30.0                  # seconds without progress before a request fails
    pull_through = false            # a reader's miss in those slices is fetched from it
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nixd.errors import ConfigError, FormatError

CONFIG_NAME = "config.toml"
DEFAULT_ISSUERS = {
    "github": "https://token.actions.githubusercontent.com",
    "gitlab": "https://gitlab.com",
}


@dataclass(frozen=True, slots=True)
class ServerSection:
    listen: tuple[str, ...] = ("127.0.0.1:8080",)
    graceful_timeout: float = 10.0
    address_file: str = "run/address"
    workers: int = 1
    metrics: str = "loopback"
    access_log: bool = True
    public_url: str = ""


METRICS_ACCESS = ("loopback", "public", "off")
"""Who may read ``/metrics`` (:mod:`nixd.server.http.ops` says why loopback is the default)."""


@dataclass(frozen=True, slots=True)
class S3Section:
    """``[storage.s3]``: how to reach the bucket of ``storage.blobs = "s3://..."``.

    No credential keys on purpose: boto3's default chain supplies them (environment,
    shared profile, instance or container role).
    """

    endpoint_url: str = ""
    region: str = ""
    addressing_style: str = "auto"
    part_size: int = 16 << 20
    redirect: bool = False
    redirect_ttl: int = 600


ADDRESSING_STYLES = ("path", "virtual", "auto")
S3_MIN_PART = 5 << 20
S3_MAX_PART = 5 << 30
S3_MAX_PARTS = 10_000


@dataclass(frozen=True, slots=True)
class StorageSection:
    database: str = "server.db"
    blobs: str = "blobs"
    zstd_level: int = 3
    max_upload_bytes: int = 64 * 1024**3
    s3: S3Section = field(default_factory=S3Section)


@dataclass(frozen=True, slots=True)
class TokensSection:
    issuer: str = "nixd-server"
    audience: str = "nixd"
    access_ttl: int = 3600


@dataclass(frozen=True, slots=True)
class PolicySection:
    file: str = "policy.toml"


@dataclass(frozen=True, slots=True)
class AuditSection:
    """The audit log: ``file`` in the state directory, or with a PostgreSQL ``[storage]
    database`` that database's ``audit_log`` table (:mod:`nixd.server.access.audit_db`),
    where ``file`` is unused."""

    file: str = "audit.log"
    durable_reads: bool = True


@dataclass(frozen=True, slots=True)
class DeviceSection:
    """Interactive login (:mod:`nixd.server.login.device`): lifetimes, the URL, throttling.

    The throttling defaults (:mod:`nixd.server.login.throttle`) are chosen so a person
    never meets them and a script gets nowhere: five wrong passwords are a typo streak,
    after that waits of 2, 4, 8 … seconds up to 15 minutes leave an attacker about a
    hundred guesses per account (and per address) a day, while a locked-out owner waits
    15 minutes at worst. A user code is one of 20^8 (2.6e10); dying after 1,000 wrong codes
    keeps the chance of guessing any one below 1 in 25 million, however many accounts
    guess. Ten pending codes per address is more than one machine ever starts; 10,000 in
    all (each lives ``code_ttl``) is a few rows of SQLite, so the bound costs nothing.
    """

    code_ttl: int = 600
    interval: int = 5
    refresh_ttl: int = 30 * 86400
    refresh_reuse_grace: int = 30
    public_url: str = ""
    signin_free_attempts: int = 5
    code_free_guesses: int = 5
    backoff: float = 2.0
    backoff_max: float = 900.0
    failure_window: float = 3600.0
    code_max_wrong_guesses: int = 1000
    codes_per_source: int = 10
    max_pending_codes: int = 10000
    sessions_per_account: int = 10


@dataclass(frozen=True, slots=True)
class OidcSection:
    """A trusted CI token issuer (``[[github]]``, ``[[gitlab]]``) and the org it serves."""

    org: str = ""
    audience: str = ""
    owner_ids: tuple[str, ...] = ()
    issuer: str = ""  # "" = the provider's public issuer (DEFAULT_ISSUERS)


@dataclass(frozen=True, slots=True)
class AwsSection:
    """AWS accounts whose principals belong to an org, proved through an STS endpoint."""

    org: str = ""
    audience: str = ""
    accounts: tuple[str, ...] = ()
    sts_endpoint: str = "https://sts.amazonaws.com"
    region: str = "us-east-1"
    max_skew: float = 300.0


@dataclass(frozen=True, slots=True)
class GcSection:
    """When the server collects garbage (:mod:`nixd.server.storage.gc`).

    ``interval`` defaults to daily, not off: with no ``[[retention]]`` entry every slice
    keeps everything, so a run removes only what nothing refers to (blobs without a
    record, records without a blob, NARs uploaded without their narinfo) — the leftovers
    of crashes and cut uploads, which otherwise pile up — and a configured retention is
    applied without a cron job. ``grace`` protects uploads in flight: nothing written
    within it (blob, record, upload alias) is collected. ``access_flush`` bounds how
    stale the recorded read times are (and how many a crash loses).
    """

    interval: float = 86400.0
    grace: float = 86400.0
    access_flush: float = 60.0


@dataclass(frozen=True, slots=True)
class FlakesSection:
    """``[flakes]``: bounds of what a publish may send (:mod:`nixd.server.flakes`).

    ``max_tarball_bytes`` is the compressed tarball; the unpacked tree is bounded by
    :class:`nixd.nix.flaketarball.TarballLimits` (1 GiB, 100,000 entries).
    """

    max_tarball_bytes: int = 256 * 1024**2


RETENTION_KEEP = ("all",)


@dataclass(frozen=True, slots=True)
class RetentionSection:
    """What one slice (or every slice matching a glob) keeps; see :mod:`.storage.gc`.

    ``keep = "all"`` (the default), or ``days`` and/or ``releases``: a path is kept if it
    is in the closure of a record read or uploaded within ``days``, or of one of the
    ``releases`` latest releases (top-level paths) of the slice.
    """

    slice: str = ""
    keep: str = ""
    days: int = 0
    releases: int = 0

    @property
    def keeps_all(self) -> bool:
        return not self.days and not self.releases


@dataclass(frozen=True, slots=True)
class MirrorSection:
    """An upstream binary cache whose signed paths may complete slices' closures.

    Only the slices listed (``org/project`` or ``org/*``) use it: a slice no mirror lists
    never makes the server contact an upstream on its behalf. ``public_keys`` are the
    only keys its narinfos are trusted by (required: an unsigned upstream is refused).
    """

    name: str = ""
    url: str = ""
    public_keys: tuple[str, ...] = ()
    priority: int = 100
    slices: tuple[str, ...] = ()
    max_concurrency: int = 8
    requests_per_second: float = 50.0
    timeout: float = 30.0
    min_rate: int = 65536
    """Bytes per second a NAR download must average once its first ``timeout`` seconds
    have passed (0: any), so an upstream that drips cannot hold a fetch for hours."""
    pull_through: bool = False

    def serves(self, slice_name: str) -> bool:
        """Whether ``slice_name`` (``org/project``) may use this mirror (case-insensitive)."""
        org, _, project = slice_name.lower().partition("/")
        for pattern in self.slices:
            p_org, _, p_project = pattern.lower().partition("/")
            if p_org == org and p_project in ("*", project):
                return True
        return False


_LISTS: dict[str, type[Any]] = {"github": OidcSection, "gitlab": OidcSection, "aws": AwsSection}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The whole config; ``state_dir`` is where the file was found."""

    state_dir: Path
    server: ServerSection = field(default_factory=ServerSection)
    storage: StorageSection = field(default_factory=StorageSection)
    tokens: TokensSection = field(default_factory=TokensSection)
    policy: PolicySection = field(default_factory=PolicySection)
    audit: AuditSection = field(default_factory=AuditSection)
    device: DeviceSection = field(default_factory=DeviceSection)
    gc: GcSection = field(default_factory=GcSection)
    flakes: FlakesSection = field(default_factory=FlakesSection)
    retention: tuple[RetentionSection, ...] = ()
    github: tuple[OidcSection, ...] = ()
    gitlab: tuple[OidcSection, ...] = ()
    aws: tuple[AwsSection, ...] = ()
    mirror: tuple[MirrorSection, ...] = ()

    def path(self, relative: str) -> Path:
        """A config path resolved against the state directory."""
        p = Path(relative)
        return p if p.is_absolute() else self.state_dir / p

    @property
    def database_path(self) -> Path:
        """The SQLite file (meaningless when :attr:`database` is a PostgreSQL URL)."""
        return self.path(self.storage.database)

    @property
    def database(self) -> str | Path:
        """What :func:`nixd.server.storage.db.open_db` opens: a PostgreSQL URL or a file."""
        if self.storage.database.startswith(POSTGRES_SCHEMES):
            return self.storage.database
        return self.database_path

    @property
    def blobs_path(self) -> Path:
        """The blob directory (meaningless when :attr:`blobs_s3` is set)."""
        return self.path(self.storage.blobs)

    @property
    def blobs_s3(self) -> tuple[str, str] | None:
        """``(bucket, prefix)`` when ``storage.blobs`` is an ``s3://`` URL (prefix "" or
        ending in ``/``), else None."""
        if not self.storage.blobs.startswith("s3://"):
            return None
        bucket, _, prefix = self.storage.blobs[len("s3://") :].partition("/")
        prefix = prefix.strip("/")
        return bucket, f"{prefix}/" if prefix else ""

    @property
    def policy_path(self) -> Path:
        return self.path(self.policy.file)

    @property
    def audit_path(self) -> Path:
        return self.path(self.audit.file)

    @property
    def address_path(self) -> Path | None:
        return self.path(self.server.address_file) if self.server.address_file else None

    @classmethod
    def load(cls, state_dir: str | Path) -> ServerConfig:
        """Read ``STATE_DIR/config.toml``."""
        state = Path(state_dir)
        file = state / CONFIG_NAME
        try:
            text = file.read_text()
        except FileNotFoundError:
            raise ConfigError(
                f"{file}: no server config here; create one with `nixd-server init {state}`"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror}") from exc
        return cls.from_toml(text, state_dir=state, source=str(file))

    @classmethod
    def from_toml(cls, text: str, *, state_dir: Path, source: str = CONFIG_NAME) -> ServerConfig:
        """Parse config text; every error names ``source:key``."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        sections: dict[str, type[Any]] = {
            "server": ServerSection,
            "storage": StorageSection,
            "tokens": TokensSection,
            "policy": PolicySection,
            "audit": AuditSection,
            "device": DeviceSection,
            "gc": GcSection,
            "flakes": FlakesSection,
        }
        built: dict[str, Any] = {}
        for key, value in data.items():
            if key == "retention":
                built[key] = _retention(value, source)
                continue
            if key == "mirror":
                built[key] = _mirrors(value, source)
                continue
            if key in _LISTS:
                built[key] = _entries(key, value, source)
                continue
            if key not in sections:
                known = ", ".join([*sections, "retention", "mirror", *_LISTS])
                raise ConfigError(f"{source}:{key}: unknown section (known: {known})")
            if not isinstance(value, dict):
                raise ConfigError(f"{source}:{key}: must be a table")
            built[key] = _section(sections[key], value, source, key)
        config = cls(state_dir=state_dir, **built)
        _check(config, source)
        return config


def _section(kind: type[Any], data: dict[str, Any], source: str, name: str) -> Any:
    known = {f.name: f for f in fields(kind)}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        where = f"{source}:{name}.{key}"
        value = raw
        if key not in known:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(known)})")
        default = getattr(kind(), key)
        if hasattr(default, "__dataclass_fields__"):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: must be a table ([{name}.{key}])")
            value = _section(type(default), value, source, f"{name}.{key}")
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: must be a list of strings")
            value = tuple(value)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}: must be a number")
            value = float(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: must be true or false")
        elif isinstance(value, bool) or not isinstance(value, type(default)):
            kind_name = "an integer" if isinstance(default, int) else "a string"
            raise ConfigError(f"{where}: must be {kind_name}")
        values[key] = value
    return kind(**values)


def _entries(name: str, value: Any, source: str) -> tuple[Any, ...]:
    """``[[name]]`` entries (a single ``[name]`` table counts as one), checked."""
    tables = [value] if isinstance(value, dict) else value
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{source}:{name}: must be a table or an array of tables ([[{name}]])")
    entries = []
    for i, table in enumerate(tables):
        where = f"{source}:{name}[{i}]"
        entry = _section(_LISTS[name], table, source, f"{name}[{i}]")
        if not entry.org or not entry.audience:
            raise ConfigError(f"{where}: needs `org` and `audience`")
        if isinstance(entry, OidcSection):
            if not entry.owner_ids:
                raise ConfigError(f'{where}.owner_ids: list the owner ids to trust (or "*")')
            if not entry.issuer:
                entry = replace(entry, issuer=DEFAULT_ISSUERS[name])
            _check_url(entry.issuer, f"{where}.issuer")
        else:
            if not entry.accounts or not all(
                a == "*" or (len(a) == 12 and a.isdigit()) for a in entry.accounts
            ):
                raise ConfigError(f'{where}.accounts: 12-digit AWS account ids (or "*")')
            _check_url(entry.sts_endpoint, f"{where}.sts_endpoint")
            if not entry.region:
                raise ConfigError(f"{where}.region: must not be empty")
            if entry.max_skew <= 0:
                raise ConfigError(f"{where}.max_skew: must be positive")
        entries.append(entry)
    return tuple(entries)


_SLICE_GLOB = re.compile(r"[A-Za-z0-9._*?\[\]!-]+/[A-Za-z0-9._*?\[\]!-]+")


def _retention(value: Any, source: str) -> tuple[RetentionSection, ...]:
    """``[[retention]]`` entries: a slice name or glob each, and exactly one way to keep."""
    tables = [value] if isinstance(value, dict) else value
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{source}:retention: must be an array of tables ([[retention]])")
    entries = []
    for i, table in enumerate(tables):
        where = f"{source}:retention[{i}]"
        entry: RetentionSection = _section(RetentionSection, table, source, f"retention[{i}]")
        if not _SLICE_GLOB.fullmatch(entry.slice):
            raise ConfigError(
                f'{where}.slice: needs ORG/PROJECT, either part a glob ("acme/*", "*/ci-*")'
            )
        if entry.keep and entry.keep not in RETENTION_KEEP:
            raise ConfigError(f'{where}.keep: the only value is "all" (or use days/releases)')
        if entry.days < 0 or entry.releases < 0:
            key = "days" if entry.days < 0 else "releases"
            raise ConfigError(f"{where}.{key}: must be positive")
        if entry.keep and not entry.keeps_all:
            raise ConfigError(f'{where}: keep = "all" cannot be combined with days or releases')
        if not entry.keep and entry.keeps_all:
            raise ConfigError(
                f'{where}: say what to keep: keep = "all", days = N and/or releases = N'
            )
        if entry.days > 100 * 365:
            raise ConfigError(f'{where}.days: at most 36500 (use keep = "all")')
        entries.append(entry)
    return tuple(entries)


_MIRROR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_MIRROR_SLICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/(\*|[A-Za-z0-9][A-Za-z0-9._-]*)")


def _mirrors(value: Any, source: str) -> tuple[MirrorSection, ...]:
    """``[[mirror]]`` entries: a unique name, an http(s) URL, trusted keys, sane limits."""
    from nixd.nix.signing import PublicKey  # noqa: PLC0415 - nix/ is pure; only mirrors pay

    tables = [value] if isinstance(value, dict) else value
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{source}:mirror: must be an array of tables ([[mirror]])")
    entries: list[MirrorSection] = []
    for i, table in enumerate(tables):
        where = f"{source}:mirror[{i}]"
        entry: MirrorSection = _section(MirrorSection, table, source, f"mirror[{i}]")
        if not _MIRROR_NAME.fullmatch(entry.name):
            raise ConfigError(f"{where}.name: needs a name of letters, digits, '.', '_', '-'")
        if any(e.name.lower() == entry.name.lower() for e in entries):
            raise ConfigError(f"{where}.name: {entry.name!r} names another mirror too")
        parts = urlsplit(entry.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.url: must be an http:// or https:// URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError(f"{where}.url: no query, fragment or credentials in the URL")
        if not entry.public_keys:
            raise ConfigError(
                f"{where}.public_keys: list the keys its narinfos are signed with "
                '(e.g. "cache.nixos.org-1:6NCH...="); unsigned paths are never mirrored'
            )
        for key in entry.public_keys:
            try:
                PublicKey.parse(key)
            except FormatError as exc:
                raise ConfigError(f"{where}.public_keys: {key!r} is not a key: {exc}") from exc
        for pattern in entry.slices:
            if not _MIRROR_SLICE.fullmatch(pattern):
                raise ConfigError(f'{where}.slices: {pattern!r} is not "org/project" or "org/*"')
        if not 0 <= entry.priority <= 10_000:
            raise ConfigError(f"{where}.priority: must be between 0 and 10000")
        if not 1 <= entry.max_concurrency <= 256:
            raise ConfigError(f"{where}.max_concurrency: must be between 1 and 256")
        if not 0 <= entry.requests_per_second <= 100_000:
            raise ConfigError(f"{where}.requests_per_second: between 0 (no limit) and 100000")
        if not 0 < entry.timeout <= 3600:
            raise ConfigError(f"{where}.timeout: must be between 0 and 3600 seconds")
        if not 0 <= entry.min_rate <= 1 << 40:
            raise ConfigError(f"{where}.min_rate: bytes per second, from 0 (no minimum)")
        entries.append(replace(entry, url=entry.url.rstrip("/")))
    return tuple(entries)


def _check_url(url: str, where: str) -> None:
    """An identity provider is reached over https; plain http only on loopback (tests)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http":
        try:
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
    raise ConfigError(f"{where}: must be an https:// URL (plain http only on loopback)")


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def _check_database_url(value: str, where: str) -> None:
    """A PostgreSQL URL must not carry a password: the config file is no place for one."""
    if not value.startswith(POSTGRES_SCHEMES):
        return
    parts = urlsplit(value)
    query = parse_qs(parts.query)
    if parts.password is not None or "password" in query:
        raise ConfigError(
            f"{where}: a password does not belong in the config file; use a password file "
            "(PGPASSFILE or ~/.pgpass), PGPASSWORD in the service's environment, or peer "
            "authentication over a Unix socket (postgresql:///DBNAME?host=/run/postgresql)"
        )


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX = re.compile(r"[A-Za-z0-9!_.*'()/-]*")


def _check_blobs(config: ServerConfig, source: str) -> None:
    """``storage.blobs`` as an ``s3://`` URL and ``[storage.s3]``: well-formed, bounded,
    and never a credential (the AWS chain supplies those)."""
    s3 = config.storage.s3
    where = f"{source}:storage.s3"
    if s3.addressing_style not in ADDRESSING_STYLES:
        raise ConfigError(
            f"{where}.addressing_style: must be one of {', '.join(map(repr, ADDRESSING_STYLES))}"
        )
    if not S3_MIN_PART <= s3.part_size <= S3_MAX_PART:
        raise ConfigError(
            f"{where}.part_size: must be between {S3_MIN_PART} (5 MiB, S3's smallest part) "
            f"and {S3_MAX_PART} (5 GiB)"
        )
    if not 1 <= s3.redirect_ttl <= 7 * 86400:
        raise ConfigError(
            f"{where}.redirect_ttl: must be between 1 and 604800 seconds (SigV4's limit)"
        )
    if s3.endpoint_url:
        parts = urlsplit(s3.endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.endpoint_url: must be an http(s):// URL")
        if parts.username is not None or parts.password is not None or parts.query:
            raise ConfigError(
                f"{where}.endpoint_url: credentials do not belong in the config file; the "
                "server takes them from the AWS chain (AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY in its environment, a profile, or an instance role)"
            )
    blobs = config.storage.blobs
    if "://" in blobs and not blobs.startswith("s3://"):
        raise ConfigError(
            f"{source}:storage.blobs: a directory, or an s3://BUCKET/prefix URL "
            f"(not {blobs.partition('://')[0]}://)"
        )
    target = config.blobs_s3
    if target is None:
        return
    bucket, prefix = target
    raw = blobs[len("s3://") :]
    if "@" in raw.partition("/")[0] or "?" in raw or "#" in raw:
        raise ConfigError(
            f"{source}:storage.blobs: an s3://BUCKET/prefix URL holds no credentials or "
            "query; the server takes credentials from the AWS chain"
        )
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(
            f"{source}:storage.blobs: {bucket!r} is not a valid bucket name (3-63 characters: "
            "lower-case letters, digits, dots and hyphens)"
        )
    if not _PREFIX.fullmatch(prefix) or "//" in prefix or len(prefix) > 512:
        raise ConfigError(
            f"{source}:storage.blobs: the key prefix {prefix!r} may hold letters, digits, "
            "/ and !_.*'()- only (at most 512 characters)"
        )
    if config.storage.max_upload_bytes > s3.part_size * S3_MAX_PARTS:
        raise ConfigError(
            f"{where}.part_size: {s3.part_size} bytes x {S3_MAX_PARTS} parts cannot hold an "
            f"upload of storage.max_upload_bytes ({config.storage.max_upload_bytes}); raise "
            "it to at least "
            f"{-(-config.storage.max_upload_bytes // S3_MAX_PARTS)}"
        )


def _check(config: ServerConfig, source: str) -> None:
    if not config.server.listen:
        raise ConfigError(f"{source}:server.listen: needs at least one address")
    if not 1 <= config.server.workers <= 64:
        raise ConfigError(f"{source}:server.workers: must be between 1 and 64")
    if config.server.metrics not in METRICS_ACCESS:
        raise ConfigError(
            f"{source}:server.metrics: must be one of {', '.join(map(repr, METRICS_ACCESS))}"
        )
    if config.server.graceful_timeout < 0:
        raise ConfigError(f"{source}:server.graceful_timeout: must not be negative")
    if not 1 <= config.storage.zstd_level <= 22:
        raise ConfigError(f"{source}:storage.zstd_level: must be between 1 and 22")
    if config.storage.max_upload_bytes <= 0:
        raise ConfigError(f"{source}:storage.max_upload_bytes: must be positive")
    if not 1024 <= config.flakes.max_tarball_bytes <= 16 * 1024**3:
        raise ConfigError(
            f"{source}:flakes.max_tarball_bytes: must be between 1024 and 17179869184 (16 GiB)"
        )
    if config.server.public_url and not config.server.public_url.startswith(
        ("http://", "https://")
    ):
        raise ConfigError(f"{source}:server.public_url: must be an http(s):// URL")
    _check_database_url(config.storage.database, f"{source}:storage.database")
    for key in ("interval", "grace"):
        if getattr(config.gc, key) < 0:
            raise ConfigError(f"{source}:gc.{key}: must not be negative (interval 0 = never)")
    if not 1 <= config.gc.access_flush <= 3600:
        raise ConfigError(f"{source}:gc.access_flush: must be between 1 and 3600 seconds")
    if 0 < config.gc.interval < 60:
        raise ConfigError(f"{source}:gc.interval: at least 60 seconds (or 0 = never)")
    _check_blobs(config, source)
    if config.tokens.access_ttl <= 0:
        raise ConfigError(f"{source}:tokens.access_ttl: must be positive")
    for key in (
        "code_ttl",
        "interval",
        "refresh_ttl",
        "signin_free_attempts",
        "code_free_guesses",
        "backoff",
        "backoff_max",
        "failure_window",
        "code_max_wrong_guesses",
        "codes_per_source",
        "max_pending_codes",
        "sessions_per_account",
    ):
        if getattr(config.device, key) <= 0:
            raise ConfigError(f"{source}:device.{key}: must be positive")
    if config.device.backoff_max < config.device.backoff:
        raise ConfigError(f"{source}:device.backoff_max: must not be less than device.backoff")
    if config.device.refresh_reuse_grace < 0:
        raise ConfigError(f"{source}:device.refresh_reuse_grace: must not be negative")
    if config.device.public_url and not config.device.public_url.startswith(
        ("http://", "https://")
    ):
        raise ConfigError(f"{source}:device.public_url: must be an http(s):// URL")


def render_default(listen: str = "127.0.0.1:8080", *, database: str | None = None) -> str:
    """The config ``nixd-server init`` writes: every key, with its default."""
    d = ServerConfig(state_dir=Path())
    if database is not None:
        _check_database_url(database, "--database")
        d = replace(d, storage=replace(d.storage, database=database))
    return f"""\
# nixd-server configuration; paths are relative to this directory.

[server]
# host:port, [v6addr]:port, or fd://N for a socket passed by systemd
listen = ["{listen}"]
# seconds in-flight downloads get to finish on SIGTERM
graceful_timeout = {d.server.graceful_timeout}
# `serve` writes its bound addresses here, one per line ("" = do not)
address_file = "{d.server.address_file}"
# processes serving the same sockets (one per core is plenty; they share the database,
# the blobs and the audit log)
workers = {d.server.workers}
# who may read the Prometheus /metrics: "loopback" (a peer on 127.0.0.1/::1 whose request
# carries no Forwarded/X-Forwarded-For/X-Real-IP header, i.e. not through a reverse proxy
# that adds one), "public" (anyone), "off" (nobody; nothing is counted). They hold no
# slice or path names, but they do show traffic. /healthz and /readyz are always open.
metrics = "{d.server.metrics}"
# one line per request on the server's log (the journal under systemd): request id,
# method, path without query, status, bytes, duration, identity kind, peer; never a header
access_log = {str(d.server.access_log).lower()}
# the server's URL as clients reach it (behind a reverse proxy: its https:// URL), for
# the links it writes, such as flake version redirects; "" = from each request's Host.
# Set it behind a CDN or shared HTTP cache: a public flake's tarball is cacheable
# (immutable) and carries such a link, which a cache keyed on the path alone would share
public_url = "{d.server.public_url}"

[storage]
# SQLite file, or PostgreSQL: "postgresql://USER@HOST/DB" (password from PGPASSFILE,
# ~/.pgpass or PGPASSWORD, never here) or "postgresql:///DB?host=/run/postgresql"
database = "{d.storage.database}"
# NAR files: a directory, or S3-compatible object storage "s3://BUCKET/optional/prefix"
# (then [storage.s3] below; credentials from the AWS chain: environment, profile or
# instance role, never here)
blobs = "{d.storage.blobs}"
zstd_level = {d.storage.zstd_level}
max_upload_bytes = {d.storage.max_upload_bytes}

# [storage.s3]
# endpoint_url = "https://ACCOUNT.r2.cloudflarestorage.com"   # "" = AWS S3
# region = "us-east-1"                 # "" = the AWS chain's (AWS_REGION, the profile)
# addressing_style = "{d.storage.s3.addressing_style}"             # "path", "virtual" or "auto"
# the multipart part size, also the most one upload holds in memory (5 MiB .. 5 GiB)
# part_size = {d.storage.s3.part_size}
# answer NAR downloads (after the access decision) with a 302 to a presigned URL of the
# bucket, good for redirect_ttl seconds, so the bytes bypass the server (a CDN can sit
# in front of the bucket); false: the server streams them
# redirect = false
# redirect_ttl = {d.storage.s3.redirect_ttl}

[tokens]
issuer = "{d.tokens.issuer}"
audience = "{d.tokens.audience}"
access_ttl = {d.tokens.access_ttl}

[policy]
file = "{d.policy.file}"

[audit]
file = "{d.audit.file}"
# Every decision is one hash-chained line. With true, an allowed read is answered only
# after its line is on disk (an fsync per batch of concurrent requests: the latency of a
# lone narinfo request becomes the disk's fsync time). With false, allowed reads are
# answered at once and their lines follow within milliseconds; a crash may lose those
# last lines. Denials, uploads and admin changes are always durable before the answer.
durable_reads = {str(d.audit.durable_reads).lower()}

# Private flakes, published from CI (`nixd publish`) and fetched as
# https://HOST/f/ORG/NAME/VERSION-OR-CONSTRAINT.tar.gz
[flakes]
# the largest source tarball a publish may upload (refused 413 before it is stored)
max_tarball_bytes = {d.flakes.max_tarball_bytes}

# Retention and garbage collection (`nixd-server gc --dry-run` shows what a run would
# remove). Every slice keeps everything unless a [[retention]] entry (the first whose
# slice glob matches) says otherwise; pins (`nixd-server pin add`) keep a path and its
# whole closure whatever the rules. The server runs a GC every `interval` seconds (0 =
# never); nothing younger than `grace` seconds is removed, so uploads in flight are safe.
[gc]
interval = {d.gc.interval}
grace = {d.gc.grace}
# read times are noted in memory and written this often (and at shutdown)
access_flush = {d.gc.access_flush}
#
# [[retention]]
# slice = "acme/ci-*"      # ORG/PROJECT, globs allowed
# days = 30                # closures read or uploaded within 30 days
# releases = 10            # and/or the closures of the 10 latest top-level paths
#
# [[retention]]
# slice = "acme/*"
# keep = "all"

# The interactive login (`nixd login`): the device authorization grant and its web
# pages; accounts are added with `nixd-server user add ORG NAME`. Defaults shown:
#
# [device]
# code_ttl = {d.device.code_ttl}
# interval = {d.device.interval}
# refresh_ttl = {d.device.refresh_ttl}
# seconds after a refresh during which the credential just used may be presented once more
# (the answer was lost in transit); its unused successor is then retired. 0 = no retry
# refresh_reuse_grace = {d.device.refresh_reuse_grace}
# how browsers reach this server (default: the Host header); https:// makes cookies Secure
# public_url = "{d.device.public_url}"
#
# Throttling. Wrong passwords (per account, and per source address) and wrong user codes
# (per browser session, and per account) are free up to a point; after that each one
# blocks the next try for `backoff` seconds, doubling up to `backoff_max`, and the
# refusal is a 429 with Retry-After. Five mistakes are a typo streak, not an attack; the
# doubling leaves a script about a hundred guesses a day, while a person locked out waits
# 15 minutes at most. Failures are forgotten after `failure_window` seconds without one.
# signin_free_attempts = {d.device.signin_free_attempts}
# code_free_guesses = {d.device.code_free_guesses}
# backoff = {d.device.backoff}
# backoff_max = {d.device.backoff_max}
# failure_window = {d.device.failure_window}
# A pending code dies after this many wrong codes were entered anywhere while it waited:
# a code is one of 20^8, so its chance of being guessed stays below 1 in 25 million no
# matter how many accounts guess (the price: a flood of wrong codes ends pending logins,
# which then start again).
# code_max_wrong_guesses = {d.device.code_max_wrong_guesses}
# Anonymous state: `nixd login` creates a pending code, so codes are bounded per source
# address (IPv6: per /64) and in all; a browser gets a session row only once signed in
# (before that its cookie is signed, not stored), at most this many per account.
# codes_per_source = {d.device.codes_per_source}
# max_pending_codes = {d.device.max_pending_codes}
# sessions_per_account = {d.device.sessions_per_account}

# Trust CI and cloud identities; one entry per org (uncomment and edit):
#
# [[github]]                           # GitHub Actions ID tokens; [[gitlab]] has the same keys
# org = "acme"
# audience = "https://cache.example"   # the `aud` jobs request (`nixd login github-action`)
# owner_ids = ["1001"]                 # repository_owner_id (GitLab: namespace_id); "*" = any
# issuer = "https://token.actions.githubusercontent.com"   # GitLab: https://gitlab.com
#
# [[aws]]                              # AWS principals proved through STS (`nixd login aws`)
# org = "acme"
# audience = "https://cache.example"   # the signed X-Nixd-Server-Audience header's value
# accounts = ["123456789012"]          # "*" = any
# sts_endpoint = "https://sts.amazonaws.com"
# region = "us-east-1"

# Upstream caches that complete slices' closures (`nixd-server mirror status`); only the
# slices listed may use one, and only paths signed by its keys are taken (uncomment):
#
# [[mirror]]
# name = "nixos"
# url = "https://cache.nixos.org"
# public_keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
# priority = 100                       # lower is asked first
# slices = ["acme/*"]                  # "org/project" or "org/*"; default none
# max_concurrency = 8
# requests_per_second = 50.0           # 0 = no limit
# timeout = 30.0                       # seconds without progress
# min_rate = 65536                     # bytes/s a NAR must average after `timeout`
# pull_through = false                 # a reader's miss in those slices is fetched
"""
