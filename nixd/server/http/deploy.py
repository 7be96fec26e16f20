"""Deploying a recorded output: resolving it, and reading exactly its closure.

URL space (dispatched from :mod:`nixd.server.http.flakes` and the cache's misses)::

    GET /api/v1/flakes/<org>/<name>/releases/<version-or-constraint>/outputs/<attr>[?check=1]
    /cache/.../<hash>.narinfo, /cache/.../nar/...   a granted closure's paths (misses only)

**Resolve** answers what CI recorded at publish (``outputs`` of the release's metadata)::

    200 {"org", "name", "version", "output", "store_path",
         "closure": {"paths": N, "nar_size": BYTES}, "complete": true, "slice": "org/project"}

with ``"missing": []`` too. The closure is walked in the deploy view of the flake's
organization (:mod:`nixd.server.flakes.deploy`); an incomplete one is refused 409
``{"error": "incomplete", "message", "missing": [paths]}`` (at most
:data:`MAX_MISSING` named, ``"missing_count"`` says how many) unless ``?check=1``, which
always answers 200 with ``"complete"`` and ``"missing"``. An output the release did not
record is a 404 saying so (``{"error": "not_found", "message": "output ... was not
recorded for acme/tool 0.2.0 (publish with --include-output)"}``). Who may resolve:
``flake:read`` (public flakes included, as for the rest of ``/api/v1/flakes``) or
``deploy:read`` on ``org/name``, or a deploy-only credential's own grant (then only the
granted output, among the releases its constraint matches). Hidden and absent are one
answer, as everywhere: 401 to an anonymous caller, the same 404 to others. Every resolve
is audited (``flake:resolve``, with the output, version and store path).

**Reading a closure.** ``deploy:read`` on a flake (a policy rule, or a deploy-only
credential's grant: :mod:`nixd.server.access.deploy`) lets the caller read the records of
the closures of its releases' recorded outputs as the deploy view serves them, and
nothing more: in the view of the flake's own organization (``/cache/``, whose view is
the token's organization, or ``/cache/<org>/``) or in the slice whose record is served
(``/cache/<org>/<project>/``). For a normal identity this runs only when the normal
read missed (after its audit line), so its hits cost nothing more; a deploy-only
identity is asked here first (one audit line per served read), and is refused everything
else by the policy decision itself (rule ``deploy-only``, audited as any refusal), so any
other path, the flake tarball and the flake listings answer exactly as absent. The set
of readable paths is computed once per identity, policy and database version and kept
(the closures themselves per output), and only asked for a path some slice holds, so the
misses of paths nobody has (``nix copy --to`` asks before each upload) cost nothing more.
Every such read is audited (``deploy:read``, with the output and its store path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import trio

from nixd.semver import VersionError, parse_constraint, parse_version
from nixd.server.access.deploy import DEPLOY_TOKEN, Grant, grants_of
from nixd.server.access.identity import Identity, anonymous
from nixd.server.access.policy import DEFAULT_DENY
from nixd.server.asgi import Scope, Send
from nixd.server.errors import BadRequest, NoRelease, NotFound, Unauthenticated
from nixd.server.flakes.deploy import Closure, Closures
from nixd.server.flakes.metadata import ATTR_RE, MAX_ATTR
from nixd.server.flakes.releases import Flake, FlakeStore, Release
from nixd.server.http.app import CacheApp, _Ctx, _json
from nixd.server.storage.db import NAME_RE, Project
from nixd.server.storage.store import PathInfo

if TYPE_CHECKING:
    from nixd.server.http.flakes import FlakeRoutes

MAX_MISSING = 1000
"""Most missing paths named in one answer (``missing_count`` has the whole number)."""
NO_GRANT = "no-deploy-grant"
"""Audit rule of a resolve a deploy-only credential's grants do not cover."""
INCOMPLETE = "incomplete-closure"
"""Audit rule of a publish refused because an output's closure is not all there."""
_ALLOWED_MAX = 10_000
MIRROR_WAIT = 120.0
"""Seconds a publish waits for the mirrors to complete its outputs' closures before it
is refused as incomplete: a CI job pushes what it built and publishes at once, while the
lower half of the closure (what an upstream cache such as cache.nixos.org has) is still
being fetched; ``nixd publish`` waits up to 300 s for an answer."""
_READABLE_MAX = 256


