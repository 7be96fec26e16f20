"""Atomic file replacement, including a writer killed with SIGKILL at random moments."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nixd.daemon import files
from nixd.errors import ConfigError
from tests.realnix import RealNix


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_creates_replaces_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "netrc"
    files.atomic_write(target, b"one\n")
    assert target.read_bytes() == b"one\n"
    assert _mode(target) == 0o600
    target.chmod(0o666)
    files.atomic_write(target, b"two\n", mode=0o644)
    assert target.read_bytes() == b"two\n"
    assert _mode(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["netrc"]


def test_modes_ignore_the_umask(tmp_path: Path) -> None:
    """Under umask 000 (a unit without UMask=) nothing is created writable by others."""
    old = os.umask(0)
    try:
        files.make_dirs(tmp_path / "var" / "lib" / "nixd", 0o700)
        files.atomic_write(tmp_path / "var" / "lib" / "nixd" / "state.json", b"{}")
        files.make_dirs(tmp_path / "var" / "lib" / "nixd", 0o700)  # exists: no change
    finally:
        os.umask(old)
    assert _mode(tmp_path / "var") == 0o755 and _mode(tmp_path / "var" / "lib") == 0o755
    assert _mode(tmp_path / "var" / "lib" / "nixd") == 0o700
    assert _mode(tmp_path / "var" / "lib" / "nixd" / "state.json") == 0o600
    (tmp_path / "var").chmod(0o750)  # an administrator's choice is kept
    files.make_dirs(tmp_path / "var" / "other", 0o700)
    assert _mode(tmp_path / "var") == 0o750
    with pytest.raises(ConfigError, match="cannot create"):
        files.make_dirs(tmp_path / "var" / "lib" / "nixd" / "state.json" / "x", 0o700)


def test_atomic_write_sets_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    target = tmp_path / "f"
    files.atomic_write(target, b"x", owner=(65534, 65534))
    st = target.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_atomic_write_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(real)
    files.atomic_write(link, b"new")
    assert not link.is_symlink()
    assert real.read_bytes() == b"keep"


def test_failed_write_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(ConfigError, match="cannot write"):
        files.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_write_into_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create"):
        files.atomic_write(tmp_path / "no" / "f", b"x")


def test_read_mode_remove(tmp_path: Path) -> None:
    target = tmp_path / "f"
    assert files.read_if_exists(target) is None
    assert files.file_mode(target) is None
    assert files.remove_file(target) is False
    files.atomic_write(target, b"x", mode=0o640)
    assert files.read_if_exists(target) == b"x"
    assert files.file_mode(target) == (0o640, os.geteuid(), os.getegid())
    assert files.remove_file(target) is True
    assert not target.exists()


def test_clean_stale_temp_files_only_removes_ours(tmp_path: Path) -> None:
    target = tmp_path / "nix.conf"
    target.write_bytes(b"keep")
    stale = tmp_path / ".nix.conf.0123456789ab.nixd-tmp"
    stale.write_bytes(b"half")
    other = tmp_path / ".other.0123456789ab.nixd-tmp"
    other.write_bytes(b"not ours")
    assert files.clean_stale_temp_files(target) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "nix.conf"]


# --- crash test --------------------------------------------------------------------------

_WRITER = """
import sys
from nixd.daemon.files import atomic_write
path, a, b = sys.argv[1], open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
sys.stdout.write("ready\\n")
sys.stdout.flush()
while True:
    atomic_write(path, a, mode=0o644)
    atomic_write(path, b, mode=0o644)
"""


def _conf(base: str, substituter: str, size: int) -> bytes:
    """A valid nix.conf of about ``size`` bytes: settings, then comment padding."""
    head = f"{base}extra-substituters = {substituter}\n"
    pad = "# padding so that writing takes a while\n"
    return (head + pad * (size // len(pad))).encode()


def test_killed_writer_leaves_old_or_new_never_half(real_nix: RealNix, tmp_path: Path) -> None:
    conf_dir = Path(real_nix.env["NIX_CONF_DIR"])
    target = conf_dir / "nix.conf"
    base = target.read_text()
    contents = {
        "old": target.read_bytes(),
        "a": _conf(base, "http://127.0.0.1:1111", 512 * 1024),
        "b": _conf(base, "http://127.0.0.1:2222", 384 * 1024),
    }
    (tmp_path / "a").write_bytes(contents["a"])
    (tmp_path / "b").write_bytes(contents["b"])
    rng = random.Random(20240601)
    seen: dict[str, int] = {}
    stray_temps = 0
    for _ in range(50):
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(target), str(tmp_path / "a"), str(tmp_path / "b")],
            stdout=subprocess.PIPE,
        )
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0, 0.05))
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
            if writer.stdout is not None:
                writer.stdout.close()
        data = target.read_bytes()
        name = next((k for k, v in contents.items() if v == data), None)
        assert name is not None, f"half-written file of {len(data)} bytes"
        seen[name] = seen.get(name, 0) + 1
        substituters = real_nix.run(
            ["nix", "show-config"], store=False, env={"NIX_USER_CONF_FILES": ""}
        ).stdout.decode()
        if name != "old":
            port = "1111" if name == "a" else "2222"
            assert f"http://127.0.0.1:{port}" in substituters
        stray_temps += files.clean_stale_temp_files(target)
    # The kills landed while writing: both versions were seen.
    assert seen.get("a", 0) > 0 and seen.get("b", 0) > 0, seen
    assert [p.name for p in conf_dir.iterdir() if p.name.endswith(".nixd-tmp")] == []
    print(f"versions seen: {seen}, stray temp files cleaned: {stray_temps}")
