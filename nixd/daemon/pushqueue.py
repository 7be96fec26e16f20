"""The push queue file: what ``nixd post-build-hook`` appends and the daemon takes.

Kept apart from :mod:`nixd.daemon.push` so the hook imports nothing heavy (no trio, no
httpx): it runs after every build and must return at once. The file is JSON lines, one
``{"paths": [...], "to": ..., "at": ...}`` per call, mode 0600. Writers and the drainer
take an exclusive ``flock``; the drainer renames the file aside (``<name>.<ns>.taken``)
under it, and a writer that opened the file before the rename sees its inode changed and
opens the new file, so no entry lands in a file already read.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from nixd.errors import NixdError


class QueueError(NixdError):
    """The queue file could not be written (permissions, or it stayed locked)."""


def _locked(path: Path, *, create: bool, wait: float) -> int | None:
    """An fd of ``path`` under an exclusive flock, still naming ``path``; None if absent."""
    deadline = time.monotonic() + wait
    while True:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise QueueError(f"{path} stayed locked") from None
                    time.sleep(0.01)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # renamed aside by the drainer meanwhile: open the new one


def enqueue(queue: str | os.PathLike[str], paths: list[str], to: str | None) -> None:
    """Append one entry to the queue file; never waits for the daemon (the hook's path)."""
    entry = json.dumps({"paths": paths, "to": to, "at": time.time()}) + "\n"
    path = Path(queue)
    try:
        fd = _locked(path, create=True, wait=5.0)
    except OSError as exc:
        raise QueueError(f"cannot queue in {path}: {exc.strerror}") from exc
    assert fd is not None
    try:
        os.write(fd, entry.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def take_queue(queue: Path) -> list[Path]:
    """Rename the queue aside (under its lock) and return every file set aside so far."""
    fd = _locked(queue, create=False, wait=5.0)
    if fd is not None:
        try:
            if os.fstat(fd).st_size:
                os.rename(queue, queue.with_name(f"{queue.name}.{time.time_ns()}.taken"))
        finally:
            os.close(fd)
    return sorted(queue.parent.glob(f"{queue.name}.*.taken"))
