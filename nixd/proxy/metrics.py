"""Prometheus text-format metrics of the proxy, kept as plain counters in memory.

One :class:`Metrics` per proxy; the hot path only does dict increments and, per request,
one histogram observation (a ``bisect`` over 17 bounds and two additions: 0.2-0.4 µs with
the clock read, measured on the 2-core machine, against ~25-50 µs of proxy CPU for a warm
narinfo). ``/metrics`` renders the exposition format (version 0.0.4) on demand.
Upstreams are labelled by their ``display_url``: credentials inside a configured URL
never reach a label.

Values are printed at full precision (:func:`number`): integers as integers (10 GiB is
``10737418240``, never ``1.07374e+10``), other floats in Python's shortest round-trip
form. Besides the counters there are ``nixd_build_info{version=...} 1`` (which version
answers) and two histograms: the time to an upstream's response headers by upstream,
and the proxy's own request duration by kind (narinfo, nar, ...), from the request head
to the last byte written.
"""

from __future__ import annotations

import bisect
import math
import platform
from collections import defaultdict
from collections.abc import Callable

from nixd import __version__

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
)  # fmt: skip
"""A warm narinfo is well under a millisecond; a NAR stream may take minutes."""

_MAX_EXACT = float(1 << 53)

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
    "nixd_proxy_prefetch_total": (
        "counter",
        "Closure prefetch, by kind and outcome (hit: a request answered from a prefetch).",
    ),
    "nixd_proxy_upstream_resumes_total": (
        "counter",
        "NAR downloads cut by their upstream and resumed with Range.",
    ),
    "nixd_proxy_verified_bytes_total": (
        "counter",
        "NAR file bytes verified as they arrived (FileSize and the signed NarHash).",
    ),
    "nixd_proxy_passthrough_total": (
        "counter",
        "NAR transfers streamed through unkept: the local store could not hold them.",
    ),
}


def number(value: float) -> str:
    """A sample value at full precision, as the exposition format spells it."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < _MAX_EXACT:
        return str(int(value))
    return repr(value)


class Histogram:
    """Cumulative-bucket histogram series by one label value (cheap to observe)."""

    def __init__(self, name: str, help_text: str, label: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help = help_text
        self.label = label
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}
        self.sums: defaultdict[str, float] = defaultdict(float)

    def observe(self, key: str, seconds: float) -> None:
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = [0] * (len(self.buckets) + 1)
        counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sums[key] += seconds

    def count(self, key: str) -> int:
        return sum(self.counts.get(key, ()))

    def render(self, out: list[str]) -> None:
        name = self.name
        out.append(f"# HELP {name} {self.help}\n# TYPE {name} histogram\n")
        for key, counts in sorted(self.counts.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                labels = _labels((("le", number(bound)), (self.label, key)))
                out.append(f"{name}_bucket{labels} {cumulative}\n")
            lab = _labels(((self.label, key),))
            out.append(f"{name}_sum{lab} {number(self.sums[key])}\n")
            out.append(f"{name}_count{lab} {cumulative}\n")


def _escape(value: str) -> str:
    """A label value as the exposition format writes it: backslash, quote, newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Metrics:
    """Counters, gauges, the build info and the two histograms."""

    def __init__(self) -> None:
        self.values: defaultdict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(
            float
        )
        self.latency = Histogram(
            "nixd_proxy_upstream_latency_seconds",
            "Time to an upstream's response headers.",
            "upstream",
            LATENCY_BUCKETS,
        )
        self.requests = Histogram(
            "nixd_proxy_request_duration_seconds",
            "Time from a request's head to its last byte sent, by kind.",
            "kind",
            REQUEST_BUCKETS,
        )
        self.observe_request: Callable[[str, float], None] = self.requests.observe
        """One answered request by kind (the hot path: bound once, one call)."""
        self.build_info = _labels((("python", platform.python_version()), ("version", __version__)))

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
        self.latency.observe(upstream, seconds)

    def render(self) -> str:
        out = [
            "# HELP nixd_build_info The nixd version answering (always 1).\n",
            "# TYPE nixd_build_info gauge\n",
            f"nixd_build_info{self.build_info} 1\n",
        ]
        by_name: defaultdict[str, list[str]] = defaultdict(list)
        for (name, labels), value in sorted(self.values.items()):
            by_name[name].append(f"{name}{_labels(labels)} {number(value)}\n")
        for name, lines in by_name.items():
            kind, text = _HELP.get(name, ("untyped", name))
            out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")
            out.extend(lines)
        self.latency.render(out)
        self.requests.render(out)
        return "".join(out)
