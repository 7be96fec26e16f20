"""Benchmark of the proxy, in the configuration users run, against nginx in the same run.

What is measured, in one run with the rounds interleaved (noise on a shared 2-core
machine is ±10-30%: only ratios against references taken in the same run mean anything):

- the system under test: the daemon's proxy (its own process, built by the daemon's own
  code: ``proxy_config()``, the refresher, ``nixd login token``) whose upstream is a real
  ``nixd-server`` (its own process, default config: durable audit, default workers)
  holding the paths uploaded with ``nix copy --to`` the slice URL with a write token,
  stored as zstd, read through the org's view ``/cache`` with a reader token;
- the references: nginx serving a ``file://`` binary cache of the same paths
  (``nix copy --to file://…?compression=zstd``) statically with ``sendfile``, and nginx as
  an authenticating reverse proxy (adds ``Authorization``, buffering off, upstream
  keep-alive) in front of it;
- workloads (bench/benchdata.py makes them, deterministic, once per spec): one big path
  of random data (1 GiB), a closure of 300 small paths each referencing two others, and a
  cache-shootout-style closure (~1.5 GiB in 300 paths of mixed sizes, half random, half
  compressible), each copied with ``nix copy --from`` into a fresh chroot store with a
  fresh narinfo cache, with Nix's default ``http-connections`` (25) and with 1 (the
  big path, one narinfo then one NAR, and the nginx reverse proxy, the cost of one proxy
  hop, with the first value only). With 1 connection Nix 2.8 idles much of the time
  (its download thread sleeps up to 10 s when a transfer's 1 MiB buffer is full, and one
  connection queues every narinfo behind the NAR in flight): those walls swing widely;
- cold = fresh proxy process and store, fresh client store, page cache dropped
  (``echo 1 > /proc/sys/vm/drop_caches``, where allowed; the output says whether);
  warm = the proxy's store filled (the same proxy again), page cache as left; nginx
  direct is measured both ways, and each proxy phase is compared with the same phase;
- narinfo requests/s, p50 and p99 with ``wrk -t2 -c32`` against the proxy (warm), the
  nixd-server directly (Bearer access token) and nginx direct;
- for every process (the nix client, the proxy, the nixd-server, each nginx) CPU seconds
  per GiB of NAR and CPU microseconds per request, from the kernel's accounting before
  and after each measurement (bench/benchproc.py), next to the wall times; and the
  proxy's peak RSS.

Ratios are "x nginx direct" (speed: direct's wall time over the other's), each the median
of the per-round pairs, and are checked against the proxy's targets as PASS/MISS lines.

    .venv/bin/python bench/proxy_bench.py                 # full run, ~15 min, data cached
    .venv/bin/python bench/proxy_bench.py --quick         # small sizes, 1 round (smoke test)
    .venv/bin/python bench/proxy_bench.py --json out.json # every figure as JSON too
    .venv/bin/python bench/proxy_bench.py --hold          # set up, print URLs, wait (profiling)

Run as root (single-user Nix with chroot stores, dropping the page cache). Generated data
is kept in ``--work`` (default /var/tmp/nixd-proxy-bench) for later runs; everything
else (server state, proxy stores, client stores) is made fresh in a run directory under
it and removed at the end. Every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchdata import Dataset, NixEnv, Spec, log, prepare
from benchproc import (
    REPO,
    Nginx,
    NixClient,
    NixdServer,
    Proxy,
    cpu_between,
    cpu_snapshot,
    drop_page_cache,
    peak_rss_mib,
)

GIB = float(1 << 30)
WORKLOADS = ("big", "closure", "shootout")
PROCS = ("nix", "proxy", "nixd-server", "nginx-direct", "nginx-rproxy")
SOURCES = {
    "nginx-direct": ("nix", "nginx-direct"),
    "nginx-rproxy": ("nix", "nginx-rproxy", "nginx-direct"),
    "proxy": ("nix", "proxy", "nixd-server"),
}
"""The processes each source's requests pass through."""


# -- the proxy child ------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, str | int | float | bool | None) else repr(value)


