"""Store path validation, checked case by case against the real Nix 2.8."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.nix import nar
from nixd.nix.hashes import Hash, sha256
from nixd.nix.storepath import MAX_NAME_LEN, StorePath, fixed_output_path
from tests.realnix import RealNix

H = "0a1b2c3d4f5g6h7i8j9klmnpqrsvwxyz"  # every base32 digit appears somewhere
ACCEPTED_NAMES = [
    "hello-2.12",
    "a",
    "x" * MAX_NAME_LEN,
    "A-Za-z0-9+-._?=",
    ".bashrc",  # `nix-store --add .bashrc` makes such paths
    "...x",
    "source.drv",
]
REJECTED_BASENAMES = [
    f"{H}-",  # empty name
    f"{H}-" + "x" * (MAX_NAME_LEN + 1),
    f"{H}-fo%o",
    f"{H}-fo o",
    f"{H}-f:o",
    f"{H}-é",
    f"{H[:31]}e-foo",  # e, o, u, t are not base32
    f"{H[:31]}u-foo",
    f"{H[:31]}A-foo",
    f"{H[:31]}-foo",  # hash too short
    "short",
]
# Nix 2.8 accepts these; we follow newer Nix (names '.', '..', '.-x') and insist on the
# dash after the hash, which Nix 2.8 never checks but always writes.
STRICTER_THAN_NIX_2_8 = [f"{H}-.", f"{H}-..", f"{H}-.-x", f"{H}-..-x", f"{H}Xfoo"]


def nix_accepts(real_nix: RealNix, basename: str) -> bool:
    """Whether Nix parses /nix/store/<basename> as a store path (valid in the store or not)."""
    proc = real_nix.run(["nix-store", "--check-validity", f"/nix/store/{basename}"], check=False)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0  # nothing is in this fresh store
    return "is not valid" in err


def test_agrees_with_nix(real_nix: RealNix) -> None:
    for name in ACCEPTED_NAMES:
        basename = f"{H}-{name}"
        assert nix_accepts(real_nix, basename), basename
        p = StorePath.from_basename(basename)
        assert (p.hash_part, p.name, p.basename) == (H, name, basename)
        assert StorePath.parse(p.path()) == p
    for basename in REJECTED_BASENAMES:
        assert not nix_accepts(real_nix, basename), basename
        with pytest.raises(FormatError):
            StorePath.from_basename(basename)


def test_deliberately_stricter_than_nix_2_8(real_nix: RealNix) -> None:
    for basename in STRICTER_THAN_NIX_2_8:
        assert nix_accepts(real_nix, basename), basename
        with pytest.raises(FormatError):
            StorePath.from_basename(basename)


def test_real_paths_parse(real_nix: RealNix, tmp_path: Path) -> None:
    src = tmp_path / ".dot-file"
    src.write_text("x")
    out = real_nix.run(["nix-store", "--add", str(src)]).stdout.decode().strip()
    p = StorePath.parse(out)
    assert p.name == ".dot-file"
    assert p.path() == out


def test_parse_full_paths() -> None:
    p = StorePath.parse(f"/custom/store/{H}-x", "/custom/store/")
    assert p.path("/custom/store") == f"/custom/store/{H}-x"
    assert str(p) == f"{H}-x"
    for bad in (f"/nix/store/{H}-x/bin", f"/nix/other/{H}-x", f"nix/store/{H}-x"):
        with pytest.raises(FormatError):
            StorePath.parse(bad)


def test_order_is_by_basename() -> None:
    paths = [StorePath(H, "b"), StorePath(H, "a"), StorePath("0" * 32, "z")]
    assert [p.basename for p in sorted(paths)] == sorted(p.basename for p in paths)


@given(st.text(max_size=260))
def test_from_basename_raises_only_format_error(text: str) -> None:
    try:
        p = StorePath.from_basename(text)
    except FormatError:
        return
    assert p.basename == text


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a").write_text("x")
    (root / "sub" / "run").write_text("#!/bin/sh\n")
    (root / "sub" / "run").chmod(0o755)
    (root / "link").symlink_to("a")
    return root


def test_fixed_output_path_agrees_with_nix(real_nix: RealNix, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    nar_hash, _ = nar.hash_path(src)
    sri = real_nix.run(["nix", "hash", "path", str(src)], store=None).stdout.decode().strip()
    assert Hash.parse(sri) == nar_hash
    added = real_nix.run(["nix-store", "--add-fixed", "--recursive", "sha256", str(src)])
    assert fixed_output_path(nar_hash, "src").path() == added.stdout.decode().strip()
    for name in ("source", "foo-1.0"):
        out = real_nix.run(["nix", "store", "add-path", "--name", name, str(src)])
        assert fixed_output_path(nar_hash, name).path() == out.stdout.decode().strip()
    assert fixed_output_path(nar_hash) == fixed_output_path(nar_hash, "source")


def test_fixed_output_path_in_another_store_dir(real_nix: RealNix, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    nar_hash, _ = nar.hash_path(src)
    store = f"local?root={tmp_path / 'other'}&store=/custom/store"
    out = (
        real_nix.run(
            ["nix-store", "--store", store, "--add-fixed", "--recursive", "sha256", str(src)],
            store=None,
        )
        .stdout.decode()
        .strip()
    )
    p = fixed_output_path(nar_hash, "src", store_dir="/custom/store/")
    assert p.path("/custom/store") == out
    assert p != fixed_output_path(nar_hash, "src")


def test_fixed_output_path_refuses() -> None:
    with pytest.raises(FormatError, match="sha256"):
        fixed_output_path(Hash("sha1", bytes(20)))
    with pytest.raises(FormatError, match="name"):
        fixed_output_path(sha256(b""), "bad name")
