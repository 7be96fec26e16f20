"""Benchmark of nixd-server: against nginx serving the same cache, or (``--backends``) on
each of its storage configurations against SQLite + disk.

nginx comparison (the default)
------------------------------

One run measures both, interleaved, and prints ratios (server / nginx), because absolute
numbers on a shared 2-core machine swing by ±30%. By default (``MEASURE=nar,hit,miss``):

1. NAR send: curl downloads of the big NAR, CPU seconds of each server process tree per
   GiB sent (server with auth, policy and audit; nginx with sendfile);
2. narinfo hit: ``wrk -t2 -c32`` on one path's narinfo (server: Bearer token, policy,
   durable audit): req/s, p50, p99, CPU-us per request;
3. narinfo miss: the same with a random hash on every request (wrk Lua), with
   ``--paths`` (default 50,000) records in the server's database, so every miss is a
   real SQLite lookup in a database of that size, not a cached answer.

``MEASURE`` may add ``big`` (``nix copy --from`` of one big path, 1 GiB by default) and
``closure`` (``nix copy --from`` of a 300-path closure).

Setup (kept in BENCH_DIR, reused by later runs): a source chroot store with a random big
path and the closure; ``nixd-server init`` with a project and tokens; everything uploaded
with ``nix copy --to`` the slice URL; ``--paths`` synthetic records (fake NARs, never
downloaded) added to the same slice with SQL; the static copy for nginx made of the
server's own signed narinfos and hard links to its blob files. Nothing leaves 127.0.0.1;
every process started here is stopped by its PID. The server runs in its default
configuration (``audit.durable_reads = true``, ``server.workers`` as ``init`` wrote it)
unless DURABLE_READS or WORKERS say otherwise.

    .venv/bin/python bench/server_bench.py [--paths N]   # BIG_MIB=1024 RUNS=3 WRK_DURATION=10s

Environment: BENCH_DIR, BIG_MIB, RUNS, WRK_RUNS, WRK_DURATION, DURABLE_READS, WORKERS,
MEASURE (comma list of nar, hit, miss, big, closure).

Storage configurations (``--backends``)
---------------------------------------

The question: what do PostgreSQL, S3 and a second instance cost or buy, against
the embedded default? The configurations (``--configs``, default all four):

(a) **SQLite + disk**: today's default, ``nixd-server init`` as it comes: SQLite (WAL) and
    blobs in the state directory. Every ratio is against (a), measured in the same run.
(b) **PostgreSQL + disk**: ``init --database`` on a throwaway cluster of the bench's own
    (:mod:`benchstores`: the tests' ``initdb`` + ``pg_ctl`` code, Unix socket, but
    PostgreSQL's durable defaults: ``fsync`` and ``synchronous_commit`` on); blobs on disk.
(c) **PostgreSQL + S3**: (b) with ``[storage] blobs = "s3://nixd-bench/PREFIX"`` and
    ``[storage.s3] endpoint_url``/``region``, moto's server (``python -m moto.server``, a
    process of its own on a free loopback port, dummy credentials in ``AWS_*``) as S3.
    moto is a single Python process keeping objects in memory, so (c) measures the
    server's S3 path plus a slow stand-in: a real S3 is slower per request (network) but
    costs this machine no CPU. A server that refuses the config (a ConfigError at start)
    skips (c), saying why.
(d) **two instances**: two ``nixd-server serve`` on one PostgreSQL database and the same
    blobs (S3 when (c) ran, the disk otherwise), each with its own state dir holding a
    copy of the first one's config, policy and keys (as a deployment ships them). Uploads
    go to the first, downloads come from the other; the narinfo load is split: one
    ``wrk -t1 -c16`` per instance at the same moment (the same 2 threads and 32
    connections as one ``wrk -t2 -c32``), their rates summed, and set against the one
    instance with the same storage ((c), or (b)).

Every configuration gets a fresh state in each run (new state dir, new database, new S3
prefix; removed afterwards), and each run goes through all of them in a rotated order
(run 1: a b c d, run 2: b c d a, ...). Per configuration and run:

- ``nix copy --to`` the slice (``?compression=zstd``) of the 300-path closure, then of the
  big path (``--big-mib``, 1 GiB by default): wall seconds; the CPU seconds of the
  server(s), PostgreSQL and moto;
- ``nix copy --from`` ``/cache/`` of both into an empty store with a fresh narinfo cache;
- narinfo hits (the nginx comparison's ``hit``: a reader's access token, policy, durable
  audit): req/s, p50/p99 (for (d) the worse of the two), CPU-us per request of the
  server process trees (and of server + PostgreSQL + moto), and the cores each process
  used while wrk ran, ``everything else`` being the rest of the machine (other users of
  the 2 cores) from ``/proc/stat``: this is what says what bounds (d) (two instances,
  wrk and PostgreSQL share 2 cores).

How to read the table: one line per measure and configuration, the median over the runs;
``ratio`` is (a)'s figure over this one's for times and CPU, this one's over (a)'s for
rates, so > 1 is better than (a) and 0.7 means 30% worse. Targets: (c) within
0.7 of (a) for narinfo req/s and the closure copies; (d) >= 1.6 x one instance's rate,
or the CPU line shows the cores were all in use. Every sample is written to
``BENCH_DIR/results-backends.json``.

    # the full measurement (a quiet machine; about 15 minutes)
    .venv/bin/python bench/server_bench.py --backends --runs 3 --wrk-runs 2 --wrk-duration 10s
    # a quick check that it works (figures are noise)
    .venv/bin/python bench/server_bench.py --backends --big-mib 16 --runs 1 --wrk-runs 1 \\
        --wrk-duration 3s

Options: ``--configs a,b,c,d``, ``--measure hit,closure,big``, ``--big-mib``, ``--closure``
(300 paths), ``--runs``, ``--wrk-runs``, ``--wrk-duration``, ``--workers`` (serve
--workers), ``--durable-reads``. BENCH_DIR says where (default /tmp/nixd-server-bench).
"""

