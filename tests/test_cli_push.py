"""``nixd push``'s argument handling and what it prints (the daemon side: tests/daemon)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixd.cli import build_parser
from nixd.commands.push import _merge, progress_line, store_paths
from nixd.errors import NixdError

P = "/nix/store/sh1nri3g62i0yddx21w05jzxqjf1zaxs-lt"


def test_links_are_followed_into_the_store(tmp_path: Path) -> None:
    root = tmp_path / "chroot"
    (root / "nix" / "store" / P.rsplit("/", 1)[1] / "bin").mkdir(parents=True)
    (tmp_path / "result").symlink_to(root / P.lstrip("/"))
    assert store_paths([str(tmp_path / "result"), P + "/bin/x", P], str(root)) == [P]
    with pytest.raises(NixdError, match="not in the Nix store"):
        store_paths([str(tmp_path)])


def test_progress_and_merged_summary() -> None:
    a = {"job": "1", "to": "acme/app", "state": "done", "total": 3, "done": 3, "pushed": 2,
         "skipped_present": 1, "skipped_upstream": 0, "failed": 0, "bytes": 3 << 20,
         "elapsed": 2.0, "rate": 1.5 * (1 << 20)}  # fmt: skip
    b = {**a, "job": "2", "state": "running", "done": 1, "pushed": 1, "failures": {P: "503"}}
    assert progress_line(a) == "[3/3] pushed 2, skipped 1, failed 0; 3.0 MiB at 1.5 MiB/s"
    merged = _merge([a, b])
    assert merged["state"] == "running" and merged["total"] == 6 and merged["pushed"] == 3
    assert merged["failures"] == {P: "503"}


def test_the_commands_are_registered() -> None:
    parser = build_parser()
    args = parser.parse_args(["push", "--to", "acme/app", "--json", P])
    assert args.paths == [P] and args.to == "acme/app"
    assert parser.parse_args(["watch-store"]).command == "watch-store"
    assert parser.parse_args(["post-build-hook"]).command == "post-build-hook"
