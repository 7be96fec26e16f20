"""The ``nixd`` command line as scripts use it: exit codes, clean ``--json``, quiet logging,
lazy imports, completions and the man page.

A fake daemon (a stdlib HTTP server on a Unix socket, in a thread) answers the control
API with each situation the exit codes distinguish; the CLI runs as a real process.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socketserver
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nixd import exitcodes
from nixd.cli import COMMANDS
from nixd.commands.status import render
from nixd.daemon import client, config

REPO = Path(__file__).resolve().parent.parent
NIXD = [sys.executable, "-m", "nixd.cli"]
ENV = dict(os.environ, PYTHONPATH=str(REPO))

LOGGED_IN = {
    "logged_in": True,
    "identity": "token:acme/ci",
    "server": "https://cache.example.org",
    "token_valid": True,
    "token_expires_at": 2e9,
    "version": "0.1.0",
    "pid": 1234,
}


def nixd(*args: str, merged: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NIXD, *args],
        capture_output=not merged,
        stdout=subprocess.PIPE if merged else None,
        stderr=subprocess.STDOUT if merged else None,
        text=True,
        timeout=60,
        check=False,
        env=ENV,
    )


class FakeDaemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    answer: tuple[int, bytes] = (200, b"{}")


class Handler(http.server.BaseHTTPRequestHandler):
    server: FakeDaemon

    def do_GET(self) -> None:
        status, body = self.server.answer
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[FakeDaemon, str]]:
    path = str(tmp_path / "nixd.sock")
    server = FakeDaemon(path, Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, path
    finally:
        server.shutdown()
        server.server_close()


def answer(status: int, data: dict[str, Any]) -> tuple[int, bytes]:
    return status, json.dumps(data).encode()


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (answer(200, LOGGED_IN), exitcodes.OK),
        (answer(200, {**LOGGED_IN, "token_valid": False}), exitcodes.NOT_LOGGED_IN),
        (answer(200, {"logged_in": False, "token_valid": False}), exitcodes.NOT_LOGGED_IN),
        (answer(401, {"error": "auth", "message": "token expired"}), exitcodes.NOT_LOGGED_IN),
        (answer(403, {"error": "forbidden", "message": "/x needs root"}), exitcodes.DENIED),
        (answer(502, {"error": "upstream", "message": "server down"}), exitcodes.UNREACHABLE),
        (answer(504, {"error": "timeout", "message": "took too long"}), exitcodes.UNREACHABLE),
        (answer(500, {"error": "config", "message": "bad config"}), exitcodes.FAILURE),
        ((200, b"not json"), exitcodes.UNREACHABLE),
    ],
    ids=["ok", "expired", "logged-out", "401", "403", "502", "504", "500", "malformed"],
)
def test_status_exit_codes_and_clean_json(
    daemon: tuple[FakeDaemon, str], reply: tuple[int, bytes], code: int
) -> None:
    server, path = daemon
    server.answer = reply
    merged = nixd("status", "--json", "--socket", path, merged=True)
    assert merged.returncode == code, merged.stdout
    data = json.loads(merged.stdout)  # stdout and stderr together: JSON and nothing else
    if reply[0] == 200 and code != exitcodes.UNREACHABLE:
        assert data["logged_in"] is json.loads(reply[1])["logged_in"]
    else:
        assert data["error"]["code"] == code
        assert data["error"]["kind"] == exitcodes.NAMES[code]
    human = nixd("status", "--socket", path)
    assert human.returncode == code
    if code != exitcodes.OK and reply[0] != 200:
        assert human.stderr.count("\n") == 1 and human.stderr.startswith("nixd: error: ")


def test_status_json_through_a_pipe_like_a_script(daemon: tuple[FakeDaemon, str]) -> None:
    """The issue's own check: `nixd status --json 2>&1 | python -m json.tool` is clean."""
    server, path = daemon
    server.answer = answer(200, LOGGED_IN)
    cmd = f"{' '.join(NIXD)} -v status --json --socket {path} 2>&1 | {sys.executable} -m json.tool"
    proc = subprocess.run(
        ["sh", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["identity"] == "token:acme/ci"
    human = nixd("status", "--socket", path)
    assert human.returncode == exitcodes.OK and "token:acme/ci" in human.stdout


def test_expired_token_says_so(daemon: tuple[FakeDaemon, str]) -> None:
    server, path = daemon
    server.answer = answer(200, {**LOGGED_IN, "token_valid": False, "token_expires_at": 1.0})
    proc = nixd("status", "--socket", path)
    assert proc.returncode == exitcodes.NOT_LOGGED_IN
    assert "EXPIRED" in proc.stdout and proc.stderr == ""


def test_version_json_without_a_daemon(tmp_path: Path) -> None:
    proc = nixd("version", "--json", "--socket", str(tmp_path / "absent.sock"))
    assert proc.returncode == 0 and proc.stderr == ""
    assert json.loads(proc.stdout) == {"cli": "0.1.0", "daemon": None}
    fast = nixd("--version")
    assert (fast.returncode, fast.stdout, fast.stderr) == (0, "nixd 0.1.0\n", "")


def test_usage_errors_exit_2() -> None:
    for args in ((), ("no-such-command",), ("status", "--no-such-option"), ("nar",)):
        proc = nixd(*args)
        assert proc.returncode == exitcodes.USAGE, args
        assert "usage:" in proc.stderr


def test_help_documents_every_exit_code() -> None:
    proc = nixd("--help")
    assert proc.returncode == 0
    for code, _, meaning in exitcodes.TABLE:
        assert f"  {code:<4} {meaning}" in proc.stdout
    for name in COMMANDS:
        assert name in proc.stdout


def test_commands_import_only_what_they_need(tmp_path: Path) -> None:
    """Start-up time comes from imports: each command imports only its own module, and
    the fast ones neither httpx nor trio (the time itself is in bench/cli_bench.py)."""
    (tmp_path / "f").write_bytes(b"x")
    script = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from nixd.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(json.loads(sys.argv[1]))
        heavy = ("httpx", "trio", "cryptography", "botocore", "jwt")
        print(json.dumps({
            "code": code,
            "heavy": sorted(m for m in heavy if m in sys.modules),
            "commands": sorted(m for m in sys.modules if m.startswith("nixd.commands.")),
        }))
        """
    )
    env = dict(ENV, NIXD_CONTROL_SOCKET=str(tmp_path / "absent.sock"))
    for argv, code, commands in (
        (["--version"], 0, []),
        (["nar", "hash", str(tmp_path / "f")], 0, ["nixd.commands.nar"]),
        (
            ["status", "--json"],
            exitcodes.UNREACHABLE,
            ["nixd.commands._common", "nixd.commands.status"],
        ),
        (["key", "generate", "k-1"], 0, ["nixd.commands.key"]),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", script, json.dumps(argv)],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout)
        assert seen["code"] == code, argv
        assert seen["commands"] == commands, argv
        if argv[0] != "key":  # signing keys need cryptography, nothing else does
            assert seen["heavy"] == [], argv


def test_library_log_lines_only_with_verbose(tmp_path: Path) -> None:
    """httpx's `INFO: HTTP Request: ... 400 Bad Request` (one per poll of an interactive
    login) stays off stderr unless -v; nixd-server keeps its own INFO lines."""
    script = textwrap.dedent(
        """
        import http.server, logging, sys, threading
        import httpx
        from nixd.cliutil import configure_logging

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.send_response(400); self.send_header("content-length", "0")
                self.end_headers()
            def log_message(self, *a): pass

        srv = http.server.HTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        verbosity, own = int(sys.argv[1]), getattr(logging, sys.argv[2])
        configure_logging(verbosity, log_format="prog: %(levelname)s: %(message)s", own_level=own)
        httpx.post(f"http://127.0.0.1:{srv.server_port}/api/v1/device/token")
        logging.getLogger("nixd.cli").info("own info line")
        logging.getLogger("nixd.cli").warning("own warning")
        """
    )

    def run(verbosity: int, own: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", script, str(verbosity), own],
            capture_output=True, text=True, env=ENV, timeout=60, check=True,
        )  # fmt: skip
        return proc.stderr

    quiet = run(0, "WARNING")
    assert quiet == "prog: WARNING: own warning\n"
    verbose = run(1, "WARNING")
    assert "HTTP Request: POST" in verbose and "400 Bad Request" in verbose
    assert "own info line" in verbose
    server = run(0, "INFO")  # nixd-server's default
    assert "own info line" in server and "HTTP Request" not in server


def test_client_defaults_match_the_daemon_config() -> None:
    assert client.DEFAULT_CONFIG_PATH == config.DEFAULT_CONFIG_PATH
    assert client.DEFAULT_CONTROL_SOCKET == config.DEFAULT_CONTROL_SOCKET


def completion(shell: str) -> str:
    proc = nixd("completion", shell)
    assert proc.returncode == 0 and proc.stderr == ""
    return proc.stdout


BASH_PROBE = """
source {script}
t() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMPREPLY=(); _nixd
      echo "${{COMPREPLY[*]}}"; }}
