"""The cache server's HTTP front: the Nix binary-cache protocol and the token API.

URL space (NIX-PROTOCOL.md has what the real client does with each answer)::

    /cache/nix-cache-info                    public, always 200 (also under every prefix)
    /cache/<hash32>.narinfo                  GET/HEAD: the caller's own organization's view
    /cache/nar/<filehash32>.nar.zst          GET/HEAD, Range (S3 with redirect: GET is 302)
    /cache/log/<drv basename>                GET
    /cache/<org>/...                         the same names in the view of <org>
    /cache/<org>/<project>/...               the same names, one slice, plus PUT
                                             (the target of ``nix copy --to``)
    POST /api/v1/token/exchange              credential -> short-lived access token
    GET  /api/v1/token/status                who am I, until when
    GET  /api/v1/cache/keys                  narinfo public keys, for pinning
    GET  /.well-known/jwks.json              access-token verification keys
    /f/..., /api/v1/flakes...                private flakes (:mod:`.flakes`, :mod:`.deploy`)
    GET  /healthz, /readyz, /metrics         live, ready, Prometheus (:mod:`.ops`)

**Views.** A view of organization O (see the tenancy model in :mod:`nixd.server`) asks
the slices holding a path in its trust order — O's own by priority, the record that came
first, name; then the slices O trusts; then slices an explicit rule grants this reader —
and the first one the reader may read answers. Another organization's slice readable only
because it is public is never asked unless O trusts it. ``/cache/`` is the view of the
caller's own organization (the ``org`` attribute of its identity); an anonymous caller
has none there and reads public slices through ``/cache/<org>/``.

**Visibility.** Anything the caller may not read answers exactly as absent: 404 with the
same body, or 401 + ``WWW-Authenticate`` to a caller with no credential at all (so a
client knows to log in). A NAR file is visible if a record in the caller's view names its
NarHash. A credential that is presented but bad (expired, revoked, forged) is a 401.
Uploads need ``cache:write`` on ``org/project``, decided on the name before the slice is
looked up, so a refusal (403, naming only the caller and the slice it asked for) says
nothing about whether the slice exists; the rule goes to the audit log.

**Uploads.** The NAR PUT is decompressed, parsed strictly and hashed as it streams into
the blob store's writer (recompressed as zstd; a temp file, or a multipart upload on
S3, committed under its final name only once verified); the narinfo PUT that follows is
accepted only if its NarHash/NarSize are those of the NAR the same slice uploaded under
its URL. Client
signatures, URL, Compression and FileHash are dropped: the server serves its own file and
signs with its own keys. An upload whose ``Content-Length`` exceeds the free space is
refused 507 before its body is asked for (no ``100 Continue``), and one to a bucket that
does not answer 503 likewise: Nix 2.8 does not rewind an
upload it retries, so only a refusal that read none of the body leaves its retries whole.

**Mirrors** (:mod:`nixd.server.mirror`, ``Services.mirror``). A stored narinfo upload to
a slice a ``[[mirror]]`` lists queues the completion of its closure (a row and a queue
entry; the fetching happens in the background task). With ``pull_through``, a narinfo
miss is fetched first: in a slice, if the caller may read it; in a view, if the view is
empty for this reader (what it cannot see plays no part, so a hidden path is pulled as if
absent), into the first slice of the view that pulls through. An upstream that is slow
or down is a 503, never a 404 (Nix would remember it for an hour), unless the server
answers the path itself (a release's source tree, a granted closure's path). A mirrored
record's narinfo carries the upstream's ``Sig`` (re-checked against the record's fingerprint) next
to the server's, and a writer's own upload replaces a mirrored copy without
``cache:admin``.

**Hot path.** Every URL is dispatched by hand (a dozen fixed routes do not need a router,
and Starlette's per-request middleware stack cost more than the rest of a narinfo answer):
parse the Authorization header; a verified token is remembered until it expires (an API
token used directly, until the database changes); the key files are re-read when the
database changes (``key rotate`` commits there) or a second has passed, not ``stat``'ed
per request; the slices holding a path are remembered until the database changes
(``PRAGMA data_version``); policy decisions are memoized per identity and policy object
(and a cold one looks only at the rules its index finds); a narinfo is rendered and
signed once per record and key set and kept, with its whole HTTP answer, as bytes (one
write through the front's ``prepared`` extension). The visibility decision and its
audit line still happen on every request. Request ids come from a counter, not from the
kernel's random source. The audit line is built by
:func:`nixd.server.access.audit.event_body`: with ``audit.durable_reads`` (the default) the answer
waits for its fsync, shared by every request in flight (group commit); without it, an
allowed read's line is queued and the answer goes out at once. NAR blobs go from the
page cache to the socket with ``sendfile`` (the ASGI zero-copy send extension); blobs in
object storage (S3) are streamed from one ranged GET per request, 1 MiB at a time, every
blocking call in a worker thread (or, with ``[storage.s3] redirect``, answered ``302`` to
a presigned URL of the bucket once the access decision is made and audited).

Measured with ``bench/server_bench.py`` (2 busy cores, 1 worker, durable audit, wrk
-c32, nginx in the same run): narinfo hit 5.5k req/s, p50 5 ms, p99 19 ms (nginx's p99
on the same machine: 7 ms), 141 CPU-us/req (app ~55, the HTTP/1.1 front and the audit
writer the rest); a miss with 50k paths in the database 4.9k req/s at 157 CPU-us/req;
NAR send 0.17 CPU-s/GiB (nginx 0.09).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import itertools
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from nixd.errors import AuthError, FormatError, NixdError
from nixd.http import parse_range
from nixd.nix import base32
from nixd.nix.hashes import Hash
from nixd.nix.narinfo import NarInfo
from nixd.nix.storepath import StorePath
from nixd.server.access.audit import AuditWriter, event_body
from nixd.server.access.credentials import CredentialRejected, CredentialStore
from nixd.server.access.deploy import DEPLOY_ONLY, is_deploy_only
from nixd.server.access.identity import Identity, anonymous
from nixd.server.access.keys import ServerKeys
from nixd.server.access.policy import DEFAULT_DENY, PUBLIC_RULES, PolicyHolder
from nixd.server.access.tokens import TokenIssuer
from nixd.server.asgi import Receive, Scope, Send
from nixd.server.bodies import read_json_object
from nixd.server.errors import (
    WWW_AUTHENTICATE,
    BadRequest,
    BadUpload,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    TooLarge,
    Unauthenticated,
    UpstreamUnavailable,
    into_client,
)
from nixd.server.http.ops import PATHS as OPS_PATHS
from nixd.server.http.ops import OpsRoutes, count_storage_error
from nixd.server.login.device import DeviceService
from nixd.server.login.exchange import Exchanger, ExchangeRejected
from nixd.server.login.web import WebPages
from nixd.server.mirror.service import MirrorService
from nixd.server.storage.blobs import BlobMissing
from nixd.server.storage.db import Project
from nixd.server.storage.store import Nar, PathConflict, PathInfo, Store, compression_of

if TYPE_CHECKING:
    from nixd.server.flakes.releases import FlakeStore
    from nixd.server.http.deploy import DeployRoutes
    from nixd.server.http.flakes import FlakeRoutes

log = logging.getLogger(__name__)


CACHE_INFO = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
NARINFO_TYPE = b"text/x-nix-narinfo"
NAR_TYPE = b"application/x-nix-nar"
MAX_SMALL_BODY = 4 << 20  # narinfos, logs, JSON
FEED_BATCH = 1 << 20  # bytes handed to the ingest thread at a time
READ_CHUNK = 1 << 20  # NAR download chunk
_TOKEN_CACHE_MAX = 10_000
_NARINFO_CACHE_MAX = 50_000
UNTRUSTED = "untrusted-public"
"""Audit rule of a read that only another organization's public slice could answer."""
VIEW_FILES = frozenset({"nar", "log", "realisations", "nix-cache-info"})
"""First path segments of a view's own files (project names are never these)."""
_HASH_PART = re.compile(r"[0-9a-df-np-sv-z]{32}")  # Nix base32: no e, o, t, u
_DECISION_CACHE_MAX = 10_000
ZEROCOPY = "http.response.zerocopysend"
"""The ASGI zero-copy send extension (a file descriptor, an offset and a count)."""
PREPARED = "nixd.http.response.prepared"
"""Our front's extension: a whole response (status line, headers, body) as bytes."""
_NARINFO_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/x-nix-narinfo\r\ncontent-length: %d\r\n\r\n"


