"""Directories created with exactly the modes asked for, whatever the process's umask.

The daemon runs as root, sometimes without a ``UMask=`` (a shell, a container), so a
directory created with ``os.makedirs`` could come out group- or world-writable. Shared by
the daemon's files and the proxy's store (rooms that do not import each other).
"""

from __future__ import annotations

import os
from pathlib import Path


def make_dirs(
    path: str | os.PathLike[str], mode: int = 0o700, *, parents_mode: int = 0o755
) -> None:
    """Create ``path`` and its missing parents with exactly these modes (OSError on failure).

    Each directory is created private (0700) and then given its mode, so none is ever
    looser than intended, even for an instant. Existing directories are left as they
    are: their modes are the administrator's.
    """
    target = Path(path)
    missing: list[Path] = []
    current = target
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        os.chmod(directory, mode if directory == target else parents_mode)
