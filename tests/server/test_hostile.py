"""Whatever a client sends, the server answers deliberately and writes its audit line.

Hostile values in audited fields (token-shaped, huge, control characters, not UTF-8) are
redacted and noted, never a 500 or a missing line; malformed bodies to the JSON endpoints
(deep, huge, wrong types, not JSON) are a 400 with an audit line. In-process on the real
app, store and audit log; the last test checks the same against a real server process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from nixd.server.access.audit import verify
from nixd.server.config import ServerConfig
from nixd.server.http.app import CacheApp
from nixd.server.http.serve import open_services
from tests.server.conftest import ServerProcess, ServerState
from tests.server.test_device import PASSWORD, Env, FakeClock, csrf_of

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ0b2tlbjphY21lL2NpIn0.c2lnbmF0dXJlc2lnbmF0dXJl"


@pytest.fixture
def env(server_state: ServerState) -> Iterator[Env]:
    with open_services(ServerConfig.load(server_state.path)) as services:
        clock = FakeClock()
        assert services.device is not None
        services.device.clock = clock
        services.device.accounts.create("acme", "alice", PASSWORD)
        yield Env(server_state, services, CacheApp(services), clock)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def post(env: Env, path: str, body: bytes, content_type: str, *, cookie: str = "") -> Answer:
    """POST ``body`` to the app straight through ASGI, in 16 KiB messages.

    (httpx's ASGI transport feeds bodies from an async generator, which the server leaves
    unfinished when it refuses a body past its limit — as it should — and the collected
    generator is then reported as a warning.)
    """
    pieces = [body[i : i + 16384] for i in range(0, len(body), 16384)] or [b""]
    messages = [
        {"type": "http.request", "body": piece, "more_body": n < len(pieces) - 1}
        for n, piece in enumerate(pieces)
    ]
    sent: list[dict[str, Any]] = []
    headers = [(b"content-type", content_type.encode()), (b"host", b"cache.test")]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("cache.test", 80),
        "scheme": "http",
    }

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await env.app(scope, receive, send)
    start = sent[0]
    return Answer(
        start["status"],
        {k.decode(): v.decode() for k, v in start["headers"]},
        b"".join(m.get("body", b"") for m in sent[1:]),
    )


def new_lines(env: Env, before: int) -> list[dict[str, object]]:
    return env.audit_lines()[before:]


def assert_log_clean(env: Env) -> None:
    text = (env.state.path / "audit.log").read_text()
    assert JWT not in text
    assert all(ord(c) < 128 for c in text)
    assert verify(env.state.path / "audit.log").ok


# -- malformed bodies --------------------------------------------------------------------------

MALFORMED_EXCHANGE = {
    "deep_array": b"[" * 100_000,
    "deep_object": b'{"kind": "token", "x": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    "huge": b'{"kind": "token", "token": "' + b"a" * (100 * 1024) + b'"}',
    "not_json": b"kind=token&token=x",
    "not_utf8": b'{"kind": "tok\xffen"}',
    "array": b"[]",
    "string": b'"token"',
    "kind_number": b'{"kind": 5}',
    "kind_object": b'{"kind": {"nested": "token"}}',
    "token_number": b'{"kind": "token", "token": 7}',
    "token_missing": b'{"kind": "token"}',
    "empty": b"",
}


@pytest.mark.parametrize("body", MALFORMED_EXCHANGE.values(), ids=MALFORMED_EXCHANGE.keys())
async def test_malformed_exchange_is_a_400_with_its_audit_line(env: Env, body: bytes) -> None:
    before = len(env.audit_lines())
    r = await post(env, "/api/v1/token/exchange", body, "application/json")
    assert r.status == 400, r.body
    assert r.json()["error"] == "invalid_request"
    lines = new_lines(env, before)
    assert [(e["action"], e["decision"], e["rule"]) for e in lines] == [
        ("token:exchange", "deny", "malformed_request")
    ]
    assert lines[0]["reason"] == r.json()["message"]
    assert_log_clean(env)


MALFORMED_DEVICE = {
    "deep_json": (b'{"client_id": ' + b"[" * 100_000, "application/json"),
    "json_list_value": (b'{"client_id": ["nixd-cli"]}', "application/json"),
    "json_not_object": (b'["nixd-cli"]', "application/json"),
    "json_invalid": (b'{"client_id": "nixd-cli"', "application/json"),
    "huge_form": (b"client_id=nixd-cli&pad=" + b"x" * 20_000, "application/x-www-form-urlencoded"),
    "form_not_utf8": (b"client_id=nixd\xff", "application/x-www-form-urlencoded"),
    "too_many_fields": (b"&".join(b"f%d=1" % n for n in range(100)), "text/plain"),
}


@pytest.mark.parametrize("path", ["/api/v1/device/authorize", "/api/v1/device/token"])
@pytest.mark.parametrize(
    ("body", "content_type"), MALFORMED_DEVICE.values(), ids=MALFORMED_DEVICE.keys()
)
async def test_malformed_device_requests_are_a_400_with_their_audit_line(
    env: Env, path: str, body: bytes, content_type: str
) -> None:
    before = len(env.audit_lines())
    r = await post(env, path, body, content_type)
    assert r.status == 400, r.body
    assert r.json()["error"] == "invalid_request"
    action = "device:authorize" if path.endswith("authorize") else "device:token"
    lines = new_lines(env, before)
    assert [(e["action"], e["decision"], e["rule"]) for e in lines] == [
        (action, "deny", "malformed_request")
    ]
    assert_log_clean(env)
    assert env.device._conn.execute("SELECT COUNT(*) FROM device_codes").fetchone()[0] == 0


@pytest.mark.parametrize(
    "body", [b"csrf=x&username=" + b"a" * 20_000, b"username=\xff\xfe", b"&".join([b"a=1"] * 40)]
)
async def test_malformed_page_forms_are_a_400_with_their_audit_line(env: Env, body: bytes) -> None:
    before = len(env.audit_lines())
    r = await post(env, "/device/signin", body, "application/x-www-form-urlencoded")
    assert r.status == 400 and b"Bad request" in r.body
    lines = new_lines(env, before)
    assert [(e["action"], e["rule"], e["page"]) for e in lines] == [
        ("web:form", "malformed_request", "/device/signin")
    ]


# -- hostile values in audited fields ---------------------------------------------------------


async def test_token_shaped_url_is_redacted_not_a_500(env: Env) -> None:
    before = len(env.audit_lines())
    async with env.client() as c:
        nar = await c.get(f"/cache/nar/{JWT}.nar.zst")
        log = await c.get(f"/cache/log/{JWT}-x.drv")
        slice_ = await c.get(f"/cache/acme/{JWT}/abc.narinfo")
    assert nar.status_code == 401 and log.status_code == 401, (nar.text, log.text)
    assert slice_.status_code == 401
    lines = new_lines(env, before)
    assert len(lines) >= 2
    for line in lines[:2]:
        assert "[redacted]" in str(line["object"])
        assert line["redacted"] == {"object": "token-shaped value"}
    assert_log_clean(env)


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        (JWT, "token-shaped value"),
        ("x\x1b[2J\r\n" + "y" * 5000, "cut from 5007 characters, control characters"),
        ("k\udcff", "not UTF-8"),
        ("\u202egnp.exe", "control characters"),
    ],
    ids=["jwt", "huge_control", "lone_surrogate", "bidi_override"],
)
async def test_hostile_exchange_kind_is_redacted_and_noted(env: Env, kind: str, why: str) -> None:
    before = len(env.audit_lines())
    body = json.dumps({"kind": kind, "token": "x"}).encode()  # ensure_ascii: \\udcff survives
    async with env.client() as c:
        r = await c.post(
            "/api/v1/token/exchange", content=body, headers={"content-type": "application/json"}
        )
    assert r.status_code == 400 and r.json()["error"] == "unsupported_kind", r.text
    lines = new_lines(env, before)
    assert len(lines) == 1
    redacted = lines[0]["redacted"]
    assert isinstance(redacted, dict) and redacted["kind"] == why
    assert set(redacted) <= {"kind", "reason"}  # the reason quotes the kind
    assert len(str(lines[0]["kind"])) <= 1024
    assert_log_clean(env)


async def test_hostile_user_name_at_sign_in_is_redacted(env: Env) -> None:
    before = len(env.audit_lines())
    async with env.client() as c:
        page = await c.get("/device")
        r = await c.post(
            "/device/signin",
            data={"csrf": csrf_of(page.text), "username": JWT, "password": "wrong-wrong"},
        )
    assert r.status_code == 401
    (line,) = new_lines(env, before)
    assert line["action"] == "web:signin" and line["redacted"] == {"user": "token-shaped value"}
    assert_log_clean(env)


async def test_hostile_authorization_header_is_audited(env: Env) -> None:
    before = len(env.audit_lines())
    async with env.client() as c:
        r = await c.get(
            "/cache/acme/app/abc.narinfo",
            headers={"authorization": f"Bearer {JWT}\x7f"},
        )
    assert r.status_code == 401
    lines = new_lines(env, before)
    assert [(e["action"], e["decision"]) for e in lines] == [("authenticate", "deny")]
    assert_log_clean(env)


# -- a real server process ------------------------------------------------------------------


def test_real_server_answers_hostile_requests_deliberately(server: ServerProcess) -> None:
    audit = server.state_dir / "audit.log"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        deep = c.post(
            "/api/v1/token/exchange",
            content=b"[" * 100_000,
            headers={"content-type": "application/json"},
        )
        hostile = c.post("/api/v1/token/exchange", json={"kind": JWT})
        codes = [
            c.post("/api/v1/device/authorize", data={"client_id": "nixd-cli"}).status_code
            for _ in range(11)
        ]
        refused = c.post("/api/v1/device/authorize", data={"client_id": "nixd-cli"})
    assert deep.status_code == 400 and deep.json()["error"] == "invalid_request"
    assert hostile.status_code == 400
    assert codes == [200] * 10 + [429]
    assert refused.status_code == 429 and 0 < int(refused.headers["retry-after"]) <= 600
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    rules = [(e["action"], e["rule"]) for e in lines]
    assert ("token:exchange", "malformed_request") in rules
    assert ("token:exchange", "unsupported_kind") in rules
    assert rules.count(("device:authorize", "too_many_pending_codes_source")) == 2
    assert JWT not in audit.read_text()
    assert verify(audit).ok