class _ResponseCut(trio.BrokenResourceError):
    """A response failed after its head was sent (a bucket stopped answering mid-NAR).

    The cause is logged once where it happened; raised through the ASGI front, which
    treats it as a connection gone (drops it, logs nothing more), so the client sees a
    short body and retries, and the log holds one WARNING instead of a traceback.
    """


@dataclass
class Services:
    """What the app needs, built by :mod:`nixd.server.http.serve` (or a test)."""

    store: Store
    credentials: CredentialStore
    issuer: TokenIssuer
    keys: ServerKeys
    policy: PolicyHolder
    audit: AuditWriter
    max_upload_bytes: int = 64 * 1024**3
    clock: Callable[[], float] = time.time
    nar_checker: Callable[[], Any] | None = None
    durable_reads: bool = True
    background: trio.Nursery | None = None
    """Where non-durable read-allow audit lines are written (``durable_reads=False``)."""
    exchangers: dict[str, Exchanger] = field(default_factory=dict)
    """Exchange kinds other than ``token`` (:mod:`nixd.server.login.exchange`), by kind."""
    device: DeviceService | None = None
    """Interactive login: ``/api/v1/device/*`` and the ``/device`` pages."""
    ops: OpsRoutes | None = None
    """``/healthz``, ``/readyz``, ``/metrics`` (:mod:`nixd.server.http.ops`)."""
    flakes: FlakeStore | None = None
    """Private flakes: ``/f/``, ``/api/v1/flakes`` and their source store paths."""
    max_tarball_bytes: int = 256 * 1024**2
    """``[flakes] max_tarball_bytes``."""
    public_url: str = ""
    """``[server] public_url``: the base of the links the server writes ("" = Host)."""
    mirror: MirrorService | None = None
    """Upstream caches (:mod:`nixd.server.mirror`): completion after uploads, pull-through."""


@dataclass
class _Ctx:
    """One request: who sent it, from where, under which id."""

    request_id: str
    source_ip: str
    identity: Identity | None = None
    deploy_only: bool = False
    """A deploy-only credential (:mod:`nixd.server.access.deploy`): its cache reads go
    to its grants' closures first, so a served read has one audit line."""


