"""What ``nixd apply`` does to a machine once a closure is in its store: profile, activation.

Model. A *target* is the kind of thing a closure configures, and it fixes three things,
the way the target's own tool does them (``nixos-rebuild``, ``darwin-rebuild``,
``home-manager switch``):

============  ==========================================  ===========================
target        profile set (``nix-env -p PROFILE --set``)  then runs
============  ==========================================  ===========================
nixos         ``/nix/var/nix/profiles/system``, for        ``OUT/bin/switch-to-configuration
              ``switch`` and ``boot`` only (``test`` and   ACTION`` (switch, boot, test,
              ``dry-activate`` leave it, as                dry-activate)
              ``nixos-rebuild`` does)
nix-darwin    ``/nix/var/nix/profiles/system``             ``OUT/activate``
home-manager  none by default: Home Manager's own          ``OUT/activate``
              ``activate`` sets its profile, and compares  (``dry-activate``: with
              the old generation with the new one to       ``DRY_RUN=1``, Home
              remove stale files, which a profile set      Manager's dry run)
              beforehand would defeat; ``--profile`` sets
              one after activation succeeded
profile       ``--profile PATH`` (required)                nothing
============  ==========================================  ===========================

Order, so that nothing is half-done: the program is checked (present, executable)
before the profile is touched; the profile is set before activation (a NixOS that
reboots mid-switch boots the new generation's bootloader entry, as with
``nixos-rebuild``); a failed activation leaves the profile on the new generation and
says how to roll back.

A chroot store (``--store /path`` or ``local?root=/path``) keeps its paths under
``ROOT/nix/store``: programs are run from there (for images being prepared, and tests);
their own ``/nix/store`` references are not rewritten.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from nixd.errors import ConfigError, NixdError

STORE_DIR = "/nix/store/"
SYSTEM_PROFILE = "/nix/var/nix/profiles/system"
MAX_LINKS = 16
"""Most symlinks followed from a profile to its store path (a loop stops there)."""


class ActivationError(NixdError):
    """The closure is not what the target needs, or setting the profile/activation failed."""


def hostname() -> str:
    """The short host name (what ``nixosConfigurations.NAME`` is usually keyed by)."""
    return socket.gethostname().split(".")[0]


def username() -> str:
    import pwd  # noqa: PLC0415

    return pwd.getpwuid(os.geteuid()).pw_name


def nix_system() -> str:
    """Nix's name of this platform (``x86_64-linux``, ``aarch64-darwin``, ...)."""
    machine = os.uname().machine
    machine = {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)
    return f"{machine}-{'darwin' if sys.platform == 'darwin' else 'linux'}"


@dataclass(frozen=True)
class Target:
    name: str
    default_output: Callable[[], str]
    """The output attribute when the reference names none (the attribute CI records)."""
    actions: tuple[str, ...]
    """Accepted ``--action`` values; the first is the default."""
    profile: str | None
    """The default profile, or None (home-manager: its own; profile: --profile needed)."""
    program: str | None
    """The activation program, relative to the output; None: nothing to run."""
    profile_actions: tuple[str, ...]
    """Actions that set the profile."""
    passes_action: bool = False
    """The action is the program's argument (switch-to-configuration)."""
    profile_after: bool = False
    """The profile (only an explicit --profile) is set after activation."""

    def environment(self, action: str) -> dict[str, str]:
        if self.name == "home-manager" and action == "dry-activate":
            return {"DRY_RUN": "1"}
        return {}


TARGETS: dict[str, Target] = {
    "nixos": Target(
        "nixos",
        lambda: f"nixosConfigurations.{hostname()}.config.system.build.toplevel",
        ("switch", "boot", "test", "dry-activate"),
        SYSTEM_PROFILE,
        "bin/switch-to-configuration",
        ("switch", "boot"),
        passes_action=True,
    ),
    "nix-darwin": Target(
        "nix-darwin",
        lambda: f"darwinConfigurations.{hostname()}.system",
        ("switch",),
        SYSTEM_PROFILE,
        "activate",
        ("switch",),
    ),
    "home-manager": Target(
        "home-manager",
        lambda: f"homeConfigurations.{username()}.activationPackage",
        ("switch", "dry-activate"),
        None,
        "activate",
        ("switch",),
        profile_after=True,
    ),
    "profile": Target(
        "profile",
        lambda: f"packages.{nix_system()}.default",
        ("switch",),
        None,
        None,
        ("switch",),
    ),
}


def store_root(store: str | None) -> Path:
    """Where the store's ``/nix/store`` is on this file system (``/`` but for chroot stores)."""
    if not store or store in ("auto", "daemon", "local") or store.startswith("unix:"):
        return Path("/")
    if store.startswith("/"):
        return Path(store)
    scheme, _, query = store.partition("?")
    if scheme in ("local", "auto"):
        root = parse_qs(query).get("root")
        return Path(root[-1]) if root and root[-1].startswith("/") else Path("/")
    raise ConfigError(f"--store {store!r}: nixd apply installs only into a local store")


