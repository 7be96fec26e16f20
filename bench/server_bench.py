"""Benchmark of nixd-server against nginx serving the very same cache as static files.

One run measures both, interleaved, and prints ratios (server / nginx), because absolute
numbers on a shared 2-core machine swing by ±30%:

1. curl download throughput of the big NAR (server with auth, nginx without);
2. ``nix copy --from`` of one big path (1 GiB by default) into a fresh chroot store;
3. ``nix copy --from`` of a 300-path closure;
4. narinfo requests/s and p99 with ``wrk -t2 -c32`` (server: Bearer token, policy, audit).

Setup (kept in BENCH_DIR, reused by later runs): a source chroot store with a random big
path and the closure; ``nixd-server init`` with a project and tokens; everything uploaded
with ``nix copy --to`` the slice URL; the static copy for nginx made of the server's own
signed narinfos and hard links to its blob files. Nothing leaves 127.0.0.1; every process
started here is stopped by its PID.

    .venv/bin/python bench/server_bench.py          # BIG_MIB=1024 RUNS=3 WRK_DURATION=10s

Environment: BENCH_DIR, BIG_MIB, RUNS, WRK_RUNS, WRK_DURATION, DURABLE_READS (the server's
``audit.durable_reads``), WORKERS, MEASURE (comma list of curl, big, closure, narinfo; all
by default). Besides wall time, the CPU seconds each server process tree spent are read from
``/proc`` around every measurement and printed per request (narinfo, closure).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

BENCH = Path(os.environ.get("BENCH_DIR", "/tmp/nixd-server-bench"))
BIG_MIB = int(os.environ.get("BIG_MIB", "1024"))
RUNS = int(os.environ.get("RUNS", "3"))
WRK_RUNS = int(os.environ.get("WRK_RUNS", "2"))
WRK_DURATION = os.environ.get("WRK_DURATION", "10s")
DURABLE_READS = os.environ.get("DURABLE_READS", "true")  # the server's audit.durable_reads
WORKERS = os.environ.get("WORKERS", "1")  # the server's worker processes
MEASURE = set(os.environ.get("MEASURE", "curl,big,closure,narinfo").split(","))
SMALL_PATHS = 300
PY = sys.executable
NIX_CONF = """\
build-users-group =
sandbox = false
experimental-features = nix-command
substituters =
fsync-metadata = false
"""
SMALL_NIX = """
let
  n = %d;
  body = i: builtins.concatStringsSep "\\n"
    (builtins.genList (j: builtins.hashString "sha512" "${toString i}/${toString j}") 32);
  node = i: builtins.toFile "bench-small-${toString i}" (body i + "\\n"
    + (if 2 * i + 1 < n then "${node (2 * i + 1)}\\n" else "")
    + (if 2 * i + 2 < n then "${node (2 * i + 2)}\\n" else ""));
