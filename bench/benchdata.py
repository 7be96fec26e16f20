"""Test data of the proxy benchmark: one source store holding three workloads, and the
static ``file://`` cache nginx serves.

The workloads (:class:`Spec` says how big):

- ``big``: one input-addressed path holding one file of random bytes (default 1 GiB);
- ``closure``: ``n`` small text files made by ``builtins.toFile``, file ``i`` naming files
  ``2i+1`` and ``2i+2``, so each references two others (Nix walks it level by level);
- ``shootout``: a closure shaped like a desktop application's (the cache-shootout's
  firefox closure is 1,541 MiB): a few hundred input-addressed paths of mixed sizes — a
  handful over 100 MiB, a few dozen of megabytes, many of kilobytes — each a directory of
  files, half random bytes and half compressible (a skewed 16-letter alphabet, which zstd
  takes to about half), path ``i`` referencing ``2i+1``, ``2i+2`` and one more later path.

Everything is deterministic from :attr:`Spec.seed`: the paths are derivations whose builder
(the system's ``/usr/bin/python3``, inside the chroot store's build chroot) writes SHAKE-256
output of the seed, so the same spec gives the same store paths and NAR hashes on every
machine. A generated data set is kept in ``WORK/data-<digest of the spec>/`` and reused
by later runs with the same spec.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 1 << 20

NIX_CONF = """\
build-users-group =
sandbox = false
experimental-features = nix-command
substituters =
fsync-metadata = false
sandbox-paths = /bin /usr /lib /lib64
max-jobs = 2
"""

# The builder of every generated path: argv[1] is a JSON list of [relative path, size,
# kind, seed]; kind "r" is random, "c" compressible. refs (an environment variable holding
# the store paths this one references) goes into nix-support/refs, which is how Nix
# finds them as references.
GENERATOR = r"""
import hashlib, json, os, sys
out = os.environ["out"]
table = bytes(b"  eeeetttaaoinshrd\n"[i % 19] for i in range(256))
for rel, size, kind, seed in json.loads(sys.argv[1]):
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        block = 0
        while size > 0:
            n = min(size, 1 << 20)
            data = hashlib.shake_256(f"{seed}/{block}".encode()).digest(n)
            f.write(data if kind == "r" else data.translate(table))
            size -= n
            block += 1
    if rel.startswith("bin/"):
        os.chmod(path, 0o755)
os.makedirs(os.path.join(out, "nix-support"), exist_ok=True)
with open(os.path.join(out, "nix-support", "refs"), "w") as f:
    f.write(os.environ.get("refs", ""))
"""

PATHS_NIX = r"""
# spec: a JSON file {"paths": [{"name", "files", "refs"}, ...]}; path i's refs are indices > i.
{ spec, generator }:
let
  s = builtins.fromJSON (builtins.readFile spec);
  mk = i: p: derivation {
    name = p.name;
    system = builtins.currentSystem;
    builder = "/usr/bin/python3";
    args = [ "-c" generator (builtins.toJSON p.files) ];
    refs = builtins.concatStringsSep " " (map (j: "${builtins.elemAt drvs j}") p.refs);
  };
  drvs = builtins.genList (i: mk i (builtins.elemAt s.paths i)) (builtins.length s.paths);
in drvs
"""

CLOSURE_NIX = r"""
# n small text files; file i names files 2i+1 and 2i+2, so they are its references.
n: let
  body = i: builtins.concatStringsSep "" (builtins.genList
    (j: builtins.hashString "sha256" "nixd-bench-${toString i}-${toString j}") 64);
  file = i: builtins.toFile "bench-small-${toString i}" (body i
    + (if 2 * i + 1 < n then "\n${file (2 * i + 1)}" else "")
    + (if 2 * i + 2 < n then "\n${file (2 * i + 2)}" else ""));
