"""Does ``[storage.s3] redirect`` pay? The server's CPU per GiB of NAR downloads.

One ``nixd-server serve`` (1 worker) per configuration, the same 64 MiB NAR (random
bytes, so its zstd blob is ~64 MiB) downloaded ``--rounds`` times by httpx:

- ``local``: blobs on disk, sent with sendfile (the baseline);
- ``s3-stream``: blobs in moto's S3 server, streamed by the server from a ranged GET;
- ``s3-redirect``: the same bucket, ``redirect = true``: the server answers 302 and the
  client fetches the presigned URL from the bucket itself.

Reported: the server process's CPU seconds (utime + stime from /proc) per GiB served, and
the wall-clock rate the client saw. moto runs in this script's process, so its CPU is not
counted against the server (an S3 endpoint's cost is the provider's). Run::

    PYTHONPATH=$PWD .venv/bin/python bench/s3_download.py --rounds 16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
import zstandard

from nixd.server.cli import main as cli_main
from tests.s3server import _ENV, S3Bucket, start_moto, use_s3
from tests.server.appenv import client_narinfo, make_nar
from tests.serverproc import ServerProcess, running_server

HASH = "0" * 31 + "1"


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _admin(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(list(argv)) == 0, out.getvalue()
    return out.getvalue()


@contextlib.contextmanager
def _server(state: Path, bucket: S3Bucket | None, *, redirect: bool) -> Iterator[ServerProcess]:
    _admin("init", str(state), "--org", "acme", "--listen", "127.0.0.1:0")
    if bucket is not None:
        use_s3(state, bucket, extra="redirect = true\n" if redirect else "")
    _admin("project", "create", str(state), "acme/app")
    with running_server(state) as server:
        yield server


def _measure(server: ServerProcess, nar: bytes, rounds: int, token: str) -> tuple[float, float]:
    auth = {"authorization": f"Bearer {token}"}
    compressed = zstandard.ZstdCompressor(level=1).compress(nar)
    url, text = client_narinfo(HASH, nar, compressed, compression="zstd")
    with httpx.Client(base_url=server.url, headers=auth, timeout=120) as c:
        assert c.put(f"/cache/acme/app/{url}", content=compressed).status_code == 200
        r = c.put(f"/cache/acme/app/{HASH}.narinfo", content=text.encode())
        assert r.status_code == 200, r.text
        nar_url = re.search(r"^URL: (\S+)$", c.get(f"/cache/{HASH}.narinfo").text, re.M)
        assert nar_url
        assert server.proc is not None
        pid = server.proc.pid
        sent = 0
        cpu0, wall0 = _cpu(pid), time.monotonic()
        for _ in range(rounds):
            with c.stream("GET", f"/cache/{nar_url.group(1)}", follow_redirects=True) as r:
                assert r.status_code == 200
                for chunk in r.iter_raw(1 << 20):
                    sent += len(chunk)
        cpu, wall = _cpu(pid) - cpu0, time.monotonic() - wall0
    gib = sent / (1 << 30)
    return cpu / gib, gib / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    os.environ.update(_ENV)
    moto = start_moto()
    try:
        with TemporaryDirectory() as tmp:
            root = Path(tmp)
            nar = make_nar(root / "nar", os.urandom(args.mib << 20))
            for name, s3, redirect in (
                ("local", False, False),
                ("s3-stream", True, False),
                ("s3-redirect", True, True),
            ):
                bucket = S3Bucket(moto, moto.new_bucket()) if s3 else None
                state = root / name
                with _server(state, bucket, redirect=redirect) as server:
                    token = re.search(
                        r"(nixd_\S+)",
                        _admin("token", "create", str(state), "--org", "acme", "--name", "b"),
                    )
                    assert token
                    per_gib, rate = _measure(server, nar, args.rounds, token.group(1))
                print(f"{name:12} server CPU {per_gib:6.3f} s/GiB   client {rate:6.2f} GiB/s")
    finally:
        moto.server.stop()


if __name__ == "__main__":
    main()
