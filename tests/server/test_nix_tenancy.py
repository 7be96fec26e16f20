"""The poisoning attack with the real Nix 2.8 and a real ``nixd-server`` process.

An attacker who may write some slice uploads, for the store path of acme's private build,
a NAR of its own choosing (the store-path hash of anything built from public inputs is
known in advance). Two shapes: another organization's public slice, and a token of acme
allowed to write only ``acme/app``. In both, acme's reader running ``nix copy --from``
the unified URL, trusting only the server's key, installs acme's build; the attacker's
upload stays in the attacker's own slice. The same holds for build logs.
"""

from __future__ import annotations

import base64
import hashlib
import lzma
import os
from pathlib import Path

import httpx
import pytest

from nixd.nix import base32
from nixd.nix.hashes import Hash
from nixd.nix.nar import dump
from nixd.nix.narinfo import NarInfo
from nixd.nix.storepath import StorePath
from tests.realnix import RealNix
from tests.server.conftest import ServerState
from tests.server.test_nix_e2e import configure, copy_from, copy_to, exchange, netrc
from tests.server.test_tenancy import EXTRA_POLICY as POLICY
from tests.serverproc import start_server

pytestmark = pytest.mark.realnix


def poison(client: httpx.Client, slice_: str, store_path: str, tmp: Path) -> None:
    """Upload, for ``store_path``, a NAR of the attacker's choosing into ``slice_``."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "out").write_bytes(b"#!/bin/sh\necho pwned\n")
    nar = b"".join(dump(tmp / "out"))
    compressed = lzma.compress(nar)
    file_hash = hashlib.sha256(compressed).digest()
    url = f"nar/{base32.encode(file_hash)}.nar.xz"
    sp = StorePath.parse(store_path)
    info = NarInfo(
        store_path=sp,
        url=url,
        compression="xz",
        file_hash=Hash("sha256", file_hash),
        file_size=len(compressed),
        nar_hash=Hash("sha256", hashlib.sha256(nar).digest()),
        nar_size=len(nar),
        references=(),
        deriver=None,
        system="x86_64-linux",
        sigs=(),
        ca=None,
    )
    r = client.put(f"/cache/{slice_}/{url}", content=compressed)
    assert r.status_code == 200, r.text
    r = client.put(f"/cache/{slice_}/{sp.hash_part}.narinfo", content=info.render().encode())
    assert r.status_code == 200, r.text


def basic(token: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"nixd:{token}".encode()).decode()}


@pytest.mark.parametrize("shape", ["other-org-public-slice", "writer-of-one-slice"])
def test_poisoning_is_confined(
    server_state: ServerState, real_nix: RealNix, tmp_path: Path, shape: str
) -> None:
    state = server_state
    state.admin("org", "create", "evil")
    state.admin("project", "create", "evil/pub", "--public")
    state.admin("project", "create", "acme/secret")
    state.admin("project", "create", "acme/app")
    (state.path / "policy.toml").write_text((state.path / "policy.toml").read_text() + POLICY)
    _, acme_ci = state.token("acme", "ci", fast=True)
    _, reader = state.token("acme", "viewer", "role=reader", fast=True)
    _, attacker = (
        state.token("evil", "ci", fast=True)
        if shape == "other-org-public-slice"
        else state.token("acme", "app-writer", fast=True)
    )
    target = "evil/pub" if shape == "other-org-public-slice" else "acme/app"
    server = start_server(state.path)
    try:
        configure(real_nix)
        salt = os.urandom(4).hex()
        top = real_nix.build(
            f'derivation {{ name = "nixd-secret"; system = builtins.currentSystem; '
            f'builder = "/bin/sh"; args = [ "-c" "echo {salt} > $out" ]; }}'
        )
        legit = real_nix.real_path(top).read_bytes()
        drv = f"{StorePath.parse(top).hash_part}-nixd-secret.drv"
        if shape == "other-org-public-slice":
            # Another org's public slice is never asked by acme's view: not even a path
            # poisoned before acme uploaded it ever reaches acme's readers.
            with httpx.Client(base_url=server.url, headers=basic(attacker)) as evil:
                poison(evil, target, top, tmp_path / "p1")
        w = netrc(tmp_path / "w", server.port, acme_ci)
        r = copy_to(real_nix, f"{server.url}/cache/acme/secret", w, top)
        assert r.returncode == 0, r.stderr.decode()
        if shape == "writer-of-one-slice":
            # A slice of acme's own holding the path already: the older record answers.
            with httpx.Client(base_url=server.url, headers=basic(attacker)) as evil:
                poison(evil, target, top, tmp_path / "p1")
        with httpx.Client(base_url=server.url, headers=basic(acme_ci)) as acme:
            assert acme.put(f"/cache/acme/secret/log/{drv}", content=b"real log\n").is_success
        with httpx.Client(base_url=server.url, headers=basic(attacker)) as evil:
            # ... and after it: the same slice again (a conflict, since it holds one) and logs.
            r = evil.put(f"/cache/{target}/log/{drv}", content=b"forged log\n")
            assert r.is_success
            r = evil.put(f"/cache/acme/secret/log/{drv}", content=b"forged log\n")
            assert r.status_code == 403

        key = state.public_key
        jwt = exchange(server.url, reader)
        dest = tmp_path / "dest"
        r = copy_from(
            real_nix,
            f"{server.url}/cache/",
            netrc(tmp_path / "j", server.port, jwt),
            key,
            dest,
            top,
        )
        assert r.returncode == 0, r.stderr.decode()
        assert real_nix.real_path(top, dest).read_bytes() == legit
        with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {jwt}"}) as c:
            assert c.get(f"/cache/log/{drv}").content == b"real log\n"
        # The attacker's upload is confined to its own slice.
        with httpx.Client(base_url=server.url, headers=basic(attacker)) as evil:
            got = NarInfo.parse(
                evil.get(f"/cache/{target}/{StorePath.parse(top).hash_part}.narinfo").text
            )
            assert got.nar_size != len(b"".join(dump(real_nix.real_path(top))))
    finally:
        assert server.stop() == 0
    assert state.cli("audit", "verify").returncode == 0