in builtins.concatStringsSep "\n" (builtins.genList file n)
"""


@dataclass(frozen=True)
class Spec:
    """How big each workload is; the data set is a pure function of this."""

    big_mib: int = 1024
    closure: int = 300
    shootout_mib: int = 1536
    shootout_paths: int = 300
    seed: int = 11

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + GENERATOR + PATHS_NIX + CLOSURE_NIX
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def shootout_layout(spec: Spec) -> list[dict[str, object]]:
    """The shootout closure's paths: name, files (path, size, kind, seed) and references.

    Tiers of sizes (before scaling to ``shootout_mib``): 2% of the paths 100-200 MiB,
    8% 8-32 MiB, 23% 256 KiB-4 MiB, the rest 2-64 KiB, in random order over the tree.
    """
    rng = random.Random(spec.seed)
    n = max(spec.shootout_paths, 4)
    tiers = [
        (max(1, round(n * 0.02)), 100 * MIB, 200 * MIB),
        (max(1, round(n * 0.08)), 8 * MIB, 32 * MIB),
        (max(1, round(n * 0.23)), 256 << 10, 4 * MIB),
    ]
    sizes: list[int] = []
    for count, lo, hi in tiers:
        sizes += [rng.randint(lo, hi) for _ in range(count)]
    sizes += [rng.randint(2 << 10, 64 << 10) for _ in range(n - len(sizes))]
    scale = spec.shootout_mib * MIB / sum(sizes)
    sizes = [max(1024, int(s * scale)) for s in sizes]
    rng.shuffle(sizes)
    paths: list[dict[str, object]] = []
    for i, size in enumerate(sizes):
        count = min(40, max(1, math.ceil(size / (4 * MIB)))) + rng.randint(0, 2)
        cuts = sorted(rng.randint(0, size) for _ in range(count - 1))
        parts = [b - a for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
        files = []
        for k, part in enumerate(parts):
            where = rng.choice(("bin", "lib", "share/data"))
            kind = rng.choice("rc")
            files.append([f"{where}/f{k}", part, kind, f"{spec.seed}/{i}/{k}"])
        refs = [j for j in (2 * i + 1, 2 * i + 2) if j < n]
        if i + 3 < n:
            refs.append(rng.randint(i + 3, n - 1))
        paths.append({"name": f"shootout-{i}", "files": files, "refs": sorted(set(refs))})
    return paths


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class NixEnv:
    """An isolated single-user Nix (root, chroot stores) for setup commands."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "nix.conf").write_text(NIX_CONF)
        for d in ("home", "xdg"):
            (root / d).mkdir(exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "NIX_CONF_DIR": str(root / "etc"),
            "NIX_USER_CONF_FILES": str(root / "etc" / "nix.conf"),
            "XDG_CACHE_HOME": str(root / "xdg"),
            "HOME": str(root / "home"),
            "NIX_REMOTE": "",
            "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        }

    def run(self, *args: str, xdg: Path | None = None, timeout: float = 3600) -> str:
        env = dict(self.env)
        if xdg is not None:
            env["XDG_CACHE_HOME"] = str(xdg)
        proc = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode:
            raise SystemExit(f"{' '.join(args[:6])} ... failed:\n{proc.stderr[-4000:]}")
        return proc.stdout


@dataclass
class Dataset:
    """A generated data set: the source store, the paths of each workload, the file cache."""

    dir: Path
    spec: Spec
    big: list[str]
    closure: list[str]
    shootout: list[str]
    """Every path of the shootout closure, root first."""
    key_file: Path
    public_key: str
    nar_bytes: dict[str, int]
    """NarSize summed over each workload's paths."""
    file_bytes: dict[str, int]
    """FileSize (zstd, as nix copy --to file:// wrote it) summed per workload."""
    warmup: list[str]
    """Paths in no workload: a fresh proxy fetches these before it is measured, so that a
    cold copy measures an empty store, not a process's first requests (imports, the
    upstream connection, the access token)."""

    @property
    def src(self) -> Path:
        return self.dir / "src"

    @property
    def filecache(self) -> Path:
        return self.dir / "filecache"

    def workload(self, name: str) -> list[str]:
        return {"big": self.big, "closure": self.closure, "shootout": self.shootout}[name]

    def roots(self, name: str) -> list[str]:
        """What ``nix copy`` is asked for: the closure's root for shootout (Nix walks it)."""
        return self.shootout[:1] if name == "shootout" else self.workload(name)


def _narinfo_fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key] = value
    return out


