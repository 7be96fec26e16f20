"""The real Nix 2.8 client against a real ``nixd-server serve`` process on loopback.

Upload with ``nix copy --to <slice URL>`` (netrc with an API token), substitute with
``nix copy --from <unified URL>`` (netrc with an exchanged access token), verifying the
server's signature; then the refusals: other org, reader uploading, anonymous, revoked
credential, expired access token, a source address outside a rule's CIDR, a NAR that does
not match its narinfo; Range resume with curl; the audit log of the run.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from nixd.nix import base32
from nixd.nix.nar import dump
from nixd.nix.narinfo import NarInfo
from nixd.server.access.identity import Identity
from nixd.server.access.keys import ServerKeys
from nixd.server.access.tokens import TokenIssuer
from nixd.server.config import ServerConfig
from nixd.server.storage.db import open_db
from tests.realnix import RealNix
from tests.server.conftest import BACKENDS, ServerState, audit_text
from tests.serverproc import start_server

CLOSURE = """
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  leaf = mk "nixd-e2e-leaf" "echo SALT > $out";
  mid = mk "nixd-e2e-mid" "echo ${leaf} > $out";
  big = mk "nixd-e2e-big"
    "i=0; while [ $i -lt 3000 ]; do echo line $i ${leaf}; i=$((i+1)); done > $out";