from __future__ import annotations

import argparse
import contextlib
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
from dataclasses import dataclass
from pathlib import Path

import httpx
from benchproc import CpuSnapshot, cpu_between, cpu_snapshot
from benchstores import Instance, MotoS3, Postgres, Refused, postgres

BENCH = Path(os.environ.get("BENCH_DIR", "/tmp/nixd-server-bench"))
BIG_MIB = int(os.environ.get("BIG_MIB", "1024"))
RUNS = int(os.environ.get("RUNS", "3"))
WRK_RUNS = int(os.environ.get("WRK_RUNS", "2"))
WRK_DURATION = os.environ.get("WRK_DURATION", "10s")
DURABLE_READS = os.environ.get("DURABLE_READS", "true")  # the server's audit.durable_reads
WORKERS = os.environ.get("WORKERS", "")  # the server's worker processes; "" = its config
MEASURE = set(os.environ.get("MEASURE", "nar,hit,miss").split(","))
NAR_GETS = 4  # big NAR downloads per NAR-send measurement
MISS_LUA = """
local chars = "0123456789abcdfghijklmnpqrsvwxyz"
math.randomseed(os.time())
request = function()
  local t = {}
  for i = 1, 32 do
    local n = math.random(1, 32)
    t[i] = chars:sub(n, n)
  end
  return wrk.format(nil, wrk.path .. table.concat(t) .. ".narinfo")
end
"""
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


