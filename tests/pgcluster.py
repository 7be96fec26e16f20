"""A throwaway PostgreSQL cluster for the tests: Debian's binaries, a temp dir, a Unix socket.

``pg_cluster`` (session scope) runs ``initdb`` and ``pg_ctl start`` once per test session,
in a directory of its own under the system temp dir (the cluster's user must be able to
reach it, and pytest's ``tmp_path`` is private to root), listening only on a Unix socket
in that directory (no TCP port to collide with anything). As root the cluster runs as the
``postgres`` system user (``runuser -u postgres --``), which owns the directory; otherwise
as the current user. Settings favour speed (``fsync=off``: a crash of the test machine
loses nothing of value). It is stopped (``pg_ctl stop -m immediate``) and removed at the
end of the session whatever happened, the teardown of a failed session included. The
benchmarks start their own cluster the same way (:func:`throwaway_cluster`, with
durable settings).

``pg_database`` gives each test a fresh, empty database and drops it afterwards.

Without the binaries the tests that need them are skipped, saying so; in CI (``CI`` set)
they fail instead, because there ``scripts/setup`` must have installed ``postgresql``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("NIXD_PG_BIN", "/usr/lib/postgresql/15/bin"))
PORT = 5432  # only names the socket file: the cluster listens on no TCP address
_names = itertools.count()


@dataclass(frozen=True)
class PgCluster:
    """A running cluster: where its socket is and who may connect (trust, local only)."""

    root: Path
    socket_dir: Path
    user: str

    @property
    def postmaster_pid(self) -> int:
        """The server process's PID (first line of ``postmaster.pid``), for its CPU time."""
        return int((self.root / "data" / "postmaster.pid").read_text().split()[0])

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for ``dbname`` over the cluster's Unix socket."""
        return f"postgresql:///{dbname}?host={self.socket_dir}&port={PORT}&user={self.user}"

    def admin(self, sql: str) -> None:
        """Run one statement as the superuser, outside a transaction (CREATE DATABASE)."""
        import psycopg  # noqa: PLC0415 - only PostgreSQL tests pay for the import

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)


def pg_available() -> bool:
    return all((PG_BIN / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres"))


def require_pg() -> None:
    """Skip (or fail, in CI) when PostgreSQL's server binaries are not installed."""
    if pg_available():
        return
    reason = f"PostgreSQL server binaries not found in {PG_BIN} (apt-get install postgresql)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _as_owner(argv: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else argv


TEST_SETTINGS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=200 -c shared_buffers=32MB"
)
"""Speed over safety: a crash of the test machine loses nothing of value."""


class PgStartError(RuntimeError):
    """``initdb`` or ``pg_ctl start`` failed; the message carries their output and log."""


@contextlib.contextmanager
def throwaway_cluster(
    settings: str = TEST_SETTINGS, prefix: str = "nixd-pg-"
) -> Iterator[PgCluster]:
    """A cluster of its own in a new temp dir, on a Unix socket only, removed on exit.

    Shared by the test fixture and the benchmarks (which pass production-like
    ``settings``): as root it runs as ``postgres``, which must own the directory.
    """
    run_as = "postgres" if os.geteuid() == 0 else None
    user = run_as or pwd.getpwuid(os.geteuid()).pw_name
    root = Path(tempfile.mkdtemp(prefix=prefix))
    data = root / "data"
    try:
        if run_as:
            entry = pwd.getpwnam(run_as)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        try:
            subprocess.run(
                _as_owner(
                    [
                        str(PG_BIN / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        user,
                        "--auth=trust",
                        "--no-locale",
                        "--encoding=UTF8",
                        "--no-sync",
                    ],
                    run_as,
                ),
                check=True,
                capture_output=True,
                timeout=120,
            )
            options = (
                f"-c listen_addresses='' -c unix_socket_directories='{root}' -p {PORT} {settings}"
            )
            subprocess.run(
                _as_owner(
                    [
                        str(PG_BIN / "pg_ctl"),
                        "-D",
                        str(data),
                        "-l",
                        str(root / "log"),
                        "-o",
                        options,
                        "-w",
                        "-t",
                        "60",
                        "start",
                    ],
                    run_as,
                ),
                check=True,
                capture_output=True,
                timeout=90,
            )
        except subprocess.CalledProcessError as exc:
            log = root / "log"
            detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PgStartError(
                f"could not start a throwaway PostgreSQL: "
                f"{exc.stderr.decode(errors='replace')}{detail}"
            ) from exc
        try:
            yield PgCluster(root, root, user)
        finally:
            subprocess.run(
                _as_owner(
                    [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                    run_as,
                ),
                check=False,
                capture_output=True,
                timeout=60,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    require_pg()
    try:
        with throwaway_cluster() as cluster:
            yield cluster
    except PgStartError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def pg_database(pg_cluster: PgCluster) -> Iterator[str]:
    """A libpq URL of a fresh, empty database, dropped after the test."""
    name = f"nixd_test_{os.getpid()}_{next(_names)}"
    pg_cluster.admin(f'CREATE DATABASE "{name}"')
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