t nixd ""
t nixd nar ""
t nixd -v nar hash --
t nixd completion ""
t nixd status --config ""
t nixd login g
"""


def test_bash_completion(tmp_path: Path) -> None:
    script = tmp_path / "nixd.bash"
    script.write_text(completion("bash"))
    proc = subprocess.run(
        ["bash", "-c", BASH_PROBE.format(script=script)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    top, nar, hash_opts, shells, config_value, login = proc.stdout.splitlines()
    assert set(COMMANDS) <= set(top.split()) and "--version" in top.split()
    assert nar.split() == ["dump", "hash", "restore", "-h", "--help"]
    assert hash_opts.split() == ["--help", "--json"]
    assert {"bash", "zsh", "fish"} <= set(shells.split())
    assert config_value == ""  # a value: bash falls back to file names (-o default)
    assert login.split() == ["github-action", "gitlab-pipeline"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion(tmp_path: Path) -> None:
    script = tmp_path / "_nixd"
    script.write_text(completion("zsh"))
    # zsh's completion system replaced by stubs that print what they are given
    probe = f"""
    compdef() {{ :; }}
    _describe() {{ shift 3; print -l -- "${{(@P)1}}"; }}
    compadd() {{ shift; print -- "compadd: $*"; }}
    _files() {{ print -- _files; }}
    source {script}
    t() {{ words=("$@"); CURRENT=$#; print "== $*"; _nixd; }}
    t nixd ""
    t nixd nar hash ""
    t nixd status --config ""
    """
    proc = subprocess.run(
        ["zsh", "-f", "-c", textwrap.dedent(probe)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    blocks = proc.stdout.split("== ")[1:]
    top, nar_hash, config_value = (b.splitlines()[1:] for b in blocks)
    assert "nar:write, hash and unpack NAR archives" in top
    assert "_files" in nar_hash and any(line.startswith("--json:") for line in nar_hash)
    assert config_value == ["_files"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completion(tmp_path: Path) -> None:
    script = tmp_path / "nixd.fish"
    script.write_text(completion("fish"))
    probe = f'source {script}; complete -C "nixd "; echo ==; complete -C "nixd nar hash --"'
    proc = subprocess.run(
        ["fish", "--no-config", "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    top, hash_opts = proc.stdout.split("==\n")
    assert {line.split("\t")[0] for line in top.splitlines()} == set(COMMANDS)
    assert [line.split("\t")[0] for line in hash_opts.splitlines()] == ["--help", "--json"]


def test_man_page(tmp_path: Path) -> None:
    page = nixd("man").stdout
    assert page.startswith('.TH "NIXD" "1"')
    for name in COMMANDS:
        assert f".SS {name}\n".replace("-", "\\-") in page  # roff escapes a minus
    assert ".SS nar hash\n" in page and ".SS login token\n" in page
    exit_status = page.split(".SH EXIT STATUS\n", 1)[1]
    for code, _, _ in exitcodes.TABLE:
        assert f".TP\n\\fB{code}\\fR\n" in exit_status
    written = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "manpages"), str(tmp_path / "man")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert written.stdout.split() == [
        str(tmp_path / "man" / n) for n in ("nixd.1", "nixd-server.1")
    ]
    assert (tmp_path / "man" / "nixd.1").read_text().split("\n", 1)[1] == page.split("\n", 1)[1]
    if shutil.which("groff"):
        for name in ("nixd.1", "nixd-server.1"):
            check = subprocess.run(
                ["groff", "-man", "-ww", "-z", str(tmp_path / "man" / name)],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert (check.returncode, check.stderr) == (0, ""), name


def test_man_page_is_reproducible() -> None:
    env = dict(ENV, SOURCE_DATE_EPOCH="1700000000")
    pages = [
        subprocess.run(
            [*NIXD, "man"], capture_output=True, text=True, env=env, timeout=60, check=True
        ).stdout
        for _ in range(2)
    ]
    assert pages[0] == pages[1]
    assert pages[0].startswith('.TH "NIXD" "1" "2023-11-14" "nixd 0.1.0"')


def test_status_says_when_nars_were_streamed_through_unkept() -> None:
    base: dict[str, object] = {"proxy": {"url": "http://127.0.0.1:1"}, "store": {}}
    assert "streamed through" not in render(base)
    text = render(
        {**base, "proxy": {"passthrough_total": 3, "store_free_bytes": 5 << 20, "url": "u"}}
    )
    assert "WARNING:        3 NAR transfer(s) streamed through without being kept" in text
    assert "5.0 MiB free" in text
