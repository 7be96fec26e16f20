"""An isolated real Nix 2.8 for tests: its own conf dir, cache home and chroot store.

See NIX-PROTOCOL.md ("Running Nix 2.8 in tests"): single-user, as root, no daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NIX_CONF = """\
build-users-group =
sandbox = false
experimental-features = nix-command
substitute = true
fsync-metadata = false
substituters =
sandbox-paths = /bin /usr /lib /lib64
"""


@dataclass
class RealNix:
    """One isolated Nix: ``run`` executes a Nix command inside it."""

    root: Path
    store: Path
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path, extra_conf: str = "") -> RealNix:
        conf = root / "etc"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "nix.conf").write_text(NIX_CONF + extra_conf)
        for d in ("cache", "home", "store"):
            (root / d).mkdir(exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "NIX_CONF_DIR": str(conf),
            "NIX_USER_CONF_FILES": str(conf / "nix.conf"),
            "XDG_CACHE_HOME": str(root / "cache"),
            "XDG_CONFIG_HOME": str(root / "home" / ".config"),
            "XDG_DATA_HOME": str(root / "home" / ".local" / "share"),
            "HOME": str(root / "home"),
            "NIX_REMOTE": "",
            "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        }
        return cls(root=root, store=root / "store", env=env)

    def run(
        self,
        args: Sequence[str],
        *,
        store: Path | bool | None = True,
        check: bool = True,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``args`` (``nix``, ``nix-store``, ``nix-build`` ...) in this Nix.

        ``store=True`` adds ``--store <chroot store>``; a Path picks another chroot store;
        ``False``/``None`` adds nothing (for commands on plain files such as ``--dump``).
        """
        cmd = list(args)
        if store is True:
            store = self.store
        if isinstance(store, Path):
            cmd[1:1] = ["--store", str(store)]
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            env={**self.env, **(env or {})},
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
            )
        return proc

    def build(self, expr: str, *, store: Path | None = None) -> str:
        """``nix-build -E expr`` into the chroot store; return the out path (logical).

        Builds in a chroot store always run in a chroot: ``sandbox-paths`` above brings
        ``/bin/sh`` and coreutils in, but the builder gets no ``PATH`` unless it sets one.
        """
        proc = self.run(
            ["nix-build", "--no-out-link", "-E", expr],
            store=store or self.store,
        )
        return proc.stdout.decode().strip().splitlines()[-1]

    def real_path(self, store_path: str, store: Path | None = None) -> Path:
        """Where a logical ``/nix/store/...`` path lives on disk in a chroot store."""
        return (store or self.store) / store_path.lstrip("/")


def nix_available() -> bool:
    return shutil.which("nix") is not None and shutil.which("nix-store") is not None
