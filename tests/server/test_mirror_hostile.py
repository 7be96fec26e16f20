"""The mirror against hostile and broken upstreams, in process, on a real store.

A scripted upstream on loopback serves a good root whose references are each broken one
way: a signature by an untrusted key, a NAR whose hash does not match, a truncated NAR,
a gigantic NarSize, a body that never ends, 10k references, a URL pointing elsewhere, a
path it does not have. Completion stores the root and its one good reference, none of
the rest (no record, no blob), and each is reported with why. Then: pull-through's single
flight, a stalled upstream's 503, a slice the mirror does not list, and retention.
"""

from __future__ import annotations

import lzma
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nixd.nix import base32
from nixd.nix.hashes import Hash
from nixd.nix.nar import dump
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import SecretKey
from nixd.nix.storepath import StorePath
from nixd.server.cli.mirror import status_of
from nixd.server.config import MirrorSection, RetentionSection
from nixd.server.errors import UpstreamUnavailable
from nixd.server.mirror import records
from nixd.server.mirror.closure import closure_missing
from nixd.server.mirror.service import MirrorService
from nixd.server.storage import pins
from nixd.server.storage.db import Project, create_org, create_project, open_db
from nixd.server.storage.gc import collect
from nixd.server.storage.store import Store
from tests.server.mirrorenv import StandIn, send, stand_in

KEY = SecretKey.generate("up-1")
EVIL = SecretKey.generate("up-1")  # the same name, another key


def fresh() -> str:
    return base32.encode(os.urandom(20))


class Upstream:
    """Narinfos and NARs to serve, built from small real NARs."""

    def __init__(self, s: StandIn, tmp: Path) -> None:
        self.s = s
        self.tmp = tmp

    def nar(self, content: bytes) -> bytes:
        f = self.tmp / f"f{fresh()}"
        f.write_bytes(content)
        return b"".join(dump(f))

    def publish(
        self,
        name: str,
        content: bytes,
        refs: tuple[str, ...] = (),
        *,
        key: SecretKey = KEY,
        nar_hash_of: bytes | None = None,
        nar_size: int | None = None,
        body: bytes | None = None,
        url: str | None = None,
        hp: str | None = None,
    ) -> str:
        """Serve a path; the keyword arguments make it lie one way or another."""
        hp = hp or fresh()
        nar = self.nar(content)
        signed_nar = self.nar(nar_hash_of) if nar_hash_of is not None else nar
        import hashlib  # noqa: PLC0415

        xz = lzma.compress(nar)
        url = url or f"nar/{hp}.nar.xz"
        ni = NarInfo(
            store_path=StorePath(hp, name),
            url=url,
            compression="xz",
            file_hash=None,
            file_size=None,
            nar_hash=Hash("sha256", hashlib.sha256(signed_nar).digest()),
            nar_size=nar_size if nar_size is not None else len(signed_nar),
            references=tuple(StorePath.from_basename(r) for r in refs),
            deriver=None,
            system="x86_64-linux",
            sigs=(),
            ca=None,
        ).signed(key)
        text = ni.render().encode()
        self.s.answers[f"/{hp}.narinfo"] = lambda h: send(h, 200, text)
        payload = body if body is not None else xz
        self.s.answers[f"/{url}"] = lambda h: send(h, 200, payload)
        return f"{hp}-{name}"


def mirror(url: str, **kw: object) -> MirrorSection:
    base: dict[str, object] = {
        "name": "up",
        "url": url,
        "public_keys": (KEY.public().render(),),
        "slices": ("acme/app",),
        "timeout": 2.0,
        "requests_per_second": 0.0,
    }
    base.update(kw)
    return MirrorSection(**base)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    conn = open_db(tmp_path / "server.db")
    create_org(conn, "acme")
    create_project(conn, "acme", "app")
    create_project(conn, "acme", "lib")
    s = Store.open(conn, tmp_path / "blobs")
    yield s
    conn.close()


def project(store: Store, name: str = "app") -> Project:
    p = store.project("acme", name)
    assert p is not None
    return p


def endless(h: object) -> None:
    """A NAR answer that says nothing of its length and never ends (until cut)."""
    from http.server import BaseHTTPRequestHandler  # noqa: PLC0415

    assert isinstance(h, BaseHTTPRequestHandler)
    h.send_response(200)
    h.send_header("connection", "close")
    h.end_headers()
    h.close_connection = True
    try:
        for _ in range(1 << 14):  # 16 GiB at most; the client hangs up long before
            h.wfile.write(b"\0" * (1 << 20))
    except OSError:
        return


