"""Shared fixtures. The real-Nix tests are required: without Nix the run fails."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgcluster import pg_cluster, pg_database  # noqa: F401 - fixtures for every test
from tests.realnix import RealNix, nix_available

_realnix_passed = 0


@pytest.fixture
def real_nix(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RealNix]:
    """An isolated Nix 2.8 (own conf dir, cache home, chroot store)."""
    if not nix_available():
        pytest.fail("the real `nix` is required (apt-get install nix-bin)")
    yield RealNix.create(tmp_path / "nix")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "real_nix" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realnix)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _realnix_passed  # noqa: PLW0603
    if report.when == "call" and report.passed and "realnix" in report.keywords:
        _realnix_passed += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"real-nix tests passed: {_realnix_passed}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With NIXD_REQUIRE_REAL_NIX=1 (the test command sets it) no real-Nix test is a failure."""
    if os.environ.get("NIXD_REQUIRE_REAL_NIX") == "1" and _realnix_passed == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
