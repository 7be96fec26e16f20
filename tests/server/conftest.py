"""Fixtures that run the real ``nixd-server`` as a process on loopback.

``metadata`` is the metadata backend a test runs on: ``"sqlite"`` unless its module sets
``BOTH_BACKENDS = True``, which runs each of its tests that use it (through ``database``,
``server_state``, ``env`` ...) once on SQLite and once on a fresh PostgreSQL database of
the session's throwaway cluster (:mod:`tests.pgcluster`).

``blobs`` is the blob backend likewise: ``"local"`` unless the module sets ``BOTH_BLOBS =
True``, which runs its tests on a local directory and on a fresh bucket of the session's
moto S3 server (:mod:`tests.s3server`); ``blob_store`` is that backend's
:class:`~nixd.server.storage.blobs.BlobStore`, and ``server_state`` is configured for it.

``server_state`` is an initialized state directory (org ``acme`` with its admin token);
``server`` runs ``nixd-server serve`` on it with the shared launcher
(:mod:`tests.serverproc`: port 0, the bound URL from the address file, stopped in
teardown).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixd.server.access.audit import VerifyResult, verify
from nixd.server.access.audit_db import export, verify_database
from nixd.server.access.shared_policy import apply_policy
from nixd.server.cli import main as cli_main
from nixd.server.config import ServerConfig
from nixd.server.http.app import CacheApp
from nixd.server.http.serve import open_services
from nixd.server.storage.blobs import BlobStore, LocalBlobs
from nixd.server.storage.db import open_db
from nixd.server.storage.sql import is_postgres
from tests.s3server import S3Bucket, s3_bucket, s3_server, use_s3
from tests.server.appenv import Env
from tests.serverproc import SERVER_CLI, ServerProcess, running_server, server_cli

CLI = SERVER_CLI
__all__ = ["s3_bucket", "s3_server"]  # fixtures, imported for the tests of this directory


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return server_cli(*args, check=check, timeout=60)


@dataclass
class ServerState:
    """An initialized state directory and the admin token ``init`` printed."""

    path: Path
    admin_token: str
    public_key: str

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``nixd-server <args[0]> [args[1]] STATE_DIR <rest>``."""
        head = [args[0]] if args[0] in ("init", "serve") else list(args[:2])
        rest = args[len(head) :]
        return run_cli(*head, str(self.path), *rest, check=check)

    def admin(self, *args: str) -> str:
        """Like :meth:`cli` but in this process (fast; not from inside a trio run)."""
        head = [args[0]] if args[0] in ("init", "serve") else list(args[:2])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli_main([*head, str(self.path), *args[len(head) :]])
        assert code == 0, out.getvalue()
        return out.getvalue()

    def token(
        self, org: str, name: str, *attrs: str, expires: str | None = None, fast: bool = False
    ) -> tuple[str, str]:
        """Create an API token; return (id, token)."""
        extra = [a for kv in attrs for a in ("--attr", kv)]
        if expires:
            extra += ["--expires", expires]
        args = ("token", "create", "--org", org, "--name", name, *extra, "--json")
        data = json.loads(self.admin(*args) if fast else self.cli(*args).stdout)
        return data["id"], data["token"]


def write_policy(path: Path, text: str) -> None:
    """Write a state directory's ``policy.toml`` and put it in force where that server reads
    its policy: the file itself, or on PostgreSQL the database (as ``policy apply`` does)."""
    path.write_text(text)
    config = ServerConfig.load(path.parent)
    if is_postgres(config.database):
        conn = open_db(config.database)
        try:
            apply_policy(path, path, conn)
        finally:
            conn.close()


def audit_text(state: Path) -> str:
    """A state directory's audit log in the file format, wherever it lives: the file, or
    on PostgreSQL the database's table (exported)."""
    config = ServerConfig.load(state)
    if is_postgres(config.database):
        out = io.BytesIO()
        export(str(config.database), out)
        return out.getvalue().decode()
    return config.audit_path.read_text()


def audit_verify(state: Path) -> VerifyResult:
    """``nixd-server audit verify``'s check of a state directory's audit log."""
    config = ServerConfig.load(state)
    if is_postgres(config.database):
        return verify_database(str(config.database))
    return verify(config.audit_path)


BACKENDS = ("sqlite", "postgresql")
BLOB_BACKENDS = ("local", "s3")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "metadata" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_BACKENDS", False):
        metafunc.parametrize("metadata", BACKENDS, indirect=True)
    if "blobs" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_BLOBS", False):
        metafunc.parametrize("blobs", BLOB_BACKENDS, indirect=True)


@pytest.fixture
def blobs(request: pytest.FixtureRequest) -> str:
    """The blob backend of this test (see the module docstring)."""
    return str(getattr(request, "param", "local"))


@pytest.fixture
def blob_store(blobs: str, tmp_path: Path, request: pytest.FixtureRequest) -> BlobStore:
    """A fresh, empty blob store of this test's backend."""
    if blobs == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        return bucket.blobs()
    return LocalBlobs.open(tmp_path / "blobs")


@pytest.fixture
def metadata(request: pytest.FixtureRequest) -> str:
    """The metadata backend of this test (see the module docstring)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def database(metadata: str, tmp_path: Path, request: pytest.FixtureRequest) -> str | Path:
    """What ``open_db`` opens for this test: an SQLite file or a fresh PostgreSQL database."""
    if metadata == "postgresql":
        return str(request.getfixturevalue("pg_database"))
    return tmp_path / "server.db"


def init_state(state: Path, database: str | None = None) -> ServerState:
    """``nixd-server init STATE --org acme`` in this process."""
    out = io.StringIO()
    extra = ["--database", database] if database else []
    with contextlib.redirect_stdout(out):
        argv = ["init", str(state), "--org", "acme", "--listen", "127.0.0.1:0", *extra]
        assert cli_main(argv) == 0
    token = re.search(r"^\s+(nixd_\S+)$", out.getvalue(), re.MULTILINE)
    key = re.search(r"narinfo public key:\s+(\S+)", out.getvalue())
    assert token and key, out.getvalue()
    return ServerState(state, token.group(1), key.group(1))


@pytest.fixture
def server_state(
    tmp_path: Path, database: str | Path, blobs: str, request: pytest.FixtureRequest
) -> ServerState:
    state = init_state(tmp_path / "server", database if isinstance(database, str) else None)
    if blobs == "s3":
        use_s3(state.path, request.getfixturevalue("s3_bucket"))
    return state


@pytest.fixture
def server_state_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], ServerState]:
    """Fresh state directories on demand (for hypothesis examples, one each)."""
    return lambda: init_state(tmp_path_factory.mktemp("state") / "server")


@pytest.fixture
def server(server_state: ServerState) -> Iterator[ServerProcess]:
    with running_server(server_state.path) as running:
        yield running


@pytest.fixture
def env(server_state: ServerState) -> Iterator[Env]:
    """The app in-process on the real store, policy, credentials, tokens and audit log:
    orgs ``acme`` (projects app, lib) and ``other`` (app), with API tokens for an acme
    member, an acme reader (role=reader) and an ``other`` member."""
    server_state.admin("org", "create", "other")
    server_state.admin("project", "create", "acme/app")
    server_state.admin("project", "create", "acme/lib")
    server_state.admin("project", "create", "other/app")
    _, member = server_state.token("acme", "ci", fast=True)
    _, reader = server_state.token("acme", "viewer", "role=reader", fast=True)
    _, other = server_state.token("other", "ci", fast=True)
    with open_services(ServerConfig.load(server_state.path)) as services:
        yield Env(server_state, services, CacheApp(services), member, reader, other)
