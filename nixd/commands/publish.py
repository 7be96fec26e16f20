"""``nixd publish``: release a flake from CI, as ``ORG/NAME`` at a semantic version.

A release is the flake's source exactly as Nix locks it from git: ``git archive`` of the
commit (so ``.gitattributes`` ``export-ignore`` holds, and nothing untracked or
uncommitted slips in), the flake's directory (``--directory``) as the tree's top. It is
published only from a clean checkout of a tagged commit, so a version always names one
commit; the server makes it immutable (the same version with other content is refused,
the same content again is a no-op).

**Identity.** Only CI publishes: the command logs in *in this process* with the job's
OIDC identity, through the same login methods the daemon uses
(:mod:`nixd.auth.github_action`, :mod:`nixd.auth.gitlab_pipeline`) and the same exchange
(:func:`nixd.auth.token.exchange_json`); the short-lived access token lives only in this
process and is never written anywhere. No daemon is needed. Whether the identity may
publish ``ORG/NAME`` is the server's decision (``flake:publish``).

**Upload.** ``PUT /api/v1/flakes/ORG/NAME/releases/VERSION`` with ``Content-Type:
application/x-nixd-release`` and ``X-Nixd-Metadata-Length: N``: the body is N bytes of
metadata JSON, then the ``.tar.gz``, streamed from a temporary file. The server
normalizes and checks the tarball; what it answers is what is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from nixd import exitcodes
from nixd.errors import ConfigError, LoginFailed, NixdError

RELEASE_TYPE = "application/x-nixd-release"
METADATA_HEADER = "X-Nixd-Metadata-Length"
MAX_METADATA = 1 << 20
"""Most bytes of metadata JSON the server takes (``X-Nixd-Metadata-Length``)."""
MAX_LOCK = 512 << 10
"""Largest ``flake.lock`` recorded (real ones are a few KiB; it must fit the metadata)."""
TOP = "source"
"""The tarball's one top-level directory (the name Nix gives an unpacked source)."""
CHUNK = 1 << 20
TIMEOUT = 300.0
"""Seconds for the upload's connection and for each read or write of it."""
NIX_TIMEOUT = 600.0
"""Seconds ``nix flake metadata`` / ``nix eval`` may take (an eval can build)."""
NIX_FLAGS = ("--extra-experimental-features", "nix-command flakes")
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

HELP = """\
Publish the flake of this git checkout as a release ORG/NAME at a semantic version.

Run it in CI, in a job for a tag (v1.2.3): it logs in with the job's OIDC identity
(GitHub Actions: `permissions: id-token: write`; GitLab CI: an `id_tokens` entry named
NIXD_ID_TOKEN whose `aud` is the server's URL), packs the flake's source as Nix locks it
from git (`git archive` of HEAD: tracked files only, `.gitattributes` export-ignore
honoured; --directory for a flake in a subdirectory), records its description, commit,
ref, flake.lock and, with --include-output, the store paths of chosen outputs, and
uploads it. No nixd daemon is needed, and the access token is never written anywhere.

Refused before anything is sent: not a git checkout, uncommitted or untracked files
(`git status --porcelain` must be empty), no flake.nix in the directory, no version (no
--version, and HEAD carries no version tag).

A release is immutable: publishing a version again with the same content is a no-op
(exit 0), with other content it is refused (exit 1).
"""