in mk "nixd-e2e-top" "echo ${mid} ${big} > $out"
"""


def configure(nix: RealNix) -> None:
    """No default substituters (loopback only) and a /bin/sh inside the build chroot."""
    shared = " ".join(p for p in ("/bin", "/usr", "/lib", "/lib64") if os.path.exists(p))
    with (nix.root / "etc" / "nix.conf").open("a") as f:
        f.write(f"substituters =\nsandbox-paths = {shared}\n")


def build_closure(nix: RealNix) -> str:
    configure(nix)
    return nix.build(CLOSURE.replace("SALT", os.urandom(4).hex()))


def netrc(path: Path, port: int, password: str) -> Path:
    path.write_text(f"machine 127.0.0.1 login nixd password {password}\n")
    path.chmod(0o600)
    return path


def exchange(url: str, api_token: str) -> str:
    r = httpx.post(f"{url}/api/v1/token/exchange", json={"kind": "token", "token": api_token})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def closure(nix: RealNix, top: str) -> list[str]:
    out = nix.run(["nix-store", "-qR", top]).stdout.decode().split()
    return sorted(out)


def copy_to(
    nix: RealNix, url: str, net: Path | None, path: str
) -> subprocess.CompletedProcess[bytes]:
    opts = ["--option", "netrc-file", str(net)] if net else ["--option", "netrc-file", "/dev/null"]
    return nix.run(["nix", "copy", *opts, "--to", url, path], check=False)


def copy_from(
    nix: RealNix, url: str, net: Path | None, key: str, dest: Path, path: str
) -> subprocess.CompletedProcess[bytes]:
    opts = ["--option", "netrc-file", str(net) if net else "/dev/null"]
    return nix.run(
        [
            "nix",
            "copy",
            *opts,
            "--option",
            "trusted-public-keys",
            key,
            "--option",
            "narinfo-cache-negative-ttl",
            "0",
            "--from",
            url,
            path,
        ],
        store=dest,
        check=False,
    )


@pytest.fixture
def acme(server_state: ServerState) -> ServerState:
    server_state.admin("org", "create", "other")
    server_state.admin("project", "create", "acme/app")
    server_state.admin("project", "create", "other/app")
    return server_state


@pytest.mark.parametrize("metadata", BACKENDS, indirect=True)  # SQLite and PostgreSQL
def test_copy_to_slice_and_from_unified(
    acme: ServerState, real_nix: RealNix, tmp_path: Path
) -> None:
    server = start_server(acme.path)
    try:
        top = build_closure(real_nix)
        paths = closure(real_nix, top)
        assert len(paths) == 4
        _, writer = acme.token("acme", "ci", fast=True)
        _, reader = acme.token("acme", "viewer", "role=reader", fast=True)
        _, other = acme.token("other", "ci", fast=True)
        cred_id, doomed = acme.token("acme", "doomed", fast=True)

        # A reader may not upload: Nix reports the refusal, nothing is stored.
        r = copy_to(
            real_nix,
            f"{server.url}/cache/acme/app",
            netrc(tmp_path / "r", server.port, reader),
            top,
        )
        assert r.returncode != 0
        assert b"403" in r.stderr, r.stderr
        assert b"token:acme/viewer may not upload to acme/app" in r.stderr
        # Anonymous uploads are refused too.
        r = copy_to(real_nix, f"{server.url}/cache/acme/app", None, top)
        assert r.returncode != 0

        # The writer uploads the closure (xz, Nix's default) through the slice URL.
        w = netrc(tmp_path / "w", server.port, writer)
        r = copy_to(real_nix, f"{server.url}/cache/acme/app", w, top)
        assert r.returncode == 0, r.stderr.decode()
        # Again: everything is present, nothing is re-uploaded.
        assert copy_to(real_nix, f"{server.url}/cache/acme/app", w, top).returncode == 0

        # A reader substitutes from the unified URL with an exchanged JWT as netrc password,
        # verifying the server's signature with the published key.
        key = httpx.get(f"{server.url}/api/v1/cache/keys").json()["current"]
        assert key == acme.public_key
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
        for p in paths:
            assert real_nix.real_path(p, dest).read_bytes() == real_nix.real_path(p).read_bytes()
        info = real_nix.run(["nix", "path-info", "--json", "--sigs", *paths], store=dest)
        sigs = {i["path"]: i.get("signatures", []) for i in json.loads(info.stdout)}
        key_name = key.split(":")[0]
        assert all(any(s.startswith(f"{key_name}:") for s in v) for v in sigs.values()), sigs

        # With a different trusted key, the same narinfos are refused as unsigned.
        wrong = "other-key-1:" + "A" * 43 + "="
        r = copy_from(
            real_nix,
            f"{server.url}/cache/",
            netrc(tmp_path / "j2", server.port, jwt),
            wrong,
            tmp_path / "dest-wrong",
            top,
        )
        assert r.returncode != 0
        assert b"signature" in r.stderr or b"lacks a valid" in r.stderr, r.stderr

        # A member of another org, and an anonymous caller, see nothing.
        for net in (netrc(tmp_path / "o", server.port, other), None):
            r = copy_from(real_nix, f"{server.url}/cache/", net, key, tmp_path / "dest-o", top)
            assert r.returncode != 0
            assert not (tmp_path / "dest-o" / top.lstrip("/")).exists()

        # A revoked credential stops working at once, used directly or exchanged.
        d = netrc(tmp_path / "d", server.port, doomed)
        acme.cli("token", "revoke", cred_id)
        r = copy_from(real_nix, f"{server.url}/cache/", d, key, tmp_path / "dest-d", top)
        assert r.returncode != 0
        x = httpx.post(
            f"{server.url}/api/v1/token/exchange", json={"kind": "token", "token": doomed}
        )
        assert x.status_code == 401 and x.json()["error"] == "revoked_credential"

        # An expired access token (signed by the server's own key, an hour in the past).
        conn = open_db(ServerConfig.load(acme.path).database)  # keys: files, or rows on PG
        keys = ServerKeys.load(acme.path, conn=conn)
        past = TokenIssuer(keys.jwt, "nixd-server", "nixd", 600, clock=lambda: time.time() - 3600)
        stale, _ = past.issue(Identity("token", "ci", {"org": "acme"}))
        conn.close()
        s = httpx.get(
            f"{server.url}/api/v1/token/status", headers={"authorization": f"Bearer {stale}"}
        )
        assert s.status_code == 401 and s.json()["error"] == "token_expired"
        r = copy_from(
            real_nix,
            f"{server.url}/cache/",
            netrc(tmp_path / "s", server.port, stale),
            key,
            tmp_path / "dest-s",
            top,
        )
        assert r.returncode != 0
    finally:
        server.stop()
    assert_audit(acme, tmp_path)


def assert_audit(state: ServerState, tmp_path: Path) -> None:
    ok = state.cli("audit", "verify")
    assert ok.returncode == 0, ok.stderr
    lines = audit_text(state.path).splitlines()  # the file, or the table exported
    assert any('"deny"' in line for line in lines) and any('"allow"' in line for line in lines)
    tampered = tmp_path / "tampered.log"
    edited = [line.replace('"deny"', '"allow"', 1) if '"deny"' in line else line for line in lines]
    tampered.write_text("\n".join(edited) + "\n")
    bad = state.cli("audit", "verify", "--file", str(tampered), check=False)
    assert bad.returncode != 0
    assert "line" in (bad.stdout + bad.stderr)


def test_mismatched_nar_is_refused_over_the_wire(acme: ServerState, tmp_path: Path) -> None:
    server = start_server(acme.path)
    try:
        _, writer = acme.token("acme", "ci", fast=True)
        tree = tmp_path / "t"
        tree.write_bytes(b"genuine bytes\n")
        nar = b"".join(dump(tree))
        xz = lzma.compress(nar)
        fh = base32.encode(hashlib.sha256(xz).digest())
        hp = "1" * 32
        wrong = base32.encode(hashlib.sha256(b"other bytes").digest())
        narinfo = (
            f"StorePath: /nix/store/{hp}-t\nURL: nar/{fh}.nar.xz\nCompression: xz\n"
            f"NarHash: sha256:{wrong}\nNarSize: {len(nar)}\nReferences: \n"
        )
        with httpx.Client(base_url=f"{server.url}/cache/acme/app", auth=("nixd", writer)) as c:
            r = c.put(f"/nar/{fh}.nar.xz", content=xz, headers={"expect": "100-continue"})
            assert r.status_code == 200, r.text
            r = c.put(f"/{hp}.narinfo", content=narinfo.encode())
            assert r.status_code == 400
            assert "NAR mismatch" in r.text and wrong in r.text
            assert c.get(f"/{hp}.narinfo").status_code == 404
            assert c.get(f"{server.url}/cache/{hp}.narinfo").status_code == 404
        assert not list((acme.path / "blobs").rglob("*.nar.zst"))
    finally:
        server.stop()


def test_range_resume_and_source_ip(acme: ServerState, real_nix: RealNix, tmp_path: Path) -> None:
    policy = acme.path / "policy.toml"
    policy.write_text(
        policy.read_text()
        + """