def serve_proxy_main(spec_file: str) -> None:
    """Child mode: the daemon's proxy, logged in like ``nixd login token``; prints its URL.

    Only the daemon's parts the proxy needs run here (the refresher and the proxy, no
    control socket), built by the daemon's own code so that the proxy is configured as
    the daemon configures it.
    """
    import httpx  # noqa: PLC0415
    import trio  # noqa: PLC0415

    from nixd.daemon.config import load_config  # noqa: PLC0415
    from nixd.daemon.main import HTTP_TIMEOUT, Daemon, configure_logging  # noqa: PLC0415

    spec = json.loads(Path(spec_file).read_text())
    config = load_config(spec["daemon_config"])
    configure_logging(config.daemon.log_level)
    token = Path(spec["token_file"]).read_text().strip()

    async def main() -> None:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False) as http:
            daemon = Daemon(config, http)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.refresher.run)
                    daemon.restore_login()  # a restarted daemon
                    if daemon.login_state is None:  # nixd login token
                        await daemon.login(None, {"method": "token", "params": {"token": token}})
                    await nursery.start(daemon.run_proxy, None)
                    described = _jsonable(dataclasses.asdict(daemon.proxy_config()))
                    out = {"url": daemon.proxy_url, "proxy_config": described}
                    print(json.dumps(out), flush=True)
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break

    trio.run(main)


# -- measuring ------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One ``nix copy``: its wall time and what every process spent on it."""

    workload: str
    source: str
    phase: str
    connections: int
    round: int
    wall_s: float
    page_cache_dropped: bool
    cpu_s: dict[str, float]
    requests: dict[str, float]
    nar_bytes: int
    upstream_bytes: float | None = None
    proxy_peak_rss_mib: float | None = None
    proxy_cpu_after_s: float | None = None
    """CPU the proxy spent after Nix had its last byte (until it went quiet)."""
    proxy_kinds: dict[str, dict[str, float]] | None = None
    """Requests the proxy answered by kind: count and mean milliseconds (its /metrics)."""