EPILOG = """\
the version, unless --version is given, comes from (first that is set):
  $GITHUB_REF          refs/tags/v1.2.3 (GitHub Actions, on a tag push)
  $CI_COMMIT_TAG       v1.2.3 (GitLab CI, in a tag pipeline)
  git tag --points-at  the version tag on HEAD (v1.2.3 or 1.2.3)

GitHub Actions:
  on:
    push:
      tags: ["v*"]
  jobs:
    publish:
      runs-on: ubuntu-latest
      permissions:
        id-token: write
        contents: read
      steps:
        - uses: actions/checkout@v4
        - run: nixd publish --server https://cache.example.com --org acme

GitLab CI:
  publish:
    rules:
      - if: $CI_COMMIT_TAG
    id_tokens:
      NIXD_ID_TOKEN:
        aud: https://cache.example.com
    script:
      - nixd publish --server https://cache.example.com --org acme

consumers (a machine logged in with `nixd login`):
  inputs.tool.url = "http://127.0.0.1:6493/f/acme/tool/0.*.tar.gz";

exit codes: 0 published (or already published with this content), 3 the server did not
accept the login, 4 the identity may not publish this flake, 1 refused for another
reason (version taken with other content, invalid version or tarball, too large, dirty
tree, no tag), 6 the server could not be reached.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "publish",
        help="publish this flake as a release ORG/NAME at a version (from CI)",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--server", metavar="URL", help="the nixd server (default from the config)")
    p.add_argument(
        "--login",
        choices=("auto", "github-action", "gitlab-pipeline", "token"),
        default="auto",
        help="how to log in: the CI job's identity, found from the environment by default "
        "(`token`: an API token from --token-file or stdin; the default policy refuses it)",
    )
    p.add_argument(
        "--audience",
        help="github-action: the `aud` to request (default: the server URL)",
    )
    p.add_argument(
        "--id-token-variable",
        default="NIXD_ID_TOKEN",
        metavar="NAME",
        help="gitlab-pipeline: the variable holding the job's ID token (default: NIXD_ID_TOKEN)",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="gitlab-pipeline: read the ID token from FILE; token: read the API token from FILE",
    )
    p.add_argument("--org", help="the organization (default: the repository's owner in CI)")
    p.add_argument("--name", help="the flake's name (default: the repository's name)")
    p.add_argument(
        "--version",
        dest="release_version",
        metavar="VERSION",
        help="the release's semantic version (default: from the tag, see below)",
    )
    p.add_argument(
        "--visibility",
        choices=("private", "public"),
        default="private",
        help="who may fetch it: readers of the organization's flakes (private, the "
        "default) or anyone (public)",
    )
    p.add_argument(
        "--directory",
        metavar="DIR",
        default=".",
        help="the flake's directory in the checkout (default: the current directory)",
    )
    p.add_argument(
        "--include-output",
        action="append",
        default=[],
        metavar="ATTR",
        help="record the store path of output ATTR (`nix eval --raw DIR#ATTR.outPath`); repeatable",
    )
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    p.add_argument("--config", help="the daemon's config file (for the default server)")
    p.set_defaults(func=run_publish)


# -- the checkout ----------------------------------------------------------------------------


class PublishError(NixdError):
    """Something about the checkout or the arguments that keeps it from being published."""


def _git(repo: Path, *args: str, check: bool = True) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, check=False, timeout=120
        )
    except FileNotFoundError as exc:
        raise PublishError("git is not installed (nixd publish packs with `git archive`)") from exc
    if check and done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise PublishError(f"git {args[0]} failed: {err[-1] if err else done.returncode}")
    return done.stdout.decode(errors="replace").rstrip("\n") if done.returncode == 0 else ""


@dataclass(frozen=True)
class Checkout:
    """A clean git checkout and where the flake is in it."""

    root: Path
    prefix: str
    """The flake's directory relative to ``root``: "" or ``"sub/dir/"``."""
    commit: str
    commit_time: int

    @property
    def flake_dir(self) -> Path:
        return self.root / self.prefix


def open_checkout(directory: str | os.PathLike[str]) -> Checkout:
    """The checkout holding ``directory``; refuses what must not be published."""
    path = Path(directory)
    if not path.is_dir():
        raise PublishError(f"{directory}: not a directory")
    try:
        done = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--show-toplevel", "--show-prefix"],
            capture_output=True,
            check=False,
            timeout=60,
        )
    except FileNotFoundError as exc:
        raise PublishError("git is not installed (nixd publish packs with `git archive`)") from exc
    if done.returncode != 0:
        raise PublishError(f"{path.resolve()} is not in a git repository")
    lines = done.stdout.decode().split("\n")
    root, prefix = Path(lines[0]), lines[1] if len(lines) > 1 else ""
    commit = _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    if not commit:
        raise PublishError(f"{root}: the repository has no commit yet")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=normal").splitlines()
    if dirty:
        shown = ", ".join(line[3:] for line in dirty[:5]) + (" ..." if len(dirty) > 5 else "")
        raise PublishError(
            f"{root}: the working tree has uncommitted or untracked changes ({shown}); a "
            "release is the commit's content: commit them, or clean the checkout"
        )
    if not _git(root, "cat-file", "-t", f"HEAD:{prefix}flake.nix", check=False) == "blob":
        raise PublishError(f"no flake.nix in {prefix or 'the top'} of commit {commit[:12]}")
    commit_time = int(_git(root, "log", "-1", "--format=%ct", "HEAD"))
    return Checkout(root, prefix, commit, commit_time)