async def test_only_verified_paths_are_stored_and_every_refusal_is_reported(
    store: Store, tmp_path: Path
) -> None:
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        good = up.publish("good", b"good")
        badsig = up.publish("badsig", b"x", key=EVIL)
        mismatch = up.publish("mismatch", b"aaaa", nar_hash_of=b"bbbb")
        truncated_hp = fresh()
        nar = up.nar(b"t" * 50_000)
        truncated = up.publish("truncated", b"t" * 50_000, hp=truncated_hp)
        cut = lzma.compress(nar)[:-40]
        s.answers[f"/nar/{truncated_hp}.nar.xz"] = lambda h: send(h, 200, cut)
        huge = up.publish("huge", b"h", nar_size=1 << 50)
        endless_hp = fresh()
        forever = up.publish("forever", b"f", hp=endless_hp)
        s.answers[f"/nar/{endless_hp}.nar.xz"] = endless
        many_refs = up.publish("many", b"m", tuple(f"{fresh()}-r" for _ in range(10_000)))
        refs_5k = up.publish("fivek", b"5", tuple(f"{fresh()}-r" for _ in range(5000)))
        elsewhere = up.publish("elsewhere", b"e", url="http://169.254.169.254/latest")
        absent = f"{fresh()}-absent"
        root = up.publish(
            "root",
            b"root",
            (
                good,
                badsig,
                mismatch,
                truncated,
                huge,
                forever,
                many_refs,
                refs_5k,
                elsewhere,
                absent,
            ),
        )
        service = MirrorService((mirror(s.url),), store, max_nar_size=64 << 20)
        app = project(store)
        try:
            result = await service.complete(app, root[:32], root[33:])
        finally:
            await service.aclose()
        assert result.fetched == 2
        assert store.in_slice(app, root[:32]) is not None
        assert store.in_slice(app, good[:32]) is not None
        assert len(list(store.iter_blobs())) == 2  # nothing unverified is kept
        assert store.stats()["nars"] == 2
        bad = [badsig, mismatch, truncated, huge, forever, many_refs, refs_5k, elsewhere, absent]
        for path in bad:
            assert store.in_slice(app, path[:32]) is None, path
        assert sorted(result.missing) == sorted(f"/nix/store/{p}" for p in bad)
        assert closure_missing(store, app, f"/nix/store/{root}") == result.missing
        # A gigantic NarSize is refused before its NAR is asked for.
        assert s.requests[f"/nar/{huge[:32]}.nar.xz"] == 0
        assert s.requests["/latest"] == 0  # nothing fetched from where a narinfo points

        (st,) = status_of(store.conn, app)
        assert st["mirrored"] == 2
        assert st["roots"] == {"pending": 0, "complete": 0, "incomplete": 1}
        reasons = {w["path"].rsplit("-", 1)[-1]: w["reason"] for w in st["failures"]}
        assert [w["path"] for w in st["missing"]] == [f"/nix/store/{absent}"]
        assert "no signature by a trusted key" in reasons["badsig"]
        assert "NAR mismatch" in reasons["mismatch"]
        assert "truncated" in reasons["truncated"]
        assert "larger than this server accepts" in reasons["huge"]
        assert "larger than" in reasons["forever"] or "TooLarge" in reasons["forever"]
        assert "narinfo of 3" in reasons["many"] and "(at most 262144)" in reasons["many"]
        assert "5000 references (more than 4096 accepted)" in reasons["fivek"]
        assert "not a name inside the cache" in reasons["elsewhere"]


async def test_a_slice_no_mirror_lists_never_contacts_it(store: Store, tmp_path: Path) -> None:
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        path = up.publish("p", b"p")
        service = MirrorService((mirror(s.url, pull_through=True),), store, max_nar_size=64 << 20)
        try:
            lib = project(store, "lib")
            assert await service.pull(lib, path[:32]) is None
            result = await service.complete(lib, path[:32], "p", deep=True)
        finally:
            await service.aclose()
        assert result.missing == [f"/nix/store/{path}"]
        assert s.total == 0