class Bench:
    """One run: the server, both nginx, the proxy of the moment, the client, the samples."""

    def __init__(self, args: argparse.Namespace, data: Dataset, run_dir: Path) -> None:
        self.args = args
        self.data = data
        self.run_dir = run_dir
        self.samples: list[Sample] = []
        self.narinfo: list[dict[str, Any]] = []
        self.server = NixdServer(run_dir / "server")
        self.nginx: dict[str, Nginx] = {}
        self.proxy: Proxy | None = None
        self.proxy_config: dict[str, object] = {}
        self.proxy_starts = 0
        self.drop_ok = False

    # setup

    def setup(self) -> None:
        t = time.monotonic()
        self.server.init()
        self.server.start()
        log(f"nixd-server at {self.server.url} ({time.monotonic() - t:.0f} s); uploading")
        t = time.monotonic()
        netrc = self.server.netrc(self.run_dir / "writer.netrc", "member")
        d = self.data
        # two uploads at once (disjoint closures): Nix uploads one path at a time, and the
        # server's ingest of one stream leaves the second core idle
        uploads = []
        for i, paths in enumerate(([*d.warmup, *d.big, *d.closure], d.shootout)):
            up = NixEnv(self.run_dir / f"upload-{i}")
            cmd = [
                "nix", "copy", "--store", str(d.src),
                "--option", "netrc-file", str(netrc),
                "--to", f"{self.server.url}/cache/bench/app?compression=zstd", *paths,
            ]  # fmt: skip
            err = (self.run_dir / f"upload-{i}.err").open("wb")
            uploads.append((subprocess.Popen(cmd, env=up.env, stderr=err), err))
        for proc, err in uploads:
            proc.wait()
            err.close()
            if proc.returncode:
                raise SystemExit(f"nix copy --to the server failed; see {err.name}")
        self.upload_s = time.monotonic() - t
        log(f"uploaded in {self.upload_s:.0f} s")
        direct = Nginx(self.run_dir / "nginx-direct", root=d.filecache)
        self.nginx["nginx-direct"] = direct
        self.nginx["nginx-rproxy"] = Nginx(
            self.run_dir / "nginx-rproxy", upstream=f"127.0.0.1:{direct.port}"
        )
        proxy = self.start_proxy()  # the proxy secret, for the client's netrc
        self.proxy_config = proxy.config
        netrc = self.run_dir / "client.netrc"
        netrc.write_text(f"machine 127.0.0.1 login nixd password {proxy.secret}\n")
        netrc.chmod(0o600)
        self.stop_proxy()
        self.client = NixClient(self.run_dir / "client", [d.public_key, self.server.key], netrc)
        self.drop_ok = drop_page_cache() if not self.args.no_drop_caches else False

    def start_proxy(self) -> Proxy:
        """A fresh proxy (new process, empty store), warmed up on paths of no workload."""
        self.proxy_starts += 1
        store = self.run_dir / f"proxy-store-{self.proxy_starts}"
        self.proxy = proxy = Proxy(self.run_dir / "proxy", store, self.server)
        auth = {"Authorization": "Basic " + _b64(f"nixd:{proxy.secret}")}
        for path in self.data.warmup:
            h = Path(path).name[:32]
            req = urllib.request.Request(f"{proxy.url}/{h}.narinfo", headers=auth)
            with urllib.request.urlopen(req, timeout=60) as r:
                nar = re.search(r"^URL: (\S+)$", r.read().decode(), re.MULTILINE)
            assert nar, f"no URL in the narinfo of {path}"
            req = urllib.request.Request(f"{proxy.url}/{nar[1]}", headers=auth)
            with urllib.request.urlopen(req, timeout=60) as r:
                while r.read(1 << 20):
                    pass
        proxy.settle()
        return proxy

    def stop_proxy(self) -> float:
        rss = 0.0
        if self.proxy is not None:
            rss = peak_rss_mib(self.proxy.pid)
            self.proxy.stop()
            self.proxy = None
        return rss

    def pids(self) -> dict[str, int]:
        pids = {name: n.pid for name, n in self.nginx.items()}
        pids["nixd-server"] = self.server.pid
        if self.proxy is not None:
            pids["proxy"] = self.proxy.pid
        return pids

    def counters(self) -> dict[str, float]:
        """Requests answered so far by each server process, and the proxy's upstream bytes."""
        out: dict[str, float] = {n: float(x.requests()) for n, x in self.nginx.items()}
        if self.proxy is not None:
            m = self.proxy.metrics()
            out["proxy"] = m.get("nixd_proxy_requests_total", 0.0) + 1  # this /metrics read
            out["nixd-server"] = m.get("nixd_proxy_upstream_requests_total", 0.0)
            out["upstream_bytes"] = m.get("nixd_proxy_upstream_bytes_total", 0.0)
            for key, value in m.items():
                kind = re.fullmatch(
                    r'nixd_proxy_request_duration_seconds_(sum|count)\{kind="(\w+)"\}', key
                )
                if kind:
                    out[f"kind:{kind[2]}:{kind[1]}"] = value
        return out

    def measure(self, workload: str, source: str, phase: str, conns: int, rnd: int) -> Sample:
        url = self.proxy.url if source == "proxy" and self.proxy else self.nginx[source].url
        dropped = phase == "cold" and self.drop_ok and drop_page_cache()
        pids = self.pids()
        cpu0 = {n: cpu_snapshot(p) for n, p in pids.items()}
        req0 = self.counters()
        res = self.client.copy(url, self.data.roots(workload), conns)
        after = None
        if self.proxy is not None:
            mid = cpu_snapshot(self.proxy.pid)
            self.proxy.settle()  # work the proxy does after Nix has its bytes counts too
            after = cpu_between(mid, cpu_snapshot(self.proxy.pid))
        cpu = {n: cpu_between(cpu0[n], cpu_snapshot(p)) for n, p in pids.items()}
        cpu["nix"] = res.cpu
        req1 = self.counters()
        delta = {n: req1[n] - req0.get(n, 0.0) for n in req1}
        requests = {n: v for n, v in delta.items() if n in PROCS}
        requests["nix"] = requests.get(source, 0.0)
        sample = Sample(
            workload, source, phase, conns, rnd, res.wall, dropped, cpu, requests,
            self.data.nar_bytes[workload],
        )  # fmt: skip
        if source == "proxy":
            sample.upstream_bytes = delta.get("upstream_bytes", 0.0)
            sample.proxy_cpu_after_s = after
            kinds = {k.split(":")[1] for k in delta if k.startswith("kind:")}
            sample.proxy_kinds = {
                kind: {
                    "count": delta.get(f"kind:{kind}:count", 0.0),
                    "mean_ms": delta.get(f"kind:{kind}:sum", 0.0)
                    / max(delta.get(f"kind:{kind}:count", 0.0), 1.0)
                    * 1e3,
                }
                for kind in sorted(kinds)
                if delta.get(f"kind:{kind}:count", 0.0) > 0 and kind != "metrics"
            }
        self.samples.append(sample)
        log(
            f"  {workload:8} c={conns:<2} {source:12} {phase:4} {res.wall:7.2f} s"
            + (" (page cache dropped)" if dropped else "")
        )
        return sample

    def run_workload(self, workload: str, conns: int, rnd: int) -> None:
        def references() -> None:
            self.measure(workload, "nginx-direct", "cold", conns, rnd)
            self.measure(workload, "nginx-direct", "warm", conns, rnd)
            if conns == self.args.connections[0]:  # the cost of a proxy hop, at the default
                self.measure(workload, "nginx-rproxy", "cold", conns, rnd)

        def proxy() -> None:
            self.start_proxy()
            self.measure(workload, "proxy", "cold", conns, rnd)
            warm = self.measure(workload, "proxy", "warm", conns, rnd)
            if workload == "closure" and "narinfo" in self.args.only and not self.narinfo_done:
                self.narinfo_round(rnd)
                self.narinfo_done = True
            warm.proxy_peak_rss_mib = self.stop_proxy()

        # alternate which comes first, so a drift of the machine's speed hits both sides
        for step in (references, proxy) if rnd % 2 == 0 else (proxy, references):
            step()

    def narinfo_round(self, rnd: int) -> None:
        assert self.proxy is not None
        h = Path(self.data.closure[0]).name[:32]
        proxy_auth = "Basic " + _b64(f"nixd:{self.proxy.secret}")
        targets: list[tuple[str, str, str | None]] = [
            ("proxy", f"{self.proxy.url}/{h}.narinfo", proxy_auth),
            ("nixd-server", f"{self.server.url}/cache/{h}.narinfo",
             f"Bearer {self.server.access_token()}"),
            ("nginx-direct", f"{self.nginx['nginx-direct'].url}/{h}.narinfo", None),
        ]  # fmt: skip
        for name, url, auth in targets:
            pids = self.pids()
            cpu0 = {n: cpu_snapshot(p) for n, p in pids.items()}
            up0 = self.counters().get("nixd-server", 0.0)
            rate, p50, p99, count, errors = wrk(url, auth, self.args.wrk_duration)
            cpu = {n: cpu_between(cpu0[n], cpu_snapshot(p)) for n, p in pids.items()}
            upstream = self.counters().get("nixd-server", 0.0) - up0
            row = {
                "round": rnd, "target": name, "req_s": rate, "p50_ms": p50, "p99_ms": p99,
                "requests": count, "socket_errors": errors,
                "cpu_us_per_req": cpu[name] / count * 1e6,
                "upstream_requests": upstream,
                "server_cpu_us_per_req": cpu["nixd-server"] / count * 1e6,
            }  # fmt: skip
            self.narinfo.append(row)
            log(f"  narinfo {name:12} {rate:9,.0f} req/s p99 {p99:.2f} ms "
                f"{row['cpu_us_per_req']:.0f} CPU-us/req")  # fmt: skip

    def run(self) -> None:
        a = self.args
        for rnd in range(a.rounds):
            log(f"round {rnd + 1}/{a.rounds}")
            self.narinfo_done = False
            for conns in a.connections:
                for workload in WORKLOADS:
                    # one path is one narinfo, then one NAR: http-connections cannot matter
                    single = workload == "big" and conns != a.connections[0]
                    if workload in a.only and not single:
                        self.run_workload(workload, conns, rnd)
            if "narinfo" in a.only and not self.narinfo_done:
                self.start_proxy()
                self.measure("closure", "proxy", "cold", a.connections[0], rnd)
                self.narinfo_round(rnd)
                self.stop_proxy()

    def close(self) -> None:
        self.stop_proxy()
        for n in self.nginx.values():
            n.stop()
        self.server.stop()


