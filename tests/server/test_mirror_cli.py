"""``nixd-server mirror complete|status|verify`` on a state directory, no server running:
complete fetches a real-nix closure from the upstream with progress; verify re-checks the
upstream signatures against the configured keys and the stored NARs against their hash."""

from __future__ import annotations

import json
import re
from pathlib import Path

import zstandard

from nixd.server.config import ServerConfig
from nixd.server.storage.blobs import blob_key
from nixd.server.storage.db import open_db
from tests.realnix import RealNix
from tests.server.conftest import ServerState
from tests.server.mirrorenv import make_upstream, stand_in
from tests.server.test_mirror_nix import add_mirror


def test_complete_then_verify_finds_a_changed_key_and_a_corrupted_blob(
    server_state: ServerState, real_nix: RealNix, tmp_path: Path
) -> None:
    state = server_state
    state.admin("project", "create", "acme/app")
    cache = tmp_path / "upstream"
    top, paths, up_key = make_upstream(real_nix, cache, n=3)
    with stand_in(cache) as upstream:
        add_mirror(state.path, upstream.url, up_key)
        # A slice no mirror lists: refused before anything is asked.
        state.admin("project", "create", "acme/lib")
        r = state.cli("mirror", "complete", "acme/lib", top, check=False)
        assert r.returncode != 0 and "no [[mirror]] lists acme/lib" in r.stderr
        assert upstream.total == 0
        r = state.cli("mirror", "complete", "acme/app", top)
        fetched = re.findall(r"^fetched\s+(\S+)$", r.stdout, re.MULTILINE)
        assert sorted(fetched) == paths
        assert "the closure is complete" in r.stdout
    (st,) = json.loads(state.cli("mirror", "status", "acme/app", "--json").stdout)
    assert st["mirrored"] == 3 and st["roots"]["complete"] == 1
    assert "acme/app: 3 path(s) mirrored" in state.cli("mirror", "status").stdout

    assert json.loads(state.cli("mirror", "verify", "--json").stdout) == {"checked": 3, "bad": []}

    # A stored NAR changed under the server: verify says which.
    config = ServerConfig.load(state.path)
    conn = open_db(config.database)
    file_hash = conn.execute(
        "SELECT n.file_hash FROM slice_records s JOIN nars n ON n.nar_hash = s.nar_hash "
        "WHERE s.name = 'mir-0'"
    ).fetchone()[0]
    conn.close()
    blob = config.blobs_path / blob_key(file_hash)
    blob.chmod(0o644)
    blob.write_bytes(zstandard.compress(b"not the NAR"))
    r = state.cli("mirror", "verify", "--json", check=False)
    assert r.returncode == 1
    (bad,) = json.loads(r.stdout)["bad"]
    assert bad["path"].endswith("-mir-0") and bad["signature"] == "ok"
    assert bad["nar"].startswith("the stored NAR")  # unreadable, or another NarHash

    # The upstream's key is no longer trusted: every mirrored path fails its signature.
    text = (state.path / "config.toml").read_text()
    other = "other-1:" + "A" * 43 + "="
    (state.path / "config.toml").write_text(text.replace(up_key, other))
    r = state.cli("mirror", "verify", check=False)
    assert r.returncode == 1
    assert "checked 3 mirrored path(s): 3 bad" in r.stdout
    assert "no upstream signature verifies" in r.stderr
