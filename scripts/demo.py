"""The whole nixd loop on loopback, printed step by step.

1. ``nixd-server init`` a cache server (org ``acme``, project ``acme/app``) and serve it
   on 127.0.0.2 (a netrc is per host: the proxy has 127.0.0.1).
2. Build a small closure of real, input-addressed store paths in a source store and
   upload it with ``nix copy --to`` the slice URL, authenticated by a write token.
3. Start ``nixd daemon`` with a config that keeps every file inside a temp dir, and
   ``nixd login token`` with a read-only token: the daemon exchanges it for a short-lived
   access token, pins the server's keys and writes the nix.conf include and netrc.
4. A real ``nix`` that reads only that nix.conf substitutes the closure into a fresh store
   through the daemon's verifying proxy.
5. The server is stopped, and another fresh store still gets the closure: from the
   proxy's verified local store.
6. ``nixd status``.

Run it as root (single-user Nix with chroot stores): ``scripts/demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BIN = Path(sys.executable).parent
NIXD = [str(BIN / "nixd")]
SERVER = [str(BIN / "nixd-server")]

NIX_CONF = """\
build-users-group =
sandbox = false
experimental-features = nix-command
substituters =
sandbox-paths = /bin /usr /lib /lib64
fsync-metadata = false
"""

CLOSURE = r"""
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
  greeting = mk "nixd-demo-greeting" "echo 'hello from a private cache' > $out";
  lib = mk "nixd-demo-lib" ''
    mkdir -p $out/share
    cp ${greeting} $out/share/greeting
    echo ${greeting} > $out/share/source
  '';
in mk "nixd-demo-app" ''
  mkdir -p $out/bin
  printf '#!/bin/sh\ncat ${lib}/share/greeting\n' > $out/bin/nixd-demo-app
  chmod +x $out/bin/nixd-demo-app
''
"""


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def show(cmd: Sequence[str]) -> None:
    printable = " ".join(a if " " not in a else repr(a) for a in cmd)
    print(f"  $ {printable}", flush=True)


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    quiet: bool = False,
) -> str:
    """Run ``cmd``, echo it, and fail the demo with its stderr when it fails."""
    if not quiet:
        show(cmd)
    proc = subprocess.run(
        list(cmd), input=stdin, capture_output=True, env=env, timeout=600, check=False
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace"))
        raise SystemExit(f"demo: {cmd[0]} exited {proc.returncode}")
    return proc.stdout.decode()


class World:
    """Everything the demo starts lives under one temp dir and is stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nix_conf_dir = root / "etc-nix"
        self.nix_conf_dir.mkdir()
        (self.nix_conf_dir / "nix.conf").write_text(NIX_CONF)
        for d in ("cache", "home"):
            (root / d).mkdir()
        self.env = {
            **os.environ,
            "NIX_CONF_DIR": str(self.nix_conf_dir),
            "NIX_USER_CONF_FILES": "",
            "XDG_CACHE_HOME": str(root / "cache"),
            "HOME": str(root / "home"),
            "NIX_REMOTE": "",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, name: str, cmd: Sequence[str]) -> subprocess.Popen[bytes]:
        show([*cmd, "&"])
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)

    def wait_for(self, what: str, path: Path, proc: subprocess.Popen[bytes]) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return path.read_text().strip()
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        log = next(self.root.glob("*.log"), None)
        raise SystemExit(f"demo: {what} did not come up; see {log}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--summary", type=Path, help="write a JSON summary here (for tests)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (single-user Nix with chroot stores)")
    root = Path(tempfile.mkdtemp(prefix="nixd-demo-"))
    root.chmod(0o755)
    world = World(root)
    try:
        summary = demo(world)
    finally:
        world.close()
        if args.keep:
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2))
    return 0


