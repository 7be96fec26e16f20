"""The storage backends the server benchmark runs on, and its server instances.

- :class:`Postgres`: a throwaway PostgreSQL cluster started with the tests' own code
  (:func:`tests.pgcluster.throwaway_cluster`: ``initdb`` + ``pg_ctl`` in a temp dir as the
  ``postgres`` user, Unix socket only), but with PostgreSQL's durable defaults (``fsync``,
  ``synchronous_commit``), not the tests' fast ones: SQLite beside it commits durably too.
- :class:`MotoS3`: moto's server as the S3 endpoint, ``python -m moto.server`` in a process
  of its own on a free loopback port (so its CPU is its own, not the bench's), with dummy
  credentials in the standard AWS environment variables that the servers inherit.
- :class:`Instance`: one ``nixd-server serve`` on a state directory of its own, made by
  ``nixd-server init`` (``--database`` for PostgreSQL), whose ``[storage] blobs`` may be
  rewritten to an ``s3://`` URL with a ``[storage.s3]`` table; :meth:`Instance.twin`
  copies config, policy and keys into a second state directory (as a deployment ships
  them) whose blobs are the first one's, so two instances share one database and one
  blob store.

Every process started here is stopped by its PID (:func:`benchproc.stop`).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchproc import (
    CHILD_ENV,
    PY,
    REPO,
    START_TIMEOUT,
    exchange_token,
    free_port,
    run,
    stop,
    write_netrc,
)

if str(REPO) not in sys.path:  # tests.pgcluster and nixd come from this tree
    sys.path.insert(0, str(REPO))

from tests.pgcluster import PgCluster, pg_available, throwaway_cluster

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "nixd-bench",
    "AWS_SECRET_ACCESS_KEY": "nixd-bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Dummy credentials: moto accepts any; the server reads them like any AWS client."""
SERVER_ENV = {
    **{k: v for k, v in CHILD_ENV.items() if not k.startswith("AWS_")},
    **S3_ENV,
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}
"""What every server process gets: this tree's nixd, the dummy credentials, no profiles."""

DURABLE_PG = "-c max_connections=200 -c shared_buffers=128MB"
"""PostgreSQL's defaults otherwise (fsync on, synchronous_commit on)."""


class Refused(Exception):
    """The server would not start on this configuration (a ConfigError, say): skip it."""


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    if not pg_available():
        raise SystemExit("PostgreSQL's server binaries are needed (apt-get install postgresql)")
    with throwaway_cluster(DURABLE_PG, prefix="nixd-bench-pg-") as cluster:
        yield Postgres(cluster)


