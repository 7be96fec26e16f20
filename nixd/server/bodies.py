"""Small request bodies (JSON API calls, login forms): read with a bound, parsed with one.

A body is read only up to its bound: the reader refuses as soon as the bytes pass it, so
a huge body costs at most the bound in memory. JSON goes through
:func:`nixd.bounds.load_json`, which checks the nesting depth before parsing
(``json.loads`` would raise ``RecursionError`` on deep input, a 500 in disguise). Every
failure — disconnect, too big, not JSON, too deep, not an object, a field of the wrong
type — is a :class:`~nixd.server.errors.BadRequest` (400 ``invalid_request``), which the
caller audits before answering.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from nixd.bounds import load_json
from nixd.errors import FormatError
from nixd.server.asgi import Receive
from nixd.server.errors import BadRequest

MAX_JSON_BYTES = 64 * 1024
"""An API call's JSON: an OIDC token or a signed STS request is a few KiB."""
MAX_JSON_DEPTH = 8
"""The deepest request nests three levels (an AWS exchange's headers)."""
MAX_FORM_FIELDS = 32


async def read_body(receive: Receive, *, limit: int, what: str = "the request body") -> bytes:
    """The whole body, or BadRequest once it passes ``limit`` bytes (nothing more is read)."""
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise BadRequest(f"the client went away while sending {what}")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"{what} is larger than {limit} bytes")
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)


def json_object(
    body: bytes,
    *,
    what: str = "the request body",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> dict[str, Any]:
    """``body`` as a JSON object, bounded in size and depth; BadRequest otherwise."""
    try:
        data = load_json(body, max_bytes=max_bytes, max_depth=max_depth, what=what)
    except FormatError as exc:
        raise BadRequest(str(exc)) from exc
    if not isinstance(data, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return data


async def read_json_object(
    receive: Receive, *, what: str = "the request body", max_bytes: int = MAX_JSON_BYTES
) -> dict[str, Any]:
    """Read and parse a JSON object body (:func:`read_body` + :func:`json_object`)."""
    body = await read_body(receive, limit=max_bytes, what=what)
    return json_object(body, what=what, max_bytes=max_bytes)


def string_fields(data: dict[str, Any], *, what: str = "the request body") -> dict[str, str]:
    """A flat object of strings, as a form is; BadRequest names the first field that is not."""
    for key, value in data.items():
        if not isinstance(value, str):
            raise BadRequest(f"{what}: field {key[:64]!r} must be a string")
    return data


def form_fields(
    body: bytes, *, what: str = "the form", max_fields: int = MAX_FORM_FIELDS
) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (UTF-8, at most ``max_fields``)."""
    try:
        text = body.decode()
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=max_fields))
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what} is not UTF-8") from exc
    except ValueError as exc:
        raise BadRequest(f"{what} could not be read: {exc}") from exc