async def test_concurrent_pulls_make_one_upstream_fetch(store: Store, tmp_path: Path) -> None:
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        path = up.publish("shared", b"shared" * 1000)
        service = MirrorService((mirror(s.url, pull_through=True),), store, max_nar_size=64 << 20)
        app = project(store)
        got = []

        async def reader() -> None:
            info = await service.pull(app, path[:32])
            assert info is not None
            got.append(info)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(reader)
        finally:
            await service.aclose()
        assert len(got) == 20 and len({(i.hash_part, i.nar.nar_hash) for i in got}) == 1
        assert s.requests[f"/{path[:32]}.narinfo"] == 1
        assert s.requests[f"/nar/{path[:32]}.nar.xz"] == 1


async def test_a_stalled_upstream_is_unavailable_not_absent(store: Store, tmp_path: Path) -> None:
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        path = up.publish("slow", b"slow")
        service = MirrorService(
            (mirror(s.url, pull_through=True, timeout=0.5),), store, max_nar_size=64 << 20
        )
        app = project(store)
        s.stall()
        try:
            with pytest.raises(UpstreamUnavailable):
                await service.pull(app, path[:32])
            s.unstall()
            info = await service.pull(app, path[:32])  # nothing negative was remembered
        finally:
            await service.aclose()
        assert info is not None and info.basename == path
        # A path no upstream has is a plain miss (404 for the reader).
        assert await _pull_absent(store, s.url) is None


async def _pull_absent(store: Store, url: str) -> object:
    service = MirrorService((mirror(url, pull_through=True),), store, max_nar_size=1 << 20)
    try:
        return await service.pull(project(store), fresh())
    finally:
        await service.aclose()


async def test_mirrored_paths_live_by_the_closures_that_reference_them(
    store: Store, tmp_path: Path
) -> None:
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        leaf = up.publish("leaf", b"leaf")
        mid = up.publish("mid", b"mid", (leaf,))
        top = up.publish("top", b"top", (mid,))
        stray = up.publish("stray", b"stray")
        service = MirrorService((mirror(s.url),), store, max_nar_size=64 << 20)
        app = project(store)
        try:
            await service.complete(app, top[:32], "top")
            await service.complete(app, stray[:32], "stray")
        finally:
            await service.aclose()
    assert closure_missing(store, app, top) == []
    pins.add_pin(store.conn, app, top[:32], who="admin")
    # Keep only what was read within a day, ten days from now: nothing but the pin.
    rules = (RetentionSection(slice="acme/app", days=1),)
    report = collect(store, rules, grace=0.0, now=time.time() + 10 * 86400)
    assert report.paths == {"acme/app": [f"/nix/store/{stray}"]}
    for p in (top, mid, leaf):
        assert store.in_slice(app, p[:32]) is not None, p
    assert store.in_slice(app, stray[:32]) is None
    live = {p.hash_part for p in records.live_provenance(store.conn, app.id)}
    assert live == {top[:32], mid[:32], leaf[:32]}


async def test_an_upstream_that_does_not_answer_leaves_the_closure_pending(
    store: Store, tmp_path: Path
) -> None:
    with stand_in() as s:
        up = Upstream(s, tmp_path)
        leaf = up.publish("leaf", b"leaf")
        top = up.publish("top", b"top", (leaf,))
        service = MirrorService((mirror(s.url, timeout=0.5),), store, max_nar_size=1 << 20)
        app = project(store)
        try:
            good = s.answers[f"/{leaf[:32]}.narinfo"]
            s.answers[f"/{leaf[:32]}.narinfo"] = lambda h: send(h, 502, b"bad gateway")
            # top is fetched; its reference is not, as the upstream fails: retry later.
            result = await service.complete(app, top[:32], "top")
            assert (result.fetched, result.unavailable) == (1, 1)
            (st,) = status_of(store.conn, app)
            assert st["roots"] == {"pending": 1, "complete": 0, "incomplete": 0}
            assert "HTTP 502" in st["failures"][0]["reason"]
            s.answers[f"/{leaf[:32]}.narinfo"] = good
            result = await service.complete(app, top[:32], "top")
        finally:
            await service.aclose()
        (st,) = status_of(store.conn, app)
        assert st["roots"] == {"pending": 0, "complete": 1, "incomplete": 0}
        assert st["failures"] == [] and st["mirrored"] == 2