in builtins.concatStringsSep "\\n" (builtins.genList node n)
"""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def nix_env(name: str) -> dict[str, str]:
    root = BENCH / "nix" / name
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "nix.conf").write_text(NIX_CONF)
    for d in ("cache", "home"):
        (root / d).mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NIX_CONF_DIR": str(root / "etc"),
        "NIX_USER_CONF_FILES": str(root / "etc" / "nix.conf"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "HOME": str(root / "home"),
        "NIX_REMOTE": "",
    }


def run(cmd: Sequence[str], env: dict[str, str] | None = None, **kw: object) -> str:
    proc = subprocess.run(
        list(cmd), env=env, capture_output=True, text=True, timeout=1800, check=False, **kw
    )  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return str(proc.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- setup ------------------------------------------------------------------------------


def make_source() -> tuple[str, list[str]]:
    src = BENCH / "src"
    env = nix_env("setup")
    big_file = BENCH / "big-path.txt"
    if not big_file.exists():
        log(f"creating a {BIG_MIB} MiB random store path")
        blob = BENCH / "big.bin"
        with blob.open("wb") as f:
            for _ in range(BIG_MIB):
                f.write(os.urandom(1 << 20))
        big_file.write_text(run(["nix-store", "--store", str(src), "--add", str(blob)], env))
        blob.unlink()
    small_file = BENCH / "small-paths.txt"
    if not small_file.exists():
        log(f"creating {SMALL_PATHS} small paths referencing each other")
        expr = BENCH / "small.nix"
        expr.write_text(SMALL_NIX % SMALL_PATHS)
        small_file.write_text(
            run(["nix", "eval", "--store", str(src), "--raw", "-f", str(expr)], env)
        )
    return big_file.read_text().strip(), small_file.read_text().split()


class Server:
    def __init__(self) -> None:
        self.state = BENCH / "server"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def cli(self, *args: str) -> str:
        return run([PY, "-m", "nixd.server.cli.main", *args])

    def setup(self) -> None:
        if not (self.state / "config.toml").exists():
            out = self.cli("init", str(self.state), "--org", "bench", "--listen", "127.0.0.1:0")
            (BENCH / "init.txt").write_text(out)
            self.cli("project", "create", str(self.state), "bench/app")
            for name, attrs in (("writer", []), ("reader", ["--attr", "role=reader"])):
                data = json.loads(
                    self.cli(
                        "token",
                        "create",
                        str(self.state),
                        "--org",
                        "bench",
                        "--name",
                        name,
                        *attrs,
                        "--json",
                    )
                )
                (BENCH / f"{name}.token").write_text(data["token"])
        config = self.state / "config.toml"
        config.write_text(
            re.sub(
                r"(?m)^durable_reads = \w+$", f"durable_reads = {DURABLE_READS}", config.read_text()
            )
        )
        self.key = re.search(r"narinfo public key:\s+(\S+)", (BENCH / "init.txt").read_text())[1]  # type: ignore[index]

    def start(self) -> None:
        address = self.state / "run" / "address"
        address.unlink(missing_ok=True)
        with (BENCH / "serve.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "nixd.server.cli.main", "serve", str(self.state), "--workers", WORKERS],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not address.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("nixd-server did not start; see serve.log")
            time.sleep(0.05)
        self.url = address.read_text().split()[0]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def netrc(self, who: str) -> Path:
        path = BENCH / f"{who}.netrc"
        token = (BENCH / f"{who}.token").read_text().strip()
        path.write_text(f"machine 127.0.0.1 login nixd password {token}\n")
        path.chmod(0o600)
        return path

    def access_token(self) -> str:
        r = httpx.post(
            f"{self.url}/api/v1/token/exchange",
            json={"kind": "token", "token": (BENCH / "reader.token").read_text().strip()},
        )
        r.raise_for_status()
        return str(r.json()["access_token"])


def upload(server: Server, paths: list[str]) -> None:
    marker = BENCH / "uploaded"
    if marker.exists():
        return
    log(f"uploading {len(paths)} paths with nix copy --to the slice URL")
    env = nix_env("upload")
    run(
        [
            "nix",
            "copy",
            "--store",
            str(BENCH / "src"),
            "--option",
            "netrc-file",
            str(server.netrc("writer")),
            "--to",
            f"{server.url}/cache/bench/app?compression=zstd",
            *paths,
        ],
        env,
    )
    marker.touch()


def make_static(server: Server, paths: list[str]) -> Path:
    """nginx's copy: the server's signed narinfos, hard links to its blobs."""
    static = BENCH / "static"
    if (static / "done").exists():
        return static
    log("building the static copy for nginx")
    shutil.rmtree(static, ignore_errors=True)
    (static / "nar").mkdir(parents=True)
    with httpx.Client(
        base_url=f"{server.url}/cache", headers={"authorization": f"Bearer {server.access_token()}"}
    ) as c:
        (static / "nix-cache-info").write_bytes(c.get("/nix-cache-info").content)
        for p in paths:
            h = Path(p).name[:32]
            text = c.get(f"/{h}.narinfo").text
            (static / f"{h}.narinfo").write_text(text)
            url = re.search(r"^URL: (\S+)$", text, re.MULTILINE)[1]  # type: ignore[index]
            blob = next((server.state / "blobs").rglob(Path(url).name))
            target = static / url
            if not target.exists():
                os.link(blob, target)
    (static / "done").touch()
    return static


class Nginx:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.dir = BENCH / "nginx"
        self.dir.mkdir(exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(f"""
