"""The in-process app environment shared by the server's app tests (httpx ASGI transport)."""

from __future__ import annotations

import base64
import hashlib
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import zstandard

from nixd.nix import base32
from nixd.nix.hashes import Hash
from nixd.nix.nar import dump
from nixd.nix.narinfo import NarInfo
from nixd.nix.storepath import StorePath
from nixd.server.http.app import CacheApp, Services

if TYPE_CHECKING:
    from tests.server.conftest import ServerState

HASH_A = "0" * 31 + "1"
HASH_B = "0" * 31 + "2"


@dataclass
class Env:
    state: ServerState
    services: Services
    app: CacheApp
    member: str  # API token of acme, plain member
    reader: str  # acme, role=reader
    other: str  # API token of org "other"

    def client(
        self, *, auth: str | None = None, basic: bool = False, ip: str = "127.0.0.1"
    ) -> httpx.AsyncClient:
        headers = {}
        if auth is not None:
            if basic:
                headers["authorization"] = (
                    "Basic " + base64.b64encode(f"nixd:{auth}".encode()).decode()
                )
            else:
                headers["authorization"] = f"Bearer {auth}"
        transport = httpx.ASGITransport(app=self.app, client=(ip, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://cache", headers=headers)

    async def access(self, api_token: str) -> str:
        async with self.client() as c:
            r = await c.post("/api/v1/token/exchange", json={"kind": "token", "token": api_token})
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])


def make_nar(tmp: Path, content: bytes) -> bytes:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "data").write_bytes(content)
    return b"".join(dump(tmp / "data"))


COMPRESSORS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "xz": ("xz", lzma.compress),
    "zstd": ("zst", zstandard.ZstdCompressor().compress),
}
"""Compression name -> (NAR file extension, compressor) for the uploads tests make."""


def client_narinfo(
    hash_part: str,
    nar: bytes,
    compressed: bytes,
    *,
    refs: tuple[str, ...] = (),
    nar_hash: bytes | None = None,
    compression: str = "xz",
) -> tuple[str, str]:
    """(NAR URL, narinfo text) as `nix copy --to` would upload them (xz unless told)."""
    file_hash = base32.encode(hashlib.sha256(compressed).digest())
    url = f"nar/{file_hash}.nar.{COMPRESSORS[compression][0]}"
    info = NarInfo(
        store_path=StorePath(hash_part, "hello"),
        url=url,
        compression=compression,
        file_hash=Hash("sha256", hashlib.sha256(compressed).digest()),
        file_size=len(compressed),
        nar_hash=Hash("sha256", nar_hash or hashlib.sha256(nar).digest()),
        nar_size=len(nar),
        references=tuple(StorePath.from_basename(r) for r in refs),
        deriver=None,
        system="x86_64-linux",
        sigs=("client-key:" + base64.b64encode(bytes(64)).decode(),),
        ca=None,
    )
    return url, info.render()


async def upload(
    c: httpx.AsyncClient,
    slice_: str,
    hash_part: str,
    nar: bytes,
    *,
    compression: str = "xz",
    **kw: object,
) -> httpx.Response:
    """The NAR, then its narinfo, as `nix copy --to '...?compression=...'` uploads them."""
    compressed = COMPRESSORS[compression][1](nar)
    url, text = client_narinfo(  # type: ignore[arg-type]
        hash_part, nar, compressed, compression=compression, **kw
    )
    r = await c.put(
        f"/cache/{slice_}/{url}",
        content=compressed,
        headers={"content-type": "application/x-nix-nar"},
    )
    assert r.status_code == 200, r.text
    return await c.put(
        f"/cache/{slice_}/{hash_part}.narinfo",
        content=text.encode(),
        headers={"content-type": "text/x-nix-narinfo"},
    )
