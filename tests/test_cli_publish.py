"""``nixd publish`` before any server: what it packs, what it refuses, which version it picks.

Real git repositories in a temp dir; the tarball is checked with the server's own reader
(:func:`nixd.nix.flaketarball.normalize`), so what the client packs is what the server
accepts, and the NAR hash is compared with the real ``nix hash path`` of the same tree.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from nixd import exitcodes
from nixd.cli import main
from nixd.commands import publish
from nixd.errors import LoginFailed
from nixd.nix.flaketarball import normalize
from nixd.semver import VersionError

FLAKE = '{ description = "a tool"; outputs = { self }: { }; }\n'
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_AUTHOR_DATE": "2024-01-02T03:04:05Z",
    "GIT_COMMITTER_DATE": "2024-01-02T03:04:05Z",
    "GIT_CONFIG_GLOBAL": "/dev/null",
}
COMMIT_TIME = 1704164645
CI_VARS = (
    "GITHUB_REF",
    "CI_COMMIT_TAG",
    "CI_COMMIT_REF_NAME",
    "GITHUB_REPOSITORY",
    "GITHUB_REPOSITORY_OWNER",
    "CI_PROJECT_ROOT_NAMESPACE",
    "CI_PROJECT_NAME",
    "ACTIONS_ID_TOKEN_REQUEST_URL",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    "NIXD_ID_TOKEN",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CI_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in GIT_ENV.items():
        monkeypatch.setenv(name, value)


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, check=True, env={**os.environ}
    )
    return done.stdout.decode().strip()


def make_repo(root: Path, files: dict[str, str], *, tag: str | None = "v0.1.0") -> Path:
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    if tag:
        git(root, "tag", tag)
    return root


def packed(directory: Path) -> tuple[publish.Checkout, bytes]:
    checkout = publish.open_checkout(directory)
    out = io.BytesIO()
    publish.pack(checkout, out)
    return checkout, out.getvalue()


def names(tarball: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def test_the_commit_is_packed_as_git_archive_gives_it(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "tool",
        {
            "flake.nix": FLAKE,
            "bin/run": "#!/bin/sh\necho hi\n",
            ".gitattributes": "private export-ignore\nnotes.txt export-ignore\n",
            "private/key": "secret\n",
            "notes.txt": "internal\n",
            "lib/default.nix": "{ }\n",
        },
    )
    os.chmod(repo / "bin/run", 0o755)
    os.symlink("lib/default.nix", repo / "link.nix")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "exec bit and a link")
    checkout, tarball = packed(repo)
    assert checkout.prefix == "" and checkout.commit == git(repo, "rev-parse", "HEAD")
    members = names(tarball)
    assert "source/flake.nix" in members and "source/lib/default.nix" in members
    assert not any("private" in n or "notes.txt" in n for n in members)
    assert members["source"].isdir() and members["source"].mtime == COMMIT_TIME
    assert members["source/bin/run"].mode & 0o111
    assert members["source/link.nix"].issym()
    assert members["source/link.nix"].linkname == "lib/default.nix"
    assert all(m.uid == 0 and m.uname == "" for m in members.values())

    source = normalize(tarball)  # the server's reader accepts it
    assert source.last_modified == COMMIT_TIME
    # the NAR hash of the commit's tree as the real nix computes it (export-ignore applied)
    tree = tmp_path / "tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", "HEAD"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    nix_hash = subprocess.run(
        ["nix-hash", "--type", "sha256", "--base32", str(tree)],
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert source.nar_hash.encode("base32", prefix=False) == nix_hash.strip()


def test_a_flake_in_a_subdirectory_is_the_tree_top(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "mono",
        {
            "README": "top\n",
            ".gitattributes": "nix/tool/big.bin export-ignore\n",
            "nix/tool/flake.nix": FLAKE,
            "nix/tool/pkg.nix": "{ }\n",
            "nix/tool/big.bin": "x" * 100,
            "nix/other/flake.nix": FLAKE,
        },
    )
    checkout, tarball = packed(repo / "nix" / "tool")
    assert checkout.prefix == "nix/tool/"
    assert set(names(tarball)) == {"source", "source/flake.nix", "source/pkg.nix"}
    assert normalize(tarball).last_modified == COMMIT_TIME


def test_refused_before_anything_is_sent(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(publish.PublishError, match="not in a git repository"):
        publish.open_checkout(plain)
    repo = make_repo(tmp_path / "tool", {"flake.nix": FLAKE})
    (repo / "flake.nix").write_text(FLAKE + "# edited\n")
    with pytest.raises(publish.PublishError, match=r"uncommitted or untracked.*flake\.nix"):
        publish.open_checkout(repo)
    git(repo, "checkout", "flake.nix")
    (repo / "result").write_text("untracked\n")
    with pytest.raises(publish.PublishError, match="untracked"):
        publish.open_checkout(repo)
    (repo / "result").unlink()
    publish.open_checkout(repo)
    noflake = make_repo(tmp_path / "noflake", {"default.nix": "{ }\n"})
    with pytest.raises(publish.PublishError, match=r"no flake\.nix"):
        publish.open_checkout(noflake)
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(publish.PublishError, match="no commit"):
        publish.open_checkout(empty)


def test_the_cli_says_why_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "tool", {"flake.nix": FLAKE})
    code = main(["publish", "--server", "http://127.0.0.1:9", "--org", "acme", "--directory",
                 str(repo)])  # fmt: skip
    assert code == exitcodes.DENIED  # outside CI: refused before anything is evaluated
    assert "no CI identity here" in capsys.readouterr().err
    monkeypatch.setenv("NIXD_ID_TOKEN", "a.job.token")  # a GitLab job, as far as it can tell
    (repo / "dirty").write_text("x")
    code = main(["publish", "--server", "http://127.0.0.1:9", "--org", "acme", "--directory",
                 str(repo)])  # fmt: skip
    assert code == exitcodes.FAILURE
    assert "untracked" in capsys.readouterr().err
    (repo / "dirty").unlink()
    git(repo, "tag", "-d", "v0.1.0")
    code = main(["publish", "--server", "http://127.0.0.1:9", "--org", "acme", "--directory",
                 str(repo), "--json"])  # fmt: skip
    assert code == exitcodes.FAILURE
    assert "no version" in capsys.readouterr().out  # --json: the error as JSON on stdout


def test_the_version_comes_from_the_job_or_the_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "tool", {"flake.nix": FLAKE}, tag="v1.2.3")
    checkout = publish.open_checkout(repo)
    assert publish.release_version(None, checkout) == "1.2.3"
    assert publish.git_ref(checkout, "1.2.3") == "refs/tags/v1.2.3"
    assert publish.release_version("2.0.0-rc.1", checkout) == "2.0.0-rc.1"
    assert publish.release_version("v2.0.0", checkout) == "2.0.0"
    with pytest.raises(VersionError, match=r"2\.0"):
        publish.release_version("2.0", checkout)
    monkeypatch.setenv("CI_COMMIT_TAG", "v0.9.0")
    assert publish.release_version(None, checkout) == "0.9.0"
    monkeypatch.setenv("GITHUB_REF", "refs/tags/v0.8.0")
    assert publish.release_version(None, checkout) == "0.8.0"
    assert publish.git_ref(checkout, "0.8.0") == "refs/tags/v0.8.0"
    monkeypatch.setenv("GITHUB_REF", "refs/heads/main")  # a branch: the tag decides
    monkeypatch.delenv("CI_COMMIT_TAG")
    assert publish.release_version(None, checkout) == "1.2.3"
    monkeypatch.setenv("GITHUB_REF", "refs/tags/latest")
    with pytest.raises(VersionError, match="latest"):
        publish.release_version(None, checkout)
    monkeypatch.delenv("GITHUB_REF")

    git(repo, "tag", "v1.3.0")
    with pytest.raises(publish.PublishError, match="several version tags"):
        publish.release_version(None, checkout)
    git(repo, "tag", "-d", "v1.3.0", "v1.2.3")
    git(repo, "tag", "nightly")
    with pytest.raises(publish.PublishError, match=r"no version: its tags \(nightly\)"):
        publish.release_version(None, checkout)


def test_names_come_from_the_ci_repository_or_the_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "tool", {"flake.nix": FLAKE})
    checkout = publish.open_checkout(repo)
    with pytest.raises(publish.PublishError, match="--org"):
        publish.flake_org_name(None, None, checkout)
    assert publish.flake_org_name("acme", None, checkout) == ("acme", "tool")
    monkeypatch.setenv("GITHUB_REPOSITORY", "acme/widget")
    monkeypatch.setenv("GITHUB_REPOSITORY_OWNER", "acme")
    assert publish.flake_org_name(None, None, checkout) == ("acme", "widget")
    assert publish.flake_org_name(None, "w2", checkout) == ("acme", "w2")
    for bad in ("../x", "a/b", ".hidden", "_x", "x" * 64, "sp ace"):
        with pytest.raises(publish.PublishError):
            publish.flake_org_name("acme", bad, checkout)


def test_metadata_records_commit_lock_and_description(tmp_path: Path) -> None:
    lock = '{"nodes": {"root": {}}, "root": "root", "version": 7}\n'
    repo = make_repo(tmp_path / "tool", {"flake.nix": FLAKE, "flake.lock": lock})
    checkout = publish.open_checkout(repo)
    assert publish.flake_lock(checkout) == {"nodes": {"root": {}}, "root": "root", "version": 7}
    (repo / "flake.lock").write_text("[" * 100_000)
    with pytest.raises(publish.PublishError, match=r"flake\.lock"):
        publish.flake_lock(checkout)
    big = publish.Release("acme", "tool", "1.0.0", {"lock": "x" * (publish.MAX_METADATA + 1)})
    with pytest.raises(publish.PublishError, match="metadata"):
        big.metadata_bytes()
    url = publish.Release("acme", "tool", "1.0.0-rc.1").url("https://cache.example/")
    assert url == "https://cache.example/api/v1/flakes/acme/tool/releases/1.0.0-rc.1"


def test_no_ci_identity_is_a_clear_refusal(tmp_path: Path) -> None:
    args = publish_args(tmp_path)
    with pytest.raises(LoginFailed, match="no CI identity here"):
        publish.login_params(args)


def publish_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    from nixd.cli import build_parser  # noqa: PLC0415

    return build_parser(["publish"]).parse_args(["publish", "--org", "acme", *extra])
