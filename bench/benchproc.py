"""The processes of the proxy benchmark and what each of them costs.

Every process is started here and stopped by its PID: two nginx instances (direct static
serving, and an authenticating reverse proxy in front of it), a real ``nixd-server serve``
in its default configuration, the proxy (the daemon's, in a process of its own) and the
``nix copy`` clients. The cost of each is read from the kernel, not estimated:

- servers: the CPU time of the process and of every live descendant (a forked
  ``nixd-server`` worker, nginx's worker) before and after a measurement: each thread's
  ``schedstat`` nanoseconds, or ``utime + stime`` with reaped children from
  ``/proc/PID/stat`` when threads ended in between (:class:`CpuSnapshot`);
- a ``nix`` client: its own ``rusage`` from ``wait4`` (all its threads);
- requests: nginx's ``stub_status`` counter, the proxy's ``/metrics`` (requests it answered
  and requests it made upstream, which are what the nixd-server answered).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchdata import NixEnv

TICK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
START_TIMEOUT = 60.0
"""Hang guard for a server or the proxy to come up (a busy machine starts slowly)."""
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
"""Every Python child runs this tree's nixd, whatever is installed."""


def _ticks(stat: Path, *, reaped: bool = False) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def _descendants(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    out = [pid]
    with contextlib.suppress(OSError, ValueError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += _descendants(int(child))
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds (clock ticks) of ``pid``, its reaped children and live descendants."""
    total = 0
    for p in _descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += _ticks(Path(f"/proc/{p}/stat"), reaped=True)
    return total / TICK


@dataclass
class CpuSnapshot:
    """What one process tree had used at one moment, two ways.

    ``ticks``: ``utime + stime`` (with reaped children) per process, in clock ticks (10
    ms): complete, but too coarse for a few hundred small requests. ``ns``: each live
    thread's run time from ``schedstat``, in nanoseconds: exact, but blind to threads and
    children that end between two snapshots. :func:`cpu_between` takes the nanoseconds
    when they account for everything the ticks saw, and the ticks otherwise.
    """

    ticks: dict[int, int]
    ns: dict[int, dict[int, int]]


def cpu_snapshot(pid: int) -> CpuSnapshot:
    snap = CpuSnapshot({}, {})
    for p in _descendants(pid):
        try:
            snap.ticks[p] = _ticks(Path(f"/proc/{p}/stat"), reaped=True)
            threads = {}
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    threads[int(task.name)] = int((task / "schedstat").read_text().split()[0])
            snap.ns[p] = threads
        except (OSError, IndexError, ValueError):
            snap.ticks.pop(p, None)
    return snap


def cpu_between(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """CPU seconds the tree used from ``before`` to ``after`` (see :class:`CpuSnapshot`)."""
    total = 0.0
    for p, ticks in after.ticks.items():
        tick_s = (ticks - before.ticks.get(p, 0)) / TICK
        old, new = before.ns.get(p, {}), after.ns.get(p, {})
        ns_s = (sum(new.values()) - sum(v for t, v in old.items() if t in new)) / 1e9
        # each thread's ticks round down on their own: allow two per thread of slack
        slack = 2 * (len(new) + 1) / TICK
        complete = old.keys() <= new.keys() and abs(tick_s - ns_s) <= slack
        total += ns_s if complete else tick_s
    return total


def peak_rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """End one process we started: ``sig``, then SIGKILL after a while."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode:
        raise SystemExit(
            f"{' '.join(cmd[:5])} ... failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def drop_page_cache() -> bool:
    """``sync; echo 1 > /proc/sys/vm/drop_caches``; False where that is not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


# -- nginx --------------------------------------------------------------------------------

NGINX_CONF = """
user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    types {{ text/x-nix-narinfo narinfo; text/x-nix-cache-info nix-cache-info; }}
    default_type application/octet-stream;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    {body}
}}
"""

DIRECT = """
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location = /nginx-status {{ stub_status; }}
    }}
"""

RPROXY = """
    upstream cache {{
        server {upstream};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location = /nginx-status {{ stub_status; }}
        location / {{
            proxy_pass http://cache;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer nixd-bench-upstream-token";
            proxy_buffering off;
        }}
    }}
