"""Crash-safe file replacement for everything the daemon writes (netrc, nix.conf, tokens).

The model: a reader of a path sees either the whole old file or the whole new one,
whenever the writer dies. The new content goes to a temporary file in the same directory
(so the rename cannot cross file systems), gets its mode and owner while still private,
is fsynced, and then atomically renamed over the target; fsyncing the directory makes
the rename itself durable. A crash before the rename leaves only a stray
``.<name>.*.nixd-tmp`` file, which :func:`clean_stale_temp_files` sweeps.

Modes never come from the umask: a file gets its mode with ``fchmod`` before it becomes
visible, and a directory created here gets its mode with ``chmod`` (:func:`make_dirs`),
so a daemon started with ``UMask=0000`` writes nothing anyone else may change.

An owner is set with ``fchown`` only when it differs from the temporary file's own: the
shipped systemd unit denies the ``@privileged`` system calls (``fchown`` among them) with
EPERM, so rewriting a root-owned ``/etc/nix/nix.conf`` as root must not ask for one
(tests/daemon/test_seccomp.py runs these writes under that filter).

These are plain blocking functions; the daemon calls them via
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import stat
from pathlib import Path

from nixd import dirs
from nixd.errors import ConfigError

logger = logging.getLogger(__name__)

_TMP_SUFFIX = ".nixd-tmp"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(
    path: str | os.PathLike[str], mode: int = 0o700, *, parents_mode: int = 0o755
) -> None:
    """:func:`nixd.dirs.make_dirs`, its failure a ConfigError naming the directory."""
    try:
        dirs.make_dirs(path, mode, parents_mode=parents_mode)
    except OSError as exc:
        raise ConfigError(f"cannot create {exc.filename or path}: {exc.strerror}") from exc


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    ``mode`` and ``owner`` (uid, gid) are set on the temporary file before the rename, so
    the target never exists, even for an instant, with looser permissions. A symlink at
    ``path`` is replaced by a regular file; callers that must not do that check first.
    """
    target = Path(path)
    directory = target.parent
    # O_EXCL with a random name; mkstemp-like but with our suffix for the sweeper.
    for _ in range(100):
        tmp = directory / f".{target.name}.{os.urandom(6).hex()}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot create a file in {directory}: {exc.strerror}") from exc
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise ConfigError(f"cannot create a temporary file in {directory}")
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if owner is not None:
                st = os.fstat(fd)
                if (st.st_uid, st.st_gid) != owner:  # a no-op fchown is still @privileged
                    os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write {target}: {exc.strerror}") from exc
        raise
    try:
        _fsync_dir(directory)
    except OSError as exc:
        raise ConfigError(f"cannot sync directory {directory}: {exc.strerror}") from exc


def read_if_exists(path: str | os.PathLike[str]) -> bytes | None:
    """The content of ``path``, or None when there is no such file."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def file_mode(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """``(permission bits, uid, gid)`` of a regular file, or None when it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot stat {path}: {exc.strerror}") from exc
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def remove_file(path: str | os.PathLike[str]) -> bool:
    """Delete ``path`` durably; False when it was already gone."""
    target = Path(path)
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot remove {target}: {exc.strerror}") from exc
    try:
        _fsync_dir(target.parent)
    except OSError as exc:
        raise ConfigError(f"cannot sync directory {target.parent}: {exc.strerror}") from exc
    return True


def clean_stale_temp_files(path: str | os.PathLike[str]) -> int:
    """Remove temporary files a crashed :func:`atomic_write` of ``path`` left; how many.

    Only call this when no other writer of ``path`` can be running (the daemon is the
    only one).
    """
    target = Path(path)
    removed = 0
    try:
        candidates = list(target.parent.glob(f".{glob.escape(target.name)}.*{_TMP_SUFFIX}"))
    except OSError:
        return 0
    for stale in candidates:
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed += 1
            logger.info("removed %s, left by an interrupted write", stale)
    return removed
