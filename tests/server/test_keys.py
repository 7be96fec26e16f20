"""The server's key files: creation, rotation with grace, pruning, reloading, atomicity."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import jwt
import pytest

from nixd.errors import ConfigError
from nixd.nix.signing import PublicKey, SecretKey
from nixd.server.access import keys as keys_mod
from nixd.server.access.keys import JwtKeys, NarinfoKeys, ServerKeys, jwk_thumbprint
from tests.realnix import RealNix


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_private_files_and_loads_back(tmp_path: Path) -> None:
    clock = Clock()
    created = ServerKeys.init(tmp_path, "cache.example.org-1", clock=clock)
    keys_dir = tmp_path / "keys"
    assert _mode(keys_dir) == 0o700
    assert _mode(keys_dir / "narinfo.json") == 0o600
    assert _mode(keys_dir / "jwt.json") == 0o600
    loaded = ServerKeys.load(tmp_path, clock=clock)
    assert loaded.narinfo.current.render() == created.narinfo.current.render()
    assert loaded.narinfo.current.public().name == "cache.example.org-1"
    assert loaded.jwt.current.kid == created.jwt.current.kid
    assert loaded.jwt.jwks() == created.jwt.jwks()
    with pytest.raises(ConfigError, match="already exists"):
        ServerKeys.init(tmp_path, "again-1", clock=clock)
    assert not [p for p in keys_dir.iterdir() if p.name.endswith(".tmp")]


def test_init_accepts_an_existing_nix_key(tmp_path: Path) -> None:
    mine = SecretKey.generate("mine-7")
    keys = ServerKeys.init(tmp_path, mine)
    assert keys.narinfo.current.render() == mine.render()
    assert keys.narinfo.published() == {
        "keys": [mine.public().render()],
        "current": mine.public().render(),
    }


def test_narinfo_rotation_cosigns_and_publishes_during_grace(tmp_path: Path) -> None:
    clock = Clock()
    keys = NarinfoKeys.create(tmp_path / "keys" / "narinfo.json", "cache-1", clock=clock)
    old = keys.current
    new = keys.rotate(grace=3600)
    assert new.public().name == "cache-2"
    assert keys.current.render() == new.render()
    assert [k.render() for k in keys.signing_keys()] == [new.render(), old.render()]
    assert keys.published() == {
        "keys": [new.public().render(), old.public().render()],
        "current": new.public().render(),
    }
    reloaded = NarinfoKeys.load(keys.path, clock=clock)
    assert [k.render() for k in reloaded.signing_keys()] == [new.render(), old.render()]

    clock.now += 3600
    assert [k.render() for k in keys.signing_keys()] == [new.render()]
    assert keys.published()["keys"] == [new.public().render()]
    assert old.render() in keys.path.read_text()  # not yet pruned from disk
    dropped = keys.prune()
    assert [e.name for e in dropped] == ["cache-1"]
    assert old.render() not in keys.path.read_text()
    assert old.public().render() not in keys.path.read_text()
    assert _mode(keys.path) == 0o600


def test_narinfo_rotation_without_grace_drops_the_old_secret_at_once(tmp_path: Path) -> None:
    keys = NarinfoKeys.create(tmp_path / "narinfo.json", "cache", clock=Clock())
    old = keys.current
    new = keys.rotate("cache-compromise-fixed", grace=0)
    assert new.public().name == "cache-compromise-fixed"
    assert old.render() not in keys.path.read_text()
    assert keys.public_keys() == [new.public()]
    assert [k.render() for k in keys.signing_keys()] == [new.render()]


def test_narinfo_rotation_refuses_a_reused_name(tmp_path: Path) -> None:
    keys = NarinfoKeys.create(tmp_path / "narinfo.json", "cache-1", clock=Clock())
    keys.rotate()
    with pytest.raises(ConfigError, match="'cache-1' exists already"):
        keys.rotate(SecretKey.generate("cache-1"))
    with pytest.raises(ConfigError, match="invalid narinfo key name"):
        keys.rotate("bad name")
    assert keys.rotate().public().name == "cache-3"


def test_refresh_picks_up_a_rotation_by_another_process(tmp_path: Path) -> None:
    clock = Clock()
    ServerKeys.init(tmp_path, "cache-1", clock=clock)
    server = ServerKeys.load(tmp_path, clock=clock)
    admin = ServerKeys.load(tmp_path, clock=clock)
    assert server.refresh() is False
    new_narinfo = admin.narinfo.rotate()
    new_jwt = admin.jwt.rotate(retain_for=60)
    assert server.refresh() is True
    assert server.narinfo.current.render() == new_narinfo.render()
    assert server.jwt.current.kid == new_jwt.kid
    assert server.refresh() is False


def test_rotation_merges_with_changes_made_by_another_process(tmp_path: Path) -> None:
    clock = Clock()
    ServerKeys.init(tmp_path, "cache-1", clock=clock)
    first = NarinfoKeys.load(tmp_path / "keys" / "narinfo.json", clock=clock)
    second = NarinfoKeys.load(tmp_path / "keys" / "narinfo.json", clock=clock)
    first.rotate()  # cache-2
    # `second` has not seen cache-2; rotating re-reads the file under the lock first.
    assert second.rotate().public().name == "cache-3"
    names = [e.name for e in NarinfoKeys.load(second.path, clock=clock).entries]
    assert names == ["cache-3", "cache-2", "cache-1"]


def test_broken_files_are_refused_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "narinfo.json"
    with pytest.raises(ConfigError, match="no narinfo signing keys file"):
        NarinfoKeys.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{path}: cannot read"):
        NarinfoKeys.load(path)
    path.write_text(json.dumps({"version": 99, "keys": []}))
    with pytest.raises(ConfigError, match="not a version 1"):
        NarinfoKeys.load(path)
    a, b = SecretKey.generate("a"), SecretKey.generate("b")
    entries = [{"secret": k.render(), "public": k.public().render(), "created": 0} for k in (a, b)]
    path.write_text(json.dumps({"version": 1, "keys": entries}))
    with pytest.raises(ConfigError, match="2 current narinfo signing keys, expected 1"):
        NarinfoKeys.load(path)
    entries[1]["public"] = a.public().render()
    path.write_text(json.dumps({"version": 1, "keys": entries}))
    with pytest.raises(ConfigError, match=r"keys\[1\]: secret and public key of 'a' do not"):
        NarinfoKeys.load(path)


def test_a_failed_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = NarinfoKeys.create(tmp_path / "narinfo.json", "cache-1", clock=Clock())
    before = keys.path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keys_mod.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        keys.rotate()
    monkeypatch.undo()
    assert keys.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "narinfo.json"]


def test_jwt_keys_rotation_retains_public_halves_only(tmp_path: Path) -> None:
    clock = Clock()
    keys = JwtKeys.create(tmp_path / "jwt.json", clock=clock)
    old = keys.current
    assert old.kid == jwk_thumbprint(old.public)
    assert old.private is not None
    new = keys.rotate(retain_for=600)
    assert keys.current.kid == new.kid != old.kid
    assert [k["kid"] for k in keys.jwks()["keys"]] == [new.kid, old.kid]
    stored = json.loads(keys.path.read_text())["keys"]
    by_kid = {k["kid"]: k for k in stored}
    assert by_kid[old.kid]["private"] is None
    assert by_kid[new.kid]["private"] is not None
    assert keys.public_key(old.kid) == old.public
    clock.now += 600
    assert keys.public_key(old.kid) is None
    assert [k["kid"] for k in keys.jwks()["keys"]] == [new.kid]
    assert keys.public_key("nope") is None


def test_jwks_entries_are_usable_by_pyjwt(tmp_path: Path) -> None:
    keys = JwtKeys.create(tmp_path / "jwt.json")
    (entry,) = keys.jwks()["keys"]
    assert entry["kty"] == "OKP" and entry["crv"] == "Ed25519" and entry["alg"] == "EdDSA"
    assert keys.current.private is not None
    token = jwt.encode({"x": 1}, keys.current.private, algorithm="EdDSA")
    assert jwt.decode(token, jwt.PyJWK(entry).key, algorithms=["EdDSA"]) == {"x": 1}


def test_stored_narinfo_key_signs_for_the_real_nix(tmp_path: Path, real_nix: RealNix) -> None:
    """The key file holds real Nix keys: `nix store sign` with the stored secret makes a
    signature `nix store verify` accepts under the published public key."""
    keys = ServerKeys.init(tmp_path / "state", "cache-1").narinfo
    keys.rotate(grace=3600)
    src = tmp_path / "hello.txt"
    src.write_text("hello\n")
    path = real_nix.run(["nix-store", "--add", str(src)]).stdout.decode().strip()
    key_file = tmp_path / "current.sec"
    key_file.write_text(keys.current.render())
    os.chmod(key_file, 0o600)
    real_nix.run(["nix", "store", "sign", "--key-file", str(key_file), path])
    # A binary-cache copy: its paths are not "ultimately trusted" as locally added ones are.
    cache = f"file://{tmp_path / 'cache'}"
    real_nix.run(["nix", "copy", "--to", cache, path])
    # `nix-store --add` made a content-addressed path, valid without any signature; drop
    # its CA line (not part of the signed fingerprint) so only the signatures can vouch.
    (narinfo,) = (tmp_path / "cache").glob("*.narinfo")
    lines = narinfo.read_text().splitlines(keepends=True)
    assert any(line.startswith("Sig: cache-2:") for line in lines)
    narinfo.write_text("".join(line for line in lines if not line.startswith("CA: ")))
    published = keys.published()
    assert len(published["keys"]) == 2
    verify = ["nix", "store", "verify", "--store", cache, "--no-contents", "--sigs-needed", "1"]
    trusted = " ".join(published["keys"])
    real_nix.run([*verify, "--trusted-public-keys", trusted, path], store=False)
    # Only the retired key trusted: the new signature must not count.
    retired = published["keys"][1]
    assert PublicKey.parse(retired).name == "cache-1"
    proc = real_nix.run([*verify, "--trusted-public-keys", retired, path], store=False, check=False)
    assert proc.returncode != 0
    assert b"untrusted" in proc.stderr, proc.stderr