def make_source(
    big_mib: int = BIG_MIB,
    big_name: str = "big-path.txt",
    closure: int = SMALL_PATHS,
    small_name: str = "small-paths.txt",
) -> tuple[str, list[str]]:
    """The source store's big path (``big_mib`` random MiB) and ``closure`` small paths,
    each made once (``big_name`` and ``small_name`` remember them)."""
    src = BENCH / "src"
    env = nix_env("setup")
    big_file = BENCH / big_name
    if not big_file.exists():
        log(f"creating a {big_mib} MiB random store path")
        blob = BENCH / f"big-{big_mib}M.bin"
        with blob.open("wb") as f:
            for _ in range(big_mib):
                f.write(os.urandom(1 << 20))
        big_file.write_text(run(["nix-store", "--store", str(src), "--add", str(blob)], env))
        blob.unlink()
    small_file = BENCH / small_name
    if not small_file.exists():
        log(f"creating {closure} small paths referencing each other")
        expr = BENCH / "small.nix"
        expr.write_text(SMALL_NIX % closure)
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
            workers = ["--workers", WORKERS] if WORKERS else []
            self.proc = subprocess.Popen(
                [PY, "-m", "nixd.server.cli.main", "serve", str(self.state), *workers],
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


def add_paths(server: Server, count: int) -> None:
    """``count`` synthetic records in bench/app (SQL, one transaction), made once.

    Each has its own fake NAR row (never downloaded): what matters is the database's
    size, so that a narinfo miss is an index lookup in a database of that many paths.
    """
    import hashlib  # noqa: PLC0415
    import sqlite3  # noqa: PLC0415

    marker = BENCH / "synthetic-paths"
    if marker.exists() and int(marker.read_text()) >= count:
        return
    log(f"adding {count} synthetic path records to bench/app")
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"

    def nix32(seed: bytes) -> str:
        digest = hashlib.sha256(seed).digest()
        return "".join(alphabet[b % 32] for b in digest[:32])

    conn = sqlite3.connect(server.state / "server.db", timeout=60)
    try:
        (project_id,) = conn.execute(
            "SELECT pr.id FROM projects pr JOIN orgs o ON o.id = pr.org_id "
            "WHERE o.name = 'bench' AND pr.name = 'app'"
        ).fetchone()
        now = time.time()
        nars = []
        records = []
        for n in range(count):
            nar_hash = "sha256:" + nix32(b"nar %d" % n) + "x" * 20
            nars.append((nar_hash, 1000 + n, nix32(b"file %d" % n) + "zz" * 10, 900 + n, now))
            records.append(
                (
                    project_id,
                    nix32(b"path %d" % n),
                    f"synthetic-{n}",
                    nar_hash,
                    "",
                    None,
                    "x86_64-linux",
                    None,
                    "token:bench/bench",
                    now,
                )
            )
        with conn:
            conn.executemany("INSERT OR IGNORE INTO nars VALUES (?, ?, ?, ?, ?)", nars)
            conn.executemany(
                "INSERT OR IGNORE INTO slice_records (project_id, hash_part, name, nar_hash, "
                "refs, deriver, system, ca, uploader, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                records,
            )
    finally:
        conn.close()
    marker.write_text(str(count))


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


def wrk(url: str, headers: Sequence[str], script: Path | None = None) -> dict[str, float]:
    """Requests/s, p50 and p99 in ms, and the number of requests (``count``)."""
    hdr = [a for h in headers for a in ("-H", h)]
    lua = ["-s", str(script)] if script else []
    out = run(["wrk", "-t2", "-c32", f"-d{WRK_DURATION}", "--latency", *lua, *hdr, url])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    count = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    result = {"req/s": rps, "count": float(count)}
    for pct in ("50", "99"):
        m = re.search(pct + r"%\s+([\d.]+)(us|ms|s)\b", out)
        result[f"p{pct} ms"] = float(m[1]) * scale[m[2]] if m else float("nan")
    return result


# -- storage configurations (--backends) ------------------------------------------------

CONFIGS = {
    "a": "SQLite + disk",
    "b": "PostgreSQL + disk",
    "c": "PostgreSQL + S3",
    "d": "2 instances, PostgreSQL + shared blobs",
}
"""The ``--backends`` configurations; ratios are against (a), measured in the same run."""


@dataclass
class Setup:
    """What one configuration runs on in one run (its instances, and what they share)."""

    name: str
    instances: list[Instance]
    database: str | None
    blobs: str
    """"disk" or "S3"."""

    def procs(self, pg: Postgres | None, s3: MotoS3 | None) -> dict[str, list[int]]:
        """Each component's process trees, by the name the CPU table gives them."""
        out = {"nixd-server": [i.pid for i in self.instances]}
        if self.database and pg is not None:
            out["PostgreSQL"] = [pg.pid]
        if self.blobs == "S3" and s3 is not None:
            out["moto S3"] = [s3.pid]
        return out


def snapshot(procs: dict[str, list[int]]) -> dict[str, list[CpuSnapshot]]:
    return {name: [cpu_snapshot(p) for p in pids] for name, pids in procs.items()}


def cpu_used(before: dict[str, list[CpuSnapshot]], procs: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds each component used since ``before`` (every tree of it summed)."""
    after = snapshot(procs)
    return {
        name: sum(cpu_between(b, a) for b, a in zip(before[name], after[name], strict=True))
        for name in procs
    }


def warm_source(paths: list[str]) -> None:
    """Read every file of ``paths`` in the source store, and start ``nix`` once, so that
    the first configuration of the first run does not pay for a cold page cache."""
    for p in paths:
        root = BENCH / "src" / p.lstrip("/")
        files = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()]
        for f in files:
            with f.open("rb") as src:
                while src.read(1 << 20):
                    pass
    run(["nix", "--version"], nix_env("setup"))


def machine_busy() -> float:
    """CPU seconds every core of the machine has been busy (not idle, not iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def nix_copy_to(url: str, netrc: Path, paths: list[str], tag: str) -> float:
    """Seconds of ``nix copy --to SLICE?compression=zstd`` from the source store."""
    env = nix_env(f"up-{tag}")
    shutil.rmtree(Path(env["XDG_CACHE_HOME"]), ignore_errors=True)
    Path(env["XDG_CACHE_HOME"]).mkdir()
    cmd = [
        "nix", "copy", "--store", str(BENCH / "src"),
        "--option", "netrc-file", str(netrc),
        "--to", f"{url}/cache/bench/app?compression=zstd", *paths,
    ]  # fmt: skip
    return timed(lambda: run(cmd, env))


def wrk_at_once(
    urls: list[tuple[str, str]], threads: int, conns: int, duration: str
) -> tuple[dict[str, float], float, float]:
    """One ``wrk`` per (url, bearer) at the same time: summed req/s and count, the worst
    p50/p99, the wall seconds and the CPU seconds of all the wrk processes (wait4)."""
    procs = []
    for n, (url, bearer) in enumerate(urls):
        out = (BENCH / f"wrk-{n}.out").open("wb")
        cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}", "--latency",
               "-H", f"Authorization: Bearer {bearer}", url]  # fmt: skip
        procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), out))
    t = time.monotonic()
    cpu = 0.0
    for proc, out in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.close()
        cpu += usage.ru_utime + usage.ru_stime
    wall = time.monotonic() - t
    total = {"req/s": 0.0, "count": 0.0, "p50 ms": 0.0, "p99 ms": 0.0}
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    for n, (proc, _) in enumerate(procs):
        text = (BENCH / f"wrk-{n}.out").read_text()
        if proc.returncode or "Requests/sec" not in text:
            raise SystemExit(f"wrk failed ({proc.returncode}):\n{text[-2000:]}")
        if re.search(r"Non-2xx or 3xx responses: (\d+)", text):
            raise SystemExit(f"wrk saw errors (is the token right?):\n{text[-2000:]}")
        total["req/s"] += float(re.search(r"Requests/sec:\s+([\d.]+)", text)[1])  # type: ignore[index]
        total["count"] += int(re.search(r"(\d+) requests in", text)[1])  # type: ignore[index]
        for pct in ("50", "99"):
            m = re.search(pct + r"%\s+([\d.]+)(us|ms|s)\b", text)
            value = float(m[1]) * scale[m[2]] if m else float("nan")
            total[f"p{pct} ms"] = max(total[f"p{pct} ms"], value)
    return total, wall, cpu


