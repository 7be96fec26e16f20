"""The server's one error map: every exception class reaches the status its tree says.

The classes are found by introspection (every module under ``nixd.server`` imported, every
exception class defined there collected), so a new class that nobody gave an answer
fails here instead of falling to a 500 by accident in production.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
import re

import pytest

import nixd.server
from nixd.errors import AuthError, ConfigError, FormatError, NixdError, TokenExpired
from nixd.server import errors
from nixd.server.errors import ServerError, Throttled, into_client
from nixd.server.login.exchange import ExchangeRejected


def _server_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(nixd.server.__path__, "nixd.server."):
        if info.name.endswith(".__main__"):
            continue  # running it is the CLI itself
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, BaseException)
                and obj.__module__.startswith("nixd.server")
                and not obj.__name__.startswith("_")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    pending = [ServerError]
    while pending:  # subclasses defined anywhere (a test, a plugin) count too
        cls = pending.pop()
        found.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
        pending.extend(cls.__subclasses__())
    return sorted(found.values(), key=lambda c: c.__name__)


def _documented() -> dict[str, tuple[int, str]]:
    """``name -> (status, code)`` from the trees in the errors module's docstring."""
    table = {}
    assert errors.__doc__
    for line in errors.__doc__.splitlines():
        match = re.match(r"[\s│├└─]*([A-Z]\w+)\s+(\d{3}) (\w+)", line)
        if match:
            table[match.group(1)] = (int(match.group(2)), match.group(3))
    return table


def _instance(cls: type[BaseException]) -> BaseException:
    """An instance made with the least each constructor needs."""
    params = inspect.signature(cls.__init__).parameters
    kwargs = {
        name: "because"
        for name, p in params.items()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    }
    positional = [
        p
        for name, p in params.items()
        if name != "self"
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is p.empty
    ]
    return cls(*["a message"] * len(positional), **kwargs)


CLASSES = _server_exceptions()


def test_the_walk_finds_the_tree() -> None:
    names = {c.__name__ for c in CLASSES}
    # Spot checks across the rooms: the walk really imports them.
    assert {"NotFound", "CredentialRejected", "ExchangeRejected", "AuditError"} <= names
    assert {"StoreError", "DatabaseError", "Throttled", "SignInRejected"} <= names
    # And the tree names nothing that does not exist.
    foreign = {"FormatError", "TokenExpired", "AuthError", "ConfigError"}
    assert set(_documented()) <= names | foreign


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_exception_reaches_its_documented_status(
    cls: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    documented = _documented()
    assert cls.__name__ in documented, (
        f"{cls.__module__}.{cls.__name__} is not in the exception tree of nixd/server/errors.py"
    )
    want_status, want_code = documented[cls.__name__]
    exc = _instance(cls)
    with caplog.at_level(logging.WARNING, logger="nixd.server.errors"):
        status, headers, body = into_client(exc, request_id="r1", as_json=True)
    answer = json.loads(body)
    # A class with several answers (ExchangeRejected) takes its code from the instance.
    assert status == vars(exc).get("status", want_status)
    assert answer["error"] == vars(exc).get("code", want_code)
    if issubclass(cls, ServerError):
        # The class carries its answer; the docstring says the same.
        assert (cls.status, cls.code) == (want_status, want_code)
    if status == 401:
        assert "www-authenticate" in headers
    if status >= 500 and isinstance(exc, ServerError) and exc.operational:
        # A condition, not a fault: the message is the answer, one WARNING, no traceback.
        assert str(exc) in answer["message"] and "r1" in answer["message"]
        assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.WARNING, None)]
    elif status >= 500:
        # The client learns the request id, never the cause; the log has the cause.
        assert "a message" not in answer["message"] and "r1" in answer["message"]
        assert any(r.exc_info and r.exc_info[1] is exc for r in caplog.records)
    else:
        assert not caplog.records


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (FormatError("bad narinfo"), 400, "bad_request"),
        (TokenExpired("old"), 401, "token_expired"),
        (AuthError("no"), 401, "invalid_credential"),
        (ConfigError("oops"), 500, "configuration_error"),
        (NixdError("other"), 500, "internal"),
        (RuntimeError("bug"), 500, "internal"),
    ],
)
def test_foreign_errors_are_answered_by_their_base(
    exc: BaseException, status: int, code: str
) -> None:
    got, _, body = into_client(exc, request_id="r2", as_json=False)
    assert got == status
    documented = _documented()
    name = type(exc).__name__
    if name in documented:
        assert documented[name] == (status, code)
    if status >= 500:
        assert str(exc) not in body.decode()


def test_instance_answers_override_the_class() -> None:
    exc = ExchangeRejected("issuer down", code="issuer_unreachable", status=502)
    status, _, body = into_client(exc, request_id="r3", as_json=True)
    assert status == 502 and json.loads(body)["error"] == "issuer_unreachable"
    assert "issuer down" not in body.decode()


def test_not_found_never_says_more() -> None:
    status, _, body = into_client(
        errors.NotFound("acme/secret holds it but rule x denies"), request_id="r", as_json=True
    )
    assert status == 404 and json.loads(body) == {"error": "not_found", "message": "not found"}


@pytest.mark.parametrize(("after", "header"), [(0.2, "1"), (1.0, "1"), (61.5, "62")])
def test_throttled_says_when_to_come_back(after: float, header: str) -> None:
    status, headers, body = into_client(
        Throttled("slow down", retry_after=after), request_id="r", as_json=True
    )
    assert status == 429 and headers["retry-after"] == header
    assert json.loads(body)["error"] == "too_many_requests"