def _warmup_paths(nix: NixEnv, base: Path, spec: Spec) -> list[str]:
    """Two content-addressed paths in no workload: one small NAR, one of 1 MiB."""
    paths = []
    for name, size in (("bench-warmup-small", 4 << 10), ("bench-warmup-1M", MIB)):
        blob = base / name
        blob.write_bytes(hashlib.shake_256(f"{spec.seed}/{name}".encode()).digest(size))
        paths.append(nix.run("nix-store", "--store", str(base / "src"), "--add", str(blob)).strip())
        blob.unlink()
    return paths


def prepare(work: Path, spec: Spec) -> Dataset:
    """The data set for ``spec`` under ``work``: made (minutes) unless already there."""
    from nixd.nix.signing import SecretKey  # noqa: PLC0415 - the bench's only nixd import here

    base = work / f"data-{spec.digest()}"
    meta_file = base / "dataset.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        log(f"reusing the data set in {base}")
        if "warmup" not in meta:  # a data set made before warm-up paths existed
            meta["warmup"] = _warmup_paths(NixEnv(base / "nix"), base, spec)
            meta_file.write_text(json.dumps(meta, indent=1))
        return Dataset(dir=base, spec=spec, key_file=base / "sk", **meta)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    started = time.monotonic()
    nix = NixEnv(base / "nix")
    src = base / "src"
    key = SecretKey.generate("nixd-bench-1")
    (base / "sk").write_text(key.render())
    (base / "sk").chmod(0o600)

    (base / "generator.py").write_text(GENERATOR)
    (base / "paths.nix").write_text(PATHS_NIX)
    big_spec = {
        "paths": [
            {"name": f"bench-big-{spec.big_mib}M", "refs": [],
             "files": [["share/blob", spec.big_mib * MIB, "r", f"{spec.seed}/big"]]},
        ]
    }  # fmt: skip
    layout = {"paths": shootout_layout(spec)}

    def build(name: str, paths_spec: dict[str, object]) -> list[str]:
        (base / f"{name}.json").write_text(json.dumps(paths_spec))
        log(f"generating {name}: {len(paths_spec['paths'])} path(s)")  # type: ignore[arg-type]
        out = nix.run(
            "nix-build", "--store", str(src), "--no-out-link", str(base / "paths.nix"),
            "--arg", "spec", str(base / f"{name}.json"),
            "--argstr", "generator", GENERATOR,
        )  # fmt: skip
        return out.split()

    big = build("big", big_spec)
    shootout = build("shootout", layout)
    log(f"generating closure: {spec.closure} small paths")
    (base / "closure.nix").write_text(CLOSURE_NIX)
    expr = f"import {base / 'closure.nix'} {spec.closure}"
    closure = nix.run(
        "nix", "eval", "--impure", "--store", str(src), "--raw", "--expr", expr
    ).split()
    assert len(closure) == spec.closure, len(closure)
    closure_of_root = nix.run("nix-store", "--store", str(src), "-qR", shootout[0]).split()
    assert sorted(closure_of_root) == sorted(shootout), "the shootout root must reach every path"

    log("nix copy --to file://…?compression=zstd (the static cache nginx serves)")
    cache = base / "filecache"
    nix.run(
        "nix", "copy", "--store", str(src),
        "--to", f"file://{cache}?compression=zstd&secret-key={base / 'sk'}",
        *big, *closure, *shootout,
    )  # fmt: skip
    nar_bytes: dict[str, int] = {}
    file_bytes: dict[str, int] = {}
    for name, paths in (("big", big), ("closure", closure), ("shootout", shootout)):
        nar_bytes[name] = file_bytes[name] = 0
        for p in paths:
            fields = _narinfo_fields((cache / f"{Path(p).name[:32]}.narinfo").read_text())
            nar_bytes[name] += int(fields["NarSize"])
            file_bytes[name] += int(fields["FileSize"])
    meta = {
        "warmup": _warmup_paths(nix, base, spec),
        "big": big, "closure": closure, "shootout": shootout,
        "public_key": key.public().render(), "nar_bytes": nar_bytes, "file_bytes": file_bytes,
    }  # fmt: skip
    meta_file.write_text(json.dumps(meta, indent=1))
    log(f"data set made in {time.monotonic() - started:.0f} s: {base}")
    return Dataset(dir=base, spec=spec, key_file=base / "sk", **meta)  # type: ignore[arg-type]