class CacheApp:
    """The ASGI application: ``CacheApp(services)``, served by :mod:`nixd.server.http.serve`."""

    def __init__(self, services: Services) -> None:
        self.s = services
        # The pages sit on top of the device service (web imports device, never back).
        self._pages = WebPages(services.device) if services.device is not None else None
        self._tokens: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self._narinfos: OrderedDict[tuple[int, tuple[str, ...]], tuple[PathInfo, bytes]] = (
            OrderedDict()
        )
        self._prepared: dict[bytes, tuple[bytes, bytes]] = {}
        self._keys_version = -1
        self._keys_statted = 0.0
        self._keys_checked = 0.0
        self._signers: list[Any] = []
        self._signer_names: tuple[str, ...] = ()
        # Unique per process (workers included) and cheap: a random prefix and a counter.
        self._request_prefix = secrets.token_hex(3)
        self._request_numbers = itertools.count(1)
        self._api_tokens: dict[str, tuple[Identity, float]] = {}
        self._api_version = -1
        self._decisions: dict[tuple[int, int, str, str, bool, str], tuple[Any, Any, bool, str]] = {}
        self._live_version = -1
        self._revoked: set[str] = set()
        self._disabled: set[str] = set()
        self._flakes: FlakeRoutes | None = None
        self._deploy: DeployRoutes | None = None
        if services.flakes is not None:
            # Imported here: the flake routes build on this module's helpers.
            from nixd.server.http.deploy import DeployRoutes  # noqa: PLC0415
            from nixd.server.http.flakes import FlakeRoutes  # noqa: PLC0415

            self._flakes = FlakeRoutes(self, services.flakes)
            self._deploy = DeployRoutes(self, services.flakes, self._flakes)

    # -- ASGI entry ---------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        client = scope.get("client")
        ctx = _Ctx(
            request_id=f"{self._request_prefix}{next(self._request_numbers):06x}",
            source_ip=client[0] if client else "",
        )
        scope["nixd.ctx"] = ctx  # for the access log line (nixd.server.http.ops.Observed)
        path: str = scope["path"]
        as_json = not path.startswith("/cache/")
        try:
            self.s.store.sync()  # PostgreSQL: other instances' commits (SQLite: nothing)
            if path.startswith("/cache/"):
                await self._cache(ctx, scope, receive, send, path[len("/cache/") :])
            elif path.startswith("/f/") and self._flakes is not None:
                await self._flakes.fetch(ctx, scope, send, path[len("/f/") :])
            elif path.startswith("/api/v1/") or path == "/.well-known/jwks.json":
                await self._api(ctx, scope, receive, send, path)
            elif path in OPS_PATHS and self.s.ops is not None:
                await self.s.ops.handle(scope, send, path)
            elif (path == "/device" or path.startswith("/device/")) and self.s.device:
                assert self._pages is not None
                await self._pages.handle(
                    scope,
                    receive,
                    send,
                    path=path,
                    request_id=ctx.request_id,
                    source_ip=ctx.source_ip,
                )
            else:
                raise NotFound()
        except _ResponseCut:
            raise  # the head is out: only cutting the connection is left (logged already)
        except Exception as exc:
            if self.s.ops is not None:
                count_storage_error(self.s.ops.metrics != "off", exc)
            status, headers, body = into_client(exc, request_id=ctx.request_id, as_json=as_json)
            await _respond(send, status, body, headers, head=scope["method"] == "HEAD")

    # -- identity -----------------------------------------------------------------------

    def _identify(self, ctx: _Ctx, scope: Scope) -> Identity | None:
        """The caller's identity from ``Authorization``; None if it sent none.

        Raises an :class:`AuthError` if a credential was sent and is not good.
        """
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        if header is None:
            return None
        self._check_keys()
        scheme, _, rest = header.decode("latin-1").strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            secret = rest.strip()
        elif scheme == "basic":
            try:
                decoded = base64.b64decode(rest.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise AuthError("malformed Basic authorization header") from exc
            secret = decoded.partition(":")[2]
        else:
            raise AuthError(f"unsupported authorization scheme {scheme!r}")
        if not secret:
            raise AuthError("empty credential in the authorization header")
        ident = self._verify_secret(secret)
        self._check_live(ident)
        ctx.identity = ident
        return ident

    def _check_keys(self) -> None:
        """Notice a replaced keyring (``key rotate``) on this very request, in every worker.

        ``key rotate`` replaces the key file, then commits to the database
        (:func:`~nixd.server.storage.db.note_key_change`); a commit is noticed here with a
        memory read (``PRAGMA data_version`` through the mapped wal-index), and then the
        key files are ``stat``'ed: that is what makes ``key rotate --tokens --grace 0``
        refuse old tokens at once. A key file replaced some other way is noticed within
        a second. (Two ``stat`` calls per request were ~20 of the ~80 CPU-us the app
        spent on a narinfo hit.)
        """
        version = self.s.store.data_version()
        now = time.monotonic()
        if version == self._keys_version and now - self._keys_statted < 1.0:
            return
        self._keys_version = version
        self._keys_statted = now
        if self.s.keys.refresh():
            self._narinfos.clear()
            self._forget_tokens()
            self._keys_checked = 0.0  # which keys sign is looked up again

    def _check_live(self, ident: Identity) -> None:
        """Refuse a still-unexpired access token whose credential or user was cut off.

        ``token revoke`` and ``user disable`` are commits by another process; the sets
        of revoked credentials and disabled users are re-read whenever the database
        changed (``PRAGMA data_version``), so they apply on the next request.
        """
        version = self.s.store.data_version()
        if version != self._live_version:
            self._live_version = version
            self._revoked = self.s.credentials.revoked_ids()
            self._disabled = (
                self.s.device.accounts.disabled_names() if self.s.device is not None else set()
            )
        credential = ident.attributes.get("credential")
        if isinstance(credential, str) and credential in self._revoked:
            raise AuthError("the credential behind this access token was revoked")
        if ident.kind == "user" and ident.subject in self._disabled:
            raise AuthError(f"user {ident.subject} is disabled")

    def _verify_secret(self, secret: str) -> Identity:
        now = self.s.clock()
        if secret.startswith("nixd_"):
            return self._api_token(secret, now)
        cached = self._tokens.get(secret)
        if cached is not None and now < cached[1]:
            return cached[0]
        ident, claims = self.s.issuer.verify(secret)
        # Cache until expiry: the check is a signature verification, the answer a pure
        # function of the token and the clock (key retirement is rare and checked on reload).
        if len(self._tokens) >= _TOKEN_CACHE_MAX:
            self._tokens.popitem(last=False)
        self._tokens[secret] = (ident, float(claims["exp"]) + self.s.issuer.leeway)
        return ident

    def _api_token(self, secret: str, now: float) -> Identity:
        """An API token used directly (netrc for ``nix copy``).

        Remembered only while the database is unchanged: revocations are written by
        ``nixd-server token revoke`` in another process, so any commit there (``PRAGMA
        data_version``) drops every remembered token, and a revoked token fails on its
        next request. The token's own expiry is kept with it.
        """
        version = self.s.store.data_version()
        if version != self._api_version:
            self._api_version = version
            self._api_tokens.clear()
        cached = self._api_tokens.get(secret)
        if cached is not None and now < cached[1]:
            return cached[0]
        ident = self.s.credentials.authenticate(secret)
        record = self.s.credentials.get(str(ident.attributes.get("credential", "")))
        expires = record.expires if record is not None and record.expires else float("inf")
        if len(self._api_tokens) >= _TOKEN_CACHE_MAX:
            self._api_tokens.clear()
        self._api_tokens[secret] = (ident, expires)
        return ident

    def _forget_tokens(self) -> None:
        self._tokens.clear()

    # -- policy + audit -----------------------------------------------------------------

    def _may(self, ctx: _Ctx, action: str, project: Project) -> tuple[bool, str]:
        """Whether the caller may ``action`` on ``project``, and the rule that said so.

        The policy's one decision function decides, the ``--public`` flag included (an
        allow that a deny rule overrides), exactly as ``nixd-server policy explain`` does.
        """
        return self._may_on(ctx, action, project.slice, public=project.public)

    def _may_on(
        self, ctx: _Ctx, action: str, resource: str, *, public: bool = False
    ) -> tuple[bool, str]:
        identity = ctx.identity or anonymous()
        policy = self.s.policy.current
        # Identities come from the token cache, so the same caller is the same object:
        # decisions are memoized per (identity, policy) object, checked by identity (`is`).
        key = (id(identity), id(policy), action, resource, public, ctx.source_ip)
        hit = self._decisions.get(key)
        if hit is not None and hit[0] is identity and hit[1] is policy:
            return hit[2], hit[3]
        decision = policy.decide(identity, action, resource, ctx.source_ip or None, public=public)
        allowed, rule = decision.allowed, decision.rule
        if action != "deploy:read" and is_deploy_only(identity):
            # Decided here, once per identity and question (memoized): a deploy-only
            # credential reads its grants' closures (nixd.server.http.deploy), nothing else.
            allowed, rule = False, DEPLOY_ONLY
        if len(self._decisions) >= _DECISION_CACHE_MAX:
            self._decisions.clear()
        self._decisions[key] = (identity, policy, allowed, rule)
        return allowed, rule

    async def _audit(
        self, ctx: _Ctx, action: str, resource: str, allowed: bool, rule: str, **extra: Any
    ) -> None:
        ident = ctx.identity or anonymous()
        audit = self.s.audit
        fields = {
            "identity": ident.render(),
            "action": action,
            "resource": resource,
            "decision": "allow" if allowed else "deny",
            "rule": rule,
            "source": ctx.source_ip,
        }
        if not all(type(v) is str for v in extra.values()):
            await audit.arecord({"request_id": ctx.request_id, **fields, **extra})
            return
        body = event_body(audit.now(), ctx.request_id, **fields, **extra)
        if allowed and action == "cache:read" and not self.s.durable_reads:
            audit.submit(body)  # written within milliseconds; the answer need not wait
            return
        # Allowed reads too wait for their batch's fsync by default (audit.durable_reads):
        # one fdatasync per batch of whatever arrived during the previous one (~30 lines
        # at wrk -c32, ~8 CPU-us per line of the ~110 a narinfo answer costs). Answering
        # first (submit) lost acknowledged lines to kill -9 (tests/server/test_audit_kill.py
        # fails that way); waiting keeps "no acknowledged line is lost".
        await audit.arecord_body(body)

    def _view(
        self, ctx: _Ctx, org: str | None, candidates: list[tuple[Project, float]]
    ) -> tuple[list[tuple[Project, str]], str]:
        """The candidate slices that answer this reader, best first, and why others did not.

        The trust order of a view of organization ``org`` (see the module docstring):
        ``org``'s own slices, then the other organizations' slices ``org`` opted in to
        (``nixd-server org trust``), then slices granted to this reader by an explicit
        (not public) rule; within each, lower priority first, then the record that came
        first, then by name. Another organization's slice that is readable only because
        it is public is left out unless ``org`` opted in to it. The second value is the
        rule to audit when nothing answers: the first deny rule that matched, else why.
        """
        trust = self.s.store.trust(org) if org else {}
        own = org.lower() if org else None  # names are unique ignoring case
        ranked: list[tuple[tuple[Any, ...], Project, str]] = []
        refused = DEFAULT_DENY if candidates else "no-slice"
        for project, created in candidates:
            allowed, rule = self._may(ctx, "cache:read", project)
            if not allowed:
                if refused in (DEFAULT_DENY, UNTRUSTED) and rule != DEFAULT_DENY:
                    refused = rule
                continue
            order = (project.priority, created, project.org, project.name)
            if project.org.lower() == own:
                ranked.append(((0, *order), project, rule))
            elif project.id in trust:
                ranked.append(((1, trust[project.id], *order), project, rule))
            elif rule not in PUBLIC_RULES:
                ranked.append(((2, *order), project, rule))
            elif refused == DEFAULT_DENY:
                refused = UNTRUSTED
        ranked.sort(key=lambda r: r[0])
        return [(p, rule) for _, p, rule in ranked], refused

    async def _read_decision(
        self, ctx: _Ctx, org: str | None, candidates: list[tuple[Project, float]], what: str
    ) -> Project:
        """The slice that answers ``what`` in ``org``'s view; else 401/404 (audited either way).

        Hidden and absent are one answer: 401 + ``WWW-Authenticate`` to a caller without a
        credential, else 404 with an empty body; the reason goes to the audit log only.
        """
        view, refused = self._view(ctx, org, candidates)
        if view:
            project, rule = view[0]
            await self._audit(ctx, "cache:read", project.slice, True, rule, object=what)
            return project
        await self._audit(ctx, "cache:read", f"{org or '*'}/*", False, refused, object=what)
        if ctx.identity is None:
            raise Unauthenticated("authentication required")
        raise NotFound()

    def _reader_org(self, ctx: _Ctx) -> str | None:
        """The organization whose view ``/cache/`` shows this caller: its own, or none."""
        org = ctx.identity.attributes.get("org") if ctx.identity is not None else None
        return org if isinstance(org, str) else None

    async def _write_decision(self, ctx: _Ctx, resource: str, what: str) -> None:
        """Refuse an upload to ``resource`` (``org/project``) the caller may not write.

        Decided on the name, before looking the slice up, so the refusal is the same
        whether the slice exists or not; the rule is in the audit line, not the answer.
        """
        allowed, rule = self._may_on(ctx, "cache:write", resource)
        await self._audit(ctx, "cache:write", resource, allowed, rule, object=what)
        if allowed:
            return
        if ctx.identity is None:
            raise Unauthenticated("authentication required to upload")
        raise Forbidden(f"{ctx.identity.render()} may not upload to {resource}")

    # -- /cache/ ------------------------------------------------------------------------

    async def _cache(
        self, ctx: _Ctx, scope: Scope, receive: Receive, send: Send, rest: str
    ) -> None:
        method: str = scope["method"]
        head = method == "HEAD"
        if rest == "nix-cache-info":
            if method in ("GET", "HEAD"):
                await _respond(send, 200, CACHE_INFO, {"content-type": "text/plain"}, head=head)
                return
            raise MethodNotAllowed("nix-cache-info is fixed by the server")
        try:
            ident = self._identify(ctx, scope)
        except AuthError as exc:
            await self._audit(ctx, "authenticate", "*", False, "credential", error=str(exc))
            raise
        ctx.deploy_only = ident is not None and self._deploy is not None and is_deploy_only(ident)
        parts = rest.split("/")
        if parts[0] in VIEW_FILES or len(parts) == 1:
            await self._view_read(ctx, scope, send, self._reader_org(ctx), rest)
            return
        if len(parts) == 2 or parts[1] in VIEW_FILES:
            await self._view_read(ctx, scope, send, parts[0], "/".join(parts[1:]))
            return
        org, project_name, name = parts[0], parts[1], "/".join(parts[2:])
        if name == "nix-cache-info" and method in ("GET", "HEAD"):
            # Fixed and public under every prefix: whether the slice exists is nobody's business.
            await _respond(send, 200, CACHE_INFO, {"content-type": "text/plain"}, head=head)
            return
        if method == "PUT":
            await self._write_decision(ctx, f"{org}/{project_name}", name)
            project = self.s.store.project(org, project_name)
            if project is None:
                raise NotFound()  # only a caller allowed to write that name learns this
            await self._slice_put(ctx, scope, receive, send, project=project, name=name)
        elif method in ("GET", "HEAD"):
            project = self.s.store.project(org, project_name)
            if project is None:
                await self._read_decision(ctx, org, [], name)  # 401/404 like a hidden slice
                return
            await self._slice_read(ctx, scope, send, project=project, name=name, head=head)
        else:
            raise MethodNotAllowed(f"{method} is not supported here")

    async def _view_read(
        self, ctx: _Ctx, scope: Scope, send: Send, org: str | None, name: str
    ) -> None:
        """A read from the view of ``org``: ``/cache/<org>/...``, or ``/cache/...`` (own org)."""
        method = scope["method"]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed("this view is read-only; upload to /cache/<org>/<project>/")
        if name == "nix-cache-info":
            await _respond(send, 200, CACHE_INFO, {"content-type": "text/plain"}, head=head)
        elif name.endswith(".narinfo") and "/" not in name:
            hash_part = _hash_part(name)
            holders = self.s.store.holders(hash_part)
            if (
                ctx.deploy_only
                and holders
                and await self._deploy_narinfo(
                    ctx, scope, send, org=org, project=None, hash_part=hash_part, head=head
                )
            ):
                return
            candidates = [(p, i.created) for p, i in holders]
            unavailable: UpstreamUnavailable | None = None
            if self.s.mirror is not None and self.s.mirror.pull_through:
                try:
                    holders, candidates = await self._pull_view(ctx, org, name, holders, candidates)
                except UpstreamUnavailable as exc:  # the 503, unless this server has it
                    unavailable = exc
            try:
                project = await self._read_decision(ctx, org, candidates, name)
            except (NotFound, Unauthenticated):
                # A miss (audited): a flake release's source tree, if this caller may read it.
                if self._flakes is not None and await self._flakes.source_narinfo(
                    ctx, scope, send, hash_part=hash_part, what=name, head=head
                ):
                    return
                # Or a path of a deployable closure this caller was granted; only a path
                # some slice holds can be one (the misses `nix copy --to` makes before
                # each upload cost nothing more).
                if (
                    holders
                    and not ctx.deploy_only
                    and await self._deploy_narinfo(
                        ctx, scope, send, org=org, project=None, hash_part=hash_part, head=head
                    )
                ):
                    return
                if unavailable is not None:
                    raise unavailable from None
                raise
            info = next(i for p, i in holders if p.id == project.id)
            self.s.store.note_access(project.id, info.hash_part)  # in memory (retention)
            await self._send_narinfo(scope, send, info, head)
        elif name.startswith("nar/"):
            await self._send_nar(ctx, scope, send, org, file_name=name[4:], project=None, head=head)
        elif name.startswith("log/"):
            logs = self.s.store.log_holders(name[4:])
            project = await self._read_decision(ctx, org, [(p, c) for p, c, _ in logs], name)
            data = next(d for p, _, d in logs if p.id == project.id)
            await _respond(send, 200, data, {"content-type": "text/plain"}, head=head)
        else:
            await self._read_decision(ctx, org, [], name)

    async def _slice_read(
        self, ctx: _Ctx, scope: Scope, send: Send, *, project: Project, name: str, head: bool
    ) -> None:
        here = [(project, 0.0)]
        if name == "nix-cache-info":
            await _respond(send, 200, CACHE_INFO, {"content-type": "text/plain"}, head=head)
        elif name.endswith(".narinfo") and "/" not in name:
            hash_part = _hash_part(name)
            info = self.s.store.in_slice(project, hash_part)
            if (
                ctx.deploy_only
                and info
                and await self._deploy_narinfo(
                    ctx, scope, send, org=None, project=project, hash_part=hash_part, head=head
                )
            ):
                return
            if (
                info is None
                and self.s.mirror is not None
                and self._may(ctx, "cache:read", project)[0]
            ):
                info = await self.s.mirror.pull(project, hash_part)  # 503 if it is slow
            try:
                await self._read_decision(ctx, project.org, here if info else [], name)
            except (NotFound, Unauthenticated):
                # A miss (audited): a path of a deployable closure granted to this caller.
                if (
                    info
                    and not ctx.deploy_only
                    and await self._deploy_narinfo(
                        ctx, scope, send, org=None, project=project, hash_part=hash_part, head=head
                    )
                ):
                    return
                raise
            assert info is not None
            self.s.store.note_access(project.id, info.hash_part)  # in memory (retention)
            await self._send_narinfo(scope, send, info, head)
        elif name.startswith("nar/"):
            alias = self.s.store.alias(project, name)
            if alias is not None and head and self._may(ctx, "cache:write", project)[0]:
                # `nix copy --to` asks whether its own upload is here before sending it;
                # anyone else gets the answer of an ordinary read.
                await self._audit(ctx, "cache:write", project.slice, True, "upload-check")
                await _respond(send, 200, b"", {"content-length": str(alias.nar_size)}, head=True)
                return
            await self._send_nar(
                ctx, scope, send, project.org, file_name=name[4:], project=project, head=head
            )
        elif name.startswith("log/"):
            logs = [h for h in self.s.store.log_holders(name[4:]) if h[0].id == project.id]
            await self._read_decision(ctx, project.org, [(p, c) for p, c, _ in logs], name)
            await _respond(send, 200, logs[0][2], {"content-type": "text/plain"}, head=head)
        else:
            await self._read_decision(ctx, project.org, [], name)

    async def _pull_view(
        self,
        ctx: _Ctx,
        org: str | None,
        name: str,
        holders: list[tuple[Project, PathInfo]],
        candidates: list[tuple[Project, float]],
    ) -> tuple[list[tuple[Project, PathInfo]], list[tuple[Project, float]]]:
        """A view's miss: pulled into the first slice of the view that pulls through.

        Only what the reader would see decides (the view is empty for it): a path hidden
        in a slice it cannot read is pulled as if absent, so no answer tells it apart.
        """
        assert self.s.mirror is not None
        if self._view(ctx, org, candidates)[0]:
            return holders, candidates
        targets = [(p, 0.0) for p in self.s.mirror.pull_targets(org)]
        ranked = self._view(ctx, org, targets)[0]
        if not ranked:
            return holders, candidates
        project = ranked[0][0]
        info = await self.s.mirror.pull(project, _hash_part(name))  # 503 if it is slow
        if info is None:
            return holders, candidates
        return [*holders, (project, info)], [*candidates, (project, info.created)]

    async def _deploy_narinfo(
        self,
        ctx: _Ctx,
        scope: Scope,
        send: Send,
        *,
        org: str | None,
        project: Project | None,
        hash_part: str,
        head: bool,
    ) -> bool:
        """Serve a path of a closure granted to this caller (:mod:`.deploy`); else False."""
        if self._deploy is None:
            return False
        return await self._deploy.narinfo(
            ctx, scope, send, org=org, project=project, hash_part=hash_part, head=head
        )

    async def _deploy_nar(
        self,
        ctx: _Ctx,
        scope: Scope,
        send: Send,
        *,
        org: str | None,
        project: Project | None,
        file_hash: str,
        head: bool,
    ) -> bool:
        """Serve a NAR of a closure granted to this caller (:mod:`.deploy`); else False."""
        if self._deploy is None:
            return False
        return await self._deploy.nar(
            ctx, scope, send, org=org, project=project, file_hash=file_hash, head=head
        )

    def _signed_narinfo(self, info: PathInfo) -> bytes:
        now = self.s.clock()
        if now - self._keys_checked > 1.0:
            self._keys_checked = now
            if self.s.keys.refresh():
                self._narinfos.clear()
                self._forget_tokens()
            # Which keys are live changes with time (grace periods): looked up once a second.
            self._signers = self.s.keys.narinfo.signing_keys()
            self._signer_names = tuple(k.name for k in self._signers)
        signers = self._signers
        # Pre-rendered and signed per record (a record is one slice's path: two slices
        # may hold one store path with different metadata, and each gets its own) and
        # key set. Keyed by the record object, checked with `is`: the store hands out
        # one object per record until the database changes, and any upload, replace or
        # delete changes it, so a changed record is a new object and its stale text is
        # never found again (it ages out of the LRU); a key rotation clears it all.
        # A hit costs no hashing of the record and no SQLite query; the visibility
        # decision before it still runs on every request.
        key = (id(info), self._signer_names)
        cached = self._narinfos.get(key)
        if cached is not None and cached[0] is info:
            self._narinfos.move_to_end(key)
            return cached[1]
        ni = NarInfo(
            store_path=StorePath(info.hash_part, info.name),
            url=info.nar.url,
            compression="zstd",
            file_hash=Hash("sha256", base32.decode(info.nar.file_hash)),
            file_size=info.nar.file_size,
            nar_hash=Hash.parse(info.nar.nar_hash),
            nar_size=info.nar.nar_size,
            references=tuple(StorePath.from_basename(r) for r in info.references),
            deriver=StorePath.from_basename(info.deriver) if info.deriver else None,
            system=info.system,
            sigs=(),
            ca=info.ca,
        )
        if self.s.mirror is not None:  # a mirrored record keeps its upstream's Sig too
            ni = dataclasses.replace(
                ni,
                sigs=self.s.mirror.upstream_sigs(info, ni.fingerprint()),
            )
        for secret in signers:
            ni = ni.signed(secret)
        body = ni.render().encode()
        if len(self._narinfos) >= _NARINFO_CACHE_MAX:
            self._narinfos.popitem(last=False)
        self._narinfos[key] = (info, body)
        return body

    async def _send_narinfo(self, scope: Scope, send: Send, info: PathInfo, head: bool) -> None:
        body = self._signed_narinfo(info)
        if PREPARED in scope.get("extensions", ()):
            # The whole answer as bytes, made once per narinfo text: one write.
            prepared = self._prepared.get(body)
            if prepared is None:
                if len(self._prepared) >= _NARINFO_CACHE_MAX:
                    self._prepared.clear()
                prepared = self._prepared[body] = (
                    _NARINFO_HEAD % len(body) + body,
                    _NARINFO_HEAD % len(body),
                )
            await send({"type": PREPARED, "status": 200, "data": prepared[head]})
            return
        await _respond(send, 200, body, {"content-type": "text/x-nix-narinfo"}, head=head)

    async def _send_nar(
        self,
        ctx: _Ctx,
        scope: Scope,
        send: Send,
        org: str | None,
        *,
        file_name: str,
        project: Project | None,
        head: bool,
    ) -> None:
        """A NAR file, if a slice record in the reader's view names its NarHash.

        NAR bytes are shared between slices by hash: whichever slice's record made it
        visible, the bytes are the ones that NarHash names, so sharing changes no answer.
        """
        if not file_name.endswith(".nar.zst"):
            await self._read_decision(ctx, org, [], file_name)
        file_hash = file_name[: -len(".nar.zst")]
        nar, holders = self.s.store.nar_holders(file_hash)
        if project is not None:
            holders = [p for p in holders if p.id == project.id]
        candidates = [(p, 0.0) for p in holders] if nar else []
        if (
            ctx.deploy_only
            and candidates
            and await self._deploy_nar(
                ctx, scope, send, org=org, project=project, file_hash=file_hash, head=head
            )
        ):
            return
        try:
            served = await self._read_decision(ctx, org, candidates, f"nar/{file_name}")
        except (NotFound, Unauthenticated):
            # A miss (audited): a flake release's source NAR, if this caller may read it.
            if (
                project is None
                and self._flakes is not None
                and await self._flakes.source_nar(ctx, scope, send, file_hash, head)
            ):
                return
            if (
                candidates
                and not ctx.deploy_only
                and await self._deploy_nar(
                    ctx, scope, send, org=org, project=project, file_hash=file_hash, head=head
                )
            ):
                return
            raise
        assert nar is not None
        self.s.store.note_nar_access(served.id, nar.nar_hash)  # in memory (retention)
        await self._send_nar_bytes(scope, send, nar, head)

    async def _send_nar_bytes(self, scope: Scope, send: Send, nar: Nar, head: bool) -> None:
        """The bytes of a NAR whose read was decided (and audited)."""
        path = self.s.store.blob_local_path(nar.file_hash)
        if path is not None:
            # _send_file opens the blob before it sends the head: a GC that unlinks it now
            # cannot cut this download short (the open file lives on).
            await _send_file(scope, send, path, head)
            return
        if not head and (
            url := await trio.to_thread.run_sync(self.s.store.blob_download_url, nar.file_hash)
        ):
            # [storage.s3] redirect: the decision is made (and audited); the bytes come
            # from the bucket (or a CDN before it). The URL expires: no cache keeps it.
            headers = {"location": url, "cache-control": "no-store"}
            await _respond(send, 302, b"", headers)
            return
        await _send_blob(scope, send, self.s.store, nar, head)

    # -- uploads ------------------------------------------------------------------------

    async def _slice_put(
        self,
        ctx: _Ctx,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        project: Project,
        name: str,
    ) -> None:
        if name.startswith("nar/"):
            nar = await self._receive_nar(scope, receive, project, name)
            log.info(
                "stored NAR %s (%d bytes) for %s as %s",
                nar.nar_hash,
                nar.nar_size,
                project.slice,
                name,
            )
        elif name.endswith(".narinfo") and "/" not in name:
            body = await _read_body(receive, MAX_SMALL_BODY)
            await self._accept_narinfo(ctx, project, name, body)
        elif name.startswith("log/"):
            body = await _read_body(receive, 64 << 20)
            self.s.store.put_log(project, name[4:], body)
        elif name.endswith(".ls") or name == "nix-cache-info":
            await _read_body(receive, MAX_SMALL_BODY)  # listings are not served; drop them
        else:
            await _read_body(receive, MAX_SMALL_BODY)
            raise BadUpload(f"{name!r} is not something this cache stores")
        await _respond(send, 200, b"", {"content-type": "text/plain"})

    async def _receive_nar(
        self, scope: Scope, receive: Receive, project: Project, name: str
    ) -> Any:
        compression = compression_of(name)
        length = _content_length(scope)
        await self.s.store.check_room_async(length)  # before the body: see Store.check_room
        checker = self.s.nar_checker() if self.s.nar_checker is not None else None
        ingest = self.s.store.begin_nar(
            compression, max_nar_size=self.s.max_upload_bytes, checker=checker
        )
        try:
            pending: list[bytes] = []
            size = 0
            more = True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise BadUpload("the client went away during the upload")
                chunk = msg.get("body", b"")
                more = msg.get("more_body", False)
                if chunk:
                    pending.append(chunk)
                    size += len(chunk)
                if size >= FEED_BATCH or (not more and pending):
                    data = b"".join(pending)
                    pending.clear()
                    size = 0
                    await trio.to_thread.run_sync(ingest.feed, data)
            finished = await trio.to_thread.run_sync(ingest.finish)
        except BaseException:
            with trio.CancelScope(shield=True):  # an S3 abort is a request: not on the loop
                await trio.to_thread.run_sync(ingest.discard)
            raise
        return await self.s.store.commit_nar_async(ingest, finished, project, name)

    async def _accept_narinfo(self, ctx: _Ctx, project: Project, name: str, body: bytes) -> None:
        try:
            ni = NarInfo.parse(body)
        except FormatError as exc:
            raise BadUpload(f"{name}: not a valid narinfo: {exc}") from exc
        if ni.store_path.hash_part != _hash_part(name):
            raise BadUpload(
                f"{name} describes {ni.store_path.path()}, whose hash is not in the file name"
            )
        nar = self.s.store.alias(project, ni.url)
        if nar is None:
            raise BadUpload(
                f"the narinfo of {ni.store_path.path()} refers to {ni.url}, which was not "
                f"uploaded to {project.slice}; upload the NAR first"
            )
        if nar.nar_hash != str(ni.nar_hash) or nar.nar_size != ni.nar_size:
            await self.s.store.drop_alias_async(project, ni.url)
            raise BadUpload(
                f"NAR mismatch for {ni.store_path.path()}: the narinfo says NarHash "
                f"{ni.nar_hash}, NarSize {ni.nar_size}, but the NAR uploaded as {ni.url} has "
                f"NarHash {nar.nar_hash}, NarSize {nar.nar_size}; nothing was stored"
            )
        record = PathInfo(
            hash_part=ni.store_path.hash_part,
            name=ni.store_path.name,
            nar=nar,
            references=tuple(sorted(r.basename for r in ni.references)),
            deriver=ni.deriver.basename if ni.deriver else None,
            system=ni.system,
            ca=ni.ca,
            uploader=(ctx.identity or anonymous()).render(),
        )
        existing = self.s.store.in_slice(project, record.hash_part)
        replace = False
        if (
            existing is not None
            and not existing.same_contents(record)
            and self.s.mirror is not None
            and self.s.mirror.mirrored(project, existing)
        ):
            replace = True  # the slice's writer's own build replaces a mirrored copy
        elif existing is not None and not existing.same_contents(record):
            replace, rule = self._may(ctx, "cache:admin", project)
            await self._audit(
                ctx, "cache:replace", project.slice, replace, rule, object=record.basename
            )
        try:
            changed = self.s.store.add_path(project, record, replace=replace)
        except PathConflict as exc:
            raise Conflict(str(exc)) from exc
        if changed:
            log.info("stored %s in %s", ni.store_path.path(), project.slice)
            if self.s.mirror is not None:  # its closure is completed in the background
                self.s.mirror.uploaded(project, record)

    # -- /api/ --------------------------------------------------------------------------

    async def _api(self, ctx: _Ctx, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        method = scope["method"]
        if path == "/.well-known/jwks.json" and method == "GET":
            await _json(send, 200, self.s.issuer.jwks())
        elif path == "/api/v1/cache/keys" and method == "GET":
            self.s.keys.refresh()
            await _json(send, 200, self.s.keys.narinfo.published())
        elif path == "/api/v1/token/exchange" and method == "POST":
            await self._exchange(ctx, receive, send)
        elif path == "/api/v1/token/status" and method == "GET":
            await self._status(ctx, scope, send)
        elif (path == "/api/v1/flakes" or path.startswith("/api/v1/flakes/")) and self._flakes:
            await self._flakes.api(ctx, scope, receive, send, path)
        elif path.startswith("/api/v1/device/") and self.s.device is not None:
            await self.s.device.handle_api(
                scope,
                receive,
                send,
                path=path,
                request_id=ctx.request_id,
                source_ip=ctx.source_ip,
            )
        elif path in ("/api/v1/token/exchange", "/api/v1/token/status", "/api/v1/cache/keys"):
            raise MethodNotAllowed(f"{method} is not supported on {path}")
        else:
            raise NotFound()

    async def _exchange(self, ctx: _Ctx, receive: Receive, send: Send) -> None:
        try:
            # Bounded in size and depth (nixd.server.bodies); any malformed body is a 400
            # with its audit line, like every other refusal of the exchange.
            request = await read_json_object(receive, what="the exchange request")
            kind = request.get("kind")
            if not isinstance(kind, str):
                raise BadRequest('"kind" must be a string naming the credential kind')
            token = request.get("token")
            if kind == "token" and (not isinstance(token, str) or not token):
                raise BadRequest('"token" must be a non-empty string')
        except BadRequest as exc:
            await self._audit(
                ctx, "token:exchange", "*", False, "malformed_request", reason=str(exc)
            )
            raise
        if kind != "token":
            await self._exchange_identity(ctx, kind, request, send)
            return
        assert isinstance(token, str)
        try:
            ident = self.s.credentials.authenticate(token)
        except CredentialRejected as exc:
            await self._audit(ctx, "token:exchange", "*", False, exc.code, reason=exc.reason)
            await _json(
                send,
                401,
                {"error": exc.code, "message": str(exc)},
                headers={"www-authenticate": WWW_AUTHENTICATE},
            )
            return
        ctx.identity = ident
        credential = self.s.credentials.get(str(ident.attributes.get("credential", "")))
        not_after = credential.expires if credential is not None else None
        access, claims = self.s.issuer.issue(ident, not_after=not_after)
        await self._audit(ctx, "token:exchange", ident.render(), True, "credential")
        await _json(
            send,
            200,
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": int(claims["exp"] - claims["iat"]),
                "expires_at": int(claims["exp"]),
                "identity": ident.render(),
            },
        )

    async def _exchange_identity(
        self, ctx: _Ctx, kind: str, request: dict[str, Any], send: Send
    ) -> None:
        """An exchange by one of ``Services.exchangers``; audited, good or bad, with why."""
        try:
            exchanger = self.s.exchangers.get(kind)
            if exchanger is None:
                supported = ", ".join(["token", *sorted(self.s.exchangers)])
                raise ExchangeRejected(
                    f"credential kind {kind!r} is not supported here (supported: {supported})",
                    code="unsupported_kind",
                    status=400,
                )
            ident = await exchanger.identify(request, ctx.source_ip or None)
        except ExchangeRejected as exc:
            await self._audit(
                ctx, "token:exchange", "*", False, exc.code, kind=kind, reason=exc.reason
            )
            headers = {"www-authenticate": WWW_AUTHENTICATE} if exc.status == 401 else None
            await _json(
                send, exc.status, {"error": exc.code, "message": exc.message}, headers=headers
            )
            return
        ctx.identity = ident
        access, claims = self.s.issuer.issue(ident)
        await self._audit(ctx, "token:exchange", ident.render(), True, kind)
        # An exchanger may add to the answer (``refresh`` hands over the rotated credential).
        answer_fields = getattr(exchanger, "answer_fields", None)
        await _json(
            send,
            200,
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": int(claims["exp"] - claims["iat"]),
                "expires_at": int(claims["exp"]),
                "identity": ident.render(),
                **(answer_fields() if answer_fields is not None else {}),
            },
        )

    async def _status(self, ctx: _Ctx, scope: Scope, send: Send) -> None:
        ident = self._identify(ctx, scope)
        if ident is None:
            raise Unauthenticated("send the access token as Authorization: Bearer")
        claims: dict[str, Any] = {}
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, tok = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and not tok.strip().startswith("nixd_"):
                    _, claims = self.s.issuer.verify(tok.strip())
        await _json(
            send,
            200,
            {
                "identity": ident.render(),
                **ident.to_json(),
                "expires_at": claims.get("exp"),
                "issued_at": claims.get("iat"),
            },
        )