@dataclass(frozen=True, slots=True)
class Output:
    """One recorded output a caller may deploy, and why (for the audit line)."""

    org: str
    resource: str
    version: str
    output: str
    store_path: str
    rule: str


@dataclass(slots=True)
class Readable:
    """What one caller may read by deploy grants: records by hash part and by FileHash."""

    paths: dict[str, tuple[Project, PathInfo, Output]] = field(default_factory=dict)
    files: dict[str, tuple[Project, PathInfo, Output]] = field(default_factory=dict)


_NOTHING = Readable()


def _missing_json(closure: Closure) -> dict[str, Any]:
    return {"missing": list(closure.missing[:MAX_MISSING]), "missing_count": len(closure.missing)}


class DeployRoutes:
    """Resolve, the publish-time completeness check, and closure reads of one app."""

    def __init__(self, app: CacheApp, flakes: FlakeStore, routes: FlakeRoutes) -> None:
        self.app = app
        self.flakes = flakes
        self.routes = routes
        store = app.s.store
        self.closures = Closures(store, lambda: (store.data_version(), store.writes, flakes.writes))
        self._outputs_version: Any = None
        self._outputs: list[tuple[Flake, Release]] = []
        self._granted_to: dict[tuple[int, str], tuple[Identity, Any, Any, tuple[Output, ...]]] = {}
        self._readable: dict[tuple[Output, ...], Readable] = {}
        self._readable_version: Any = None

    # -- what may be read ---------------------------------------------------------------

    def _recorded(self) -> list[tuple[Flake, Release]]:
        """Every release that recorded outputs, with its flake (until the database changes)."""
        version = self.closures.version()
        if version != self._outputs_version:
            found = []
            for flake in self.flakes.flakes():
                found += [(flake, r) for r in self.flakes.releases(flake) if _outputs(r)]
            self._outputs, self._outputs_version = found, version
        return self._outputs

    def readable(self, ctx: _Ctx) -> Readable:
        """The records this caller may read by deploy grants.

        What it was granted is remembered per identity; the records per set of granted
        outputs, so a thousand kiosks with one grant share one map.
        """
        recorded = self._recorded()  # also notices a changed database
        if not recorded:
            return _NOTHING
        identity = ctx.identity or anonymous()
        policy = self.app.s.policy.current
        version = self.closures.version()
        key = (id(identity), ctx.source_ip)
        hit = self._granted_to.get(key)
        if hit is not None and hit[0] is identity and hit[1] is policy and hit[2] == version:
            outputs = hit[3]
        else:
            outputs = tuple(self._granted(ctx, identity, recorded))
            if len(self._granted_to) >= _ALLOWED_MAX:
                self._granted_to.clear()
            self._granted_to[key] = (identity, policy, version, outputs)
        if not outputs:
            return _NOTHING
        if self._readable_version != version:
            self._readable_version = version
            self._readable.clear()
        readable = self._readable.get(outputs)
        if readable is None:
            readable = Readable()
            for output in outputs:
                closure = self.closures.of(output.org, output.store_path)
                for hash_part, (project, info) in closure.records.items():
                    readable.paths.setdefault(hash_part, (project, info, output))
                    readable.files.setdefault(info.nar.file_hash, (project, info, output))
            if len(self._readable) >= _READABLE_MAX:
                self._readable.clear()
            self._readable[outputs] = readable
        return readable

    def _granted(
        self, ctx: _Ctx, identity: Identity, recorded: list[tuple[Flake, Release]]
    ) -> list[Output]:
        grants = grants_of(identity)
        found: list[Output] = []
        for flake, release in recorded:
            allowed, rule = self.routes.may(ctx, "deploy:read", flake.resource)
            for attr, path in sorted(_outputs(release).items()):
                if allowed:
                    why = rule
                elif grants and rule == DEFAULT_DENY and _covered(grants, flake, attr, release):
                    why = DEPLOY_TOKEN
                else:
                    continue
                found.append(Output(flake.org, flake.resource, release.version, attr, path, why))
        return found

    # -- cache reads (misses only) --------------------------------------------------------

    @staticmethod
    def _here(org: str | None, project: Project | None, served: Project, out: Output) -> bool:
        """Whether the URL asked is one the record may be served under (see module doc)."""
        if project is not None:
            return project.id == served.id
        return org is not None and org.lower() == out.org.lower()

    async def narinfo(
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
        """Serve a granted closure's narinfo; False (the miss stands) otherwise."""
        found = self.readable(ctx).paths.get(hash_part)
        if found is None or not self._here(org, project, found[0], found[2]):
            return False
        served, info, out = found
        await self._audit_read(ctx, out, f"{hash_part}.narinfo", info)
        self.app.s.store.note_access(served.id, info.hash_part)
        await self.app._send_narinfo(scope, send, info, head)
        return True

    async def nar(
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
        """Serve a granted closure's NAR; False (the miss stands) otherwise."""
        found = self.readable(ctx).files.get(file_hash)
        if found is None or not self._here(org, project, found[0], found[2]):
            return False
        served, info, out = found
        await self._audit_read(ctx, out, f"nar/{file_hash}.nar.zst", info)
        self.app.s.store.note_nar_access(served.id, info.nar.nar_hash)
        await self.app._send_nar_bytes(scope, send, info.nar, head)
        return True

    async def _audit_read(self, ctx: _Ctx, out: Output, what: str, info: PathInfo) -> None:
        await self.app._audit(
            ctx,
            "deploy:read",
            out.resource,
            True,
            out.rule,
            object=what,
            path=f"/nix/store/{info.basename}",
            output=out.output,
            version=out.version,
            store_path=out.store_path,
        )

    # -- resolve --------------------------------------------------------------------------

    def _may_resolve(self, ctx: _Ctx, flake: Flake, attr: str) -> tuple[bool, str, list[Grant]]:
        """Whether the caller may resolve ``attr`` of ``flake``, the rule, and (for a
        deploy-only caller allowed by its own grants) the grants that limit the versions."""
        allowed, rule = self.routes._may_read(ctx, flake)
        if allowed:
            return True, rule, []
        deploy, deploy_rule = self.routes.may(ctx, "deploy:read", flake.resource)
        if deploy:
            return True, deploy_rule, []
        grants = grants_of(ctx.identity)
        if grants and deploy_rule == DEFAULT_DENY:
            mine = [g for g in grants if g.names(flake.org, flake.name) and g.output == attr]
            if mine:
                return True, DEPLOY_TOKEN, mine
            return False, NO_GRANT, []
        return False, rule if rule != DEFAULT_DENY else deploy_rule, []

    def _release(self, flake: Flake, spec: str, grants: list[Grant], attr: str) -> Release:
        if not grants:
            return self.routes._resolve(flake, spec)[0]
        # Only the releases the grants cover exist for this caller.
        covered = [r for r in self.flakes.releases(flake) if _covered(grants, flake, attr, r)]
        try:
            exact = parse_version(spec)
        except VersionError:
            exact = None
        if exact is not None:
            match = [r for r in covered if r.parsed == exact]
            if not match:
                raise NotFound()
            return match[0]
        try:
            constraint = parse_constraint(spec)
        except VersionError as exc:
            raise BadRequest(
                f"{spec!r} is neither a version nor a version constraint: {exc}"
            ) from exc
        best = constraint.best([r.parsed for r in covered])
        if best is None:
            raise NotFound()
        return next(r for r in covered if r.parsed == best)

    async def resolve(
        self, ctx: _Ctx, scope: Scope, send: Send, *, org: str, name: str, spec: str, attr: str
    ) -> None:
        """``GET /api/v1/flakes/<org>/<name>/releases/<spec>/outputs/<attr>``."""
        query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        check = query.get("check", [""])[-1].lower() in ("1", "true", "yes")
        what = f"{spec}#{attr}"
        valid = NAME_RE.fullmatch(org) is not None and NAME_RE.fullmatch(name) is not None
        flake = self.flakes.flake(org, name) if valid else None
        allowed, rule, grants = (
            self._may_resolve(ctx, flake, attr) if flake else (False, "no-flake", [])
        )
        resource = flake.resource if flake else f"{org}/{name}"
        if not allowed or flake is None:
            await self.app._audit(ctx, "flake:resolve", resource, False, rule, object=what)
            if ctx.identity is None:
                raise Unauthenticated("authentication required")
            raise NotFound()
        try:
            if len(attr) > MAX_ATTR or not ATTR_RE.fullmatch(attr):
                raise BadRequest(f"{attr[:80]!r} is not an output attribute name")
            release = self._release(flake, spec, grants, attr)
            path = _outputs(release).get(attr)
            if path is None:
                raise NoRelease(
                    f"output {attr} was not recorded for {flake.resource} {release.version} "
                    "(publish with --include-output)"
                )
        except (NotFound, BadRequest) as exc:
            await self.app._audit(
                ctx, "flake:resolve", resource, True, rule, object=what, error=str(exc)
            )
            raise
        closure = self.closures.of(flake.org, path)
        await self.app._audit(
            ctx,
            "flake:resolve",
            resource,
            True,
            rule,
            object=what,
            output=attr,
            version=release.version,
            store_path=path,
            complete="true" if closure.complete else "false",
        )
        if not closure.complete and not check:
            await _json(
                send,
                409,
                {
                    "error": "incomplete",
                    "message": _incomplete(flake.resource, release.version, attr, closure),
                    **_missing_json(closure),
                },
            )
            return
        await _json(
            send,
            200,
            {
                "org": flake.org,
                "name": flake.name,
                "version": release.version,
                "output": attr,
                "store_path": path,
                "closure": {"paths": len(closure.records), "nar_size": closure.nar_size},
                "complete": closure.complete,
                "slice": closure.root_slice,
                **_missing_json(closure),
            },
        )

    # -- publish --------------------------------------------------------------------------

    def _incomplete(self, org: str, outputs: dict[str, str]) -> dict[str, Closure]:
        return {
            attr: closure
            for attr, path in sorted(outputs.items())
            if not (closure := self.closures.of(org, path)).complete
        }

    async def _complete_from_mirrors(self, incomplete: dict[str, Closure]) -> bool:
        """Complete each output's closure in the slice holding the output, from the
        mirrors that slice may use, for at most :data:`MIRROR_WAIT`; True if any was
        tried. Only the mirror room fetches (verified like an upload); a slice no mirror
        lists fetches nothing, and an output the server does not hold is left alone."""
        mirror = self.app.s.mirror
        if mirror is None:
            return False
        tried = False
        with trio.move_on_after(MIRROR_WAIT):
            for closure in incomplete.values():
                if closure.truncated:
                    continue
                found = closure.records.get(closure.store_path.removeprefix("/nix/store/")[:32])
                if found is None or not mirror.for_slice(found[0]):
                    continue
                project, info = found
                await mirror.complete(project, info.hash_part, info.name, deep=True)
                tried = True
        return tried

    async def refuse_incomplete(
        self, ctx: _Ctx, send: Send, *, org: str, name: str, version: str, outputs: dict[str, str]
    ) -> bool:
        """Answer 409 (and say True) if a recorded output's closure is not all there."""
        incomplete = self._incomplete(org, outputs)
        if incomplete and await self._complete_from_mirrors(incomplete):
            incomplete = self._incomplete(org, outputs)
        if not incomplete:
            return False
        missing = sorted({p for c in incomplete.values() for p in c.missing})
        attrs = ", ".join(incomplete)
        await self.app._audit(
            ctx,
            "flake:release",
            f"{org}/{name}",
            False,
            INCOMPLETE,
            version=version,
            outputs=attrs,
            missing=str(len(missing)),
        )
        first = next(iter(incomplete.items()))
        await _json(
            send,
            409,
            {
                "error": "incomplete",
                "message": _incomplete(f"{org}/{name}", version, first[0], first[1])
                + (f" (and {len(incomplete) - 1} more outputs)" if len(incomplete) > 1 else ""),
                "missing": missing[:MAX_MISSING],
                "missing_count": len(missing),
                "outputs": {a: list(c.missing[:MAX_MISSING]) for a, c in incomplete.items()},
            },
        )
        return True


def _outputs(release: Release) -> dict[str, str]:
    outputs = release.metadata.get("outputs") or {}
    return outputs if isinstance(outputs, dict) else {}


def _covered(grants: tuple[Grant, ...] | list[Grant], flake: Flake, attr: str, r: Release) -> bool:
    version = r.parsed
    return any(g.covers(flake.org, flake.name, attr, version) for g in grants)


def _incomplete(resource: str, version: str, attr: str, closure: Closure) -> str:
    if closure.truncated:
        return (
            f"the closure of {attr} of {resource} {version} has more than the "
            "server walks; it cannot be deployed from here"
        )
    count = len(closure.missing)
    return (
        f"the closure of {attr} of {resource} {version} ({closure.store_path}) is not "
        f"complete: {count} path{'s' if count != 1 else ''} missing from the cache "
        "(push the whole closure with nix copy --to first)"
    )