def pack(checkout: Checkout, out: IO[bytes]) -> None:
    """Write the flake's tree at HEAD to ``out`` as a ``.tar.gz`` under ``source/``.

    ``git archive`` decides the content (tracked files at the commit, export-ignore and
    export-subst applied, modes and symlinks kept); entries are renamed from the flake's
    directory to :data:`TOP`, whose mtime (Nix's ``lastModified``) is the commit time.
    """
    args = ["git", "-C", str(checkout.root), "archive", "--format=tar", checkout.commit]
    if checkout.prefix:
        args += ["--", checkout.prefix]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        with (
            tarfile.open(fileobj=proc.stdout, mode="r|") as src,
            tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as dst,
        ):
            top = tarfile.TarInfo(TOP)
            top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o755, checkout.commit_time
            dst.addfile(top)
            for member in src:
                name = member.name.rstrip("/")
                if checkout.prefix:
                    if not (name + "/").startswith(checkout.prefix):
                        continue
                    name = name[len(checkout.prefix) :]
                if not name:
                    continue  # the flake's directory itself: that is TOP
                member.name = f"{TOP}/{name}"
                member.uname = member.gname = ""
                member.uid = member.gid = 0
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    except tarfile.TarError as exc:
        proc.kill()
        raise PublishError(f"git archive gave an unreadable archive: {exc}") from exc
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise PublishError(f"git archive failed: {err.splitlines()[-1] if err else code}")


# -- what a release is called and says ------------------------------------------------------


def release_version(explicit: str | None, checkout: Checkout) -> str:
    """The version: ``--version``, else the tag of the CI job, else the tag on HEAD."""
    from nixd.semver import parse_version, version_from_tag  # noqa: PLC0415

    if explicit:
        return str(version_from_tag(explicit) if explicit[:1] in "vV" else parse_version(explicit))
    ref = os.environ.get("GITHUB_REF", "")
    if ref.startswith("refs/tags/"):
        return str(version_from_tag(ref))
    if tag := os.environ.get("CI_COMMIT_TAG", ""):
        return str(version_from_tag(tag))
    tags = _git(checkout.root, "tag", "--points-at", "HEAD").split()
    found: dict[str, str] = {}
    for tag in tags:
        try:
            found.setdefault(str(version_from_tag(tag)), tag)
        except NixdError:
            continue
    if not found:
        why = f"its tags ({', '.join(tags)}) are no versions" if tags else "it has no tag"
        raise PublishError(
            f"no version: {why} on HEAD ({checkout.commit[:12]}); tag the commit "
            "(`git tag v1.2.3`) or pass --version"
        )
    if len(found) > 1:
        raise PublishError(
            f"HEAD carries several version tags ({', '.join(sorted(found.values()))}): "
            "pass --version"
        )
    return next(iter(found))


def _check_name(value: str, what: str) -> str:
    if not value or not set(value) <= NAME_CHARS or not value[0].isalnum() or len(value) > 63:
        raise PublishError(
            f"{what} {value!r} must be letters, digits, '.', '_' or '-', start with a letter "
            "or digit, and have at most 63 characters"
        )
    return value


def flake_org_name(org: str | None, name: str | None, checkout: Checkout) -> tuple[str, str]:
    """``--org``/``--name``, else the CI repository's owner and name, else the directory's."""
    repository = os.environ.get("GITHUB_REPOSITORY", "")
    owner, _, repo = repository.partition("/")
    org = org or os.environ.get("GITHUB_REPOSITORY_OWNER") or owner
    org = org or os.environ.get("CI_PROJECT_ROOT_NAMESPACE", "")
    if not org:
        raise PublishError("no organization: pass --org")
    name = name or repo or os.environ.get("CI_PROJECT_NAME") or checkout.root.name
    return _check_name(org, "the organization"), _check_name(name, "the name")


def git_ref(checkout: Checkout, version: str) -> str:
    """The ref the job ran for (``GITHUB_REF``, ``CI_COMMIT_REF_NAME``), else the tag."""
    ref = os.environ.get("GITHUB_REF") or os.environ.get("CI_COMMIT_REF_NAME")
    if ref:
        return ref
    for tag in (f"v{version}", version):
        if _git(checkout.root, "rev-parse", "--verify", "--quiet", f"refs/tags/{tag}", check=False):
            return f"refs/tags/{tag}"
    return ""