user root;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  types {{ text/x-nix-narinfo narinfo; application/zstd zst; text/plain nix-cache-info; }}
  client_body_temp_path {self.dir}/tmp;
  proxy_temp_path {self.dir}/tmp;
  fastcgi_temp_path {self.dir}/tmp;
  uwsgi_temp_path {self.dir}/tmp;
  scgi_temp_path {self.dir}/tmp;
  server {{ listen 127.0.0.1:{self.port}; root {root}; }}
}}
""")
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(self.dir)], stderr=subprocess.DEVNULL
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{self.url}/nix-cache-info").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("nginx did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


# -- measurements ----------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children still running."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _TICK
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += tree_cpu(int(child))
    except (OSError, IndexError, ValueError):
        pass
    return total


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def curl_speed(url: str, netrc: Path | None) -> float:
    auth = ["--netrc-file", str(netrc)] if netrc else []
    out = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download}", *auth, url])
    return float(out) / (1 << 20)


def nix_copy(url: str, netrc: Path | None, key: str, paths: list[str], tag: str) -> float:
    dest = BENCH / f"dest-{tag}"
    env = nix_env(f"copy-{tag}")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(Path(env["XDG_CACHE_HOME"]), ignore_errors=True)
    Path(env["XDG_CACHE_HOME"]).mkdir()
    cmd = [
        "nix",
        "copy",
        "--store",
        str(dest),
        "--option",
        "trusted-public-keys",
        key,
        "--option",
        "netrc-file",
        str(netrc) if netrc else "/dev/null",
        "--from",
        url,
        *paths,
    ]
    seconds = timed(lambda: run(cmd, env))
    shutil.rmtree(dest, ignore_errors=True)
    return seconds


def wrk(url: str, headers: Sequence[str]) -> tuple[float, float, int]:
    """Requests/s, p99 ms and the number of requests."""
    hdr = [a for h in headers for a in ("-H", h)]
    out = run(["wrk", "-t2", "-c32", f"-d{WRK_DURATION}", "--latency", *hdr, url])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    count = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    ms = float(p99[1]) * scale[p99[2]] if p99 else float("nan")  # type: ignore[index]
    return rps, ms, count


def main() -> int:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return 0
    BENCH.mkdir(parents=True, exist_ok=True)
    for tool in ("nix", "nginx", "wrk", "curl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed")
    big, small = make_source()
    server = Server()
    server.setup()
    server.start()
    nginx: Nginx | None = None
    try:
        upload(server, [big, *small])
        static = make_static(server, [big, *small])
        nginx = Nginx(static)
        reader = server.netrc("reader")
        h = Path(big).name[:32]
        big_url = re.search(r"^URL: (\S+)$", (static / f"{h}.narinfo").read_text(), re.MULTILINE)[1]  # type: ignore[index]
        targets = {"server": (f"{server.url}/cache", reader), "nginx": (nginx.url, None)}
        assert server.proc is not None
        pids = {"server": server.proc.pid, "nginx": nginx.proc.pid}
        results: dict[str, dict[str, list[float]]] = {k: {} for k in targets}

        def add(name: str, metric: str, value: float) -> None:
            results[name].setdefault(metric, []).append(value)

        if "curl" in MEASURE:
            log("curl throughput")
            for _ in range(RUNS + 2):
                for name, (base, net) in targets.items():
                    add(name, "curl MiB/s", curl_speed(f"{base}/{big_url}", net))
        log(f"nix copy of the {BIG_MIB} MiB path and of the {len(small)}-path closure")
        for _ in range(RUNS if MEASURE & {"big", "closure"} else 0):
            for name, (base, net) in targets.items():
                if "big" in MEASURE:
                    add(name, "big s", nix_copy(f"{base}/", net, server.key, [big], name))
                if "closure" in MEASURE:
                    cpu = tree_cpu(pids[name])
                    add(name, "closure s", nix_copy(f"{base}/", net, server.key, small, name))
                    # 4 requests per path (NIX-PROTOCOL.md / ANCHOR-BENCH.md)
                    per = (tree_cpu(pids[name]) - cpu) / (4 * len(small)) * 1e6
                    add(name, "closure CPU us/req", per)
        jwt = server.access_token()
        small_h = Path(small[0]).name[:32]
        for _ in range(WRK_RUNS if "narinfo" in MEASURE else 0):
            log("wrk narinfo")
            for name, (base, _net) in targets.items():
                hdr = [f"Authorization: Bearer {jwt}"] if name == "server" else []
                cpu = tree_cpu(pids[name])
                rps, p99, count = wrk(f"{base}/{small_h}.narinfo", hdr)
                add(name, "narinfo req/s", rps)
                add(name, "narinfo p99 ms", p99)
                add(name, "narinfo CPU us/req", (tree_cpu(pids[name]) - cpu) / count * 1e6)
    finally:
        if nginx is not None:
            nginx.stop()
        server.stop()

    med = {n: {m: statistics.median(v) for m, v in r.items()} for n, r in results.items()}
    rows = [
        ("curl NAR download", "curl MiB/s", True, 0.5),
        (f"nix copy {BIG_MIB} MiB path", "big s", False, 0.9),
        (f"nix copy {len(small)}-path closure", "closure s", False, 0.7),
        ("  server CPU us per request", "closure CPU us/req", False, None),
        ("narinfo req/s (wrk -t2 -c32)", "narinfo req/s", True, None),
        ("narinfo p99 ms", "narinfo p99 ms", False, None),
        ("  server CPU us per request", "narinfo CPU us/req", False, None),
    ]
    print(
        f"\nnixd-server ({WORKERS} worker(s), audit.durable_reads = {DURABLE_READS}) vs nginx "
        "(1 worker) serving a static copy "
        f"of the same cache; medians of {RUNS} runs ({WRK_RUNS} for wrk)"
    )
    print(f"{'measure':34} {'nixd-server':>12} {'nginx':>12} {'ratio':>7} {'target':>8}")
    for title, metric, higher_better, target in rows:
        if metric not in med["server"]:
            continue
        s, n = med["server"][metric], med["nginx"][metric]
        ratio = s / n if higher_better else n / s
        tgt = f">= {target}" if target else ""
        if metric == "narinfo req/s":
            tgt = ">= 5000/s"
            ratio = s / n
        if metric == "narinfo p99 ms":
            tgt = "< 10 ms"
            ratio = n / s
        print(f"{title:34} {s:12.2f} {n:12.2f} {ratio:7.2f} {tgt:>8}")
    (BENCH / f"results-w{WORKERS}-durable-{DURABLE_READS}.json").write_text(
        json.dumps(results, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