# -- helpers ---------------------------------------------------------------------------


def _hash_part(name: str) -> str:
    hash_part = name[: -len(".narinfo")]
    if not _HASH_PART.fullmatch(hash_part):
        raise NotFound()
    return hash_part


async def _respond(
    send: Send, status: int, body: bytes, headers: dict[str, str], *, head: bool = False
) -> None:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    if "content-length" not in headers:
        raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _json(
    send: Send, status: int, payload: Any, *, headers: dict[str, str] | None = None
) -> None:
    await _respond(
        send,
        status,
        json.dumps(payload).encode(),
        {"content-type": "application/json", "cache-control": "no-store", **(headers or {})},
    )


def _content_length(scope: Scope) -> int:
    """The request's ``Content-Length`` (0 if none; the front has checked its syntax)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() and len(value) <= 20 else 0
    return 0


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise BadUpload("the client went away during the upload")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body is larger than {limit} bytes")
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)


def _nar_headers(scope: Scope, size: int) -> tuple[int, int, int, list[tuple[bytes, bytes]]]:
    """``(start, end, status, headers)`` of a NAR answer of ``size`` bytes, Range applied."""
    start, end, status = 0, size, 200
    headers = [
        (b"content-type", b"application/zstd"),
        (b"accept-ranges", b"bytes"),
        (b"cache-control", b"private, max-age=31536000, immutable"),
    ]
    for name, value in scope["headers"]:
        if name == b"range":
            # One parser for every front (nixd.http): anything it does not serve is the
            # whole file, never a 416 a plain GET would not have got.
            rng = parse_range(value, size)
            if rng is not None and (rng.start, rng.stop) != (0, size):
                start, end, status = rng.start, rng.stop, 206
                headers.append((b"content-range", rng.content_range))
    headers.append((b"content-length", str(end - start).encode()))
    return start, end, status, headers


async def _send_blob(scope: Scope, send: Send, store: Store, nar: Nar, head: bool) -> None:
    """A NAR from a blob store without local files (S3): one ranged GET, streamed.

    The size is the record's (``nars.file_size``), so Range is answered without asking
    the store first; the GET (or, for HEAD, a HEAD) is made before the status line, so
    a missing blob is a 404 and an unreachable store a 503, never a cut-off 200. Every
    blocking call, each chunk of at most 1 MiB included, runs in a worker thread.
    """
    start, end, status, headers = _nar_headers(scope, nar.file_size)
    try:
        if head:
            await trio.to_thread.run_sync(store.blob_size, nar.file_hash)
        else:
            read = await trio.to_thread.run_sync(store.open_blob, nar.file_hash, start, end)
    except BlobMissing:
        log.error("stored NAR %s is missing from %s", nar.file_hash, store.blobs.describe())
        raise NotFound() from None
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if head:
        await send({"type": "http.response.body", "body": b""})
        return
    try:
        chunks = iter(read)
        while True:
            try:
                chunk = await trio.to_thread.run_sync(next, chunks, None)
            except NixdError as exc:  # StorageUnavailable, a short read: after the head
                log.warning("cut the download of NAR %s: %s", nar.file_hash, exc)
                raise _ResponseCut(str(exc)) from exc
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        read.close()


async def _send_file(scope: Scope, send: Send, path: os.PathLike[str], head: bool) -> None:
    """A NAR file with Content-Length, Accept-Ranges and single-range support.

    The blob is served as stored, so a front offering the ASGI zero-copy extension
    (``http.response.zerocopysend``, as :mod:`nixd.server.http.serve` does) gets the
    descriptor, the offset and the count and streams it with ``sendfile``: measured on
    the 2-core bench machine, pread + send cost 0.66 to 1.7 CPU-s per GiB sent, sendfile
    is the kernel's copy only. Other fronts (the in-process test transport) get
    synchronous pread()s of up to 1 MiB: the files are mostly in the page cache, and a
    thread hop per chunk costs more than it saves.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        log.error("stored NAR %s is missing", path)
        raise NotFound() from None
    try:
        size = os.fstat(fd).st_size
        start, end, status, headers = _nar_headers(scope, size)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if head:
            await send({"type": "http.response.body", "body": b""})
            return
        if ZEROCOPY in scope.get("extensions", ()):
            # The front sends the blob with sendfile: no byte of it passes through Python.
            await send({"type": ZEROCOPY, "file": fd, "offset": start, "count": end - start})
            return
        pos = start
        while pos < end:
            chunk = os.pread(fd, min(READ_CHUNK, end - pos), pos)
            if not chunk:
                raise NixdError(f"stored NAR {path} shrank while being sent")
            pos += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": pos < end})
        if start == end:
            await send({"type": "http.response.body", "body": b""})
    finally:
        os.close(fd)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