def _nix(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["nix", *NIX_FLAGS, *args], cwd=cwd, capture_output=True, check=False, timeout=NIX_TIMEOUT
    )


def flake_description(checkout: Checkout) -> str:
    """``description`` from ``nix flake metadata --json`` ("" without nix, or if it fails)."""
    if shutil.which("nix") is None:
        return ""
    done = _nix(["flake", "metadata", "--json", "--no-write-lock-file", "."], checkout.flake_dir)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        print(
            f"nixd: warning: no description: nix flake metadata failed: {err[-1] if err else ''}",
            file=sys.stderr,
        )
        return ""
    try:
        description = json.loads(done.stdout).get("description", "")
    except (ValueError, AttributeError):
        return ""
    return description if isinstance(description, str) else ""


def flake_lock(checkout: Checkout) -> Any:
    """The committed ``flake.lock`` as JSON, or None when the flake has none."""
    path = checkout.flake_dir / "flake.lock"
    if not path.is_file():
        return None
    from nixd.bounds import load_json  # noqa: PLC0415

    try:
        return load_json(
            path.read_bytes()[: MAX_LOCK + 1], max_bytes=MAX_LOCK, max_depth=64, what="flake.lock"
        )
    except NixdError as exc:
        raise PublishError(f"{path}: {exc}") from exc


def flake_outputs(checkout: Checkout, attrs: list[str]) -> dict[str, str]:
    """``{ATTR: store path}`` of ``nix eval --raw .#ATTR.outPath`` for each ``attrs``."""
    if not attrs:
        return {}
    if shutil.which("nix") is None:
        raise PublishError("--include-output needs nix on PATH")
    outputs = {}
    for attr in attrs:
        if not attr or any(c.isspace() or c in "#'\"" for c in attr):
            raise PublishError(f"--include-output {attr!r} is not a flake attribute path")
        done = _nix(["eval", "--raw", f".#{attr}.outPath"], checkout.flake_dir)
        path = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0 or not path.startswith("/nix/store/"):
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise PublishError(f"cannot evaluate {attr}: {err[-1] if err else path!r}")
        outputs[attr] = path
    return outputs


@dataclass
class Release:
    org: str
    name: str
    version: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.org}/{self.name} {self.version}"

    def url(self, server: str) -> str:
        parts = (quote(self.org, safe=""), quote(self.name, safe=""), quote(self.version, safe=""))
        return f"{server.rstrip('/')}/api/v1/flakes/{parts[0]}/{parts[1]}/releases/{parts[2]}"

    def metadata_bytes(self) -> bytes:
        data = json.dumps(self.metadata, sort_keys=True, separators=(",", ":")).encode()
        if len(data) > MAX_METADATA:
            raise PublishError(
                f"the release's metadata is {len(data)} bytes, more than the {MAX_METADATA} "
                "the server takes (a very large flake.lock?)"
            )
        return data


def prepare(args: argparse.Namespace, checkout: Checkout) -> Release:
    """What to publish, from the arguments, the environment and the checkout."""
    org, name = flake_org_name(args.org, args.name, checkout)
    version = release_version(args.release_version, checkout)
    metadata = {
        "visibility": args.visibility,
        "description": flake_description(checkout),
        "commit": checkout.commit,
        "ref": git_ref(checkout, version),
        "lock": flake_lock(checkout),
        "outputs": flake_outputs(checkout, list(args.include_output)),
    }
    return Release(org, name, version, metadata)


# -- login and upload ------------------------------------------------------------------------