@dataclass
class Postgres:
    cluster: PgCluster

    @property
    def pid(self) -> int:
        return self.cluster.postmaster_pid

    def fresh_database(self, name: str) -> str:
        """A new empty database (an older one of that name dropped first): its URL."""
        self.cluster.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.cluster.admin(f'CREATE DATABASE "{name}"')
        return self.cluster.url(name)

    def drop(self, name: str) -> None:
        self.cluster.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class MotoS3:
    """moto's S3 server on 127.0.0.1:PORT with one bucket."""

    def __init__(self, log_dir: Path, bucket: str = "nixd-bench") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        log_dir.mkdir(parents=True, exist_ok=True)
        with (log_dir / "moto.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env={**SERVER_ENV},
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    stop(self.proc)
                    raise SystemExit(f"moto did not start; see {log_dir}/moto.log") from None
                time.sleep(0.1)
        self.reset()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reset(self) -> None:
        """Forget every object (moto keeps them in memory), then make the bucket again."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=60):
            pass
        import boto3  # noqa: PLC0415 - only the S3 configurations need it

        s3 = boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip
        s3.create_bucket(Bucket=self.bucket)

    def config(self, prefix: str) -> tuple[str, dict[str, str]]:
        """``[storage] blobs`` and the ``[storage.s3]`` keys for blobs under ``prefix``."""
        return f"s3://{self.bucket}/{prefix}", {"endpoint_url": self.url, "region": "us-east-1"}

    def stop(self) -> None:
        stop(self.proc)


@dataclass
class Instance:
    """One ``nixd-server serve`` on ``state``; tokens and keys made by :meth:`init`."""

    state: Path
    workers: str = ""
    """``--workers`` for serve ("" = what the config says)."""
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    key: str = ""
    tokens: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str) -> str:
        return run([PY, "-m", "nixd.server.cli", *args], env=SERVER_ENV)

    def init(self, database: str | None, durable_reads: str) -> None:
        shutil.rmtree(self.state, ignore_errors=True)
        db = ["--database", database] if database else []
        out = self.cli("init", str(self.state), "--org", "bench", "--listen", "127.0.0.1:0", *db)
        self.key = re.search(r"narinfo public key:\s+(\S+)", out)[1]  # type: ignore[index]
        self.cli("project", "create", str(self.state), "bench/app")
        for name, role in (("ci", "member"), ("laptop", "reader")):
            made = self.cli(
                "token", "create", str(self.state), "--org", "bench", "--name", name,
                "--attr", f"role={role}", "--json",
            )  # fmt: skip
            self.tokens[role] = json.loads(made)["token"]
        self._edit(
            lambda t: re.sub(r"(?m)^durable_reads = \w+$", f"durable_reads = {durable_reads}", t)
        )

    def _edit(self, change: Callable[[str], str]) -> None:
        config = self.state / "config.toml"
        config.write_text(change(config.read_text()))

    def set_blobs(self, blobs: str, s3: dict[str, str] | None = None) -> None:
        """``[storage] blobs = blobs``, and ``s3`` as keys of ``[storage.s3]`` (the table
        ``init`` wrote, where it wrote one, or a new one at the end)."""

        def change(text: str) -> str:
            text = re.sub(r'(?m)^blobs = ".*"$', f'blobs = "{blobs}"', text)
            if not s3:
                return text
            header = re.search(r"(?m)^\[storage\.s3\]\n", text)
            if header is None:
                text += "\n[storage.s3]\n"
                header = re.search(r"(?m)^\[storage\.s3\]\n", text)
                assert header is not None
            head, table = text[: header.end()], text[header.end() :]
            end = re.search(r"(?m)^\[", table)
            body, rest = (table[: end.start()], table[end.start() :]) if end else (table, "")
            for key, value in s3.items():
                body = re.sub(rf"(?m)^{key} = .*\n", "", body)
                body = f'{key} = "{value}"\n' + body
            return head + body + rest

        self._edit(change)

    def twin(self, state: Path) -> Instance:
        """A second instance: this one's config, policy and keys; its blobs; same database."""
        shutil.rmtree(state, ignore_errors=True)
        shutil.copytree(
            self.state, state, ignore=shutil.ignore_patterns("run", "audit.log*", "blobs", "*.log")
        )
        other = Instance(state, self.workers, key=self.key, tokens=dict(self.tokens))
        text = (self.state / "config.toml").read_text()
        blobs = re.search(r'(?m)^blobs = "(.*)"$', text)[1]  # type: ignore[index]
        if "://" not in blobs and not blobs.startswith("/"):
            other.set_blobs(str(self.state / blobs))
        return other

    def settings(self) -> dict[str, object]:
        """The effective settings that bound its speed (defaults included)."""
        from nixd.server.config import ServerConfig  # noqa: PLC0415

        c = ServerConfig.load(self.state)
        return {
            "workers": int(self.workers) if self.workers else c.server.workers,
            "durable_reads": c.audit.durable_reads,
        }

    def check_config(self) -> None:
        """The server's own config loader on this state dir: :class:`Refused` if it says no."""
        from nixd.errors import ConfigError  # noqa: PLC0415
        from nixd.server.config import ServerConfig  # noqa: PLC0415

        try:
            ServerConfig.load(self.state)
        except ConfigError as exc:
            raise Refused(str(exc)) from None

    def start(self) -> None:
        self.check_config()
        address = self.state / "run" / "address"
        address.unlink(missing_ok=True)
        log = self.state / "serve.log"
        workers = ["--workers", self.workers] if self.workers else []
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "nixd.server.cli", "serve", str(self.state), *workers],
                stdout=out, stderr=subprocess.STDOUT, env=SERVER_ENV,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not (address.exists() and address.read_text().strip()):
            if self.proc.poll() is not None:
                errors = [ln for ln in log.read_text().splitlines() if "error:" in ln]
                raise Refused(errors[-1] if errors else f"exited {self.proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"nixd-server did not start; see {log}")
            time.sleep(0.05)
        self.url = address.read_text().split()[0].rstrip("/")
        self.access_token()  # the first request's imports and connections, before measuring

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def netrc(self, path: Path, role: str) -> Path:
        return write_netrc(path, self.url, self.tokens[role])

    def access_token(self) -> str:
        """A reader's access token, exchanged the way the daemon does."""
        try:
            return exchange_token(self.url, self.tokens["reader"])
        except urllib.error.HTTPError as exc:
            detail = f"{exc.code} {exc.read()[:500]!r}"
            raise SystemExit(f"token exchange on {self.url}: {detail}") from None

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None
