"""Benchmark of the local proxy substituter against nginx serving the same cache directly.

One run, references measured in the same run (see ANCHOR-BENCH.md), rounds interleaved:

- ``nix copy --from`` of one big path (default 1 GiB of random data, uncompressed NAR):
  nginx direct, nginx as a reverse proxy adding ``Authorization`` (buffering off, upstream
  keep-alive), through the proxy cold (from nginx, verifying, filling its store) and
  warm (from its local store); printed as ratios of wall time against direct;
- the same for a closure of ``--closure`` (300) small paths, each referencing two others
  (per-request latency bound: Nix makes ~4 requests per path);
- narinfo requests/s with ``wrk -t2 -c32`` and p50/p99 latency, proxy vs nginx direct,
  with the CPU-microseconds each server spends per request;
- peak RSS of a fresh proxy process while it streams one NAR of ``--size-mib`` and one of
  twice that (cold: downloading, hashing, verifying, storing; then warm), to show it
  flat in NAR size.

Usage: ``.venv/bin/python bench/proxy_bench.py [--size-mib 1024] [--rounds 3]``.
The proxy runs in its own process (``--serve-proxy CONFIG``) so it is measured like nginx.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

NIX_CONF = "build-users-group =\nsandbox = false\nexperimental-features = nix-command\n"
NIX_CONF += "substituters =\nfsync-metadata = false\n"

NGINX_CONF = """
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        default_type application/octet-stream;
    }}
    upstream cache {{
        server 127.0.0.1:{port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{rport};
        location / {{
            proxy_pass http://cache;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer bench-token";
            proxy_buffering off;
        }}
    }}
}}
"""


def serve_proxy_main(config_file: str) -> None:
    """Child mode: run the proxy from a JSON config and print its URL on stdout."""
    import trio  # noqa: PLC0415

    from nixd.proxy.config import ProxyConfig, UpstreamConfig  # noqa: PLC0415
    from nixd.proxy.server import serve_proxy  # noqa: PLC0415

    raw = json.loads(Path(config_file).read_text())
    ups = tuple(
        UpstreamConfig(**{**u, "trusted_keys": tuple(u["trusted_keys"])})
        for u in raw.pop("upstreams")
    )
    config = ProxyConfig(**raw, upstreams=ups)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve_proxy, config, None)
            print(handle.url, flush=True)

    trio.run(main)


class Env:
    def __init__(self, work: Path) -> None:
        self.work = work
        (work / "etc").mkdir(parents=True, exist_ok=True)
        (work / "etc" / "nix.conf").write_text(NIX_CONF)
        self.env = {
            "PATH": os.environ["PATH"],
            "NIX_CONF_DIR": str(work / "etc"),
            "NIX_USER_CONF_FILES": str(work / "etc" / "nix.conf"),
            "HOME": str(work / "home"),
            "NIX_REMOTE": "",
        }

    def nix(self, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        env = {**self.env, "XDG_CACHE_HOME": str(cache or self.work / "xdg-setup")}
        proc = subprocess.run(args, env=env, capture_output=True, check=False)
        if proc.returncode:
            sys.exit(f"{' '.join(args)} failed:\n{proc.stderr.decode()}")
        return proc


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


CLOSURE_NIX = """
# n small text files; file i names files 2i+1 and 2i+2, so they are its references.
n: let
  body = i: builtins.concatStringsSep "" (builtins.genList
    (j: builtins.hashString "sha256" "nixd-bench-${toString i}-${toString j}") 64);
  file = i: builtins.toFile "bench-small-${toString i}" (body i
    + (if 2 * i + 1 < n then "\\n${file (2 * i + 1)}" else "")
    + (if 2 * i + 2 < n then "\\n${file (2 * i + 2)}" else ""));
