"""The cache server's Prometheus metrics, with ``prometheus_client``; any room may count here.

Every name starts ``nixd_server_``. Labels take values from small fixed sets only: a route
is a template (``/cache/{org}/{project}/*.narinfo``, :func:`nixd.server.http.ops.route_of`),
never a raw path (a path names slices and store paths, and any client can make up
millions of them); a method outside :data:`METHODS` is ``other``; a status is one the
server itself chose. So a client can neither blow up the series count nor read a slice
name off ``/metrics``.

**Several workers.** ``[server] workers > 1`` are separate processes, so a counter in one
is invisible to the scrape that another answers. :func:`enable_multiprocess` (called by
``serve`` before it forks and before the first :func:`metrics`) points prometheus_client's
multiprocess mode at a directory made for that run: each process keeps its values in
memory-mapped files there, and :func:`exposition` sums every process's files on each
scrape. The directory is removed when the server stops; a new run starts from zero (a
Prometheus counter reset, which ``rate()`` handles). With one worker the values stay in
memory, and the process's own CPU and memory metrics are exported too.

The metrics are made on first use (:func:`metrics`), and prometheus_client is imported
only then: the library decides at import whether values live in memory or in files, so
``serve`` must be able to say so first.

**GC.** ``metrics().gc_runs``, ``gc_bytes_freed`` and ``gc_paths_removed`` are for a
garbage collection that runs inside the server (``metrics().gc_runs.inc()``); a
``nixd-server gc`` run from the command line is another process, and its counts end
with it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What :func:`exposition` writes: the text format every Prometheus reads."""
METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"})
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
)  # fmt: skip
"""A narinfo answer takes well under a millisecond; a NAR stream may take minutes."""


@dataclass(frozen=True, slots=True)
class ServerMetrics:
    """Every metric of the server (one set per process)."""

    registry: CollectorRegistry
    requests: Counter
    """``nixd_server_requests_total{route, method, status}``"""
    duration: Histogram
    """``nixd_server_request_duration_seconds{route}``: request head to the answer's end."""
    received: Counter
    """``nixd_server_request_body_bytes_total{route}``"""
    sent: Counter
    """``nixd_server_response_body_bytes_total{route}``"""
    uploads: Counter
    """``nixd_server_uploads_total{kind}``: nar, narinfo, log stored (2xx to a PUT)."""
    downloads: Counter
    """``nixd_server_downloads_total{kind}``: nar, narinfo, log answered 200/206 to a GET."""
    storage_errors: Counter
    """``nixd_server_storage_errors_total{backend, error}``: database or blobs; full,
    unavailable (a bucket that does not answer), failed or unready."""
    gc_runs: Counter
    """``nixd_server_gc_runs_total``"""
    gc_bytes_freed: Counter
    """``nixd_server_gc_bytes_freed_total``: blob bytes removed."""
    gc_paths_removed: Counter
    """``nixd_server_gc_paths_removed_total``: slice path records removed."""


_metrics: ServerMetrics | None = None


def metrics() -> ServerMetrics:
    """This process's metrics, made (and prometheus_client imported) on the first call."""
    global _metrics  # noqa: PLW0603 - one set per process, made once
    if _metrics is None:
        _metrics = _build()
    return _metrics


def _build() -> ServerMetrics:
    from prometheus_client import (  # noqa: PLC0415
        CollectorRegistry,
        Counter,
        Histogram,
        disable_created_metrics,
    )
    from prometheus_client.process_collector import ProcessCollector  # noqa: PLC0415

    # a *_created sample beside every series is of no use here
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=False)
    if MULTIPROC_ENV not in os.environ:
        ProcessCollector(registry=registry)

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=registry)

    return ServerMetrics(
        registry=registry,
        requests=counter(
            "nixd_server_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ("route", "method", "status"),
        ),
        duration=Histogram(
            "nixd_server_request_duration_seconds",
            "Time from the request head to the end of the answer, by route template.",
            ("route",),
            buckets=DURATION_BUCKETS,
            registry=registry,
        ),
        received=counter(
            "nixd_server_request_body_bytes_total",
            "Request body bytes received, by route template.",
            ("route",),
        ),
        sent=counter(
            "nixd_server_response_body_bytes_total",
            "Response body bytes sent, by route template.",
            ("route",),
        ),
        uploads=counter(
            "nixd_server_uploads_total",
            "Uploads stored (a 2xx answer to a PUT), by kind: nar, narinfo, log.",
            ("kind",),
        ),
        downloads=counter(
            "nixd_server_downloads_total",
            "Downloads answered with 200 or 206 to a GET, by kind: nar, narinfo, log.",
            ("kind",),
        ),
        storage_errors=counter(
            "nixd_server_storage_errors_total",
            "Storage failures. backend: database or blobs; error: full (507), unavailable "
            "(503, the blob store does not answer), failed (a "
            "request's storage operation failed) or unready (a /readyz check failed).",
            ("backend", "error"),
        ),
        gc_runs=counter("nixd_server_gc_runs_total", "Garbage collections run by this server."),
        gc_bytes_freed=counter(
            "nixd_server_gc_bytes_freed_total", "Blob bytes removed by garbage collection."
        ),
        gc_paths_removed=counter(
            "nixd_server_gc_paths_removed_total",
            "Slice path records removed by garbage collection.",
        ),
    )


def enable_multiprocess() -> Path:
    """Make a fresh directory for this run's values and point prometheus_client at it.

    Must run before the first :func:`metrics` (and before anything imports
    prometheus_client): the library picks where values live when it is imported. The
    caller removes the directory with :func:`disable_multiprocess` when the run ends.
    """
    path = Path(tempfile.mkdtemp(prefix="nixd-server-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def disable_multiprocess(path: Path) -> None:
    """Remove a run's value files (every worker has exited)."""
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(MULTIPROC_ENV) == str(path):
        del os.environ[MULTIPROC_ENV]


def exposition() -> bytes:
    """The text exposition: this process's registry, or every worker's files summed."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess  # noqa: PLC0415

    path = os.environ.get(MULTIPROC_ENV)
    if path:
        registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))
    return bytes(generate_latest(metrics().registry))
