"""The local authenticating proxy substituter: what Nix talks to on 127.0.0.1.

Model (DESIGN.md, "Security model"):

- Every request but ``nix-cache-info`` (a constant Nix must always be able to read),
  ``/metrics`` from loopback and, with ``flakes`` on, the flake routes (``GET``/``HEAD
  /f/...`` and ``/api/v1/flakes...``, granted to local users on purpose and forwarded as
  this machine's login: :mod:`nixd.proxy.flakes`) needs Basic auth with user ``nixd``
  and the local secret from ``secret_file`` (compared in constant time). Others get
  401. Nix remembers a 401 as "absent" for an hour: for a local user without the secret
  that is the intended outcome, and for root/nix-daemon (which read the managed netrc)
  it never happens.
  ``/metrics`` holds only counters (no store paths, no identities), so it is open to
  loopback callers for a Prometheus scraper without the secret.
- ``<hash>.narinfo``: answered from the local store (narinfos whose NAR is kept there),
  else from memory (verified answers, ``positive_ttl``; misses, ``negative_ttl``), else by
  asking every upstream concurrently. The upstream with the best (lowest) priority among
  those with a narinfo signed by a key trusted *for that upstream* wins; an upstream that
  is slow only matters while no better-priority answer decides. Nix gets the upstream's
  narinfo unchanged (its signatures too, so nix-daemon verifies again) except ``URL``,
  which becomes ``nar/<hash part>-<file digest>.nar<ext>``: the name says which store path
  and which exact file, so after a restart the proxy finds the upstream again.
  A narinfo resolved from an upstream has its references' narinfos and small NARs fetched
  ahead of Nix (:mod:`nixd.proxy.prefetch`), so Nix's next requests are memory hits.
- ``nar/<name>``: from the local store (``sendfile``, Range), else from a single-flight
  :class:`~nixd.proxy.singleflight.Download` that all requests for the name tail.
  ``Range`` is read by :func:`nixd.http.parse_range`: a range it does not serve (malformed,
  several, past the end, numbers beyond any file) is answered with the whole file, a 200,
  never a 416 a plain GET would not have got.
  A download is verified as it arrives (FileSize and, decompressed, the signed
  NarHash/NarSize, in worker threads; :mod:`nixd.proxy.verify`); its last byte goes to Nix
  and the file enters the :class:`LocalStore` only once both matched. When the store
  cannot hold a NAR (larger than its cap or the free space of its disk, even after
  evicting, or the disk fills up mid-download), each request streams it from the upstream
  through to Nix, verified the same, and nothing is kept (:meth:`Proxy._pass_through`;
  WARNING once per NAR, counted in the status). A download the upstream cuts resumes from
  it with ``Range``; Nix's own ``Range`` retry (Nix 2.8 asks again from the offset it has
  after a cut transfer) tails the same download, so it is served from the bytes already
  received rather than refused while the upstream is away.
  NARs whose FileSize is at most :data:`~nixd.proxy.localstore.SMALL` take a short path:
  fetched whole over a kept-alive connection (one fetch shared by concurrent requests),
  checked inline (FileSize, then the signed NarHash) before any byte goes to Nix, kept, and
  answered with one write; warm hits on them come from memory.
- ``log/<drv basename>`` (``nix log``): asked of the upstreams in priority order, each with
  its own credential; the first 200 is passed on, at most :data:`MAX_LOG` bytes. Build logs
  are not signed in Nix's protocol, so they are not verified and not kept; 404 only when
  every upstream said 404, otherwise the upstream's failure maps as for a narinfo.
- Errors reach Nix only through :func:`nixd.proxy.errors.status_for`.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import hmac
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from nixd.errors import (
    AuthError,
    ConfigError,
    FormatError,
    IntegrityError,
    NixdError,
    UpstreamError,
)
from nixd.http import BodyTooLarge, parse_range
from nixd.nix.cacheinfo import CacheInfo
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey
from nixd.nix.storepath import StorePath
from nixd.proxy import pagecache
from nixd.proxy.config import FlakesConfig, ProxyConfig, UpstreamConfig
from nixd.proxy.errors import BadRequest, NotFound, status_for, worst_error
from nixd.proxy.flakes import FlakeForwarder, is_flake_request
from nixd.proxy.front import Abort, Connection, HttpServer, Request, Responder, serve_front
from nixd.proxy.localstore import SMALL, LocalStore
from nixd.proxy.metrics import Metrics
from nixd.proxy.negcache import NegativeCache, TTLCache
from nixd.proxy.prefetch import Prefetcher, fetches_whole
from nixd.proxy.singleflight import Download, NoRoom, PassThrough, State
from nixd.proxy.upstream import Upstream
from nixd.proxy.verify import (
    check_small_nar,
    expected_raw,
    nar_key,
    parse_nar_key,
)

if TYPE_CHECKING:
    from nixd.auth.model import TokenSource

log = logging.getLogger(__name__)

NARINFO_TYPE = (b"content-type", b"text/x-nix-narinfo")
NAR_HEADERS = ((b"content-type", b"application/x-nix-nar"), (b"accept-ranges", b"bytes"))
_PENDING = object()
_BASE32 = frozenset("0123456789abcdfghijklmnpqrsvwxyz")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")
MAX_LOG = 64 << 20
"""Largest build log passed on (the cache server accepts logs up to the same size)."""
MAX_PASSED_THROUGH = 256
"""NARs remembered as streamed through (for the once-per-NAR warning and the status)."""
_NARINFO_OK = Metrics.key("nixd_proxy_requests_total", kind="narinfo", status="200")
_LOCAL_NARINFO_HIT = Metrics.key("nixd_proxy_local_hits_total", kind="narinfo")
_LOCAL_NAR_HIT = Metrics.key("nixd_proxy_local_hits_total", kind="nar")


class _SmallFetch:
    """A small NAR being fetched whole; later requests for it wait for the first one."""

    __slots__ = ("data", "done", "error", "prefetch")

    def __init__(self, prefetch: bool) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.prefetch = prefetch
        """Started by a prefetch: a request that joined it fetches again if it failed."""


class Resolved:
    """A verified narinfo: the text Nix gets, the NAR's proxy name, and where it is.

    The complete HTTP answers (GET and HEAD) are rendered once here, so a hit on the
    in-memory cache is one lookup and one write.
    """

    __slots__ = ("get_response", "head_response", "info", "key", "upstream")

    def __init__(self, text: bytes, key: str, info: NarInfo, upstream: Upstream | None) -> None:
        self.key = key
        self.info = info
        """As the upstream sent it (URL relative to the upstream), or as stored locally."""
        self.upstream = upstream
        """None: the narinfo came from the local store."""
        self.head_response = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/x-nix-narinfo\r\ncontent-length: %d\r\n\r\n"
            % len(text)
        )
        self.get_response = self.head_response + text

    @property
    def text(self) -> bytes:
        return self.get_response[len(self.head_response) :]


def _read_secret(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"proxy secret_file {path}: {exc.strerror}") from exc
    if not secret:
        raise ConfigError(f"proxy secret_file {path} is empty")
    return secret


class _Secret:
    """The local secret, re-read when its file changes (checked at most once a second)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._checked = 0.0
        self._mtime = 0.0
        self._load()

    def _load(self) -> None:
        self._mtime = os.stat(self.path).st_mtime
        secret = _read_secret(self.path)
        self.secret = secret.encode()
        self.header = b"Basic " + base64.b64encode(b"nixd:" + self.secret)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            if os.stat(self.path).st_mtime != self._mtime:
                self._load()
        except (OSError, ConfigError) as exc:
            log.warning("keeping the previous proxy secret: %s", exc)

    def allows(self, header: bytes | None) -> bool:
        if header is None:
            return False
        self._refresh()
        if hmac.compare_digest(header, self.header):
            return True
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).partition(b":")
        except ValueError:
            return False
        # Both comparisons always run: no early exit that would time the user name.
        user_ok = hmac.compare_digest(user, b"nixd")
        password_ok = hmac.compare_digest(password, self.secret)
        return bool(sep) and user_ok and password_ok

    def allows_on(self, header: bytes | None, conn: Connection | None) -> bool:
        """:meth:`allows`, remembered per connection for the same header and secret.

        Comparing with ``==`` is safe here: the remembered value is what this very
        connection already sent and had verified, so its timing tells the peer nothing.
        """
        if header is None:
            return False
        if conn is not None:
            self._refresh()
            seen = conn.authorized
            if isinstance(seen, tuple) and seen[1] is self.secret and seen[0] == header:
                return True
        if not self.allows(header):
            return False
        if conn is not None:
            conn.authorized = (header, self.secret)
        return True