in builtins.concatStringsSep "\\n" (builtins.genList file n)
"""


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``'s children (nginx's worker)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(cpu_seconds(int(k)) for k in kids)


def wrk(url: str, auth: str | None, cpu: Callable[[], float]) -> tuple[float, float, float, float]:
    """req/s, p50 ms, p99 ms and server CPU-microseconds per request."""
    args = ["wrk", "-t2", "-c32", "-d5s", "--latency", url]
    if auth:
        args[1:1] = ["-H", f"Authorization: {auth}"]
    c0 = cpu()
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    used = cpu() - c0
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    if "Non-2xx" in out:
        sys.exit(f"wrk saw errors:\n{out}")
    return rate, pct("50"), pct("99"), used / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--closure", type=int, default=300, help="small paths in the closure")
    parser.add_argument(
        "--only", choices=("all", "closure"), default="all", help="closure: just the closure rows"
    )
    parser.add_argument("--serve-proxy", help=argparse.SUPPRESS)
    parser.add_argument(
        "--hold", action="store_true", help="set up, print the URLs, wait (for profiling)"
    )
    args = parser.parse_args()
    if args.serve_proxy:
        serve_proxy_main(args.serve_proxy)
        return

    from nixd.nix.signing import SecretKey  # noqa: PLC0415

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # run the cleanup

    work = Path(tempfile.mkdtemp(prefix="nixd-proxy-bench-", dir="/var/tmp"))
    work.chmod(0o755)  # nginx workers (user nobody) read the cache under it
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env = Env(work)
        key = SecretKey.generate("bench-1")
        (work / "sk").write_text(key.render())
        src = work / "src"

        def add_random(mib: int) -> str:
            blob = work / f"random-{mib}M.bin"
            with open(blob, "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(1 << 20))
            out = env.nix("nix-store", "--store", str(src), "--add", str(blob)).stdout
            blob.unlink()
            return out.decode().strip()

        closure_only = args.only == "closure"
        big: list[str] = []
        if not closure_only:
            print(f"setup: {args.size_mib}, {2 * args.size_mib} MiB random paths", file=sys.stderr)
            big = [add_random(args.size_mib), add_random(2 * args.size_mib)]
        print(f"setup: {args.closure} small paths, cache dir, nginx", file=sys.stderr)
        (work / "closure.nix").write_text(CLOSURE_NIX)
        expr = f"import {work / 'closure.nix'} {args.closure}"
        closure = env.nix("nix", "eval", "--impure", "--store", str(src), "--raw", "--expr", expr)
        small = closure.stdout.decode().split()
        assert len(small) == args.closure, len(small)
        cache = work / "cache"
        env.nix(
            "nix", "copy", "--store", str(src),
            "--to", f"file://{cache}?compression=none&secret-key={work / 'sk'}",
            *big, *small,
        )  # fmt: skip
        path, double = big if big else (small[0], small[0])
        run = work / "run"
        run.mkdir()
        nginx_port, rproxy_port = free_port(), free_port()
        (run / "nginx.conf").write_text(
            NGINX_CONF.format(run=run, port=nginx_port, rport=rproxy_port, root=cache)
        )
        nginx = subprocess.Popen(["nginx", "-c", str(run / "nginx.conf"), "-g", "daemon off;"])
        procs.append(nginx)
        direct = f"http://127.0.0.1:{nginx_port}"
        rproxy = f"http://127.0.0.1:{rproxy_port}"
        secret = secrets.token_urlsafe(32)
        (work / "secret").write_text(secret)
        netrc = work / "netrc"
        netrc.write_text(f"machine 127.0.0.1 login nixd password {secret}\n")
        auth = "Basic " + base64.b64encode(f"nixd:{secret}".encode()).decode()
        pub = key.public().render()

        def start_proxy(store: Path) -> tuple[subprocess.Popen[bytes], str]:
            cfg = {
                "secret_file": str(work / "secret"),
                "store_dir": str(store),
                "store_max_bytes": 8 * args.size_mib << 20,
                "upstreams": [{"url": direct, "trusted_keys": [pub], "auth": "none"}],
            }
            (work / "proxy.json").write_text(json.dumps(cfg))
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve-proxy", str(work / "proxy.json")],
                stdout=subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdout is not None
            return proc, proc.stdout.readline().decode().strip()

        def copy(url: str, paths: list[str]) -> float:
            dst, xdg = work / "dst", work / "xdg-run"
            subprocess.run(["rm", "-rf", str(dst), str(xdg)], check=True)
            os.sync()
            t = time.monotonic()
            env.nix(
                "nix", "copy", "--store", str(dst), "--from", url,
                "--option", "trusted-public-keys", pub, "--option", "netrc-file", str(netrc),
                *paths, cache=xdg,
            )  # fmt: skip
            return time.monotonic() - t

        def settle(pid: int) -> None:
            """Wait (bounded) until the proxy stops using CPU: its off-path NarHash checks."""
            last = cpu_seconds(pid)
            for _ in range(100):
                time.sleep(0.3)
                now = cpu_seconds(pid)
                if now - last < 0.02:
                    return
                last = now

        time.sleep(0.3)
        if args.hold:
            proxy, url = start_proxy(work / "proxy-store-hold")
            print(f"direct {direct}\nproxy {url} pid {proxy.pid}\npath {path}", flush=True)
            print(f"netrc {netrc}\nnar {direct}/nar/", flush=True)
            time.sleep(3600)
        series = ("direct", "nginx-rproxy", "cold", "warm")
        results: dict[tuple[str, str], list[float]] = {
            (w, s): [] for w in ("big", "closure") for s in series
        }
        cpu: dict[tuple[str, str], list[float]] = {}
        rates: dict[str, list[tuple[float, float, float, float]]] = {"nginx": [], "proxy": []}
        hash_part = Path(path).name[:32]
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            workloads = (
                [("closure", small)] if closure_only else [("big", [path]), ("closure", small)]
            )
            for what, paths in workloads:
                results[(what, "direct")].append(copy(direct, paths))
                results[(what, "nginx-rproxy")].append(copy(rproxy, paths))
            store = work / f"proxy-store-{r}"
            proxy, url = start_proxy(store)
            for what, paths in workloads:
                for kind in ("cold", "warm"):
                    c0 = cpu_seconds(proxy.pid)
                    results[(what, kind)].append(copy(url, paths))
                    cpu.setdefault((what, kind), []).append(cpu_seconds(proxy.pid) - c0)
                    settle(proxy.pid)  # the off-path NarHash check admits the NARs
            if closure_only:
                proxy.terminate()
                proxy.wait()
                shutil.rmtree(store, ignore_errors=True)
                continue
            rates["nginx"].append(
                wrk(f"{direct}/{hash_part}.narinfo", None, lambda: children_cpu_seconds(nginx.pid))
            )
            proxy_cpu = functools.partial(cpu_seconds, proxy.pid)
            rates["proxy"].append(wrk(f"{url}/{hash_part}.narinfo", auth, proxy_cpu))
            proxy.terminate()
            proxy.wait()
            shutil.rmtree(store, ignore_errors=True)

        if not closure_only:
            print("RSS: streaming one NAR cold then warm through a fresh proxy", file=sys.stderr)
        rss: dict[str, tuple[int, float, float]] = {}
        for label, p in (
            []
            if closure_only
            else [(f"{args.size_mib} MiB", path), (f"{2 * args.size_mib} MiB", double)]
        ):
            store = work / "proxy-store-rss"
            proxy, url = start_proxy(store)
            h = Path(p).name[:32]
            req = urllib.request.Request(f"{url}/{h}.narinfo", headers={"Authorization": auth})
            with urllib.request.urlopen(req, timeout=30) as resp:
                nar_url = re.search(r"^URL: (\S+)$", resp.read().decode(), re.M).group(1)  # type: ignore[union-attr]
            timings = []
            for _ in ("cold", "warm"):
                t = time.monotonic()
                subprocess.run(
                    [
                        "curl",
                        "-sfo",
                        "/dev/null",
                        "-H",
                        f"Authorization: {auth}",
                        f"{url}/{nar_url}",
                    ],
                    check=True,
                )
                timings.append(time.monotonic() - t)
                settle(proxy.pid)
            rss[label] = (rss_peak_kib(proxy.pid), timings[0], timings[1])
            proxy.terminate()
            proxy.wait()
            shutil.rmtree(store, ignore_errors=True)

        def ratio_rows(what: str) -> None:
            med = {s: statistics.median(results[(what, s)]) for s in series}
            print("| source | wall s | x direct | proxy CPU s |")
            print("|---|---|---|---|")
            print(f"| nginx direct | {med['direct']:.2f} | 1.00 | |")
            r = med["direct"] / med["nginx-rproxy"]
            print(f"| nginx reverse proxy, buffering off | {med['nginx-rproxy']:.2f} | {r:.2f} | |")
            for k in ("cold", "warm"):
                c = statistics.median(cpu[(what, k)])
                print(f"| proxy {k} | {med[k]:.2f} | {med['direct'] / med[k]:.2f} | {c:.2f} |")

        if closure_only:
            print(f"\n## nix copy --from, {args.closure} small paths (medians of {args.rounds})\n")
            ratio_rows("closure")
            return
        print(f"\n## nix copy --from, one {args.size_mib} MiB path (medians of {args.rounds})\n")
        ratio_rows("big")
        print(f"\n## nix copy --from, {args.closure} small paths (medians of {args.rounds})\n")
        ratio_rows("closure")
        print("\n## proxy peak RSS streaming one NAR (curl, cold then warm)\n")
        print("| NAR | peak RSS MiB | cold s | warm s |")
        print("|---|---|---|---|")
        for label, (kib, cold, warm) in rss.items():
            print(f"| {label} | {kib / 1024:.1f} | {cold:.2f} | {warm:.2f} |")
        print(f"\n## narinfo, wrk -t2 -c32 -d5s (medians of {args.rounds})\n")
        print("| server | req/s | x nginx | p50 ms | p99 ms | server CPU-us/req |")
        print("|---|---|---|---|---|---|")
        base = statistics.median(x[0] for x in rates["nginx"])
        for name, runs in (("nginx direct", rates["nginx"]), ("proxy", rates["proxy"])):
            rate, p50, p99, us = (statistics.median(x[i] for x in runs) for i in range(4))
            print(
                f"| {name} | {rate:,.0f} | {rate / base:.2f} | {p50:.2f} | {p99:.2f} | {us:.0f} |"
            )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
