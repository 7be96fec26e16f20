"""The shipped unit's system call filter, applied to a process without systemd.

systemd is not running here (no ``systemd-run``), so this reads the ``SystemCallFilter=``
and ``SystemCallErrorNumber=`` lines of ``systemd/nixd.service``, expands their ``@sets``
with the real ``systemd-analyze syscall-filter`` (the same tables systemd uses) and loads
the result with libseccomp (through ctypes) the way systemd does: the first line, an
allow-list, allows its sets; each later ``~`` line removes its sets from it; everything
else fails with the configured errno.

``python -m tests.daemon.seccomp SPEC`` loads the filter described by the JSON ``SPEC``
(``{"allow": [...], "errno": N}``) into itself and then runs nixd's file writes
(:func:`nixd_writes`), printing one JSON line with what happened;
``python -m tests.daemon.seccomp exec SPEC ARGV...`` loads it and execs ``ARGV`` (a
filter outlives ``execve``), to run the whole daemon under it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SCMP_ACT_ALLOW = 0x7FFF0000


def scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


def syscall_sets() -> dict[str, list[str]]:
    """Every ``@set`` systemd knows, as its direct members (syscalls and nested sets)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is required (apt-get install systemd)"
    out = subprocess.run(
        [analyze, "syscall-filter", "--no-pager"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    sets: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = sets.setdefault(line.strip(), [])
        elif not line.startswith(" "):
            current = None  # a trailing "# Unlisted system calls" block, or a blank line
        elif current is not None and (entry := line.strip()) and not entry.startswith("#"):
            current.append(entry)
    return sets


def expand(names: list[str], sets: dict[str, list[str]]) -> set[str]:
    result: set[str] = set()
    stack = list(names)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.startswith("@"):
            assert name in sets, f"unknown system call set {name}"
            stack.extend(sets[name])
        else:
            result.add(name)
    return result


def unit_filter(service: str) -> tuple[list[str], int]:
    """(allowed system calls, errno for the rest) from a unit file's text."""
    sets = syscall_sets()
    allowed: set[str] | None = None
    number = errno.EPERM
    for raw in service.splitlines():
        key, sep, value = raw.partition("=")
        if not sep:
            continue
        if key.strip() == "SystemCallErrorNumber":
            number = getattr(errno, value.strip())
        if key.strip() != "SystemCallFilter":
            continue
        value = value.strip()
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split(), sets)
        if allowed is None:
            assert not deny, "the unit's first SystemCallFilter= is expected to be an allow-list"
            allowed = names
        elif deny:
            allowed -= names
        else:
            allowed |= names
    assert allowed is not None, "the unit has no SystemCallFilter="
    return sorted(allowed), number


def load_filter(allowed: list[str], number: int) -> None:
    """Allow ``allowed``, fail every other system call with ``number``; for good."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(scmp_act_errno(number))
    assert ctx, "seccomp_init failed"
    try:
        for name in allowed:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a system call of this architecture
                continue
            rc = lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0)
            assert rc == 0, f"seccomp_rule_add({name}) = {rc}"
        rc = lib.seccomp_load(ctx)
        assert rc == 0, f"seccomp_load = {rc}"
    finally:
        lib.seccomp_release(ctx)


def nixd_writes(root: Path) -> dict[str, object]:
    """What the daemon writes at login, token renewal and logout, under the filter."""
    from nixd.daemon import files  # noqa: PLC0415 - imported before the filter is loaded
    from nixd.daemon.nixsetup import NixSetup, NixSetupConfig, NixState  # noqa: PLC0415

    report: dict[str, object] = {}
    # the filter is really there: an fchown that changes the owner is refused
    probe = root / "probe"
    probe.write_bytes(b"")
    try:
        os.chown(probe, 65534, 65534)
        report["chown_denied"] = False
    except PermissionError:
        report["chown_denied"] = True

    conf = root / "etc"
    setup = NixSetup(
        NixSetupConfig(
            nix_conf=conf / "nix.conf", fragment=conf / "nixd.conf", netrc=conf / "nixd-netrc"
        )
    )
    state = NixState("http://127.0.0.1:41234", "c2VjcmV0LXByb3h5", (), (("cache.example", "t1"),))
    first = setup.apply(state)
    report["login"] = [first.netrc_changed, first.fragment_changed, first.nix_conf_changed]
    report["in_effect"] = first.in_effect
    renewed = NixState(state.proxy_url, state.proxy_secret, (), (("cache.example", "t2"),))
    report["renewal"] = setup.apply(renewed).netrc_changed
    files.atomic_write(root / "state.json", b"{}", mode=0o600)
    report["include_added"] = "!include" in (conf / "nix.conf").read_text()
    report["logout"] = setup.remove()
    report["nix_conf_restored"] = (conf / "nix.conf").read_text()

    # a nix.conf owned by someone else needs a real fchown, which the filter denies:
    # reported as a problem with what to do, never an exception out of apply
    other = root / "other"
    foreign = NixSetup(
        NixSetupConfig(
            nix_conf=other / "nix.conf", fragment=other / "nixd.conf", netrc=other / "nixd-netrc"
        )
    )
    report["foreign_owner_problem"] = foreign.apply(state).problem
    return report


def main() -> None:
    if sys.argv[1] == "exec":
        spec = json.loads(sys.argv[2])
        load_filter(spec["allow"], spec["errno"])
        os.execv(sys.argv[3], sys.argv[3:])
    spec = json.loads(sys.argv[1])
    import nixd.daemon.nixsetup  # noqa: F401, PLC0415 - every import before the filter

    root = Path(spec["root"])
    (root / "other").mkdir()
    (root / "other" / "nix.conf").write_text("sandbox = false\n")
    os.chown(root / "other" / "nix.conf", 65534, 65534)
    load_filter(spec["allow"], spec["errno"])
    print(json.dumps(nixd_writes(root)))


if __name__ == "__main__":
    main()