def login_params(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The login method and its params, from ``--login`` (``auto``: the CI environment)."""
    from nixd.auth.github_action import URL_VAR  # noqa: PLC0415
    from nixd.commands.login import github_action_params, gitlab_pipeline_params  # noqa: PLC0415

    method = args.login
    if method == "auto":
        if os.environ.get(URL_VAR):
            method = "github-action"
        elif os.environ.get(args.id_token_variable) or args.token_file:
            method = "gitlab-pipeline"
        else:
            raise LoginFailed(
                "no CI identity here: nixd publish runs in a GitHub Actions job with "
                f"`permissions: id-token: write` ({URL_VAR} is not set) or a GitLab CI job "
                f"with `id_tokens: {{{args.id_token_variable}: {{aud: <server URL>}}}}`"
            )
    if method == "github-action":
        return method, github_action_params(args.audience)
    if method == "gitlab-pipeline":
        return method, gitlab_pipeline_params(args.id_token_variable, args.token_file)
    from nixd.auth.token import read_api_token  # noqa: PLC0415

    return method, {"token": read_api_token(args.token_file)}


@dataclass
class Answer:
    status: int
    body: dict[str, Any]


async def _login(client: Any, server: str, method: str, params: dict[str, Any]) -> str:
    """An access token for this process (never written anywhere)."""
    from nixd.auth import methods  # noqa: PLC0415
    from nixd.auth.token import exchange_json  # noqa: PLC0415

    login = methods.from_params(method, params, server)
    token, _ = await exchange_json(client, server, await login.exchange_body(client))
    return token.value


async def _body(metadata: bytes, tarball: Path) -> AsyncIterator[bytes]:
    import trio  # noqa: PLC0415

    yield metadata
    async with await trio.open_file(tarball, "rb") as f:
        while chunk := await f.read(CHUNK):
            yield chunk


async def upload(
    server: str, method: str, params: dict[str, Any], release: Release, tarball: Path
) -> Answer:
    """Log in, then PUT the release; the server's status and JSON answer."""
    import httpx  # noqa: PLC0415

    metadata = release.metadata_bytes()
    size = os.stat(tarball).st_size
    async with httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT)) as client:
        token = await _login(client, server, method, params)
        url = release.url(server)
        try:
            response = await client.put(
                url,
                content=_body(metadata, tarball),
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": RELEASE_TYPE,
                    METADATA_HEADER: str(len(metadata)),
                    "Content-Length": str(len(metadata) + size),
                    "Accept": "application/json",
                },
            )
        except httpx.HTTPError as exc:
            from nixd.errors import UpstreamError  # noqa: PLC0415

            raise UpstreamError(f"uploading to {url} failed: {type(exc).__name__}") from exc
        raw = response.content[:MAX_METADATA]
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = raw.decode(errors="replace").strip()[:500]
        body = {"error": "http", "message": text or f"HTTP {response.status_code}"}
    return Answer(response.status_code, body)


REFUSED_CODES = {
    401: exitcodes.NOT_LOGGED_IN,
    403: exitcodes.DENIED,
    502: exitcodes.UNREACHABLE,
    503: exitcodes.UNREACHABLE,
    504: exitcodes.UNREACHABLE,
}
"""Server status → exit code of a refused publish (others: FAILURE)."""


def report(release: Release, answer: Answer, *, as_json: bool) -> int:
    """Print the outcome; the exit code."""
    if as_json:
        print(json.dumps(answer.body, indent=1, sort_keys=True))
    if answer.status == 201:
        if not as_json:
            nar_hash = answer.body.get("nar_hash") or answer.body.get("narHash") or "?"
            print(f"published {release.label} ({nar_hash})")
        return exitcodes.OK
    if answer.status == 200:
        if not as_json:
            print(f"{release.label} is already published with this content")
        return exitcodes.OK
    if not as_json:
        message = str(answer.body.get("message") or answer.body.get("error") or "")
        print(
            f"nixd: error: {release.label} was not published (HTTP {answer.status}): {message}",
            file=sys.stderr,
        )
    return REFUSED_CODES.get(answer.status, exitcodes.FAILURE)


def run_publish(args: argparse.Namespace) -> int:
    import trio  # noqa: PLC0415

    from nixd.commands.login import server_url  # noqa: PLC0415

    server = (args.server or "").rstrip("/") or server_url(args.config)
    if not server.startswith(("https://", "http://")):
        raise ConfigError(f"--server {server!r} is not an http(s) URL")
    checkout = open_checkout(args.directory)
    method, params = login_params(args)  # before evaluating anything: fail fast outside CI
    release = prepare(args, checkout)
    with tempfile.TemporaryDirectory(prefix="nixd-publish-") as tmp:
        tarball = Path(tmp) / "source.tar.gz"
        with tarball.open("wb") as out:
            pack(checkout, out)
        answer = trio.run(upload, server, method, params, release, tarball)
    return report(release, answer, as_json=args.json)