def real_path(store: str | None, path: str) -> Path:
    return store_root(store) / path.lstrip("/")


def profile_target(profile: Path) -> str | None:
    """The store path a profile points to (through its generation link), or None."""
    current = profile
    for _ in range(MAX_LINKS):
        try:
            target = os.readlink(current)
        except FileNotFoundError:
            return None
        except OSError:
            return None
        if target.startswith(STORE_DIR):
            return target
        current = current.parent / target
    return None


@dataclass(frozen=True)
class Plan:
    """What applying one store path to one target does."""

    target: Target
    action: str
    store_path: str
    store: str | None
    profile: Path | None
    """The profile to set (None: none)."""
    sets_profile: bool
    previous: str | None
    """What the profile pointed to before."""

    @property
    def program(self) -> Path | None:
        if self.target.program is None:
            return None
        return real_path(self.store, self.store_path) / self.target.program

    @property
    def argv(self) -> list[str]:
        program = self.program
        if program is None:
            return []
        return [str(program), *([self.action] if self.target.passes_action else [])]

    @property
    def changes_profile(self) -> bool:
        return self.sets_profile and self.previous != self.store_path

    def describe(self) -> list[str]:
        """What it will do, as lines for a person (the dry run's text)."""
        lines = []
        if self.profile is not None and self.sets_profile:
            if self.previous == self.store_path:
                lines.append(f"profile {self.profile}: unchanged ({self.store_path})")
            else:
                lines.append(
                    f"profile {self.profile}: {self.previous or '(none)'} -> {self.store_path}"
                )
        elif self.profile is not None:
            lines.append(f"profile {self.profile}: left as it is ({self.action})")
        if self.argv:
            env = " ".join(f"{k}={v}" for k, v in self.target.environment(self.action).items())
            lines.append("run: " + (env + " " if env else "") + shlex.join(self.argv))
        else:
            lines.append("run: nothing (a profile only)")
        return lines


def plan(
    target: Target, action: str | None, store_path: str, store: str | None, profile: str | None
) -> Plan:
    """The plan for ``store_path`` (ConfigError for an action the target does not have)."""
    chosen = action or target.actions[0]
    if chosen not in target.actions:
        raise ConfigError(
            f"nixd apply {target.name} takes --action {' or '.join(target.actions)}, not {chosen!r}"
        )
    where = profile or target.profile
    if where is None and target.name == "profile":
        raise ConfigError("nixd apply profile needs --profile PATH (the profile to set)")
    path = Path(where).absolute() if where else None
    sets = path is not None and chosen in target.profile_actions
    return Plan(
        target, chosen, store_path, store, path, sets, profile_target(path) if path else None
    )


def check_program(p: Plan) -> None:
    """The activation program is there and executable, before anything changes."""
    program = p.program
    if program is None:
        return
    if not program.is_file() or not os.access(program, os.X_OK):
        raise ActivationError(
            f"{p.store_path} has no executable {p.target.program}: it is not a "
            f"{p.target.name} configuration (nothing was changed)"
        )


def check_writable(p: Plan) -> None:
    """The profile can be set by this user, checked before anything is fetched."""
    if p.profile is None or not p.sets_profile:
        return
    where = p.profile.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not os.access(where, os.W_OK):
        raise ActivationError(
            f"cannot set the profile {p.profile}: {where} is not writable by this user "
            "(run as root, or pass --profile; nothing was changed)"
        )


def set_profile(p: Plan, nix_env: str = "nix-env") -> None:
    """``nix-env -p PROFILE --set PATH``: a new generation (none if it is the current one)."""
    assert p.profile is not None
    p.profile.parent.mkdir(parents=True, exist_ok=True)
    cmd = [nix_env, "--profile", str(p.profile), "--set", p.store_path]
    if p.store:
        cmd += ["--store", p.store]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ActivationError(
            f"setting the profile {p.profile} failed: {done.stderr.strip()[-2000:]}"
        )


def activate(p: Plan) -> int:
    """Run the activation program, its output going to ours; its exit status."""
    if not p.argv:
        return 0
    env = {**os.environ, **p.target.environment(p.action)}
    return subprocess.run(p.argv, env=env, check=False).returncode


def apply_plan(p: Plan) -> None:
    """Profile and activation in the order of the module docstring."""
    check_program(p)
    if p.sets_profile and not p.target.profile_after:
        set_profile(p)
    status = activate(p)
    if status != 0:
        undo = (
            f"; the profile {p.profile} points at the new generation "
            f"(nix-env -p {p.profile} --rollback goes back)"
            if p.sets_profile and not p.target.profile_after
            else ""
        )
        raise ActivationError(f"{shlex.join(p.argv)} failed with exit status {status}{undo}")
    if p.sets_profile and p.target.profile_after:
        set_profile(p)
