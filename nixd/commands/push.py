"""``nixd push``, ``nixd watch-store`` and ``nixd post-build-hook``: upload store paths.

The daemon does the upload with its own identity (:mod:`nixd.daemon.push`); these
commands only name the paths and the slice, and show the progress the daemon reports.
No token is ever handled here. ``post-build-hook`` (and ``push --queue``) only append to
the daemon's queue file and return: a build never waits for an upload and never fails
because of one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from nixd.commands._common import add_daemon_options
from nixd.errors import NixdError

POLL = 0.5
"""Seconds between progress questions to the daemon."""
BATCH = 500
"""Paths per request (the control socket takes bodies of at most 64 KiB)."""
SETTLE = 1.0
"""watch-store: seconds without news before new store entries are pushed."""
INVALID_PATIENCE = 3600.0
"""watch-store: seconds a new entry may stay invalid (being built) before it is dropped."""
INVALID_RETRY = 5.0
"""watch-store: seconds between validity checks of an entry still being built."""
_SKIP_SUFFIXES = (".lock", ".drv", ".chroot", ".check", ".tmp")

PUSH_HELP = """\
Push store paths and their closures to a slice of the cache server.

The daemon uploads with its own identity (the login of this machine): run as root or as
a member of daemon.control_group. Paths the slice already has, and paths signed by a key
of a configured upstream (cache.nixos.org, ...), are skipped. The slice is --to, else
push.to in the daemon's config.

With --queue the paths are only queued for the daemon, which pushes them in the
background; nothing waits (use it from scripts that must not block).
"""

HOOK_HELP = """\
Queue $OUT_PATHS for the daemon to push, and return at once (Nix's post-build-hook).

Nix runs the hook with no arguments, so point post-build-hook at a script:

    #!/bin/sh
    exec nixd post-build-hook

This never fails and never waits: errors are printed, the exit code is always 0, so a
build never fails because of an upload.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "push", help="push store paths to the cache", description=PUSH_HELP, formatter_class=fmt
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="store paths (or links to them)")
    p.add_argument("--to", metavar="ORG/PROJECT", help="the slice (default: push.to)")
    p.add_argument("--queue", action="store_true", help="only queue them; return at once")
    p.add_argument("--no-wait", action="store_true", help="start the push, do not wait for it")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_daemon_options(p)
    p.set_defaults(func=run_push)

    w = sub.add_parser(
        "watch-store",
        help="push every new store path until interrupted",
        description=(
            "Watch the store for new valid paths and push them (with their closures) "
            "until SIGINT/SIGTERM; then wait for the pushes started and exit."
        ),
    )
    w.add_argument("--to", metavar="ORG/PROJECT", help="the slice (default: push.to)")
    w.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    add_daemon_options(w)
    w.set_defaults(func=run_watch)

    h = sub.add_parser(
        "post-build-hook",
        help="queue $OUT_PATHS for pushing (Nix's post-build-hook); never blocks",
        description=HOOK_HELP,
        formatter_class=fmt,
    )
    h.add_argument("--to", metavar="ORG/PROJECT", help="the slice (default: push.to)")
    h.add_argument("--config", help="the daemon's config file (to find its queue)")
    h.set_defaults(func=run_hook)


# -- helpers ---------------------------------------------------------------------------------


def _config(config_arg: str | None) -> Any:
    from nixd.daemon.config import DEFAULT_CONFIG_PATH, Config, load_config  # noqa: PLC0415
    from nixd.errors import ConfigError  # noqa: PLC0415

    if config_arg:
        return load_config(config_arg)
    try:
        return load_config(DEFAULT_CONFIG_PATH)
    except ConfigError:
        return Config()


