"""Interactive login end to end: a real headless Chromium approves the code of a waiting login.

The real ``nixd-server`` runs as a process on loopback; the client side is
:mod:`nixd.auth.device` (what ``nixd login`` runs) polling it over HTTP, while Selenium
drives Debian's Chromium through the sign-in, code and approval pages. Denied and expired
codes must end the waiting login with a clear message. Nothing leaves loopback: Chromium
runs with background networking, sync, component updates and QUIC off.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from nixd.auth import device as client_device
from nixd.errors import LoginFailed
from tests.server.conftest import ServerState, blobs, database, metadata, server_state
from tests.serverproc import ServerProcess, start_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "browser-test password"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Debian's chromium and chromium-driver are needed",
)

__all__ = ["blobs", "database", "metadata", "server_state"]  # the fixtures this module uses


def _serve(state: ServerState, *, code_ttl: int) -> ServerProcess:
    with (state.path / "config.toml").open("a") as f:
        f.write(f"\n[device]\ncode_ttl = {code_ttl}\ninterval = 1\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "nixd.server.cli",
            "user",
            "add",
            str(state.path),
            "acme",
            "alice",
        ],
        input=f"{PASSWORD}\n",
        text=True,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return start_server(state.path)


@pytest.fixture
def server(server_state: ServerState) -> Iterator[ServerProcess]:
    running = _serve(server_state, code_ttl=60)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def short_server(server_state: ServerState) -> Iterator[ServerProcess]:
    running = _serve(server_state, code_ttl=3)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver  # noqa: PLC0415 - test-only dependency
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=900,800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def _sign_in_and_decide(driver: Any, url: str, decision: str, shot: Path | None) -> str:
    """Open the code's URL, sign in, press ``decision``; the result page's heading."""
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support import expected_conditions as ec  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    d = driver
    d.get(url)
    wait = WebDriverWait(d, 20)
    wait.until(ec.presence_of_element_located((By.ID, "username"))).send_keys("alice")
    d.find_element(By.ID, "password").send_keys(PASSWORD)
    d.find_element(By.ID, "signin").click()
    button = wait.until(ec.element_to_be_clickable((By.ID, decision)))
    if shot is not None:
        d.save_screenshot(str(shot))
    button.click()
    return str(wait.until(ec.presence_of_element_located((By.ID, "result"))).text)


async def test_browser_approves_a_waiting_login(server: ServerProcess, browser: Any) -> None:
    out = io.StringIO()
    shot = Path(os.environ.get("NIXD_SCREENSHOT_DIR", server.state_dir)) / "approve.png"
    async with httpx.AsyncClient(timeout=10) as client:
        auth = await client_device.request_code(client, server.url)
        client_device.show(auth, out)
        assert auth.user_code in out.getvalue() and auth.verification_uri in out.getvalue()
        grant: list[client_device.DeviceGrant] = []

        async def wait_for_approval() -> None:
            grant.append(await client_device.poll(client, server.url, auth))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_approval)
                heading = await trio.to_thread.run_sync(
                    _sign_in_and_decide, browser, auth.verification_uri_complete, "approve", shot
                )
        assert heading == "Approved"
        assert grant[0].access.identity == "user:alice"
        # The refresh credential works, and is rotated, at the real server.
        method = client_device.DeviceLogin(grant[0].refresh_token)
        r = await client.post(
            server.url + "/api/v1/token/exchange", json=await method.exchange_body(client)
        )
        assert r.status_code == 200, r.text
        assert method.accept(r.json())
        assert method.to_state()["refresh_token"] != grant[0].refresh_token
    assert shot.stat().st_size > 10_000


async def test_browser_denies(server: ServerProcess, browser: Any) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        auth = await client_device.request_code(client, server.url)
        failure: list[LoginFailed] = []

        async def wait_for_decision() -> None:
            with pytest.raises(LoginFailed) as info:
                await client_device.poll(client, server.url, auth)
            failure.append(info.value)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_decision)
                heading = await trio.to_thread.run_sync(
                    _sign_in_and_decide, browser, auth.verification_uri_complete, "deny", None
                )
    assert heading == "Denied"
    assert str(failure[0]) == f"the login with code {auth.user_code} was denied in the browser"


async def test_expired_code(short_server: ServerProcess, browser: Any) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support import expected_conditions as ec  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    async with httpx.AsyncClient(timeout=10) as client:
        auth = await client_device.request_code(client, short_server.url)
        with trio.fail_after(30), pytest.raises(LoginFailed) as info:
            await client_device.poll(client, short_server.url, auth)
    assert "expired before it was approved; run `nixd login` again" in str(info.value)

    def late_visit() -> str:
        browser.get(auth.verification_uri_complete)
        browser.find_element(By.ID, "username").send_keys("alice")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "signin").click()
        # the answer page loads after the click: wait for it (a busy machine is slow)
        error = WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.ID, "error")))
        return str(error.text)

    with trio.fail_after(30):
        message = await trio.to_thread.run_sync(late_visit)
    assert "unknown, already used or expired" in message