"""


class Nginx:
    """One nginx (one worker): static files, or a reverse proxy to ``upstream``."""

    def __init__(self, dir: Path, *, root: Path | None = None, upstream: str | None = None):
        self.dir = dir
        (dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if root is not None:
            body = DIRECT.format(port=self.port, root=root)
            self.kind = "static files, sendfile on, 1 worker"
        else:
            body = RPROXY.format(port=self.port, upstream=upstream)
            self.kind = "reverse proxy adding Authorization, buffering off, keepalive 32, 1 worker"
        (dir / "nginx.conf").write_text(NGINX_CONF.format(dir=dir, body=body))
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(dir / "nginx.conf"), "-p", str(dir)], stderr=subprocess.DEVNULL
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                self.requests()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"nginx did not start; see {dir}/error.log") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def requests(self) -> int:
        """Requests served so far (stub_status; this read counts itself, subtracted)."""
        with urllib.request.urlopen(f"{self.url}/nginx-status", timeout=10) as r:
            text = r.read().decode()
        return int(text.splitlines()[2].split()[2]) - 1

    def stop(self) -> None:
        stop(self.proc, signal.SIGQUIT)


# -- nixd-server --------------------------------------------------------------------------


def write_netrc(path: Path, url: str, token: str) -> Path:
    """A netrc (0600) giving ``token`` to the host of ``url``, as the daemon's does."""
    host = url.split("//", 1)[1].rsplit(":", 1)[0]
    path.write_text(f"machine {host} login nixd password {token}\n")
    path.chmod(0o600)
    return path


