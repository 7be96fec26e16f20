"""One strict HTTP/1.1 layer for every front and for the raw upstream client.

The room's model, in the jeepney shape (a sans-I/O core, one thin trio module):

- **Bytes in, values out** (no sockets, no clock): :class:`~nixd.http.request.RequestReader`
  turns what a connection received into request heads and ``Content-Length`` bodies;
  :class:`~nixd.http.response.ResponseReader` / :func:`~nixd.http.response.parse_response_head`
  do the same for the answers a client reads; :func:`~nixd.http.ranges.parse_range` reads
  one ``Range``. They are strict wherever two readers could disagree about where a
  message ends (request smuggling, response splitting) and bound every number before
  converting it (:mod:`nixd.bounds`). What they accept, h11 accepts and reads the same
  way: h11 is the test oracle (``tests/http``), not the runtime parser, because it costs
  several times the per-request budget (measured: ~121 µs per request in a server loop
  against ~13.5 µs for a hand-parsed one, DESIGN.md; parsing alone, ~24 µs a head
  against ~5.6 µs, :mod:`nixd.http.request`), where the proxy's whole warm narinfo
  answer costs ~25-50 µs of CPU.
- **One value of bounds**: :class:`~nixd.http.limits.Limits` (head and body size, header
  count, total and per-peer connections, a deadline for the whole head, body idle and
  keep-alive timeouts, requests per connection). A front has no other numbers.
- **One trio server**, :func:`nixd.http.serve.serve_http`: readiness through
  ``task_status``, a shutdown trigger passed in, draining with a graceful timeout,
  connection caps with eviction of idle connections and refusal-with-linger, and a
  :class:`~nixd.http.serve.Responder` that refuses a second response start and cuts the
  connection when a body fails mid-stream, so no second head is ever written into a body.

Containment: anything that goes wrong while serving one connection (a refused head, a
handler's exception, a peer gone) is logged and ends that connection only; it never
reaches the server's nursery.

This room imports nothing of the others but :mod:`nixd.bounds` and :mod:`nixd.errors`;
the proxy front, the server's ASGI front and the upstream client build on it.
"""

from __future__ import annotations

from nixd.http.errors import BadRequest, BadResponse, BodyTooLarge, ResponseStateError
from nixd.http.limits import Limits
from nixd.http.ranges import ByteRange, parse_range
from nixd.http.request import RequestHead, RequestReader, parse_request_head
from nixd.http.response import ResponseHead, ResponseReader, parse_response_head

__all__ = [
    "BadRequest",
    "BadResponse",
    "BodyTooLarge",
    "ByteRange",
    "Limits",
    "RequestHead",
    "RequestReader",
    "ResponseHead",
    "ResponseReader",
    "ResponseStateError",
    "parse_range",
    "parse_request_head",
    "parse_response_head",
]