def store_paths(args: list[str], store_root: str | None = None) -> list[str]:
    """Store paths from the arguments: ``./result`` links are followed to the store."""
    out = []
    for arg in args:
        path = arg
        if not path.startswith("/nix/store/"):
            target = os.path.realpath(path)
            if store_root and target.startswith(store_root.rstrip("/") + "/nix/store/"):
                target = target[len(store_root.rstrip("/")) :]
            path = target
        parts = path.split("/")
        if len(parts) < 4 or parts[:3] != ["", "nix", "store"]:
            raise NixdError(f"{arg}: not in the Nix store")
        out.append("/".join(parts[:4]))
    return list(dict.fromkeys(out))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def progress_line(s: dict[str, Any]) -> str:
    skipped = int(s.get("skipped_present", 0)) + int(s.get("skipped_upstream", 0))
    return (
        f"[{s.get('done', 0)}/{s.get('total', 0)}] pushed {s.get('pushed', 0)}, "
        f"skipped {skipped}, failed {s.get('failed', 0)}; "
        f"{_size(float(s.get('bytes', 0)))} at {_size(float(s.get('rate', 0)))}/s"
    )


def _final(s: dict[str, Any]) -> str:
    line = (
        f"push {s.get('state')} to {s.get('to')}: {s.get('pushed', 0)} pushed, "
        f"{s.get('skipped_present', 0)} already there, "
        f"{s.get('skipped_upstream', 0)} on an upstream, {s.get('failed', 0)} failed "
        f"({_size(float(s.get('bytes', 0)))} in {float(s.get('elapsed', 0)):.1f} s)"
    )
    if s.get("error"):
        line += f"\n  error: {s['error']}"
    for path, why in dict(s.get("failures") or {}).items():
        line += f"\n  {path}: {why}"
    return line


class _Session:
    """The daemon's control socket, as the commands here use it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from nixd.daemon.client import socket_path  # noqa: PLC0415

        self.config_arg: str | None = args.config
        self.path = socket_path(args.socket, args.config)

    def call(self, method: str, endpoint: str, body: dict[str, Any] | None = None) -> Any:
        from nixd.daemon.client import call  # noqa: PLC0415

        return call(self.path, method, endpoint, body, config_arg=self.config_arg)

    def start(self, paths: list[str], to: str | None, *, skip_invalid: bool = False) -> list[Any]:
        jobs = []
        for i in range(0, len(paths), BATCH):
            body = {"paths": paths[i : i + BATCH], "to": to, "skip_invalid": skip_invalid}
            jobs.append(self.call("POST", "/push", body))
        return jobs

    def wait(self, jobs: list[dict[str, Any]], *, tty: bool) -> list[dict[str, Any]]:
        current = list(jobs)
        while True:
            current = [
                j
                if j.get("state") != "running"
                else self.call("POST", "/push/job", {"job": j["job"]})
                for j in current
            ]
            if tty:
                print("\r\033[K" + progress_line(_merge(current)), end="", file=sys.stderr)
            if all(j.get("state") != "running" for j in current):
                if tty:
                    print(file=sys.stderr)
                return current
            time.sleep(POLL)


def _merge(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for several jobs (a push split into batches)."""
    if len(jobs) == 1:
        return jobs[0]
    out: dict[str, Any] = {"job": ",".join(str(j["job"]) for j in jobs), "to": jobs[0]["to"]}
    for key in ("requested", "total", "done", "pushed", "skipped_present", "skipped_upstream",
                "failed", "bytes", "nar_bytes"):  # fmt: skip
        out[key] = sum(int(j.get(key, 0)) for j in jobs)
    out["elapsed"] = max(float(j.get("elapsed", 0)) for j in jobs)
    out["rate"] = out["bytes"] / max(out["elapsed"], 1e-6)
    states = {j.get("state") for j in jobs}
    out["state"] = "running" if "running" in states else "failed" if "failed" in states else "done"
    out["error"] = "; ".join(str(j["error"]) for j in jobs if j.get("error")) or None
    out["failures"] = {k: v for j in jobs for k, v in dict(j.get("failures") or {}).items()}
    out["invalid"] = [p for j in jobs for p in j.get("invalid") or []]
    return out


# -- commands --------------------------------------------------------------------------------