def exchange_token(url: str, api_token: str) -> str:
    """An access token for ``api_token`` from the server at ``url`` (urllib's HTTPError
    if it refuses)."""
    body = json.dumps({"kind": "token", "token": api_token}).encode()
    req = urllib.request.Request(
        f"{url}/api/v1/token/exchange", data=body,
        headers={"content-type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return str(json.loads(r.read())["access_token"])


@dataclass
class NixdServer:
    """A real ``nixd-server serve`` on 127.0.0.2 (default config), with a project and tokens.

    127.0.0.2, as in scripts/demo: a netrc is per host, and the proxy is on 127.0.0.1.
    """

    state: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    key: str = ""
    tokens: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str) -> str:
        return run([PY, "-m", "nixd.server.cli", *args], env=CHILD_ENV)

    def init(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)
        out = self.cli("init", str(self.state), "--org", "bench", "--listen", "127.0.0.2:0")
        self.key = re.search(r"narinfo public key:\s+(\S+)", out)[1]  # type: ignore[index]
        self.cli("project", "create", str(self.state), "bench/app")
        for name, role in (("ci", "member"), ("laptop", "reader")):
            made = self.cli(
                "token", "create", str(self.state), "--org", "bench", "--name", name,
                "--attr", f"role={role}", "--json",
            )  # fmt: skip
            self.tokens[role] = json.loads(made)["token"]

    def config(self) -> dict[str, object]:
        """The effective settings that bound its speed (defaults included)."""
        from nixd.server.config import ServerConfig  # noqa: PLC0415

        c = ServerConfig.load(self.state)
        return {
            "workers": c.server.workers,
            "audit": {k: v for k, v in dataclasses.asdict(c.audit).items() if k != "file"},
            "zstd_level": c.storage.zstd_level,
        }

    def start(self) -> None:
        address = self.state / "run" / "address"
        address.unlink(missing_ok=True)
        with (self.state / "serve.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "nixd.server.cli", "serve", str(self.state)],
                stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not (address.exists() and address.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nixd-server did not start; see {self.state}/serve.log")
            time.sleep(0.05)
        self.url = address.read_text().split()[0].rstrip("/")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def netrc(self, path: Path, role: str) -> Path:
        return write_netrc(path, self.url, self.tokens[role])

    def access_token(self) -> str:
        """A reader's access token, exchanged the way the daemon does."""
        return exchange_token(self.url, self.tokens["reader"])

    def stop(self) -> None:
        stop(self.proc)


# -- the proxy ------------------------------------------------------------------------------

DAEMON_TOML = """\
[daemon]
control_socket = "{run}/nixd.sock"
state_dir = "{run}/nixd-state"
log_level = "warning"

[server]
url = "{server}"

[proxy]
listen = "127.0.0.1:0"
store_dir = "{store}"

[nix]
nix_conf = "{run}/nixd-nix/nix.conf"
fragment = "{run}/nixd-nix/nixd.conf"
netrc = "{run}/nixd-nix/netrc"
restart_nix_daemon = false
"""


class Proxy:
    """The daemon's proxy in a process of its own (``proxy_bench.py --serve-proxy``).

    The child builds the daemon (:class:`nixd.daemon.main.Daemon`) from a daemon config
    that sets only paths, logs in with the reader token like ``nixd login token`` (or
    restores the saved login, like a restarted daemon), and runs the daemon's proxy:
    the :class:`~nixd.proxy.config.ProxyConfig` is the daemon's own ``proxy_config()``,
    whose upstream is the server's ``/cache`` (the org's view) with ``auth = "nixd"``.
    """

    def __init__(self, run_dir: Path, store: Path, server: NixdServer) -> None:
        self.run_dir = run_dir
        (run_dir / "nixd-nix").mkdir(parents=True, exist_ok=True)
        (run_dir / "nixd-nix" / "nix.conf").touch()
        self.store = store
        conf = run_dir / "daemon.toml"
        conf.write_text(DAEMON_TOML.format(run=run_dir, server=server.url, store=store))
        token = run_dir / "reader.token"
        token.write_text(server.tokens["reader"])
        token.chmod(0o600)
        spec = run_dir / "serve-proxy.json"
        spec.write_text(json.dumps({"daemon_config": str(conf), "token_file": str(token)}))
        with (run_dir / "proxy.log").open("ab") as err:
            self.proc = subprocess.Popen(
                [PY, str(Path(__file__).parent / "proxy_bench.py"), "--serve-proxy", str(spec)],
                stdout=subprocess.PIPE, stderr=err, env=CHILD_ENV,
            )  # fmt: skip
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line:
            stop(self.proc)
            raise SystemExit(f"the proxy did not start; see {run_dir}/proxy.log")
        info = json.loads(line)
        self.url: str = info["url"].rstrip("/")
        self.config: dict[str, object] = info["proxy_config"]
        secret = (run_dir / "nixd-state" / "proxy-secret").read_text().strip()
        self.secret = secret

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> dict[str, float]:
        """The proxy's series: ``name`` (labels summed) and ``name{labels}`` each."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            text = r.read().decode()
        series: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, _, value = line.rpartition(" ")
            name = re.split(r"[{ ]", key, maxsplit=1)[0]
            with contextlib.suppress(ValueError):
                series[name] = series.get(name, 0.0) + float(value)
                if key != name:
                    series[key] = float(value)
        return series

    def settle(self, quiet: float = 0.02, limit: float = 30.0) -> None:
        """Wait (bounded) until the proxy stops using CPU: work after the last byte."""
        last = tree_cpu(self.pid)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = tree_cpu(self.pid)
            if now - last < quiet:
                return
            last = now

    def stop(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.store, ignore_errors=True)


# -- the nix client -----------------------------------------------------------------------


@dataclass
class CopyResult:
    wall: float
    cpu: float
    """CPU seconds of the nix process (all threads), from wait4."""


class NixClient(NixEnv):
    """``nix copy --from URL`` into a fresh chroot store with a fresh narinfo cache."""

    def __init__(self, root: Path, trusted_keys: list[str], netrc: Path) -> None:
        super().__init__(root)
        self.keys = " ".join(trusted_keys)
        self.netrc = netrc

    def clean(self) -> None:
        for d in ("dst", "xdg"):
            shutil.rmtree(self.root / d, ignore_errors=True)

    def copy(self, url: str, paths: list[str], connections: int) -> CopyResult:
        self.clean()
        cmd = [
            "nix", "copy", "--store", str(self.root / "dst"), "--from", url,
            "--option", "trusted-public-keys", self.keys,
            "--option", "netrc-file", str(self.netrc),
            "--option", "http-connections", str(connections),
            *paths,
        ]  # fmt: skip
        err = self.root / "copy.err"
        with err.open("wb") as f:
            t = time.monotonic()
            proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=f)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.monotonic() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"nix copy --from {url} failed:\n{err.read_text()[-4000:]}")
        return CopyResult(wall, usage.ru_utime + usage.ru_stime)
