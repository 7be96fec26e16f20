"""A TCP relay that paces what the server sends, so a restart lands mid-transfer.

The relay listens on its own loopback address and forwards each connection to the
target; bytes towards the client go at most ``rate`` bytes a second per connection, so
a large NAR takes a known *minimum* time, whatever the machine's speed. Tests wait for
:meth:`PacedRelay.wait_forwarded` (bytes really sent on), never for seconds. When
either side goes away the relay closes both, so a server killed mid-body looks to the
client exactly like the server going away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

CHUNK = 64 << 10


@dataclass
class PacedRelay:
    target_host: str
    target_port: int
    rate: int
    """Most bytes a second sent to each client."""
    host: str = "127.0.0.3"
    port: int = 0
    forwarded: int = 0
    """Bytes sent on to clients so far, all connections together."""
    connections: int = 0
    _progress: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def wait_forwarded(self, n: int) -> None:
        while self.forwarded < n:
            await self._progress.wait()

    async def serve(self, *, task_status: trio.TaskStatus[PacedRelay]) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._connection, listeners)
            task_status.started(self)

    async def _connection(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            server = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:

            async def up() -> None:
                try:
                    while data := await client.receive_some(CHUNK):
                        await server.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()

            async def down() -> None:
                try:
                    while data := await server.receive_some(CHUNK):
                        await client.send_all(data)
                        self.forwarded += len(data)
                        self._progress.set()
                        self._progress = trio.Event()
                        await trio.sleep(len(data) / self.rate)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()  # the server is done or gone: so is the client

            nursery.start_soon(up)
            nursery.start_soon(down)