class Proxy:
    """Request handling and the state behind it; one per :func:`serve_proxy`."""

    def __init__(
        self,
        config: ProxyConfig,
        tokens: TokenSource | None,
        store: LocalStore,
        metrics: Metrics,
        nursery: trio.Nursery,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.store = store
        self.metrics = metrics
        self.nursery = nursery
        self.secret = _Secret(config.secret_file)
        self.token_lock = trio.Lock()
        self.cache_info = (
            CacheInfo(want_mass_query=True, priority=config.priority).render().encode()
        )
        self.resolved: TTLCache[Resolved] = TTLCache(config.positive_ttl)
        self.negative = NegativeCache(config.negative_ttl)
        self.downloads: dict[str, Download] = {}
        self.small_fetches: dict[str, _SmallFetch] = {}
        self.downloads_idle = trio.Event()
        self.downloads_idle.set()
        self.upstreams: list[Upstream] = []
        self.all_keys: tuple[PublicKey, ...] = ()
        # closure prefetch (nixd.proxy.prefetch): its workers run in this nursery
        self.prefetch = Prefetcher(self, metrics)
        nursery.start_soon(self.prefetch.run)
        self._set_upstreams(config.upstreams)
        self.url = ""
        """The proxy's own base URL, once it listens."""
        self.flakes: FlakeForwarder | None = None
        self.update_flakes(config.flakes)

        # NARs streamed through without being kept (the store could not hold them).
        self.passing_through = 0
        """Pass-through transfers in flight."""
        self.passed_through: OrderedDict[str, int] = OrderedDict()
        """Recent NARs that did not fit (key -> FileSize or -1), to warn once per NAR.
        (Not in the status, which any local user may read: the WARNING names them.)"""

    # -- upstreams ---------------------------------------------------------------------

    def _set_upstreams(self, configs: Sequence[UpstreamConfig]) -> None:
        new = [
            Upstream(c, i, self.tokens, self.token_lock, self.metrics)
            for i, c in enumerate(configs)
        ]
        new.sort(key=lambda u: (u.config.priority, u.index))
        old, self.upstreams = self.upstreams, new
        self.all_keys = tuple(dict.fromkeys(k for u in new for k in u.keys))
        self.resolved.clear()
        self.negative.clear()
        self.prefetch.reset()
        for upstream in old:
            upstream.retire()
            self.nursery.start_soon(self._close_when_unused, upstream)

    async def _close_when_unused(self, upstream: Upstream) -> None:
        await upstream.unused.wait()
        await upstream.aclose()

    def update_flakes(self, config: FlakesConfig | None) -> None:
        """Turn the flake routes on, off, or to another server (:mod:`nixd.proxy.flakes`)."""
        self.config = dataclasses.replace(self.config, flakes=config)
        if config is None:
            if self.flakes is not None:
                self.nursery.start_soon(self.flakes.aclose)
            self.flakes = None
        elif self.flakes is None:
            self.flakes = FlakeForwarder(config, self.tokens, self.token_lock)
            self.flakes.proxy_url = self.url
        else:
            self.flakes.update(config)

    def update_upstreams(self, configs: Sequence[UpstreamConfig]) -> None:
        """Swap the upstream set; downloads in flight finish on the old clients."""
        self.config = dataclasses.replace(self.config, upstreams=tuple(configs))
        self._set_upstreams(configs)
        log.info("proxy upstreams: %s", ", ".join(u.name for u in self.upstreams) or "none")

    # -- requests ----------------------------------------------------------------------

    async def handle(self, request: Request, resp: Responder) -> None:
        start = time.monotonic()
        path = request.path
        # The hot path: a narinfo Nix asked for moments ago (HEAD twice, then GET).
        if len(path) == 41 and path.endswith(b".narinfo"):
            cached = self.resolved.get(path[1:33].decode("ascii", "replace"))
            if (
                cached is not None
                and request.method in (b"GET", b"HEAD")
                and self.secret.allows_on(request.headers.get(b"authorization"), request.connection)
            ):
                if request.method == b"GET":
                    await resp.send_prepared(200, cached.get_response)
                else:
                    await resp.send_prepared(200, cached.head_response)
                self.metrics.add(_NARINFO_OK)
                if cached.upstream is None:
                    self.metrics.add(_LOCAL_NARINFO_HIT)
                self.metrics.observe_request("narinfo", time.monotonic() - start)
                return
        head = request.method == b"HEAD"
        kind = "other"
        try:
            if request.method not in (b"GET", b"HEAD"):
                await resp.simple(405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
            elif path == b"/nix-cache-info":
                kind = "cache-info"
                await resp.simple(
                    200, self.cache_info, [(b"content-type", b"text/x-nix-cache-info")], head=head
                )
            elif path == b"/metrics" and (
                request.peer_is_loopback
                or self.secret.allows(request.headers.get(b"authorization"))
            ):
                kind = "metrics"
                body = self.metrics.render().encode()
                await resp.simple(
                    200, body, [(b"content-type", b"text/plain; version=0.0.4")], head=head
                )
            elif self.flakes is not None and is_flake_request(request.method, path):
                kind = "flake"  # open to local users by design: see nixd.proxy.flakes
                await self.flakes.handle(request, resp)
            elif not self.secret.allows_on(
                request.headers.get(b"authorization"), request.connection
            ):
                kind = "unauthorized"
                await resp.simple(
                    401,
                    b"this proxy needs the local secret (netrc)\n",
                    [(b"www-authenticate", b'Basic realm="nixd-proxy"')],
                    head=head,
                )
            elif path.endswith(b".narinfo") and len(path) == 41 and path.count(b"/") == 1:
                kind = "narinfo"
                await self._serve_narinfo(path[1:33].decode("ascii", "replace"), resp, head)
            elif path.startswith(b"/nar/") and path.count(b"/") == 2:
                kind = "nar"
                await self._serve_nar(path[5:].decode("ascii", "replace"), request, resp, head)
            elif path.startswith(b"/log/") and path.count(b"/") == 2:
                kind = "log"
                await self._serve_log(path[5:].decode("ascii", "replace"), resp, head)
            else:
                await resp.simple(404, b"not found\n", head=head)
        except Exception as exc:  # containment: whatever fails here ends this request only
            if resp.started:
                if not isinstance(exc, NixdError | Abort):
                    log.error("unexpected error in the proxy mid-response", exc_info=exc)
                resp.abort(str(exc))  # raises Abort: the front cuts the connection
            status, message = status_for(exc)  # logs unexpected errors with their traceback
            await resp.simple(status, message.encode(), head=head)
        finally:
            self.metrics.inc("nixd_proxy_requests_total", kind=kind, status=str(resp.status))
            self.metrics.observe_request(kind, time.monotonic() - start)

    async def _serve_log(self, name: str, resp: Responder, head: bool) -> None:
        """A build log from the first upstream (by priority) that has it (module docstring)."""
        try:
            drv = StorePath.from_basename(name)
        except FormatError as exc:
            raise BadRequest(f"not a derivation name: {exc}") from None
        if (
            not name.endswith(".drv")
            or not set(drv.hash_part) <= _BASE32
            or not set(drv.name) <= _NAME_CHARS
        ):
            raise BadRequest("build logs are named after a derivation (<hash>-<name>.drv)")
        failure: Exception | None = None
        for upstream in list(self.upstreams):
            url = upstream.url_for(f"log/{name}")
            try:
                # the raw kept-alive path where it applies, else httpx (as fetch_narinfo does)
                got = await upstream.get_small(url, MAX_LOG)
                if got is None:
                    got = await upstream._get_bounded(url, MAX_LOG)
                status, body = got
                upstream.check_status(status, url)
            except NotFound:
                continue
            except BodyTooLarge as exc:
                log.warning("upstream %s: build log %s: %s", upstream.name, name, exc)
                failure = failure or UpstreamError(f"{upstream.name}: build log too large")
                continue
            except (UpstreamError, AuthError) as exc:
                log.warning("upstream %s: build log %s: %s", upstream.name, name, exc)
                failure = failure or exc
                continue
            await resp.simple(
                200, body, [(b"content-type", b"text/plain; charset=utf-8")], head=head
            )
            return
        if failure is not None:
            raise failure
        raise NotFound(f"log/{name}")

    async def _serve_narinfo(self, hash_part: str, resp: Responder, head: bool) -> None:
        resolved = await self.resolve(hash_part)
        await resp.send_prepared(200, resolved.head_response if head else resolved.get_response)

    async def resolve(self, hash_part: str) -> Resolved:
        """The verified narinfo for a store-path hash part, or NotFound / an upstream error."""
        if not all(c in "0123456789abcdfghijklmnpqrsvwxyz" for c in hash_part):
            raise NotFound(hash_part)
        cached = self.resolved.get(hash_part)
        if cached is not None:
            if cached.upstream is None:
                self.metrics.inc("nixd_proxy_local_hits_total", kind="narinfo")
            return cached
        prefetched = self.prefetch.take(hash_part)
        if prefetched is not None:
            self.resolved.put(hash_part, prefetched)
            return prefetched
        local = self._local_narinfo(hash_part)
        if local is not None:
            self.metrics.inc("nixd_proxy_local_hits_total", kind="narinfo")
            self.resolved.put(hash_part, local)
            return local
        if hash_part in self.negative:
            raise NotFound(f"{hash_part}: recently absent upstream")
        flight = self.prefetch.in_flight(hash_part)
        if flight is not None:  # asked already (a prefetch, a request): its answer, or ask
            await flight.wait()
            return await self.resolve(hash_part)
        with self.prefetch.looking_up(hash_part):
            found = await self._lookup_upstreams(hash_part)
        self.resolved.put(hash_part, found)
        self.prefetch.follow(found, asked=True)
        return found

    def _local_narinfo(self, hash_part: str) -> Resolved | None:
        text = self.store.narinfo(hash_part)
        if text is None:
            return None
        try:
            info = NarInfo.parse(text)
        except FormatError as exc:
            log.warning("proxy store: unreadable narinfo for %s: %s", hash_part, exc)
            return None
        # Trust is re-checked against the current config: a key dropped since is honoured.
        if info.store_path.hash_part != hash_part or not info.verify(self.all_keys):
            return None
        return Resolved(text, info.url.removeprefix("nar/"), info, None)

    async def _lookup_upstreams(self, hash_part: str, *, renew: bool = True) -> Resolved:
        """Ask every upstream; NotFound (and a negative entry) only when none has it.

        ``renew``: a 401 renews the credential and retries (False for prefetches).
        """
        upstreams = list(self.upstreams)
        if len(upstreams) == 1:  # nothing to race: no tasks, no channel
            try:
                found = await upstreams[0].fetch_narinfo(hash_part, renew=renew)
            except FormatError:
                found = None
            return self._resolved_or_miss(hash_part, upstreams[0] if found else None, found)
        results: list[object] = [_PENDING] * len(upstreams)
        send, receive = trio.open_memory_channel[tuple[int, object]](len(upstreams))

        async def ask(i: int, upstream: Upstream) -> None:
            outcome: object
            try:
                outcome = await upstream.fetch_narinfo(hash_part, renew=renew)
            except Exception as exc:
                outcome = exc
            send.send_nowait((i, outcome))

        winner: int | None = None
        async with trio.open_nursery() as nursery:
            for i, upstream in enumerate(upstreams):
                nursery.start_soon(ask, i, upstream)
            remaining = len(upstreams)
            while remaining:
                i, outcome = await receive.receive()
                results[i] = outcome
                remaining -= 1
                decided, winner = _decide(results)
                if decided:
                    break
            nursery.cancel_scope.cancel()
        if winner is not None:
            info = results[winner]
            assert isinstance(info, NarInfo)
            return self._resolved_or_miss(hash_part, upstreams[winner], info)
        errors = [r for r in results if isinstance(r, Exception) and not isinstance(r, FormatError)]
        if errors:
            raise worst_error(errors)
        return self._resolved_or_miss(hash_part, None, None)

    def _resolved_or_miss(
        self, hash_part: str, upstream: Upstream | None, info: NarInfo | None
    ) -> Resolved:
        if upstream is not None and info is not None:
            key = nar_key(info)
            text = dataclasses.replace(info, url=f"nar/{key}").render().encode()
            return Resolved(text, key, info, upstream)
        self.metrics.inc("nixd_proxy_misses_total")
        self.negative.add(hash_part)
        raise NotFound(f"{hash_part}: no upstream has a trusted narinfo")

    async def _serve_nar(self, key: str, request: Request, resp: Responder, head: bool) -> None:
        hash_part = parse_nar_key(key)
        if hash_part is None:
            raise NotFound(key)
        self.prefetch.nar_asked(key)
        if await self._serve_local_nar(key, request, resp, head):
            return
        download = self.downloads.get(key)
        if download is None:
            resolved = await self.resolve(hash_part)
            if resolved.upstream is None:  # the local copy went away since; ask upstreams
                self.resolved.discard(hash_part)
                resolved = await self._lookup_upstreams(hash_part)
                self.resolved.put(hash_part, resolved)
            if resolved.key != key or resolved.upstream is None:
                raise NotFound(f"{key}: not the file the trusted narinfo names")
            if await self._serve_local_nar(key, request, resp, head):
                return
            expected = expected_raw(resolved.info)
            if not head and fetches_whole(resolved.info):
                data = await self._fetch_small(key, resolved)
                self.metrics.inc("nixd_proxy_sent_bytes_total", len(data), source="upstream")
                await self._send_bytes(data, request, resp)
                return
            if head:
                size = resolved.info.file_size
                headers = [*NAR_HEADERS]
                if size is not None:
                    headers.append((b"content-length", str(size).encode()))
                await resp.start(200, headers)
                await resp.end()
                return
            download = self.downloads.get(key)
            if download is None:
                size = expected[1] if expected is not None else None
                if size is not None and not self.store.can_hold(size):
                    why = "larger than the store's cap or its free space"
                    await self._serve_passthrough(resolved, request, resp, head, why=why)
                    return
                try:
                    download = self._start_download(key, resolved)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    why = f"no temp file could be made: {exc.strerror}"
                    await self._serve_passthrough(resolved, request, resp, head, why=why)
                    return
        else:
            self.metrics.inc("nixd_proxy_singleflight_joins_total")
        await self._serve_download(download, request, resp, head)

    async def _fetch_small(self, key: str, resolved: Resolved, *, prefetch: bool = False) -> bytes:
        """A small NAR fetched whole, verified and kept; one fetch per key at a time.

        ``prefetch``: started ahead of Nix (:mod:`nixd.proxy.prefetch`): no credential
        renewal, and a request that joined it fetches again itself if it failed.
        """
        while (running := self.small_fetches.get(key)) is not None:
            self.metrics.inc("nixd_proxy_singleflight_joins_total")
            await running.done.wait()
            if running.data is not None:
                return running.data
            if not running.prefetch:
                raise running.error or UpstreamError(f"{key}: fetch failed")
        upstream = resolved.upstream
        assert upstream is not None
        fetch = _SmallFetch(prefetch)
        self.small_fetches[key] = fetch
        try:
            data = await upstream.fetch_small_nar(resolved.info, SMALL, renew=not prefetch)
            try:
                check_small_nar(data, resolved.info, key)
            except IntegrityError as exc:
                self.metrics.inc("nixd_proxy_verification_failures_total", stage="file")
                log.warning("upstream %s: %s; not served, not kept", upstream.name, exc)
                raise
            try:
                self.store.admit_bytes(key, data, resolved.info.store_path.hash_part, resolved.text)
            except Exception as exc:  # containment: a store failure only loses this copy
                log.warning("could not keep %s in the proxy store: %s", key, exc)
            fetch.data = data
            return data
        except Exception as exc:
            fetch.error = exc
            raise
        finally:
            del self.small_fetches[key]
            fetch.done.set()

    async def _send_bytes(self, data: bytes, request: Request, resp: Responder) -> None:
        """A whole NAR held in memory, with Range; headers and body in one write."""
        size = len(data)
        rng = parse_range(request.headers.get(b"range"), size)
        if rng is not None:
            head = (
                b"HTTP/1.1 206 Partial Content\r\ncontent-type: application/x-nix-nar\r\n"
                b"accept-ranges: bytes\r\ncontent-length: %d\r\n"
                b"content-range: %s\r\n\r\n" % (rng.length, rng.content_range)
            )
            body = data[rng.start : rng.stop]
            status = 206
        else:
            head = (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-nix-nar\r\n"
                b"accept-ranges: bytes\r\ncontent-length: %d\r\n\r\n" % size
            )
            body = data
            status = 200
        if not resp.keep_alive:
            head = head[:-2] + b"connection: close\r\n\r\n"
        if request.method == b"HEAD":
            body = b""
        await resp.send_prepared(status, head + body)

    async def _serve_local_nar(
        self, key: str, request: Request, resp: Responder, head: bool
    ) -> bool:
        data = self.store.small_nar(key)
        if data is not None:
            self.metrics.add(_LOCAL_NAR_HIT)
            await self._send_bytes(data, request, resp)
            if not head:
                self.metrics.inc("nixd_proxy_sent_bytes_total", len(data), source="local")
            return True
        found = self.store.nar(key)
        if found is None:
            return False
        path, size = found
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # the index is trusted at start: found out here
            self.store.drop_missing(key)
            return False
        try:
            self.metrics.inc("nixd_proxy_local_hits_total", kind="nar")
            start, end = await _start_nar_answer(request, resp, size)
            stop = size if end is None else end  # the size is known: never None
            if not head:
                pos = start
                pagecache.read_ahead(fd, pos, 2 * pagecache.BLOCK, size)
                while pos < stop:  # in blocks, dropping what was sent (see pagecache)
                    n = min(stop - pos, pagecache.BLOCK)
                    pagecache.read_ahead(fd, pos + 2 * n, pagecache.BLOCK, size)
                    await resp.send_file(fd, pos, n)
                    pagecache.drop_behind(fd, pos, pos + n, size)
                    pos += n
                self.metrics.inc("nixd_proxy_sent_bytes_total", stop - start, source="local")
            await resp.end()
        finally:
            os.close(fd)
        return True

    def _start_download(self, key: str, resolved: Resolved) -> Download:
        assert resolved.upstream is not None
        download = Download(
            key,
            resolved.info,
            resolved.upstream,
            self.store.new_temp(),
            self.metrics,
            resumes=self.config.resumes,
            resume_delay=self.config.resume_delay,
            make_room=self.store.make_room,
        )
        self.downloads[key] = download
        if self.downloads_idle.is_set():
            self.downloads_idle = trio.Event()
        self.nursery.start_soon(self._run_download, download, resolved)
        return download

    async def _run_download(self, download: Download, resolved: Resolved) -> None:
        key = download.key
        try:
            await download.run()  # verified inline: FileSize and the signed NarHash/NarSize
            if download.state is not State.OK:
                return
            try:
                self.store.admit(
                    key, download.temp, download.info.store_path.hash_part, resolved.text
                )
            except Exception as exc:  # containment: a store failure only loses this copy
                log.warning("could not keep %s in the proxy store: %s", key, exc)
        finally:
            if self.downloads.get(key) is download:
                del self.downloads[key]
            if not self.downloads:
                self.downloads_idle.set()
            if download.temp.exists():
                download.temp.unlink(missing_ok=True)

    async def _serve_download(
        self, download: Download, request: Request, resp: Responder, head: bool
    ) -> None:
        try:
            fd = download.open_reader()
        except FileNotFoundError:
            if isinstance(download.error, NoRoom):
                why = "the store's filesystem is full"
                await self._serve_passthrough(download, request, resp, head, why=why)
                return
            raise download.error or NotFound(download.key) from None
        try:
            while download.state is State.STARTING:
                await download.wait_changed()
            if download.state is State.FAILED:
                assert download.error is not None
                if isinstance(download.error, NoRoom):
                    why = "the store's filesystem is full"
                    await self._serve_passthrough(download, request, resp, head, why=why)
                    return
                raise download.error
            start, stop = await _start_nar_answer(request, resp, download.size)
            if head:
                await resp.end()
                return
            pos = start
            download.reader_at(resp, pos)
            while True:
                if download.failed:
                    if isinstance(download.error, NoRoom):
                        # Carry on from here with a fetch of this reader's own.
                        why = "the store's filesystem filled up while downloading it"
                        await self._pass_through(download, resp, why=why, start=pos, stop=stop)
                        break
                    resp.abort(f"{download.key}: {download.error}")
                limit = download.servable()
                if stop is not None:
                    limit = min(limit, stop)
                if pos < limit:
                    limit = min(limit, pos + pagecache.BLOCK)  # report progress as we go
                    await resp.send_file(fd, pos, limit - pos)
                    self.metrics.inc("nixd_proxy_sent_bytes_total", limit - pos, source="upstream")
                    pos = limit
                    download.reader_at(resp, pos)
                elif download.state is State.OK and (
                    stop is None or pos >= stop or pos >= download.written
                ):
                    break
                else:
                    await download.wait_changed()
            await resp.end()
        finally:
            download.reader_at(resp, None)
            os.close(fd)

    async def _serve_passthrough(
        self,
        source: Resolved | Download,
        request: Request,
        resp: Responder,
        head: bool,
        *,
        why: str,
    ) -> None:
        """A whole answer (Range too) streamed from the upstream and not kept."""
        expected = expected_raw(source.info)
        size = expected[1] if expected is not None else None
        start, stop = await _start_nar_answer(request, resp, size)
        if not head:
            await self._pass_through(source, resp, why=why, start=start, stop=stop)
        await resp.end()

    async def _pass_through(
        self,
        source: Resolved | Download,
        resp: Responder,
        *,
        why: str,
        start: int,
        stop: int | None,
    ) -> None:
        """Send file bytes ``[start, stop)`` of a NAR the store cannot hold to ``resp``
        (started), fetched for this reader alone and verified just the same.

        One upstream fetch per reader: sharing one among readers of different speeds
        would need either unbounded buffering or the pace of the slowest reader.
        """
        key, info, upstream = source.key, source.info, source.upstream
        assert upstream is not None
        if key not in self.passed_through:
            log.warning(
                "proxy store cannot hold %s (%s bytes): %s; streaming it through to Nix "
                "without keeping it",
                key, info.file_size if info.file_size is not None else "unknown", why,
            )  # fmt: skip
        self.passed_through[key] = info.file_size if info.file_size is not None else -1
        self.passed_through.move_to_end(key)
        while len(self.passed_through) > MAX_PASSED_THROUGH:
            self.passed_through.popitem(last=False)
        self.metrics.inc("nixd_proxy_passthrough_total")
        transfer = PassThrough(
            key,
            info,
            upstream,
            self.metrics,
            sender=resp,
            start=start,
            stop=stop,
            resumes=self.config.resumes,
            resume_delay=self.config.resume_delay,
        )
        self.passing_through += 1
        try:
            await transfer.run()
        finally:
            self.passing_through -= 1
            self.metrics.inc("nixd_proxy_sent_bytes_total", transfer.sent, source="upstream")

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "store_dir": self.config.store_dir,
            "store_bytes": self.store.total_bytes,
            "store_max_bytes": self.store.max_bytes,
            "requests": int(m.total("nixd_proxy_requests_total")),
            "local_hits": int(m.total("nixd_proxy_local_hits_total")),
            "misses": int(m.total("nixd_proxy_misses_total")),
            "verification_failures": int(m.total("nixd_proxy_verification_failures_total")),
            "downloads_in_flight": len(self.downloads),
            "store_free_bytes": self.store.free_bytes(),
            "passthrough_total": int(m.total("nixd_proxy_passthrough_total")),
            "passthrough_in_flight": self.passing_through,
            "upstreams": [u.status() for u in self.upstreams],
        }


async def _start_nar_answer(
    request: Request, resp: Responder, size: int | None
) -> tuple[int, int | None]:
    """Start the answer for a NAR file of ``size`` bytes, honouring ``Range`` (see the
    module docstring); the file bytes ``[start, stop)`` the body is to carry.

    Without a known size there is no range to check a request against: the whole file,
    and no Content-Length (the body ends with the connection; ``stop`` is None).
    """
    rng = parse_range(request.headers.get(b"range"), size) if size is not None else None
    start, stop = (rng.start, rng.stop) if rng is not None else (0, size)
    headers = [*NAR_HEADERS]
    if stop is not None:
        headers.append((b"content-length", str(stop - start).encode()))
    if rng is not None:
        headers.append((b"content-range", rng.content_range))
    await resp.start(206 if rng is not None else 200, headers)
    return start, stop


def _decide(results: list[object]) -> tuple[bool, int | None]:
    """In priority order: the first verified answer wins once all better ones are in."""
    for i, outcome in enumerate(results):
        if outcome is _PENDING:
            return False, None
        if isinstance(outcome, NarInfo):
            return True, i
    return True, None


class ProxyHandle:
    """What :func:`serve_proxy` hands back once listening (for the daemon and tests)."""

    def __init__(self, proxy: Proxy, url: str, front: HttpServer, shutdown: trio.Event) -> None:
        self._proxy = proxy
        self.url = url
        self.metrics = proxy.metrics
        self._front = front
        self._shutdown = shutdown

    @property
    def store(self) -> LocalStore:
        return self._proxy.store

    def update_upstreams(self, upstreams: Sequence[UpstreamConfig]) -> None:
        self._proxy.update_upstreams(upstreams)

    def update_flakes(self, flakes: FlakesConfig | None) -> None:
        self._proxy.update_flakes(flakes)

    def status(self) -> dict[str, Any]:
        return {"url": self.url, **self._proxy.status()}

    async def prefetch_settled(self) -> None:
        """Wait until the closure prefetch has nothing queued or in flight."""
        while not self._proxy.prefetch.idle.is_set():
            await self._proxy.prefetch.idle.wait()

    async def downloads_settled(self) -> None:
        """Wait until no download is in flight (each verified and kept, or dropped)."""
        while not self._proxy.downloads_idle.is_set():
            await self._proxy.downloads_idle.wait()

    async def drain(self) -> None:
        """Stop accepting, close connections idle after a request, answer the others
        (requests in flight, heads still coming: :mod:`nixd.http.serve`), then return."""
        self._shutdown.set()
        await self._front.closed.wait()


async def serve_proxy(
    config: ProxyConfig,
    tokens: TokenSource | None,
    *,
    listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[ProxyHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until cancelled; ``task_status.started(ProxyHandle)`` once listening.

    ``listeners`` are used as given (socket activation); otherwise the proxy binds
    ``listen_host:listen_port``.
    """
    _read_secret(config.secret_file)
    metrics = Metrics()
    store = LocalStore(config.store_dir, config.store_max_bytes, metrics)
    proxy: Proxy | None = None
    try:
        async with trio.open_nursery() as nursery:
            proxy = Proxy(config, tokens, store, metrics, nursery)
            if listeners is None:
                listeners = await trio.open_tcp_listeners(
                    config.listen_port, host=config.listen_host
                )
            shutdown = trio.Event()
            front = await nursery.start(serve_front, listeners, proxy.handle, shutdown)
            url = front.urls[0]
            proxy.url = url
            if proxy.flakes is not None:
                proxy.flakes.proxy_url = url
            log.info("proxy listening on %s with %d upstream(s)", url, len(proxy.upstreams))
            nursery.start_soon(store.reconcile)  # after start: never holds up a request
            task_status.started(ProxyHandle(proxy, url, front, shutdown))
            await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for upstream in proxy.upstreams if proxy is not None else []:
                await upstream.aclose()
            if proxy is not None and proxy.flakes is not None:
                await proxy.flakes.aclose()
        store.close()