[[rule]]
id = "acme-loopback-1-only"
description = "acme/app is only served to 127.0.0.1"
effect = "deny"
subjects = [{ kind = "*" }]
actions = ["*"]
resources = ["acme/app"]
conditions = { source_ips = ["127.0.0.2/32"] }
"""
    )
    server = start_server(acme.path, workers=2)  # two processes share sockets, database, audit log
    try:
        _, writer = acme.token("acme", "ci", fast=True)
        top = build_closure(real_nix)
        w = netrc(tmp_path / "w", server.port, writer)
        assert copy_to(real_nix, f"{server.url}/cache/acme/app", w, top).returncode == 0
        hp = Path(top).name[:32]
        curl = shutil.which("curl")
        assert curl
        base = ["curl", "-sS", "--netrc-file", str(w)]
        info = subprocess.run(
            [*base, f"{server.url}/cache/{hp}.narinfo"], capture_output=True, timeout=30, check=True
        ).stdout
        url = NarInfo.parse(info).url
        whole = subprocess.run(
            [*base, f"{server.url}/cache/{url}"], capture_output=True, timeout=30, check=True
        ).stdout
        # A download broken off after 100 bytes, resumed with curl -C - (Range: bytes=100-).
        part = tmp_path / "nar.zst"
        subprocess.run(
            [*base, "-r", "0-99", "-o", str(part), f"{server.url}/cache/{url}"],
            timeout=30,
            check=True,
        )
        assert part.stat().st_size == 100
        resumed = subprocess.run(
            [*base, "-C", "-", "-o", str(part), "-w", "%{http_code}", f"{server.url}/cache/{url}"],
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert resumed.stdout == b"206"
        assert part.read_bytes() == whole

        # The same request from 127.0.0.2 falls under the deny rule's CIDR: invisible.
        other_ip = server.url.replace("127.0.0.1", "127.0.0.1")
        from_2 = subprocess.run(
            [
                *base,
                "--interface",
                "127.0.0.2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"{other_ip}/cache/{hp}.narinfo",
            ],
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert from_2.stdout == b"404"
        explain = acme.cli(
            "policy",
            "explain",
            "--identity",
            "token:ci",
            "--attr",
            "org=acme",
            "--action",
            "cache:read",
            "--resource",
            "acme/app",
            "--source-ip",
            "127.0.0.2",
            check=False,
        )
        assert explain.returncode == 2
        assert "acme-loopback-1-only" in explain.stdout
    finally:
        assert server.stop() == 0
    # Both workers wrote to one audit log; the chain holds.
    assert acme.cli("audit", "verify").returncode == 0
