"""How long completing a closure from a local upstream takes.

Usage: ``PYTHONPATH=. python bench/mirror_complete.py DIR [N] [--shape layered|chain]
[--compression xz|zstd]``. Builds N (default 500) tiny derivations with the real Nix in
DIR (no nixpkgs), copies the closure to a signed ``file://`` cache, serves it with nginx
(static files, one worker; Python's http.server if nginx is missing), and times
:meth:`~nixd.server.mirror.service.MirrorService.complete` of the top path into an empty
slice of a fresh server store (SQLite, local blobs): every narinfo checked, every NAR
decompressed, parsed, hashed, recompressed to zstd and committed, every record durable.

Shapes: ``layered`` (the default) is 20 layers, each path referring to three of the layer
below — wide like a real closure; ``chain`` refers each path to the two before it, the
worst case for parallelism (each fetch reveals the next). The mirror's limits are the
defaults (8 in flight to the upstream, no rate limit here).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench.benchproc import Nginx
from nixd.nix.signing import SecretKey
from nixd.server.config import MirrorSection
from nixd.server.mirror.service import MirrorService
from nixd.server.storage.db import create_org, create_project, open_db
from nixd.server.storage.store import Store
from tests.realnix import RealNix


def expression(n: int, shape: str, salt: str) -> str:
    out = [
        "let mk = name: script: derivation { inherit name; system = builtins.currentSystem;",
        '  builder = "/bin/sh"; args = [ "-c" script ]; };',
    ]
    rng = random.Random(7)
    layers = 20
    per = max(1, (n - 1) // layers)
    for i in range(n - 1):
        if shape == "chain":
            refs = list(range(max(0, i - 2), i))
        else:
            layer = i // per
            below = range((layer - 1) * per, layer * per) if layer else range(0)
            refs = rng.sample(list(below), min(3, len(below)))
        body = " ".join(f"${{p{j}}}" for j in refs)
        out.append(f'  p{i} = mk "b-{i}" "echo {salt} {i} {body} > $out";')
    everything = " ".join(f"${{p{j}}}" for j in range(n - 1))
    out.append(f'in mk "b-top" "echo {everything} > $out"')
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("n", type=int, nargs="?", default=500)
    ap.add_argument("--shape", choices=("layered", "chain"), default="layered")
    ap.add_argument("--compression", default="xz")
    args = ap.parse_args()
    root: Path = args.dir
    root.mkdir(parents=True, exist_ok=True)
    nix = RealNix.create(root / "nix")
    shared = " ".join(p for p in ("/bin", "/usr", "/lib", "/lib64") if os.path.exists(p))
    with (nix.root / "etc" / "nix.conf").open("a") as f:
        f.write(f"sandbox-paths = {shared}\nmax-jobs = 2\n")
    t0 = time.monotonic()
    top = nix.build(expression(args.n, args.shape, os.urandom(4).hex()))
    secret = SecretKey.generate("bench-up-1")
    (root / "up.sec").write_text(secret.render())
    cache = root / f"cache-{args.shape}-{args.compression}"
    nix.run(
        ["nix", "copy", "--to",
         f"file://{cache}?compression={args.compression}&secret-key={root / 'up.sec'}", top]
    )  # fmt: skip
    paths = nix.run(["nix-store", "-qR", top]).stdout.decode().split()
    print(f"built and cached {len(paths)} paths in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    nginx = Nginx(root / "nginx", root=cache)
    try:
        with tempfile.TemporaryDirectory(dir=root) as state:
            conn = open_db(Path(state) / "server.db")
            create_org(conn, "acme")
            create_project(conn, "acme", "app")
            store = Store.open(conn, Path(state) / "blobs")
            project = store.project("acme", "app")
            assert project is not None
            section = MirrorSection(
                name="up", url=nginx.url, public_keys=(secret.public().render(),),
                slices=("acme/app",), requests_per_second=0.0,
            )  # fmt: skip
            service = MirrorService((section,), store, max_nar_size=1 << 30)
            hp, _, name = top.rsplit("/", 1)[-1].partition("-")

            async def run() -> tuple[float, int, list[str]]:
                start = time.monotonic()
                try:
                    result = await service.complete(project, hp, name, deep=True)
                finally:
                    await service.aclose()
                return time.monotonic() - start, result.fetched, result.missing

            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            took, fetched, missing = trio.run(run)
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
            stats = store.stats()
            conn.close()
    finally:
        nginx.stop()
    assert not missing, missing
    print(
        f"completed a {len(paths)}-path closure ({args.shape}, {args.compression}, upstream "
        f"{nginx.kind}): {fetched} fetched in {took:.2f}s = {fetched / took:.0f} paths/s; "
        f"{stats['bytes']} bytes of zstd blobs; server CPU {cpu:.2f}s "
        f"({cpu / fetched * 1000:.1f} ms/path); load average {os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