def run_push(args: argparse.Namespace) -> int:
    if args.queue:
        return _queue(args, args.paths)
    config = _config(args.config)
    paths = store_paths(args.paths, config.push.store)
    session = _Session(args)
    jobs = session.start(paths, args.to)
    if args.no_wait:
        summary = _merge(jobs)
        print(json.dumps(summary, indent=1) if args.json else f"push started: job {summary['job']}")
        return 0
    summary = _merge(session.wait(jobs, tty=sys.stderr.isatty() and not args.json))
    print(json.dumps(summary, indent=1) if args.json else _final(summary))
    return 0 if summary["state"] == "done" else 1


def _queue(args: argparse.Namespace, raw: list[str]) -> int:
    from nixd.daemon.pushqueue import enqueue  # noqa: PLC0415

    config = _config(args.config)
    paths = store_paths(raw, config.push.store)
    enqueue(config.push_queue, paths, args.to)
    if not getattr(args, "quiet", False):
        print(f"queued {len(paths)} path(s) for the daemon to push", file=sys.stderr)
    return 0


def run_hook(args: argparse.Namespace) -> int:
    """Never fails, never waits (see HOOK_HELP)."""
    try:
        raw = os.environ.get("OUT_PATHS", "").split()
        if raw:
            args.quiet = True
            _queue(args, raw)
    except BaseException as exc:  # the build must not fail because of the hook
        print(f"nixd post-build-hook: not queued: {exc}", file=sys.stderr)
    return 0


def _candidate(name: str) -> bool:
    return len(name) > 33 and name[32] == "-" and not name.endswith(_SKIP_SUFFIXES)


def run_watch(args: argparse.Namespace) -> int:
    import signal  # noqa: PLC0415

    import watchfiles  # noqa: PLC0415

    config = _config(args.config)
    root = config.push.store
    store_dir = os.path.join(root, "nix/store") if root else "/nix/store"
    session = _Session(args)
    session.call("GET", "/push")  # fail now (not logged in, no permission), not later
    tty = sys.stderr.isatty() and not args.json
    stop = {"now": False}

    def on_signal(_signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # store path -> (first seen, not before): entries appear before they are valid
    pending: dict[str, tuple[float, float]] = {}
    jobs: list[dict[str, Any]] = []
    last_news = 0.0
    watching = False

    def push_due(now: float, *, everything: bool = False) -> None:
        due = sorted(p for p, (_, t) in pending.items() if everything or t <= now)
        if not due:
            return
        seen = {p: pending.pop(p) for p in due}
        for job in session.wait(session.start(due, args.to, skip_invalid=True), tty=tty):
            jobs.append(job)
            for path in job.get("invalid") or []:
                first = seen.get(path, (now, now))[0]
                if now - first < INVALID_PATIENCE and not everything:
                    pending[path] = (first, now + INVALID_RETRY)  # still being built
        if tty and jobs:
            print(_final(_merge(jobs)), file=sys.stderr)

    for changes in watchfiles.watch(
        store_dir,
        recursive=False,
        debounce=200,
        step=50,
        rust_timeout=250,
        yield_on_timeout=True,
        stop_event=_Stop(stop),
    ):
        if not watching:  # the first (empty) yield: the watch is in place
            watching = True
            print(f"watching {store_dir}; pushing new paths (Ctrl-C to stop)", file=sys.stderr)
            sys.stderr.flush()
        now = time.monotonic()
        for change, changed in changes:
            name = os.path.basename(changed)
            if change != watchfiles.Change.deleted and _candidate(name):
                pending.setdefault(f"/nix/store/{name}", (now, now))
                last_news = now
        if pending and now - last_news >= SETTLE:
            push_due(now)
    if pending:  # stopping: one last look at what is still waiting
        push_due(time.monotonic(), everything=True)
    summary = _merge(jobs) if jobs else {"state": "done", "total": 0, "pushed": 0, "failed": 0}
    print(json.dumps(summary, indent=1) if args.json else _final(summary))
    return 0 if summary["state"] == "done" else 1


class _Stop:
    """A ``threading.Event``-like view of the signal flag, for watchfiles' stop_event."""

    def __init__(self, flag: dict[str, bool]) -> None:
        self.flag = flag

    def is_set(self) -> bool:
        return self.flag["now"]
