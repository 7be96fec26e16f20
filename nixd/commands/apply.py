"""``nixd apply {nixos|nix-darwin|home-manager|profile} REF``: deploy without evaluating.

Steps, each done only if the one before succeeded, so a machine is never half-deployed:

1. **Resolve** REF (``ORG/FLAKE/VERSION#OUTPUT``, the output defaulting per target) with
   :func:`nixd.commands.resolve.resolve`. The server answers only when the whole closure
   is in a slice this machine may read; otherwise it names the missing paths and nothing
   is fetched, set or run.
2. **Fetch** the closure with the real Nix, through the local daemon's proxy, so the
   proxy verifies every NAR against its signed narinfo and Nix checks the signatures
   against ``trusted-public-keys`` again as it imports into the local store. As root:
   ``nix copy --from http://127.0.0.1:PORT PATH`` (the proxy's secret is in the root-only
   netrc Nix reads); as another user: ``nix-store --realise PATH``, which the
   ``nix-daemon`` substitutes through the same proxy (nixd's nix.conf lists it).
3. **Profile and activation** per target: :mod:`nixd.commands._activation`.

**Retrying after a failure.** Nix 2.8 remembers a narinfo that was "not there" (404, and
401/403) in ``binary-cache-v6.sqlite`` under ``$XDG_CACHE_HOME`` for
``narinfo-cache-negative-ttl`` (an hour by default), and Nix's answer for a path it has
remembered as absent is the same as for one that never existed. What the proxy answers
404 (:mod:`nixd.proxy.errors`): a path every upstream said it does not have (kept in its
own short negative cache), and, on purpose, an upstream it cannot reach (not kept). So
a server that goes away mid-fetch yields 404s that a *shared* Nix cache would keep for
an hour. ``nixd apply``'s own ``nix copy`` therefore runs with an ``XDG_CACHE_HOME`` of
its own, made for the one attempt and removed after: it reads no earlier answer and
leaves none behind, whatever ``narinfo-cache-negative-ttl`` says (nixd's nix.conf sets it
to 0 anyway, which is what protects ``nix-daemon``'s substitution for non-root users).
And a fetch that fails is tried again (:data:`RETRY_DELAYS`), each time by a fresh
``nix``: long enough for the proxy to try an upstream it had marked offline again
(``offline_probe``, 2 s by default). Paths already copied stay valid in the store, so a
later attempt copies only the rest.

**Progress** (paths and bytes) is read from Nix's ``--log-format internal-json`` and
written to stderr; stdout holds only the result (text, or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from nixd import exitcodes
from nixd.commands import _activation as act
from nixd.commands._common import add_daemon_options
from nixd.commands.flake import FlakeQueryError
from nixd.commands.resolve import missing_lines, parse_ref, resolve
from nixd.errors import ConfigError, NixdError

RETRY_DELAYS = (1.0, 3.0)
"""Seconds before the second and third fetch attempts."""
PROGRESS_EVERY = 0.5
"""Least seconds between two byte-progress lines (each copied path gets one anyway)."""
ACT_COPY_PATH = 100
ACT_FILE_TRANSFER = 101
RES_PROGRESS = 105
MAX_ERROR = 4000
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
"""Nix colours its messages even in internal-json; kept text is plain."""

HELP = """\
Deploy a configuration CI built and published, with no evaluation on this machine:
resolve REF to the store path CI recorded, fetch its whole closure through the local
nixd proxy (verified, into the local store), set the profile and run the activation the
target expects.

  nixos         sets /nix/var/nix/profiles/system (for switch and boot), then runs
                OUT/bin/switch-to-configuration ACTION
  nix-darwin    sets /nix/var/nix/profiles/system, then runs OUT/activate
  home-manager  runs OUT/activate (Home Manager sets its own profile; dry-activate runs
                it with DRY_RUN=1)
  profile       sets --profile PATH, runs nothing