def demo(world: World) -> dict[str, object]:
    root, env = world.root, world.env
    state = root / "server"

    step("Set up the cache server: an org, a project (slice), keys and tokens")
    init = run([*SERVER, "init", str(state), "--org", "acme"], env=env)
    admin = re.search(r"nixd_[A-Za-z0-9_-]+", init)
    if not admin:
        raise SystemExit("demo: `nixd-server init` printed no admin token")
    run([*SERVER, "project", "create", str(state), "acme/app"], env=env)

    def token(name: str, role: str) -> str:
        cmd = [*SERVER, "token", "create", str(state), "--org", "acme", "--name", name]
        created: str = json.loads(run([*cmd, "--attr", f"role={role}", "--json"], env=env))["token"]
        return created

    writer = token("ci", "member")
    reader = token("laptop", "reader")
    print("  tokens: `ci` (role=member, writes) and `laptop` (role=reader); shown never again")

    step("Serve it on loopback")
    server = world.start("server", [*SERVER, "serve", str(state), "--listen", "127.0.0.2:0"])
    url = world.wait_for("nixd-server", state / "run" / "address", server).split()[0]
    url = url.rstrip("/")
    print(f"  listening on {url}")

    step("Build a small closure of input-addressed paths in a source store")
    src = root / "src-store"
    expr = root / "closure.nix"
    expr.write_text(CLOSURE)
    out = run(["nix-build", "--store", str(src), "--no-out-link", str(expr)], env=env)
    app = out.strip().splitlines()[-1]
    closure = run(["nix-store", "--store", str(src), "-qR", app], env=env).split()
    for path in closure:
        print(f"  {path}")

    step("Upload it with `nix copy --to` the slice URL (netrc password = the write token)")
    push_netrc = root / "push-netrc"
    push_netrc.write_text(f"machine 127.0.0.2 login ci password {writer}\n")
    push_netrc.chmod(0o600)
    to = f"{url}/cache/acme/app"
    run(
        ["nix", "copy", "--store", str(src), "--to", to, app, "--netrc-file", str(push_netrc)],
        env=env,
    )

    step("Start the nixd daemon (every file in the temp dir; in production: systemd)")
    config = root / "nixd.toml"
    sock = root / "run" / "nixd.sock"
    config.write_text(
        f"""\
[daemon]
control_socket = "{sock}"
state_dir = "{root}/nixd-state"
shutdown_grace = 2

[server]
url = "{url}"

[proxy]
listen = "127.0.0.1:0"
store_dir = "{root}/nixd-store"

[nix]
nix_conf = "{world.nix_conf_dir}/nix.conf"
fragment = "{world.nix_conf_dir}/nixd.conf"
netrc = "{world.nix_conf_dir}/nixd-netrc"
restart_nix_daemon = false
"""
    )
    daemon = world.start("daemon", [*NIXD, "daemon", "--config", str(config)])
    deadline = time.monotonic() + 60
    while not sock.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"demo: the daemon did not start; see {root}/daemon.log")
        time.sleep(0.05)

    step("Log in with the read-only token (stdin, never the command line)")
    print(run([*NIXD, "login", "token", "--socket", str(sock)], env=env, stdin=reader.encode()))
    print("  nix.conf now includes what nixd wrote:")
    print("    " + (world.nix_conf_dir / "nix.conf").read_text().strip().splitlines()[-1])
    for line in (world.nix_conf_dir / "nixd.conf").read_text().splitlines():
        print(f"    {line}")

    step("A real `nix` substitutes the closure through the proxy into a fresh store")
    dst = root / "store-1"
    run(["nix-store", "--store", str(dst), "--realise", app], env=env)
    got = run(["nix-store", "--store", str(dst), "-qR", app], env=env, quiet=True).split()
    print(f"  {len(got)} paths substituted; {app}/bin/nixd-demo-app's data file says:")
    lib_greeting = next(p for p in got if p.endswith("nixd-demo-lib"))
    text = (dst / lib_greeting.lstrip("/") / "share" / "greeting").read_text().strip()
    print(f"    {text}")

    step("Stop the server: a second fresh store is served from the proxy's verified copy")
    world.stop(server)
    dst2 = root / "store-2"
    run(["nix-store", "--store", str(dst2), "--realise", app], env=env)
    got2 = run(["nix-store", "--store", str(dst2), "-qR", app], env=env, quiet=True).split()
    print(f"  {len(got2)} paths substituted with the upstream down")

    step("nixd status")
    print(run([*NIXD, "status", "--socket", str(sock)], env=env))
    status = json.loads(
        run([*NIXD, "status", "--json", "--socket", str(sock)], env=env, quiet=True)
    )
    return {
        "closure": sorted(closure),
        "substituted": sorted(got),
        "substituted_offline": sorted(got2),
        "greeting": text,
        "status": status,
        "secrets": [writer, reader, admin.group(0)],
        "logs": {p.name: p.read_text(errors="replace") for p in root.glob("*.log")},
    }


if __name__ == "__main__":
    sys.exit(main())
