"""Prometheus text-format metrics of the proxy, kept as plain counters in memory.

One :class:`Metrics` per proxy; the hot path only does dict increments. ``/metrics``
renders the exposition format (version 0.0.4) on demand. Upstreams are labelled by their
``display_url``: credentials inside a configured URL never reach a label.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_HELP = {
    "nixd_proxy_requests_total": ("counter", "Requests answered, by kind and status."),
    "nixd_proxy_local_hits_total": ("counter", "Requests answered from the local store."),
    "nixd_proxy_misses_total": ("counter", "narinfo lookups no upstream could answer."),
    "nixd_proxy_sent_bytes_total": ("counter", "NAR bytes sent to Nix, by source."),
    "nixd_proxy_upstream_bytes_total": ("counter", "NAR bytes received from upstreams."),
    "nixd_proxy_verification_failures_total": (
        "counter",
        "Upstream answers rejected by verification, by stage.",
    ),
    "nixd_proxy_upstream_requests_total": (
        "counter",
        "Requests to upstreams, by upstream and outcome.",
    ),
    "nixd_proxy_singleflight_joins_total": (
        "counter",
        "NAR requests that joined a download already in flight.",
    ),
    "nixd_proxy_store_bytes": ("gauge", "Bytes of NARs in the local store."),
    "nixd_proxy_store_evictions_total": ("counter", "NARs evicted from the local store."),
    "nixd_proxy_upstream_resumes_total": (
        "counter",
        "NAR downloads cut by their upstream and resumed with Range.",
    ),
}


def _escape(value: str) -> str:
    """A label value as the exposition format writes it: backslash, quote, newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Metrics:
    """Counters, gauges and the upstream latency histogram."""

    def __init__(self) -> None:
        self.values: defaultdict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(
            float
        )
        self._latency: dict[str, list[int]] = {}
        self._latency_sum: defaultdict[str, float] = defaultdict(float)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self.values[(name, tuple(sorted(labels.items())))] += amount

    @staticmethod
    def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        """A series key made once, for :meth:`add` on hot paths."""
        return (name, tuple(sorted(labels.items())))

    def add(self, key: tuple[str, tuple[tuple[str, str], ...]], amount: float = 1) -> None:
        self.values[key] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self.values[(name, tuple(sorted(labels.items())))] = value

    def get(self, name: str, **labels: str) -> float:
        """The current value (for status output and tests)."""
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str) -> float:
        """Sum over all label sets of ``name``."""
        return sum(v for (n, _), v in self.values.items() if n == name)

    def observe_latency(self, upstream: str, seconds: float) -> None:
        counts = self._latency.setdefault(upstream, [0] * (len(LATENCY_BUCKETS) + 1))
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum[upstream] += seconds

    def render(self) -> str:
        by_name: defaultdict[str, list[str]] = defaultdict(list)
        for (name, labels), value in sorted(self.values.items()):
            by_name[name].append(f"{name}{_labels(labels)} {value:g}\n")
        out: list[str] = []
        for name, lines in by_name.items():
            kind, text = _HELP.get(name, ("untyped", name))
            out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")
            out.extend(lines)
        hist = "nixd_proxy_upstream_latency_seconds"
        out.append(f"# HELP {hist} Time to an upstream's response headers.\n")
        out.append(f"# TYPE {hist} histogram\n")
        for upstream, counts in sorted(self._latency.items()):
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(
                    f"{hist}_bucket{_labels((('le', le), ('upstream', upstream)))} {cumulative}\n"
                )
            lab = _labels((("upstream", upstream),))
            out.append(f"{hist}_sum{lab} {self._latency_sum[upstream]:g}\n")
            out.append(f"{hist}_count{lab} {cumulative}\n")
        return "".join(out)
