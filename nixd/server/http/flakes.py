"""Flake routes: publishing from CI, fetching by version or constraint, discovery.

URL space (dispatched from :class:`nixd.server.http.app.CacheApp`)::

    GET|HEAD /f/<org>/<name>/<version>.tar.gz        the release's canonical tarball
    GET|HEAD /f/<org>/<name>/<constraint>.tar.gz     302 to the best matching version
    GET  /api/v1/flakes[?org=ORG]                    the flakes the caller may read
    GET  /api/v1/flakes/<org>/<name>                 one flake and its releases
    GET  /api/v1/flakes/<org>/<name>/releases/<v>    one release (version or constraint)
    PUT  /api/v1/flakes/<org>/<name>/releases/<v>    publish (CI identities)
    /cache/.../<hash>.narinfo, /cache/.../nar/...    a release's source tree as a store
                                                     path, in the views (see below)

**Reading** is ``flake:read`` on ``org/name``, decided by the policy's one function; a
public flake is also readable by anyone (rule ``public-flake``), unless a deny rule
matches. Names are one flake ignoring case but rules match case-sensitively, so an allow
stands only if no deny rule names the lower-case or the requested spelling either
(:meth:`FlakeRoutes.may`; publishing likewise).

Hidden and absent are one answer, whatever the URL below ``/f/<org>/<name>/`` asks:
401 + ``WWW-Authenticate`` to a caller without a credential, 404 with the same body to
one with a credential; the reason goes to the audit log only. Only a caller who may
read the flake learns which versions exist (a 404 naming what matched nothing, a 400 for
a constraint that does not parse).

**Constraints** resolve by SemVer precedence among the flake's releases
(:meth:`nixd.semver.Constraint.best`; pre-releases only when the constraint names one of
the same major.minor.patch); the redirect goes to ``[server] public_url`` if set, else to
the scheme and Host of the request, and is never cached (``no-store``). The exact URL's
answer is immutable: ``ETag`` (the tarball's sha256), ``Cache-Control: immutable`` and
``Link: <itself>; rel="immutable"``, which newer Nix clients lock to (2.8 locks the URL
as written and the NAR hash; see :mod:`nixd.server.flakes`).

**Publishing** is ``flake:publish`` on ``org/name``, decided on the name before anything
is looked up, so a refusal (403) says nothing of what exists. The body is
``X-Nixd-Metadata-Length`` bytes of metadata JSON (:mod:`nixd.server.flakes.metadata`)
followed by the ``.tar.gz``; a ``Content-Length`` over the bound is refused 413 before
the body is read. The tarball is unpacked and normalized in a worker thread
(:func:`nixd.nix.flaketarball.normalize`, every size bounded); any refusal stores
nothing. Then: 201 published, 200 the same version with the same tree (a no-op), 409
the version holds another tree.

**The source store path.** A cache narinfo or NAR request that no slice answers for this
caller (the hot path's miss, after its own audit line) asks whether the path is a
release's source tree the caller may read; if so it is served (``flake:read`` audited),
else the answer of the miss stands unchanged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qs

import trio

from nixd.bounds import parse_uint
from nixd.errors import AuthError, FormatError, NixdError
from nixd.nix.flaketarball import Source, TarballError, TarballLimits, normalize
from nixd.nix.hashes import Hash
from nixd.semver import Version, VersionError, parse_constraint, parse_version
from nixd.server.access.policy import DEFAULT_DENY
from nixd.server.asgi import Receive, Scope, Send
from nixd.server.errors import (
    BadRequest,
    BadUpload,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    NoRelease,
    NotFound,
    TooLarge,
    Unauthenticated,
)
from nixd.server.flakes.metadata import MAX_METADATA_BYTES, MetadataError, parse_metadata
from nixd.server.flakes.releases import Flake, FlakeStore, Release, VersionTaken
from nixd.server.http.app import (
    CacheApp,
    _Ctx,
    _json,
    _nar_headers,
    _ResponseCut,
    _send_file,
)
from nixd.server.storage.blobs import BlobMissing, BlobRead
from nixd.server.storage.db import NAME_RE, get_org
from nixd.server.storage.store import Nar, PathInfo

log = logging.getLogger(__name__)

RELEASE_TYPE = "application/x-nixd-release"
PUBLIC_FLAKE_RULE = "public-flake"
"""Audit rule of a read allowed only because the flake is public (a deny still wins)."""
NO_FLAKE = "no-flake"
"""Audit rule of a read of a flake that does not exist (answered as a hidden one)."""
IMMUTABLE = "max-age=31536000, immutable"
_INFOS_MAX = 10_000


def _valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


def _exact(spec: str) -> Version | None:
    """``spec`` as an exact version, or None if it is not one (then it is a constraint)."""
    try:
        return parse_version(spec)
    except VersionError:
        return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class FlakeRoutes:
    """The flake routes of one :class:`~nixd.server.http.app.CacheApp` (its identity,
    policy and audit machinery, so every decision is made and recorded the same way)."""

    def __init__(self, app: CacheApp, flakes: FlakeStore) -> None:
        self.app = app
        self.flakes = flakes
        self._infos: OrderedDict[tuple[str, str], PathInfo] = OrderedDict()

    # -- shared -----------------------------------------------------------------------------

    async def _identify(self, ctx: _Ctx, scope: Scope) -> None:
        try:
            self.app._identify(ctx, scope)
        except AuthError as exc:
            await self.app._audit(ctx, "authenticate", "*", False, "credential", error=str(exc))
            raise

    def may(
        self, ctx: _Ctx, action: str, resource: str, asked: str | None = None
    ) -> tuple[bool, str]:
        """``action`` on the flake ``resource``, decided on that name; an allow stands only
        if no deny rule names another spelling of it (lower case, or as ``asked``): the
        store knows one flake whatever the case, while rules match case-sensitively."""
        allowed, rule = self.app._may_on(ctx, action, resource)
        if not allowed and rule != DEFAULT_DENY:
            return allowed, rule
        # Also when no rule matched: a deploy grant allows on a default deny, a deny not.
        ok, by = self._spellings(ctx, action, resource, asked)
        return (allowed, rule) if ok else (False, by)

    def _spellings(
        self, ctx: _Ctx, action: str, resource: str, asked: str | None
    ) -> tuple[bool, str]:
        for other in sorted({resource.lower(), asked or resource} - {resource}):
            allowed, rule = self.app._may_on(ctx, action, other)
            if not allowed and rule != DEFAULT_DENY:
                return False, rule
        return True, ""

    def _may_read(self, ctx: _Ctx, flake: Flake, asked: str | None = None) -> tuple[bool, str]:
        """``flake:read`` on the flake; a public flake is an allow that a deny overrides."""
        allowed, rule = self.app._may_on(ctx, "flake:read", flake.resource)
        if not allowed and rule == DEFAULT_DENY and flake.public:
            allowed, rule = True, PUBLIC_FLAKE_RULE
        if not allowed:
            return allowed, rule
        ok, by = self._spellings(ctx, "flake:read", flake.resource, asked)
        return (allowed, rule) if ok else (False, by)

    async def _readable(self, ctx: _Ctx, org: str, name: str, what: str) -> Flake:
        """The flake if the caller may read it (audited); else the answer of an absent one."""
        flake = self.flakes.flake(org, name) if _valid_name(org) and _valid_name(name) else None
        if flake is not None:
            allowed, rule = self._may_read(ctx, flake, f"{org}/{name}")
            if allowed:
                await self.app._audit(ctx, "flake:read", flake.resource, True, rule, object=what)
                return flake
            resource, refused = flake.resource, rule
        else:
            resource, refused = f"{org}/{name}", NO_FLAKE
        await self.app._audit(ctx, "flake:read", resource, False, refused, object=what)
        if ctx.identity is None:
            raise Unauthenticated("authentication required")
        raise NotFound()

    def _base(self, scope: Scope) -> str:
        """The server's URL as the client reached it: ``[server] public_url`` or Host."""
        configured = self.app.s.public_url
        if configured:
            return configured.rstrip("/")
        host = _header(scope, b"host") or "localhost"
        return f"{scope.get('scheme', 'http')}://{host}"

    def _url(self, scope: Scope, release: Release) -> str:
        return f"{self._base(scope)}/f/{release.org}/{release.name}/{release.version}.tar.gz"

    def _release_json(self, scope: Scope, release: Release) -> dict[str, Any]:
        return {
            "org": release.org,
            "name": release.name,
            "version": release.version,
            "url": self._url(scope, release),
            "commit": release.commit,
            "ref": release.ref,
            "published_at": release.published_at,
            "published_by": release.published_by,
            "nar_hash": Hash.parse(release.nar_hash).encode("sri"),
            "nar_size": release.nar_size,
            "store_path": f"/nix/store/{release.store_path}",
            "last_modified": release.last_modified,
            "tarball_sha256": release.tarball_sha256,
            "tarball_size": release.tarball_size,
            "outputs": release.metadata.get("outputs") or {},
            "lock": release.metadata.get("lock"),
        }

    @staticmethod
    def _flake_json(flake: Flake, releases: list[Release]) -> dict[str, Any]:
        return {
            "org": flake.org,
            "name": flake.name,
            "visibility": flake.visibility,
            "description": flake.description,
            "latest": releases[0].version if releases else None,
        }

    def _resolve(self, flake: Flake, spec: str) -> tuple[Release, bool]:
        """The release ``spec`` names (a version) or matches best (a constraint), and
        whether it was exact. Only for a caller who may read ``flake``."""
        version = _exact(spec)
        if version is not None:
            release = self.flakes.release(flake, str(version))
            if release is None:
                raise NoRelease(f"{flake.resource} has no release {spec}")
            return release, True
        try:
            constraint = parse_constraint(spec)
        except VersionError as exc:
            raise BadRequest(
                f"{spec!r} is neither a version nor a version constraint: {exc}"
            ) from exc
        releases = self.flakes.releases(flake)
        best = constraint.best([r.parsed for r in releases])
        if best is None:
            raise NoRelease(f"no release of {flake.resource} matches {spec!r}")
        return next(r for r in releases if r.parsed == best), False

    # -- /f/ ----------------------------------------------------------------------------------

    async def fetch(self, ctx: _Ctx, scope: Scope, send: Send, rest: str) -> None:
        """``/f/<org>/<name>/<version-or-constraint>.tar.gz``."""
        await self._identify(ctx, scope)
        method = scope["method"]
        parts = rest.split("/")
        org = parts[0]
        name = parts[1] if len(parts) > 1 else ""
        last = parts[2] if len(parts) == 3 else ""
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed("flake tarballs are published with PUT /api/v1/flakes/...")
        spec = last[: -len(".tar.gz")] if last.endswith(".tar.gz") else ""
        flake = await self._readable(ctx, org, name, last or rest)
        if not spec:
            raise NotFound()
        release, exact = self._resolve(flake, spec)
        if not exact:
            location = self._url(scope, release)
            headers = {"location": location, "cache-control": "no-store"}
            await _send_all(send, 302, b"", headers, head=method == "HEAD")
            return
        await self._send_tarball(scope, send, flake, release, head=method == "HEAD")

    async def _send_tarball(
        self, scope: Scope, send: Send, flake: Flake, release: Release, *, head: bool
    ) -> None:
        etag = f'"{release.tarball_sha256}"'
        url = self._url(scope, release)
        headers = [
            (b"content-type", b"application/gzip"),
            (b"etag", etag.encode()),
            (b"cache-control", f"{'public' if flake.public else 'private'}, {IMMUTABLE}".encode()),
            (b"link", f'<{url}>; rel="immutable"'.encode()),
        ]
        if _header(scope, b"if-none-match") in (etag, "*"):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers.append((b"content-length", str(release.tarball_size).encode()))
        try:
            read = (
                await trio.to_thread.run_sync(self.flakes.open_tarball, release)
                if not head
                else None
            )
        except BlobMissing:
            log.error("the tarball of %s %s is missing", flake.resource, release.version)
            raise NotFound() from None
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if read is None:
            await send({"type": "http.response.body", "body": b""})
            return
        await _stream(send, read, f"tarball {release.tarball_key}")

    # -- /api/v1/flakes -------------------------------------------------------------------------

    async def api(self, ctx: _Ctx, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        await self._identify(ctx, scope)
        method = scope["method"]
        parts = (
            path[len("/api/v1/flakes") :].strip("/").split("/") if path != "/api/v1/flakes" else []
        )
        if not parts:
            if method != "GET":
                raise MethodNotAllowed(f"{method} is not supported on {path}")
            await self._list(ctx, scope, send)
            return
        if len(parts) == 4 and parts[2] == "releases" and method == "PUT":
            await self._publish(
                ctx, scope, receive, send, org=parts[0], name=parts[1], spec=parts[3]
            )
            return
        if method != "GET":
            raise MethodNotAllowed(f"{method} is not supported here")
        if len(parts) == 6 and parts[2] == "releases" and parts[4] == "outputs":
            assert self.app._deploy is not None  # built with these routes
            await self.app._deploy.resolve(
                ctx, scope, send, org=parts[0], name=parts[1], spec=parts[3], attr=parts[5]
            )
            return
        org = parts[0]
        name = parts[1] if len(parts) > 1 else ""
        if len(parts) == 2:
            flake = await self._readable(ctx, org, name, "flake")
            releases = self.flakes.releases(flake)
            await _json(
                send,
                200,
                {
                    **self._flake_json(flake, releases),
                    "releases": [self._release_json(scope, r) for r in releases],
                },
            )
            return
        what = "/".join(parts[2:])
        flake = await self._readable(ctx, org, name, what)
        if len(parts) != 4 or parts[2] != "releases":
            raise NotFound()
        release, _ = self._resolve(flake, parts[3])
        await _json(send, 200, self._release_json(scope, release))

    async def _list(self, ctx: _Ctx, scope: Scope, send: Send) -> None:
        query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        org = query.get("org", [None])[-1]
        shown = []
        for flake in self.flakes.flakes(org):
            if self._may_read(ctx, flake)[0]:
                shown.append(flake)
        await self.app._audit(
            ctx,
            "flake:list",
            f"{org or '*'}/*",
            True,
            "readable",
            shown=" ".join(f.resource for f in shown),
        )
        listed = [self._flake_json(f, self.flakes.releases(f)) for f in shown]
        await _json(send, 200, {"flakes": listed})

    async def _publish(
        self,
        ctx: _Ctx,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        org: str,
        name: str,
        spec: str,
    ) -> None:
        if not _valid_name(org) or not _valid_name(name):
            raise BadRequest(
                f"{org}/{name} is not a flake name: use letters, digits, '.', '_' or '-' "
                "(at most 63 each, starting with a letter or digit)"
            )
        resource = f"{org}/{name}"
        allowed, rule = self.may(ctx, "flake:publish", resource)
        await self.app._audit(ctx, "flake:publish", resource, allowed, rule, object=spec)
        if not allowed:
            if ctx.identity is None:
                raise Unauthenticated("authentication required to publish")
            raise Forbidden(f"{ctx.identity.render()} may not publish {resource}")
        try:
            version = parse_version(spec)
        except VersionError as exc:
            raise BadRequest(f"{spec!r} is not a release version (SemVer 2.0): {exc}") from exc
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if content_type != RELEASE_TYPE:
            raise BadRequest(f"a release is sent as Content-Type: {RELEASE_TYPE}")
        meta_length = self._metadata_length(scope)
        limit = meta_length + self.app.s.max_tarball_bytes
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and len(length) <= 20 and int(length) > limit:
            raise TooLarge(
                f"the release is {length} bytes; this server takes tarballs of at most "
                f"{self.app.s.max_tarball_bytes} bytes ([flakes] max_tarball_bytes)"
            )
        # What the name alone decides is refused before a byte of the body is read.
        if get_org(self.flakes.conn, org) is None:
            raise BadRequest(f"there is no organization {org!r} on this server")
        named = self.flakes.flake(org, name)
        if named is not None and (named.org, named.name) != (org, name):
            raise Conflict(f"this flake is published as {named.resource}; use that name")
        body = await _read_bounded(receive, limit, self.app.s.max_tarball_bytes)
        if len(body) < meta_length:
            raise BadUpload(
                f"the body ({len(body)} bytes) is shorter than its metadata ({meta_length} bytes)"
            )
        try:
            meta = parse_metadata(body[:meta_length])
        except MetadataError as exc:
            raise BadUpload(str(exc)) from exc
        tarball = body[meta_length:]
        del body
        limits = TarballLimits(compressed=self.app.s.max_tarball_bytes)
        try:
            source: Source = await trio.to_thread.run_sync(normalize, tarball, limits)
        except TarballError as exc:
            raise BadUpload(f"the flake tarball is refused: {exc}") from exc
        existing = self.flakes.flake(org, name)
        if existing is not None:
            old = self.flakes.release(existing, str(version))
            if old is not None and old.nar_hash != str(source.nar_hash):
                raise Conflict(
                    f"version {old.version} of {existing.resource} is already published with "
                    "other content; versions are immutable"
                )
        # Recorded outputs must be deployable: their closures all there (nixd.server.http.deploy).
        deploy = self.app._deploy
        if meta.outputs and deploy is not None:
            outputs = meta.outputs
            if await deploy.refuse_incomplete(
                ctx, send, org=org, name=name, version=str(version), outputs=outputs
            ):
                return
        stored = await trio.to_thread.run_sync(self.flakes.store_blobs, source)
        identity = ctx.identity.render() if ctx.identity is not None else "anonymous"
        try:
            published, release = self.flakes.record(
                org, name, version, meta=meta, source=source, blobs=stored, published_by=identity
            )
        except VersionTaken as exc:
            raise Conflict(str(exc)) from exc
        await self.app._audit(
            ctx,
            "flake:release",
            resource,
            True,
            "published" if published else "unchanged",
            version=release.version,
            nar_hash=release.nar_hash,
        )
        if published:
            log.info("published %s %s (%s)", resource, release.version, release.store_path)
        await _json(
            send,
            201 if published else 200,
            {"published": published, **self._release_json(scope, release)},
        )

    @staticmethod
    def _metadata_length(scope: Scope) -> int:
        raw = _header(scope, b"x-nixd-metadata-length")
        if raw is None:
            raise BadRequest("X-Nixd-Metadata-Length: the length of the metadata JSON is missing")
        try:
            length = parse_uint(raw.strip(), limit=1 << 62, what="X-Nixd-Metadata-Length")
        except FormatError as exc:
            raise BadRequest(str(exc)) from exc
        if length > MAX_METADATA_BYTES:
            raise TooLarge(
                f"the release metadata is {length} bytes; at most {MAX_METADATA_BYTES} are taken"
            )
        return length

    # -- the source tree as a store path (cache misses only) ------------------------------------

    def _info(self, release: Release) -> PathInfo:
        """The narinfo fields of a release's source tree; one object per stored NAR, so the
        app's signed-narinfo cache (keyed by the object) finds it again."""
        key = (release.store_path, release.nar_file_hash)
        info = self._infos.get(key)
        if info is None:
            nar_hash = Hash.parse(release.nar_hash)
            info = PathInfo(
                hash_part=release.hash_part,
                name=release.store_path[33:],
                nar=Nar(
                    release.nar_hash, release.nar_size, release.nar_file_hash, release.nar_file_size
                ),
                references=(),
                deriver=None,
                system=None,
                ca=f"fixed:r:{nar_hash}",
            )
            if len(self._infos) >= _INFOS_MAX:
                self._infos.popitem(last=False)
            self._infos[key] = info
        return info

    async def _readable_source(
        self, ctx: _Ctx, candidates: list[tuple[Flake, Release]], what: str
    ) -> Release | None:
        refused = NO_FLAKE
        for flake, release in candidates:
            allowed, rule = self._may_read(ctx, flake)
            if allowed:
                await self.app._audit(ctx, "flake:read", flake.resource, True, rule, object=what)
                return release
            if refused == NO_FLAKE or rule != DEFAULT_DENY:
                refused = rule
        if candidates:
            resource = candidates[0][0].resource
            await self.app._audit(ctx, "flake:read", resource, False, refused, object=what)
        return None

    async def source_narinfo(
        self, ctx: _Ctx, scope: Scope, send: Send, *, hash_part: str, what: str, head: bool
    ) -> bool:
        """Serve a release's source narinfo if the caller may read one; False otherwise."""
        if not self.flakes.is_source(hash_part):
            return False
        release = await self._readable_source(ctx, self.flakes.sources(hash_part), what)
        if release is None:
            return False
        await self.app._send_narinfo(scope, send, self._info(release), head)
        return True

    async def source_nar(
        self, ctx: _Ctx, scope: Scope, send: Send, file_hash: str, head: bool
    ) -> bool:
        """Serve a release's source NAR if the caller may read one; False otherwise."""
        if not self.flakes.is_source_file(file_hash):
            return False
        what = f"nar/{file_hash}.nar.zst"
        release = await self._readable_source(ctx, self.flakes.source_files(file_hash), what)
        if release is None:
            return False
        local = self.flakes.blobs.local_path(release.nar_key)
        if local is not None:
            await _send_file(scope, send, local, head)
            return True
        start, end, status, headers = _nar_headers(scope, release.nar_file_size)
        try:
            read = await trio.to_thread.run_sync(self.flakes.open_nar, release, start, end)
        except BlobMissing:
            log.error("the source NAR of %s %s is missing", release.org, release.version)
            raise NotFound() from None
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if head:
            read.close()
            await send({"type": "http.response.body", "body": b""})
            return True
        await _stream(send, read, f"source NAR {release.nar_key}")
        return True


async def _send_all(
    send: Send, status: int, body: bytes, headers: dict[str, str], *, head: bool
) -> None:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _stream(send: Send, read: BlobRead, what: str) -> None:
    """A blob's bytes after the head, each chunk read in a worker thread."""
    try:
        chunks = iter(read)
        while True:
            try:
                chunk = await trio.to_thread.run_sync(next, chunks, None)
            except NixdError as exc:
                log.warning("cut the download of %s: %s", what, exc)
                raise _ResponseCut(str(exc)) from exc
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        read.close()


async def _read_bounded(receive: Receive, limit: int, tarball_limit: int) -> bytes:
    """The whole request body, refused (413) as soon as it passes ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise BadUpload("the client went away during the upload")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(
                f"the release is larger than this server takes (tarballs of at most "
                f"{tarball_limit} bytes, [flakes] max_tarball_bytes)"
            )
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)