def _b64(text: str) -> str:
    import base64  # noqa: PLC0415

    return base64.b64encode(text.encode()).decode()


def wrk(url: str, auth: str | None, duration: str) -> tuple[float, float, float, int, int]:
    """req/s, p50 ms, p99 ms, requests and socket errors of ``wrk -t2 -c32``.

    A non-2xx answer ends the run (the set-up is wrong); socket errors (timeouts on a
    loaded machine) are counted and shown.
    """
    args = ["wrk", "-t2", "-c32", f"-d{duration}", "--latency", url]
    if auth:
        args[1:1] = ["-H", f"Authorization: {auth}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=300).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"wrk {url} saw answers other than 200:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        assert m, out
        return float(m[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m[2]]

    count = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    return rate, pct("50"), pct("99"), count, sum(map(int, errors.groups())) if errors else 0


# -- report ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """Per (workload, connections, source, phase): medians, per-process costs, ratio."""
    groups: dict[tuple[str, int, str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.workload, s.connections, s.source, s.phase), []).append(s)
    rows = []
    for (workload, conns, source, phase), group in groups.items():
        ref = {
            (s.round): s.wall_s for s in groups.get((workload, conns, "nginx-direct", phase), [])
        }
        ratios = [ref[s.round] / s.wall_s for s in group if s.round in ref]
        gib = group[0].nar_bytes / GIB
        cost = {}
        for proc in SOURCES[source]:
            cpu = [s.cpu_s.get(proc, 0.0) for s in group]
            reqs = [s.requests.get(proc, 0.0) for s in group]
            cost[proc] = {
                "cpu_s": _median(cpu),
                "cpu_s_per_gib": _median([c / gib for c in cpu]),
                "requests": _median(reqs),
                "cpu_us_per_req": _median(
                    [c / r * 1e6 for c, r in zip(cpu, reqs, strict=True) if r]
                ),
            }
        rss = [s.proxy_peak_rss_mib for s in group if s.proxy_peak_rss_mib]
        rows.append({
            "workload": workload, "connections": conns, "source": source, "phase": phase,
            "rounds": len(group), "wall_s": _median([s.wall_s for s in group]),
            "x_direct": _median(ratios),
            "page_cache_dropped": all(s.page_cache_dropped for s in group),
            "nar_bytes": group[0].nar_bytes, "cost": cost,
            "upstream_bytes": _median([s.upstream_bytes or 0.0 for s in group])
            if source == "proxy" else None,
            "proxy_peak_rss_mib": max(rss) if rss else None,
            "proxy_cpu_after_s": _median([s.proxy_cpu_after_s for s in group
                                          if s.proxy_cpu_after_s is not None]),
            "proxy_kinds": _kinds(group),
        })  # fmt: skip
    return rows


def _kinds(group: list[Sample]) -> dict[str, dict[str, float]]:
    kinds = {k for s in group for k in s.proxy_kinds or {}}
    return {
        kind: {
            field: _median([s.proxy_kinds[kind][field] for s in group
                            if s.proxy_kinds and kind in s.proxy_kinds])
            for field in ("count", "mean_ms")
        }
        for kind in sorted(kinds)
    }  # fmt: skip


TARGETS: list[tuple[str, str, Callable[[dict[str, Any]], float], str, float, str]] = [
    # (workload, phase, figure of the proxy's row, comparison, bound, unit)
    ("closure", "cold", lambda r: r["x_direct"], ">=", 1.0, "x nginx direct"),
    ("closure", "warm", lambda r: r["x_direct"], ">=", 1.1, "x nginx direct"),
    ("big", "cold", lambda r: r["x_direct"], ">=", 0.9, "x nginx direct"),
    ("big", "cold", lambda r: r["cost"]["proxy"]["cpu_s_per_gib"], "<=", 2.5, "proxy CPU-s/GiB"),
    ("shootout", "cold", lambda r: r["x_direct"], ">=", 0.8, "x nginx direct"),
    ("shootout", "warm", lambda r: r["x_direct"], ">=", 1.0, "x nginx direct"),
]
"""The proxy's targets; the server's own are measured by server_bench.py."""


def targets(
    rows: list[dict[str, Any]], narinfo: list[dict[str, Any]], names: dict[str, str]
) -> list[dict[str, Any]]:
    """PASS/MISS of every target, for every http-connections value measured."""
    out = []
    for workload, phase, figure, cmp, bound, unit in TARGETS:
        for r in rows:
            if (r["workload"], r["source"], r["phase"]) != (workload, "proxy", phase):
                continue
            value = figure(r)
            ok = value >= bound if cmp == ">=" else value <= bound
            out.append({
                "target": f"{phase} {names[workload]}: {unit} {cmp} {bound}",
                "http_connections": r["connections"], "value": value, "pass": ok,
            })  # fmt: skip
    med = _narinfo_medians(narinfo)
    checks = [
        ("proxy warm narinfo: CPU-us/req <= 60", "proxy", "cpu_us_per_req", "<=", 60.0),
        ("nixd-server narinfo: req/s >= 5000 (server target)", "nixd-server", "req_s", ">=",
         5000.0),
        ("nixd-server narinfo: p99 ms < 10 (server target)", "nixd-server", "p99_ms", "<", 10.0),
        ("nixd-server narinfo: CPU-us/req <= 120 (server target)", "nixd-server",
         "cpu_us_per_req", "<=", 120.0),
    ]  # fmt: skip
    for label, target, key, cmp, bound in checks:
        if target not in med:
            continue
        value = med[target][key]
        ok = {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[cmp]
        out.append({"target": label, "http_connections": None, "value": value, "pass": ok})
    return out


def _narinfo_medians(narinfo: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    med: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["target"] for r in narinfo):
        rows = [r for r in narinfo if r["target"] == name]
        med[name] = {
            k: _median([r[k] for r in rows])
            for k in ("req_s", "p50_ms", "p99_ms", "cpu_us_per_req", "upstream_requests",
                      "server_cpu_us_per_req", "socket_errors")
        }  # fmt: skip
    return med


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def workload_names(d: Dataset) -> dict[str, str]:
    return {
        "big": f"{_size(d.nar_bytes['big'])} path",
        "closure": f"{len(d.closure)}-path closure",
        "shootout": f"{len(d.shootout)}-path shootout closure",
    }


def workload_titles(d: Dataset) -> dict[str, str]:
    return {
        "big": f"one {_size(d.nar_bytes['big'])} path of random data",
        "closure": f"{len(d.closure)} small paths, each referencing two others",
        "shootout": f"cache-shootout-style closure: {len(d.shootout)} paths of mixed sizes",
    }


def report(bench: Bench, rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    a, d = bench.args, bench.data
    out: list[str] = []
    p = out.append
    server_cfg = bench.server.config()
    pc = bench.proxy_config
    up = (pc.get("upstreams") or [{}])[0]  # type: ignore[index]
    p("# proxy benchmark, ratios against nginx direct in the same run\n")
    p(
        f"rounds {a.rounds} (interleaved, order alternating); page cache dropped before each "
        f"cold copy: {'yes' if bench.drop_ok else 'NO (not allowed or --no-drop-caches)'}"
    )
    p(
        "nix: Nix 2.8 single-user, chroot stores, fresh store and narinfo cache per copy; "
        f"http-connections {', '.join(map(str, a.connections))}"
    )
    p(
        f"nixd-server: workers {server_cfg['workers']}, audit {server_cfg['audit']}, "
        f"stores zstd level {server_cfg['zstd_level']}; uploaded with nix copy --to "
        f"…/cache/bench/app?compression=zstd in {bench.upload_s:.0f} s"
    )
    p(
        f"proxy: the daemon's proxy_config(): upstream {up.get('url')} auth {up.get('auth')} "
        f"priority {up.get('priority')}; store_max_bytes {pc.get('store_max_bytes')}, "
        f"positive_ttl {pc.get('positive_ttl')}, negative_ttl {pc.get('negative_ttl')}; "
        "each cold copy gets a new proxy process and store, warmed up first on "
        f"{len(bench.data.warmup)} paths of no workload"
    )
    p(
        f"nginx: {bench.nginx['nginx-direct'].kind}; rproxy: {bench.nginx['nginx-rproxy'].kind}; "
        "cache made by nix copy --to file://…?compression=zstd"
    )
    p(
        "cost columns: CPU-s per GiB of NAR and CPU-us per request of each process the copy "
        "passes through (nix = the client; requests = what that process answered)"
    )
    titles = workload_titles(d)
    durable = "durable" if server_cfg["audit"].get("durable_reads") else "non-durable"
    setting = (
        f"nixd-server {server_cfg['workers']} worker(s), {durable} audit, zstd; "
        "nginx 1 worker, sendfile"
    )
    for workload in WORKLOADS:
        for conns in a.connections:
            sel = [r for r in rows if r["workload"] == workload and r["connections"] == conns]
            if not sel:
                continue
            p(f"\n## {titles[workload]}: {_size(d.nar_bytes[workload])} NAR "
              f"({_size(d.file_bytes[workload])} zstd in the file cache), "
              f"http-connections = {conns}, medians of {sel[0]['rounds']}\n")  # fmt: skip
            p(f"{setting}\n")
            p("| source | phase | wall s | x direct | CPU-s/GiB | CPU-us/req | requests |")
            p("|---|---|---|---|---|---|---|")
            order = [("nginx-direct", "cold"), ("nginx-direct", "warm"),
                     ("nginx-rproxy", "cold"), ("proxy", "cold"), ("proxy", "warm")]  # fmt: skip
            for source, phase in order:
                r = next((r for r in sel if (r["source"], r["phase"]) == (source, phase)), None)
                if r is None:
                    continue
                cost = r["cost"]
                per_gib = " · ".join(f"{k} {v['cpu_s_per_gib']:.2f}" for k, v in cost.items())
                per_req = " · ".join(f"{k} {v['cpu_us_per_req']:.0f}" for k, v in cost.items())
                reqs = " · ".join(f"{k} {v['requests']:.0f}" for k, v in cost.items() if k != "nix")
                p(
                    f"| {source} | {phase} | {r['wall_s']:.2f} | {r['x_direct']:.2f} | {per_gib} "
                    f"| {per_req} | {reqs} |"
                )
            p("")
            for r in sel:
                if r["source"] != "proxy":
                    continue
                kinds = ", ".join(
                    f"{k} {v['count']:.0f} x {v['mean_ms']:.2f} ms"
                    for k, v in r["proxy_kinds"].items()
                )
                p(f"proxy {r['phase']}: {r['proxy_cpu_after_s']:.2f} CPU-s after Nix's last "
                  f"byte; requests by kind (count x mean head-to-last-byte): {kinds}")  # fmt: skip
            rss = [r["proxy_peak_rss_mib"] for r in sel if r["proxy_peak_rss_mib"]]
            if rss:
                p(f"proxy peak RSS {max(rss):.0f} MiB")
    med = _narinfo_medians(bench.narinfo)
    if med:
        n = len([r for r in bench.narinfo if r["target"] == "proxy"])
        p(f"\n## narinfo, wrk -t2 -c32 -d{a.wrk_duration} (medians of {n}); {setting}\n")
        p("| server | req/s | x nginx | p50 ms | p99 ms | CPU-us/req | upstream req | errors |")
        p("|---|---|---|---|---|---|---|---|")
        base = med.get("nginx-direct", {}).get("req_s", float("nan"))
        for name, m in med.items():
            label = {"proxy": "proxy (warm)", "nixd-server": "nixd-server direct"}.get(name, name)
            p(
                f"| {label} | {m['req_s']:,.0f} | {m['req_s'] / base:.2f} | {m['p50_ms']:.2f} | "
                f"{m['p99_ms']:.2f} | {m['cpu_us_per_req']:.0f} | {m['upstream_requests']:.0f} | "
                f"{m['socket_errors']:.0f} |"
            )
    quick = " (--quick: small sizes, not the targets' workloads)" if a.quick else ""
    p(f"\n## targets{quick}\n")
    for c in checks:
        where = f" (http-connections = {c['http_connections']})" if c["http_connections"] else ""
        p(f"{'PASS' if c['pass'] else 'MISS'}  {c['target']}{where}: {c['value']:.2f}")
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round (smoke test)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--big-mib", type=int)
    parser.add_argument("--closure", type=int, help="small paths in the closure (300)")
    parser.add_argument("--shootout-mib", type=int)
    parser.add_argument("--shootout-paths", type=int)
    parser.add_argument(
        "--connections",
        default="25,1",
        help="http-connections values (25,1); the first is also the only one for the big path "
        "and for the nginx reverse proxy",
    )
    parser.add_argument("--wrk-duration", help="per wrk run (5s; --quick 2s)")
    parser.add_argument(
        "--only", default="big,closure,shootout,narinfo", help="comma list of workloads"
    )
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/nixd-proxy-bench"))
    parser.add_argument("--json", help="write every figure as JSON to this file (- = stdout)")
    parser.add_argument("--no-drop-caches", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--hold", action="store_true", help="set up, print the URLs, wait")
    parser.add_argument("--serve-proxy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_proxy:
        serve_proxy_main(args.serve_proxy)
        return
    quick = args.quick
    spec = Spec(
        big_mib=args.big_mib or (32 if quick else 1024),
        closure=args.closure or (50 if quick else 300),
        shootout_mib=args.shootout_mib or (96 if quick else 1536),
        shootout_paths=args.shootout_paths or (40 if quick else 300),
    )
    if args.rounds is None:
        args.rounds = 1 if quick else 3
    args.wrk_duration = args.wrk_duration or ("2s" if quick else "5s")
    args.connections = [int(c) for c in args.connections.split(",")]
    args.only = set(args.only.split(","))
    if os.geteuid() != 0:
        raise SystemExit("run as root (single-user Nix with chroot stores)")
    for tool in ("nix", "nginx", "wrk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (scripts/setup installs it)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # run the cleanup

    started = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    args.work.chmod(0o755)
    data = prepare(args.work, spec)
    run_dir = args.work / f"run-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    bench = Bench(args, data, run_dir)
    try:
        bench.setup()
        if args.hold:
            hold(bench)
            return
        bench.run()
        elapsed = time.monotonic() - started
        rows = summarize(bench.samples)
        checks = targets(rows, bench.narinfo, workload_names(data))
        text = report(bench, rows, checks) + f"\n\nwhole run {elapsed:.0f} s"
        result = {
            "config": {
                "spec": dataclasses.asdict(spec), "rounds": args.rounds,
                "connections": args.connections, "wrk": f"-t2 -c32 -d{args.wrk_duration}",
                "page_cache_dropped": bench.drop_ok, "server": bench.server.config(),
                "proxy_config": bench.proxy_config, "nar_bytes": data.nar_bytes,
                "file_bytes": data.file_bytes, "upload_s": bench.upload_s,
                "paths": {w: len(data.workload(w)) for w in WORKLOADS}, "quick": quick,
                "tree": str(REPO), "elapsed_s": elapsed,
            },
            "samples": [dataclasses.asdict(s) for s in bench.samples],
            "summary": rows, "narinfo": bench.narinfo,
            "narinfo_medians": _narinfo_medians(bench.narinfo), "targets": checks,
        }  # fmt: skip
        dumped = json.dumps(_no_nan(result), indent=1)
        if args.json == "-":
            print(text, file=sys.stderr)
            print(dumped)
        else:
            print(text)
            if args.json:
                Path(args.json).write_text(dumped)
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def _no_nan(value: Any) -> Any:
    """NaN (a figure with nothing to divide by) as null: strict JSON readers refuse NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def hold(bench: Bench) -> None:
    proxy = bench.start_proxy()
    print(f"nginx direct   {bench.nginx['nginx-direct'].url} pid {bench.nginx['nginx-direct'].pid}")
    print(f"nginx rproxy   {bench.nginx['nginx-rproxy'].url} pid {bench.nginx['nginx-rproxy'].pid}")
    print(f"nixd-server    {bench.server.url} pid {bench.server.pid}")
    print(f"proxy          {proxy.url} pid {proxy.pid} (secret in {bench.client.netrc})")
    print(f"big path       {bench.data.big[0]}\nshootout root  {bench.data.shootout[0]}")
    print("waiting; SIGTERM or ^C ends it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
