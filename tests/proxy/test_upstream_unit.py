"""The upstream client's pieces without a network: bounded decoding, the credential's
origin binding, URL redaction, which narinfo URLs are fetched, and the store's file modes
under umask 000. (The raw path's response heads are read by nixd.http, tested in
tests/http/test_parsing.py.)"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import os
import stat
import zlib
from pathlib import Path

import pytest
import trio

from nixd.auth.model import AccessToken
from nixd.errors import ConfigError, UpstreamError
from nixd.proxy.config import UpstreamConfig
from nixd.proxy.credential import (
    BasicCredential,
    NetrcCredential,
    Origin,
    TokenCredential,
    origin_of,
    redact_url,
    strip_userinfo,
)
from nixd.proxy.localstore import LocalStore
from nixd.proxy.metrics import Metrics
from nixd.proxy.upstream import Upstream, _BoundedDecoder, file_limit
from tests.proxy.hostile import signed_path


def test_bounded_decoder_never_produces_more_than_asked() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))
    assert len(bomb) < 128 << 10
    decoder = _BoundedDecoder("gzip", "u")
    assert len(decoder.decode(bomb, 1000)) <= 1000
    assert _BoundedDecoder("identity", "u").decode(b"abc", 1) == b"abc"  # the caller cuts
    assert _BoundedDecoder("deflate", "u").decode(zlib.compress(b"hi"), 100) == b"hi"
    with pytest.raises(UpstreamError, match="unsupported"):
        _BoundedDecoder("br", "u")
    with pytest.raises(UpstreamError, match="does not decode"):
        _BoundedDecoder("gzip", "u").decode(b"not gzip at all", 100)


def test_origins_and_redaction() -> None:
    assert origin_of("HTTP://Cache.Example") == Origin("http", "cache.example", 80)
    assert origin_of("https://u:p@cache.example/x") == Origin("https", "cache.example", 443)
    assert origin_of("http://[::1]:8080/") == Origin("http", "::1", 8080)
    for bad in ("http://[::1", "http://h:99999", "ftp://h", "file:///etc/passwd", "nar/x"):
        with pytest.raises(ValueError):
            origin_of(bad)
    assert strip_userinfo("http://u:p@h:1/a?b") == "http://h:1/a?b"
    assert strip_userinfo("http://h/a@b") == "http://h/a@b"
    assert redact_url("http://u:p@h:1/a") == "http://***@h:1/a"
    assert redact_url("http://tok@h") == "http://***@h"
    assert redact_url("http://h/path@not-userinfo") == "http://h/path@not-userinfo"
    assert redact_url("http://u:p@[::1") == "http://***@[::1"  # unparseable, still redacted
    assert redact_url("no scheme u:p@h") == "no scheme u:p@h"


def test_config_never_shows_url_credentials() -> None:
    config = UpstreamConfig(url="https://ci:s3cret@cache.example/x/")
    assert config.base_url == "https://cache.example/x"
    assert config.display_url == "https://***@cache.example/x"
    with pytest.raises(ConfigError) as info:
        UpstreamConfig(url="https://ci:s3cret@cache.example", auth="nixd")
    assert "s3cret" not in str(info.value) and "pick one" in str(info.value)
    with pytest.raises(ConfigError) as info:
        UpstreamConfig(url="https://ci:s3cret@cache.example", trusted_keys=("bad",))
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError, match="foreign_urls"):
        UpstreamConfig(url="https://cache.example", foreign_urls="maybe")  # type: ignore[arg-type]


class Tokens:
    def __init__(self) -> None:
        self.value = "t1"
        self.refreshes = 0

    async def get(self) -> AccessToken:
        return AccessToken(self.value, expires_at=2e9, identity="token:x")

    async def refresh(self, stale: AccessToken | None) -> AccessToken:
        self.refreshes += 1
        await trio.sleep(0.01)
        self.value = f"t{self.refreshes + 1}"
        return await self.get()


async def test_credentials_answer_for_their_origin_only(tmp_path: Path) -> None:
    origin = origin_of("http://cache.example:8080/prefix")
    tokens = Tokens()
    token = TokenCredential(origin, tokens, trio.Lock())
    assert await token.header("http://cache.example:8080/x.narinfo") == "Bearer t1"
    assert await token.header("http://CACHE.example:8080/other/path") == "Bearer t1"
    for elsewhere in (
        "http://cache.example/x",  # port 80
        "https://cache.example:8080/x",  # scheme
        "http://cache.example.evil:8080/x",
        "http://127.0.0.1:8080/x",
        "not a url",
    ):
        assert await token.header(elsewhere) is None, elsewhere
    # A burst of 401s for the same token makes one renewal.
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(token.on_401, "Bearer t1")
    assert tokens.refreshes == 1
    assert await token.on_401("Bearer t1") == "Bearer t2"  # renewed meanwhile: no new one

    basic = BasicCredential(origin, "ci", "pw")
    expected = "Basic " + base64.b64encode(b"ci:pw").decode()
    assert await basic.header("http://cache.example:8080/a") == expected
    assert await basic.header("http://other:8080/a") is None
    assert await basic.on_401(expected) is None

    netrc = tmp_path / "netrc"
    netrc.write_text("default login any password everywhere\n")
    from_netrc = NetrcCredential(origin, str(netrc))
    assert await from_netrc.header("http://cache.example:8080/a") is not None
    # curl would send a `default` entry to every host; the credential does not.
    assert await from_netrc.header("http://other.example:8080/a") is None


def test_which_narinfo_urls_are_fetched(tmp_path: Path) -> None:
    def make(**kw: object) -> Upstream:
        config = UpstreamConfig(url="http://ci:pw@cache.example:8080/base/", **kw)  # type: ignore[arg-type]
        return Upstream(config, 0, None, trio.Lock(), Metrics())

    refusing, anonymous = make(), make(foreign_urls="anonymous")
    assert refusing.name == "http://***@cache.example:8080/base"
    for u in (refusing, anonymous):
        assert u.url_for("nar/x.nar") == "http://cache.example:8080/base/nar/x.nar"
        assert u.url_for("//evil/x") == "http://cache.example:8080/base/evil/x"
        assert u.url_for("http://u:p@cache.example:8080/y") == "http://cache.example:8080/y"
        for bad in ("file:///etc/shadow", "gopher://h/x", "http://[::1/x", "nar/a b", "nar/\u00e9"):
            with pytest.raises(UpstreamError):
                u.url_for(bad)
    with pytest.raises(UpstreamError, match="another origin"):
        refusing.url_for("http://127.0.0.1:631/admin")
    assert anonymous.url_for("http://u:p@cdn.example/n") == "http://cdn.example/n"


def test_file_limit(tmp_path: Path) -> None:
    info = signed_path(tmp_path).info
    assert file_limit(info) == info.file_size
    unsized = dataclasses.replace(info, file_size=None)
    assert file_limit(unsized) == info.nar_size
    compressed = dataclasses.replace(unsized, compression="xz")
    assert info.nar_size < file_limit(compressed) < info.nar_size * 2 + (1 << 20)


def test_store_modes_ignore_the_umask(tmp_path: Path) -> None:
    root = tmp_path / "cache" / "nixd" / "store"
    old = os.umask(0)
    try:
        store = LocalStore(root, 1 << 20, Metrics())
        signed = signed_path(tmp_path)
        key = f"{signed.hash_part}-{'0' * 52}.nar"
        store.admit_bytes(key, signed.nar, signed.hash_part, signed.narinfo())
        store.close()
    finally:
        os.umask(old)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(root) == 0o700 and mode(root / "nar") == 0o700 and mode(root / "tmp") == 0o700
    assert mode(tmp_path / "cache") == 0o755 and mode(tmp_path / "cache" / "nixd") == 0o755
    assert mode(root / "index.sqlite") == 0o600
    assert mode(root / "nar" / key) == 0o600
    for extra in root.glob("index.sqlite-*"):
        assert mode(extra) == 0o600, extra


def test_an_old_loose_index_is_tightened(tmp_path: Path) -> None:
    root = tmp_path / "store"
    LocalStore(root, 1 << 20, Metrics()).close()
    (root / "index.sqlite").chmod(0o644)
    LocalStore(root, 1 << 20, Metrics()).close()
    assert stat.S_IMODE((root / "index.sqlite").stat().st_mode) == 0o600