class Backends:
    """The ``--backends`` run: every configuration per run, alternating, fresh state each."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.base = BENCH / "backends"
        self.base.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict[str, list[float]]] = {c: {} for c in opts.configs}
        self.skipped: dict[str, str] = {}
        self.described: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        """Short names for the table: storage, instances x workers, durable audit."""
        self.pg: Postgres | None = None
        self.s3: MotoS3 | None = None

    def add(self, config: str, metric: str, value: float) -> None:
        self.results[config].setdefault(metric, []).append(value)

    def d_blobs(self) -> str:
        """(d) shares S3 when (c) runs here and the server took it, the disk otherwise."""
        return "S3" if "c" in self.opts.configs and "c" not in self.skipped else "disk"

    def setup(self, config: str, run_no: int) -> Setup:
        assert self.pg is not None
        name = f"{config}-r{run_no}"
        state = self.base / name
        database = None if config == "a" else self.pg.fresh_database(f"bench_{config}_{run_no}")
        blobs = "S3" if config == "c" or (config == "d" and self.d_blobs() == "S3") else "disk"
        first = Instance(state, self.opts.workers)
        first.init(database, self.opts.durable_reads)
        if blobs == "S3":
            assert self.s3 is not None
            blobs_url, s3_keys = self.s3.config(name)
            first.set_blobs(blobs_url, s3_keys)
        instances = [first]
        if config == "d":
            instances.append(first.twin(self.base / f"{name}-twin"))
        return Setup(name, instances, database, blobs)

    def teardown(self, setup: Setup) -> None:
        for inst in setup.instances:
            inst.stop()
            shutil.rmtree(inst.state, ignore_errors=True)
        if setup.database and self.pg is not None:
            self.pg.drop(setup.database.split("///", 1)[1].split("?", 1)[0])
        if setup.blobs == "S3" and self.s3 is not None:
            self.s3.reset()

    def measure(self, config: str, run_no: int, big: str, small: list[str]) -> None:
        opts = self.opts
        setup = self.setup(config, run_no)
        try:
            for inst in setup.instances:
                inst.start()
            procs = setup.procs(self.pg, self.s3)
            first, last = setup.instances[0], setup.instances[-1]
            settings = first.settings()
            durable = str(settings["durable_reads"]).lower()
            metadata = "SQLite" if setup.database is None else "PG"
            self.tags[config] = (
                f"{metadata}+{setup.blobs} {len(setup.instances)}x{settings['workers']}w"
                f"{' durable' if settings['durable_reads'] else ''}"
            )
            self.described[config] = (
                f"{len(setup.instances)} instance(s) x {settings['workers']} worker(s), "
                f"metadata {'SQLite' if setup.database is None else 'PostgreSQL'}, "
                f"blobs {setup.blobs}, audit.durable_reads = {durable}"
            )
            writer = first.netrc(self.base / "writer.netrc", "member")
            reader = last.netrc(self.base / "reader.netrc", "reader")
            copies = [("closure", small), ("big", [big])]
            for what, paths in copies:
                if what not in opts.measure:
                    continue
                log(f"({config}) nix copy --to, {what}")
                before = snapshot(procs)
                self.add(config, f"up {what} s", nix_copy_to(first.url, writer, paths, config))
                for comp, cpu in cpu_used(before, procs).items():
                    self.add(config, f"up {what} CPU-s {comp}", cpu)
            for what, paths in copies:
                if what not in opts.measure:
                    continue
                other = " the other instance" if config == "d" else ""
                log(f"({config}) nix copy --from{other}, {what}")
                before = snapshot(procs)
                seconds = nix_copy(f"{last.url}/cache/", reader, first.key, paths, config)
                self.add(config, f"down {what} s", seconds)
                for comp, cpu in cpu_used(before, procs).items():
                    self.add(config, f"down {what} CPU-s {comp}", cpu)
            if "hit" in opts.measure:
                hit = Path(small[0]).name[:32]
                targets = [
                    (f"{i.url}/cache/{hit}.narinfo", i.access_token()) for i in setup.instances
                ]
                n = len(targets)
                threads, conns = max(1, 2 // n), max(1, 32 // n)
                for _ in range(opts.wrk_runs):
                    how = f"{n} x -t{threads} -c{conns} {opts.wrk_duration}"
                    log(f"({config}) wrk narinfo hit, {how}")
                    before, busy = snapshot(procs), machine_busy()
                    got, wall, wrk_cpu = wrk_at_once(targets, threads, conns, opts.wrk_duration)
                    used = cpu_used(before, procs)
                    others = machine_busy() - busy - sum(used.values()) - wrk_cpu
                    for metric in ("req/s", "p50 ms", "p99 ms"):
                        self.add(config, f"hit {metric}", got[metric])
                    self.add(config, "hit CPU-us/req", used["nixd-server"] / got["count"] * 1e6)
                    self.add(config, "hit CPU-us/req all", sum(used.values()) / got["count"] * 1e6)
                    everything = {**used, "wrk": wrk_cpu, "everything else": max(0.0, others)}
                    for comp, cpu in everything.items():
                        self.add(config, f"hit cores {comp}", cpu / wall)
        finally:
            self.teardown(setup)

    def run(self) -> None:
        opts = self.opts
        big, small = make_source(
            opts.big_mib, f"big-{opts.big_mib}M-path.txt", opts.closure, f"small-{opts.closure}.txt"
        )
        warm_source([big, *small])
        needs_s3 = "c" in opts.configs or "d" in opts.configs
        with contextlib.ExitStack() as stack:
            self.pg = stack.enter_context(postgres())
            if needs_s3:
                self.s3 = MotoS3(self.base)
                stack.callback(self.s3.stop)
            for run_no in range(opts.runs):
                shift = run_no % len(opts.configs)
                order = opts.configs[shift:] + opts.configs[:shift]
                if run_no == 0 and "c" in order and "d" in order:  # (d) asks whether (c) ran
                    order.remove("c")
                    order.insert(order.index("d"), "c")
                for config in order:
                    if config in self.skipped:
                        continue
                    log(f"run {run_no + 1}/{opts.runs}: ({config}) {CONFIGS[config]}")
                    try:
                        self.measure(config, run_no, big, small)
                    except Refused as exc:
                        if config != "c":
                            raise SystemExit(
                                f"({config}) the server refused to start: {exc}"
                            ) from None
                        self.skipped[config] = str(exc)
                        log(f"({config}) skipped: the server refuses the s3:// blobs config: {exc}")
                        del self.results[config]
        self.report(len(small))

    def report(self, closure: int) -> None:
        opts = self.opts
        med = {c: {m: statistics.median(v) for m, v in r.items()} for c, r in self.results.items()}
        print(
            f"\nnixd-server storage configurations: medians of {opts.runs} run(s), the "
            "configurations alternating in each; ratio = against (a) in the same run, "
            "> 1 is better than (a)"
        )
        for config in opts.configs:
            what = self.described.get(config, "")
            if config in self.skipped:
                what = f"SKIPPED: {self.skipped[config]}"
            label = CONFIGS[config]
            if config == "d":
                label = f"2 instances, PostgreSQL + {self.d_blobs()}"
            print(f"  ({config}) {label:38} {what}")
        one = "c" if self.d_blobs() == "S3" else "b"
        copies = f"wall, median of {opts.runs}"
        rows = [
            ("narinfo hit req/s", "hit req/s", True, ""),
            ("narinfo hit p99 ms", "hit p99 ms", False, ""),
            ("narinfo hit CPU-us/req, nixd-server", "hit CPU-us/req", False, ""),
            ("narinfo hit CPU-us/req, +PG +S3", "hit CPU-us/req all", False, ""),
            (f"nix copy --to {closure} paths s", "up closure s", False, f"zstd, {copies}"),
            (f"nix copy --from {closure} paths s", "down closure s", False,
             f"{copies} (d: from the other instance)"),
            (f"nix copy --to {opts.big_mib} MiB path s", "up big s", False, f"zstd, {copies}"),
            (f"nix copy --from {opts.big_mib} MiB path s", "down big s", False,
             f"{copies} (d: from the other instance)"),
        ]  # fmt: skip
        targets = {
            ("c", "hit req/s"): ">= 0.7", ("c", "up closure s"): ">= 0.7",
            ("c", "down closure s"): ">= 0.7",
        }  # fmt: skip
        a = med.get("a", {})
        samples = f"{opts.wrk_duration} x {opts.runs * opts.wrk_runs}"
        wrk_how = {c: f"wrk -t2 -c32 {samples}" for c in med}
        if "d" in wrk_how:
            wrk_how["d"] = f"2 wrk -t1 -c16 at once, summed, {samples}"
        print(f"\n{'measure':38} {'configuration':29} {'value':>9} {'ratio':>5} {'target':>6}  how")
        for title, metric, higher, how in rows:
            for config, figures in med.items():
                if metric not in figures:
                    continue
                value = figures[metric]
                ref = a.get(metric)
                ratio = float("nan")
                if ref and value:
                    ratio = value / ref if higher else ref / value
                note = wrk_how[config] if metric.startswith("hit ") else how
                if metric == "hit p99 ms" and config == "d":
                    note += ", the worse of the two"
                target = targets.get((config, metric), "")
                if config == "d" and metric == "hit req/s" and med.get(one, {}).get(metric):
                    vs = value / med[one][metric]
                    note += f"; {vs:.2f} x one instance ({one}), target >= 1.6"
                tag = f"({config}) {self.tags.get(config, '')}"
                print(f"{title:38} {tag:29} {value:9.2f} {ratio:5.2f} {target:>6}  {note}")
        cores = os.cpu_count()
        print(
            f"\nCPU while wrk ran (cores of the machine's {cores}; what bounds the narinfo rate):"
        )
        for config, figures in med.items():
            parts = [
                f"{metric.removeprefix('hit cores ')} {value:.2f}"
                for metric, value in figures.items() if metric.startswith("hit cores ")
            ]  # fmt: skip
            busy = sum(v for m, v in figures.items() if m.startswith("hit cores "))
            if parts:
                full = " (every core busy: CPU-bound)" if busy >= 0.9 * (cores or 1) else ""
                print(f"  ({config}) " + ", ".join(parts) + f"; busy {busy:.2f} of {cores}{full}")
        print("\nCPU seconds per copy (nixd-server / PostgreSQL / S3):")
        for config, figures in med.items():
            for phase in ("up closure", "down closure", "up big", "down big"):
                parts = [
                    f"{metric.split('CPU-s ', 1)[1]} {value:.2f}"
                    for metric, value in figures.items()
                    if metric.startswith(f"{phase} CPU-s ")
                ]
                if parts:
                    print(f"  ({config}) {phase:13} " + ", ".join(parts))
        out = BENCH / "results-backends.json"
        out.write_text(
            json.dumps(
                {"configs": self.described, "skipped": self.skipped, "runs": self.results}, indent=2
            )
        )
        log(f"every sample: {out}")


def backends_options(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="server_bench.py --backends")
    p.add_argument("--backends", action="store_true", required=True)
    p.add_argument("--configs", default="a,b,c,d", help="comma list of a, b, c, d")
    p.add_argument("--big-mib", type=int, default=BIG_MIB, help="the big path's size (1024)")
    p.add_argument("--closure", type=int, default=SMALL_PATHS, help="small paths (300)")
    p.add_argument("--runs", type=int, default=RUNS)
    p.add_argument("--wrk-runs", type=int, default=WRK_RUNS, help="wrk runs per run and config")
    p.add_argument("--wrk-duration", default=WRK_DURATION)
    p.add_argument("--workers", default=WORKERS, help="serve --workers (default: the config's)")
    p.add_argument("--durable-reads", default=DURABLE_READS, choices=("true", "false"))
    p.add_argument("--measure", default="hit,closure,big", help="comma list of hit, closure, big")
    opts = p.parse_args(argv)
    opts.configs = [c for c in opts.configs.split(",") if c]
    if not opts.configs or set(opts.configs) - set(CONFIGS):
        p.error(f"--configs: a comma list of {', '.join(CONFIGS)}")
    opts.measure = set(opts.measure.split(","))
    return opts


def main() -> int:
    if "--backends" in sys.argv[1:]:
        Backends(backends_options(sys.argv[1:])).run()
        return 0
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return 0
    paths = 50_000
    if "--paths" in sys.argv[1:]:
        paths = int(sys.argv[sys.argv.index("--paths") + 1])
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
        if paths and MEASURE & {"hit", "miss"}:
            server.stop()  # the records go in while nobody serves (one big write)
            add_paths(server, paths)
            server.start()
        nginx = Nginx(static)
        reader = server.netrc("reader")
        h = Path(big).name[:32]
        big_url = re.search(r"^URL: (\S+)$", (static / f"{h}.narinfo").read_text(), re.MULTILINE)[1]  # type: ignore[index]
        big_size = (static / big_url).stat().st_size
        targets = {"server": (f"{server.url}/cache", reader), "nginx": (nginx.url, None)}
        assert server.proc is not None
        pids = {"server": server.proc.pid, "nginx": nginx.proc.pid}
        results: dict[str, dict[str, list[float]]] = {k: {} for k in targets}

        def add(name: str, metric: str, value: float) -> None:
            results[name].setdefault(metric, []).append(value)

        if "nar" in MEASURE:
            log(f"NAR send: {NAR_GETS} curl downloads of the {big_size >> 20} MiB NAR per run")
            for base, net in targets.values():
                curl_speed(f"{base}/{big_url}", net)  # warm the page cache
            for _ in range(RUNS):
                for name, (base, net) in targets.items():
                    cpu = tree_cpu(pids[name])
                    speeds = [curl_speed(f"{base}/{big_url}", net) for _ in range(NAR_GETS)]
                    gib = NAR_GETS * big_size / (1 << 30)
                    add(name, "NAR CPU-s/GiB", (tree_cpu(pids[name]) - cpu) / gib)
                    add(name, "NAR MiB/s", statistics.median(speeds))
        if MEASURE & {"big", "closure"}:
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
        miss_lua = BENCH / "miss.lua"
        miss_lua.write_text(MISS_LUA)
        kinds = [k for k in ("hit", "miss") if k in MEASURE]
        for _ in range(WRK_RUNS if kinds else 0):
            for kind in kinds:
                log(f"wrk narinfo {kind}")
                for name, (base, _net) in targets.items():
                    hdr = [f"Authorization: Bearer {jwt}"] if name == "server" else []
                    cpu = tree_cpu(pids[name])
                    if kind == "hit":
                        got = wrk(f"{base}/{small_h}.narinfo", hdr)
                    else:
                        got = wrk(f"{base}/", hdr, miss_lua)
                    for metric in ("req/s", "p50 ms", "p99 ms"):
                        add(name, f"{kind} {metric}", got[metric])
                    per = (tree_cpu(pids[name]) - cpu) / got["count"] * 1e6
                    add(name, f"{kind} CPU us/req", per)
    finally:
        if nginx is not None:
            nginx.stop()
        server.stop()

    med = {n: {m: statistics.median(v) for m, v in r.items()} for n, r in results.items()}
    # (title, metric, higher is better, target for the server)
    rows: list[tuple[str, str, bool, str]] = [
        ("NAR send CPU-s/GiB", "NAR CPU-s/GiB", False, "<= 0.4"),
        ("NAR send MiB/s (curl)", "NAR MiB/s", True, ""),
        (f"nix copy {BIG_MIB} MiB path s", "big s", False, ""),
        (f"nix copy {len(small)}-path closure s", "closure s", False, ""),
        ("  CPU us per request", "closure CPU us/req", False, ""),
    ]
    for kind, what in (("hit", "narinfo hit"), ("miss", f"narinfo miss ({paths} paths)")):
        rows += [
            (f"{what} req/s", f"{kind} req/s", True, ">= 5000" if kind == "hit" else ""),
            (f"{what} p50 ms", f"{kind} p50 ms", False, ""),
            (f"{what} p99 ms", f"{kind} p99 ms", False, "< 10" if kind == "hit" else ""),
            (f"{what} CPU us/req", f"{kind} CPU us/req", False, "<= 120" if kind == "hit" else ""),
        ]
    workers = WORKERS or "config default"
    print(
        f"\nnixd-server (workers: {workers}, audit.durable_reads = {DURABLE_READS}) vs nginx "
        f"(1 worker) serving a static copy of the same cache; wrk -t2 -c32 {WRK_DURATION}; "
        f"medians of {RUNS} runs ({WRK_RUNS} for wrk)"
    )
    print(f"{'measure':40} {'nixd-server':>12} {'nginx':>10} {'ratio':>7} {'target':>8}")
    for title, metric, higher_better, target in rows:
        if metric not in med["server"]:
            continue
        srv, ngx = med["server"][metric], med["nginx"][metric]
        ratio = (srv / ngx if higher_better else ngx / srv) if srv and ngx else float("nan")
        print(f"{title:40} {srv:12.2f} {ngx:10.2f} {ratio:7.2f} {target:>8}")
    (BENCH / f"results-w{WORKERS or 'default'}-durable-{DURABLE_READS}.json").write_text(
        json.dumps(results, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