REF is ORG/FLAKE/VERSION[#OUTPUT]; VERSION may be a constraint (1.*, ~1.2, ^1). Without
#OUTPUT the output is the one CI records for the target (nixd publish --include-output):

  nixos         nixosConfigurations.HOSTNAME.config.system.build.toplevel
  nix-darwin    darwinConfigurations.HOSTNAME.system
  home-manager  homeConfigurations.USER.activationPackage
  profile       packages.SYSTEM.default

Nothing is fetched, set or run unless the server reports the whole closure present; the
activation program is checked before the profile changes. A fetch that fails (the server
went away) leaves no memory of the failure, so running the command again works as soon
as the server is back. --dry-run resolves and says what would change, and changes
nothing.
"""

EPILOG = """\
examples:
  nixd apply nixos acme/systems/1.*                  # this host's configuration
  nixd apply nixos acme/systems/1.4.0 --action boot
  nixd apply nix-darwin acme/macs/0.*
  nixd apply home-manager acme/homes/2.* --dry-run
  nixd apply profile 'acme/tool/0.2.*#packages.x86_64-linux.default' \\
      --profile /nix/var/nix/profiles/tool
  nixd apply nixos acme/systems/1.* --json | jq -r .store_path

On a machine given only a deploy token (nixd-server token create ... --deploy
ORG/FLAKE#OUTPUT) and logged in with nixd login token, this resolves and fetches exactly
that output's closure, and nothing else of the cache.

Progress goes to stderr; --json prints one document: target, ref, version, output,
store_path, closure, profile, previous, profile_changed, action, run (the
activation's command line), fetched {paths, downloaded, attempts}.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "apply",
        help="fetch and activate a published configuration (nixos, nix-darwin, ...)",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", choices=tuple(act.TARGETS), help="what the closure configures")
    p.add_argument(
        "ref",
        metavar="ORG/FLAKE/VERSION[#OUTPUT]",
        help="the release (version or constraint) and optionally the output attribute",
    )
    p.add_argument(
        "--action",
        choices=("switch", "boot", "test", "dry-activate"),
        help="nixos: switch-to-configuration's action (default switch); home-manager: "
        "switch or dry-activate",
    )
    p.add_argument(
        "--profile",
        metavar="PATH",
        help="the profile to set (default: /nix/var/nix/profiles/system for nixos and "
        "nix-darwin; none for home-manager; required for profile)",
    )
    p.add_argument(
        "--store",
        metavar="STORE",
        help="the Nix store to install into (default: Nix's; a path = a chroot store)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve and print what would change; fetch, set and run nothing",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON document")
    add_daemon_options(p)
    # Resolving and fetching both go through this machine's proxy, as its login.
    p.set_defaults(func=run, server=None, token_file=None)


# -- progress ---------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@dataclass
class Progress:
    """Reads Nix's internal-json log lines; writes progress and Nix's messages to ``out``.

    Paths: Nix's ``copyPath`` activities (type 100), one per path it copies (paths already
    in the store are not copied). Bytes: the progress of its file transfers (type 101) of
    NAR files, as downloaded (compressed); the closure's total is the uncompressed size
    the server reported."""

    total_paths: int
    total_bytes: int
    out: IO[str]
    present: Callable[[str], bool] = lambda path: True
    """Whether a path is in the store now (a copyPath activity also stops when it failed)."""
    clock: Callable[[], float] = time.monotonic
    copied: int = 0
    downloaded: int = 0
    errors: list[str] = field(default_factory=list)
    _paths: dict[int, str] = field(default_factory=dict)
    """copyPath activity id → its store path."""
    _transfers: dict[int, int] = field(default_factory=dict)
    """NAR transfer activity id → bytes received so far."""
    _last: float = float("-inf")

    def _line(self, text: str) -> None:
        self.out.write(f"nixd: {text}\n")
        self.out.flush()

    def _status(self, path: str) -> str:
        got = self.downloaded + sum(self._transfers.values())
        of = f" of {self.total_paths}" if self.total_paths else ""
        size = f" (closure {_mib(self.total_bytes)})" if self.total_bytes else ""
        return f"fetched {self.copied}{of} paths{size}, {_mib(got)} downloaded" + (
            f": {path}" if path else ""
        )

    def feed(self, line: str) -> None:
        if not line.startswith("@nix "):
            if line.strip():
                self.out.write(line if line.endswith("\n") else line + "\n")
            return
        try:
            event = json.loads(line[5:])
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        kind, ident, fields = event.get("action"), event.get("id"), event.get("fields") or []
        if not isinstance(fields, list):
            return
        first = fields[0] if fields else None
        if kind == "start" and isinstance(ident, int) and isinstance(first, str):
            if event.get("type") == ACT_COPY_PATH:
                self._paths[ident] = first
            elif event.get("type") == ACT_FILE_TRANSFER and "/nar/" in first:
                self._transfers[ident] = 0
        elif kind == "result" and event.get("type") == RES_PROGRESS and ident in self._transfers:
            if fields and isinstance(first, int) and not isinstance(first, bool) and first >= 0:
                assert isinstance(ident, int)
                self._transfers[ident] = first
                now = self.clock()
                if now - self._last >= PROGRESS_EVERY:
                    self._last = now
                    self._line(self._status(""))
        elif kind == "stop" and ident in self._transfers:
            assert isinstance(ident, int)
            self.downloaded += self._transfers.pop(ident)
        elif kind == "stop" and ident in self._paths:
            assert isinstance(ident, int)
            path = self._paths.pop(ident)
            if self.present(path):
                self.copied += 1
                self._last = self.clock()
                self._line(self._status(path))
        elif kind == "msg":
            level, msg = event.get("level"), event.get("msg")
            if isinstance(msg, str) and isinstance(level, int):
                msg = _ANSI.sub("", msg)
                if level == 0:
                    self.errors.append(msg)
                if level <= 1:
                    self.out.write(msg.rstrip("\n") + "\n")


# -- fetching ---------------------------------------------------------------------------


class FetchError(NixdError):
    """Nix could not fetch the closure (after the retries)."""


def fetch_command(proxy: str | None, path: str, store: str | None) -> list[str]:
    """The Nix command that fetches ``path``'s closure (see the module docstring)."""
    common = ["--log-format", "internal-json", "-v"]
    if store:
        common += ["--store", store]
    if proxy is not None:
        return [
            "nix", "copy", "--extra-experimental-features", "nix-command", "--from", proxy,
            *common, path,
        ]  # fmt: skip
    return ["nix-store", "--realise", path, *common]


def _run_nix(cmd: list[str], progress: Progress) -> int:
    cache = tempfile.mkdtemp(prefix="nixd-apply-cache-")
    try:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        with subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace",
        ) as proc:  # fmt: skip
            assert proc.stderr is not None
            for line in proc.stderr:
                progress.feed(line)
            return proc.wait()
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def fetch(
    proxy: str | None,
    path: str,
    store: str | None,
    progress: Progress,
    *,
    delays: Iterable[float] = RETRY_DELAYS,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Fetch ``path``'s closure; the number of attempts it took (FetchError if all failed)."""
    cmd = fetch_command(proxy, path, store)
    waits = [0.0, *delays]
    for attempt, wait in enumerate(waits, 1):
        if wait:
            progress._line(f"fetch failed; trying again in {wait:g} s")
            sleep(wait)
        progress.errors.clear()
        if _run_nix(cmd, progress) == 0:
            return attempt
    why = "; ".join(" ".join(e.split()) for e in progress.errors)[-MAX_ERROR:] or "nix failed"
    raise FetchError(f"fetching {path} failed after {len(waits)} attempts: {why}")


def _can_use_proxy_directly() -> bool:
    """Root reads the netrc with the proxy's secret; other users go through nix-daemon."""
    return os.geteuid() == 0


# -- the command ------------------------------------------------------------------------


def _fail(args: argparse.Namespace, code: int, message: str, missing: tuple[str, ...] = ()) -> int:
    from nixd.cliutil import error_json  # noqa: PLC0415

    if args.json:
        error = json.loads(error_json(code, message))
        if missing:
            error["error"]["missing"] = list(missing)
        print(json.dumps(error))
    else:
        lines = [f"nixd: error: {message}"]
        if missing:
            lines += ["missing from the cache (nothing was fetched or changed):"]
            lines += missing_lines(missing, len(missing))
        print("\n".join(lines), file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    target = act.TARGETS[args.target]
    ref = parse_ref(args.ref, need_output=False)
    if not ref.output:
        ref = ref.with_output(target.default_output())
    if args.store:
        act.store_root(args.store)  # refuse a non-local store before asking anything
    try:
        found = resolve(args, ref)
    except FlakeQueryError as exc:  # ResolveError, or no proxy to ask
        return _fail(args, exc.code, str(exc), getattr(exc, "missing", ()))
    try:
        p = act.plan(target, args.action, found.store_path, args.store, args.profile)
    except ConfigError as exc:
        return _fail(args, exitcodes.USAGE, str(exc))
    result: dict[str, Any] = {
        "target": target.name,
        "ref": str(ref),
        "version": found.version,
        "output": found.output,
        "store_path": found.store_path,
        "closure": {"paths": found.paths, "nar_size": found.nar_size},
        "profile": str(p.profile) if p.profile else None,
        "previous": p.previous,
        "action": p.action,
        "run": p.argv,
    }
    present = act.real_path(args.store, found.store_path).exists()
    if args.dry_run:
        result |= {
            "dry_run": True,
            "present": present,
            "profile_changed": p.changes_profile,
        }
        if args.json:
            print(json.dumps(result, indent=1, sort_keys=True))
        else:
            print(f"would apply {ref.org}/{ref.name} {found.version} {found.output}")
            print(f"  {found.store_path}")
            state = "already in the store" if present else "to fetch"
            print(f"closure: {found.paths} paths, {_mib(found.nar_size)} ({state})")
            print("\n".join(p.describe()))
        return exitcodes.OK

    try:
        act.check_writable(p)
    except act.ActivationError as exc:
        return _fail(args, exitcodes.DENIED, str(exc))
    print(
        f"nixd: {ref.org}/{ref.name} {found.version} {found.output} is {found.store_path}; "
        f"fetching its closure ({found.paths} paths, {_mib(found.nar_size)})",
        file=sys.stderr,
    )
    progress = Progress(
        found.paths,
        found.nar_size,
        sys.stderr,
        present=lambda path: act.real_path(args.store, path).exists(),
    )
    try:
        proxy = act_proxy(args) if _can_use_proxy_directly() else None
        attempts = fetch(proxy, found.store_path, args.store, progress)
        if not act.real_path(args.store, found.store_path).exists():
            raise FetchError(f"{found.store_path} is not in the store after fetching it")
        act.apply_plan(p)
    except FlakeQueryError as exc:
        return _fail(args, exc.code, str(exc))
    except FetchError as exc:
        return _fail(args, exitcodes.UNREACHABLE, f"{exc} (nothing was set or activated)")
    except act.ActivationError as exc:
        return _fail(args, exitcodes.FAILURE, str(exc))
    result |= {
        "profile_changed": p.changes_profile,
        "fetched": {"paths": progress.copied, "downloaded": progress.downloaded,
                    "attempts": attempts},
    }  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        print(found.store_path)
    return exitcodes.OK


def act_proxy(args: argparse.Namespace) -> str:
    """The local proxy's URL, from the daemon's status."""
    from nixd.commands.flake import proxy_url  # noqa: PLC0415

    return proxy_url(args)
