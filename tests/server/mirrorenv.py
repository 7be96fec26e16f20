"""Upstream stand-ins for the mirror tests: a binary cache on loopback that counts requests.

:class:`StandIn` serves a directory (a static cache made by the real ``nix copy --to
file://...``) and/or scripted answers (hostile ones), in a thread, counting every request
by path; it can stall (accept and answer nothing until released) and be stopped.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.realnix import RealNix

Answer = Callable[[http.server.BaseHTTPRequestHandler], None]


class StandIn:
    """A binary cache at :attr:`url`; ``answers`` override files by request path."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self.answers: dict[str, Answer] = {}
        self.requests: Counter[str] = Counter()
        self.stalled = threading.Event()  # set: every request waits until unstall()
        self._release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                outer.requests[self.path] += 1
                if outer.stalled.is_set():
                    outer._release.wait(60)  # then answered (the client may have gone)
                answer = outer.answers.get(self.path)
                if answer is not None:
                    answer(self)
                    return
                file = (outer.root / self.path.lstrip("/")) if outer.root else None
                if file is None or ".." in self.path or not file.is_file():
                    send(self, 404, b"not here\n")
                    return
                send(self, 200, file.read_bytes())

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                return None  # a client that hung up (a refused endless body) is expected

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def stall(self) -> None:
        self._release.clear()
        self.stalled.set()

    def unstall(self) -> None:
        self.stalled.clear()
        self._release.set()

    def stop(self) -> None:
        self.unstall()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def send(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    h.send_response(status)
    h.send_header("content-length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@contextlib.contextmanager
def stand_in(root: Path | None = None) -> Iterator[StandIn]:
    s = StandIn(root)
    try:
        yield s
    finally:
        s.stop()


def chain_closure(n: int, salt: str) -> str:
    """A Nix expression: ``n`` derivations, each referring to the two before it (no nixpkgs)."""
    lines = ["let", "  mk = name: script: derivation {", "    inherit name;",
             "    system = builtins.currentSystem;", '    builder = "/bin/sh";',
             '    args = [ "-c" script ];', "  };"]  # fmt: skip
    lines.append(f'  p0 = mk "mir-0" "echo {salt} > $out";')
    for i in range(1, n):
        refs = " ".join(f"${{p{j}}}" for j in range(max(0, i - 2), i))
        lines.append(f'  p{i} = mk "mir-{i}" "echo {salt} {i} {refs} > $out";')
    lines.append(f"in p{n - 1}")
    return "\n".join(lines)


def configure(nix: RealNix) -> None:
    shared = " ".join(p for p in ("/bin", "/usr", "/lib", "/lib64") if os.path.exists(p))
    with (nix.root / "etc" / "nix.conf").open("a") as f:
        f.write(f"substituters =\nsandbox-paths = {shared}\n")


def make_upstream(
    nix: RealNix, cache: Path, *, n: int = 6, compression: str = "xz"
) -> tuple[str, list[str], str]:
    """Build a chain closure, sign it with a fresh key and ``nix copy`` it to the file
    cache ``cache``: (top path, closure, the upstream's public key)."""
    configure(nix)
    top = nix.build(chain_closure(n, os.urandom(4).hex()))
    secret = nix.root / "up.sec"
    out = nix.run(["nix", "key", "generate-secret", "--key-name", "up-1"], store=None)
    secret.write_bytes(out.stdout)
    public = (
        nix.run(["nix", "key", "convert-secret-to-public"], store=None, input=out.stdout)
        .stdout.decode()
        .strip()
    )
    nix.run(
        ["nix", "copy", "--to", f"file://{cache}?compression={compression}&secret-key={secret}",
         top]
    )  # fmt: skip
    paths = sorted(nix.run(["nix-store", "-qR", top]).stdout.decode().split())
    return top, paths, public
