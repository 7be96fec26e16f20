"""``/metrics``: full-precision values, the build info, and both histograms."""

from __future__ import annotations

import math
import platform
import re
from pathlib import Path

import httpx
import trio

from nixd import __version__
from nixd.nix.narinfo import NarInfo
from nixd.proxy.metrics import REQUEST_BUCKETS, Metrics, number
from tests.proxy.conftest import Caches, start_proxy, upstream_for
from tests.proxy.fakecache import FakeCache

SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")
GIB = 1 << 30
BUILD_INFO = f'nixd_build_info{{python="{platform.python_version()}",version="{__version__}"}}'


def samples(text: str) -> dict[str, str]:
    """``name{labels}`` → value, checking every line is a comment or a sample."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = SAMPLE.match(line)
        assert m, line
        out[m.group(1) + (m.group(2) or "")] = m.group(3)
    return out


def test_values_at_full_precision() -> None:
    assert number(10 * GIB) == "10737418240"
    assert number(float(10 * GIB)) == "10737418240"
    assert number(2.0**53 + 2) == "9007199254740994.0"  # float past 2**53: repr, exact
    assert number(0.1) == "0.1" and float(number(1 / 3)) == 1 / 3
    assert number(math.inf) == "+Inf" and number(-math.inf) == "-Inf"
    assert number(math.nan) == "NaN"
    m = Metrics()
    m.set("nixd_proxy_store_bytes", 10 * GIB)
    m.inc("nixd_proxy_sent_bytes_total", float(123456789012), source="local")
    values = samples(m.render())
    assert values["nixd_proxy_store_bytes"] == "10737418240"
    assert values['nixd_proxy_sent_bytes_total{source="local"}'] == "123456789012"
    assert values[BUILD_INFO] == "1"
    assert not any("e+" in v for v in values.values())


def test_request_histogram_is_cumulative() -> None:
    m = Metrics()
    for seconds in (0.0001, 0.0004, 0.002, 0.2, 1000.0):
        m.observe_request("narinfo", seconds)
    m.observe_request("nar", 3.0)
    text = m.render()
    assert "# TYPE nixd_proxy_request_duration_seconds histogram" in text
    values = samples(text)
    name = "nixd_proxy_request_duration_seconds"
    buckets = [
        int(values[f'{name}_bucket{{le="{number(b)}",kind="narinfo"}}'])
        for b in (*REQUEST_BUCKETS, math.inf)
    ]
    assert buckets == sorted(buckets)  # cumulative
    assert buckets[0] == 2 and buckets[REQUEST_BUCKETS.index(0.0025)] == 3
    assert buckets[REQUEST_BUCKETS.index(0.25)] == 4 and buckets[-1] == 5
    assert values[f'{name}_count{{kind="narinfo"}}'] == "5"
    assert float(values[f'{name}_sum{{kind="narinfo"}}']) == 0.0001 + 0.0004 + 0.002 + 0.2 + 1000.0
    assert values[f'{name}_count{{kind="nar"}}'] == "1"


async def test_proxy_times_every_request(
    caches: Caches, tmp_path: Path, fake_upstream: FakeCache
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, tmp_path, (upstream_for(fake_upstream, caches),))
            async with httpx.AsyncClient(base_url=proxy.url, auth=("nixd", proxy.secret)) as c:
                hash_part = caches.blob.rsplit("/", maxsplit=1)[-1][:32]
                cold = await c.get(f"/{hash_part}.narinfo")
                warm = await c.get(f"/{hash_part}.narinfo")  # the prepared hot path
                assert cold.status_code == warm.status_code == 200
                info = NarInfo.parse(cold.content)
                assert (await c.get(f"/{info.url}")).status_code == 200
                assert (await c.get("/nix-cache-info")).status_code == 200
                values = samples((await c.get("/metrics")).text)
            nursery.cancel_scope.cancel()
    name = "nixd_proxy_request_duration_seconds"
    assert values[f'{name}_count{{kind="narinfo"}}'] == "2"
    assert values[f'{name}_count{{kind="nar"}}'] == "1"
    assert values[f'{name}_count{{kind="cache-info"}}'] == "1"
    assert float(values[f'{name}_sum{{kind="nar"}}']) > 0
    assert BUILD_INFO in values
