"""The audit log: chain, tamper detection, reopening, group commit, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from nixd.server.access.audit import (
    GENESIS,
    HEAD_SUFFIX,
    AuditError,
    AuditLog,
    _body,
    event_body,
    verify,
)
from nixd.server.access.identity import Identity
from nixd.server.access.policy import Decision

CI = Identity("token", "ci", {"org": "acme"})


def _event(n: int, **extra: object) -> dict[str, object]:
    return {
        "request_id": f"req-{n}",
        "identity": CI,
        "action": "cache:read",
        "resource": "acme/app",
        "decision": "allow",
        "rule": "acme-read",
        "source": "127.0.0.1",
        "n": n,
        **extra,
    }


def _write(path: Path, count: int) -> None:
    with AuditLog(path) as log:
        for n in range(1, count + 1):
            log.record(_event(n))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _remove_head(path: Path) -> None:
    Path(f"{path}{HEAD_SUFFIX}").unlink()


def test_lines_carry_the_fields_and_chain(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record(
            {
                "request_id": "r1",
                "identity": CI,
                "action": "cache:write",
                "resource": "acme/app",
                "decision": Decision(False, "default-deny", "no rule allows it"),
                "source": "127.0.0.2",
                "path": "/nix/store/abc-x",
            }
        )
        log.record({"identity": "user:root", "action": "token:create", "credential": "ab12"})
    first, second = (json.loads(line) for line in _lines(path))
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first["identity"] == "token:ci"
    assert (first["decision"], first["rule"], first["reason"]) == (
        "deny",
        "default-deny",
        "no rule allows it",
    )
    assert (first["action"], first["resource"], first["source"]) == (
        "cache:write",
        "acme/app",
        "127.0.0.2",
    )
    assert first["path"] == "/nix/store/abc-x"
    assert second["seq"] == 2 and second["decision"] is None
    assert second["prev"] == hashlib.sha256(_lines(path)[0].rstrip(b"\n")).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    result = verify(path)
    assert result.ok and result.lines == 2 and result.first_bad is None, result.describe()


@pytest.mark.parametrize(
    "event",
    [
        {"identity": CI, "action": "x", "token": "abc"},
        {"identity": CI, "action": "x", "access_token": "abc"},
        {"identity": CI, "action": "x", "Password": "abc"},
        {"identity": CI, "action": "x", "details": {"client-secret": "abc"}},
        {
            "identity": CI,
            "action": "x",
            "header": "Bearer eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.sig",
        },
        {"identity": CI, "action": "x", "note": "nixd_0123456789abcdef_" + "A" * 43},
        {"identity": "ci", "action": "x"},
        {"action": "x"},
        {"identity": CI},
        {"identity": CI, "action": "x", "seq": 5},
        {"identity": CI, "action": "x", "blob": b"bytes"},
        {"identity": CI, "action": "x", "nan": float("nan")},
    ],
)
def test_bad_events_are_refused_and_nothing_is_written(tmp_path, event):
    path = tmp_path / "audit.log"
    with AuditLog(path) as log, pytest.raises((ValueError, TypeError)):
        log.record(event)
    assert path.read_bytes() == b""


def test_edited_line_is_named(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 6)
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"decision":"allow"', b'"decision":"deny"')
    path.write_bytes(b"".join(lines))
    result = verify(path)
    assert not result.ok
    assert result.first_bad == 3
    assert "edited" in result.problem


def test_edited_last_line_is_caught_by_the_head(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 4)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"n":4', b'"n":5'))
    result = verify(path)
    assert (result.ok, result.first_bad) == (False, 4)
    assert "edited" in result.problem


@pytest.mark.parametrize(("index", "first_bad"), [(0, 1), (2, 3), (4, 5)])
def test_removed_line_is_named(tmp_path, index, first_bad):
    path = tmp_path / "audit.log"
    _write(path, 6)
    lines = _lines(path)
    del lines[index]
    path.write_bytes(b"".join(lines))
    result = verify(path)
    assert (result.ok, result.first_bad) == (False, first_bad)
    assert f"record {index + 1} was removed" in result.problem


def test_swapped_lines_are_named(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 6)
    lines = _lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    path.write_bytes(b"".join(lines))
    result = verify(path)
    assert (result.ok, result.first_bad) == (False, 3)
    assert "reordered" in result.problem and "record 3 is at line 4" in result.problem


def test_renumbered_removal_still_breaks_the_chain(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 5)
    lines = _lines(path)
    del lines[1]
    lines[1:] = [
        re.sub(rb'"seq":(\d+)', lambda m: b'"seq":%d' % (int(m[1]) - 1), ln) for ln in lines[1:]
    ]
    path.write_bytes(b"".join(lines))
    result = verify(path)
    assert not result.ok and result.first_bad in (1, 2)


def test_not_json_line_is_named(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 3)
    lines = _lines(path)
    lines.insert(1, b"garbage\n")
    path.write_bytes(b"".join(lines))
    result = verify(path)
    assert (result.ok, result.first_bad) == (False, 2)
    assert "not an audit record" in result.problem


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 6)
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:4]))  # cut at a line boundary
    result = verify(path)
    assert (result.ok, result.first_bad) == (False, 5)
    assert "truncated" in result.problem and "2 line(s)" in result.problem
    path.write_bytes(b"".join(lines[:4]) + lines[4][:20])  # cut inside a line
    result = verify(path)
    assert not result.ok and "truncated" in result.problem


def test_a_lagging_head_still_verifies(tmp_path):
    # the head file is not fsync'ed: after a power cut it may be older than the log
    path = tmp_path / "audit.log"
    head = Path(f"{path}{HEAD_SUFFIX}")
    _write(path, 3)
    old = head.read_bytes()
    _write(path, 2)
    head.write_bytes(old)
    result = verify(path)
    assert result.ok and result.lines == 5, result.describe()


def test_without_head_a_cut_goes_unnoticed_and_verify_says_so(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 3)
    _remove_head(path)
    result = verify(path)
    assert result.ok and "could go unnoticed" in result.describe()


def test_missing_log(tmp_path):
    result = verify(tmp_path / "nope.log")
    assert not result.ok and "no such audit log" in result.problem


def test_reopen_continues_the_chain(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 3)
    with AuditLog(path) as log:
        log.record(_event(4))
    assert [json.loads(line)["seq"] for line in _lines(path)] == [1, 2, 3, 4]
    assert verify(path).ok


def test_torn_last_line_verifies_and_is_cut_off_on_reopen(tmp_path, caplog):
    path = tmp_path / "audit.log"
    _write(path, 3)
    with path.open("ab") as f:
        f.write(b'{"seq":4,"time":"2026-')  # a crash mid-write: never acknowledged
    result = verify(path)
    assert result.ok and result.torn_tail == 22 and "incomplete line" in result.describe()
    with AuditLog(path) as log:
        log.record(_event(4))
    assert "incomplete last line" in caplog.text
    assert [json.loads(line)["seq"] for line in _lines(path)] == [1, 2, 3, 4]
    result = verify(path)
    assert result.ok and result.torn_tail == 0


def test_torn_only_line_is_cut_off(tmp_path):
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"seq":1,"ti')
    with AuditLog(path) as log:
        log.record(_event(1))
    assert json.loads(path.read_bytes())["prev"] == GENESIS
    assert verify(path).ok


def test_reopening_a_damaged_log_records_the_damage(tmp_path, caplog):
    path = tmp_path / "audit.log"
    _write(path, 5)
    path.write_bytes(b"".join(_lines(path)[:3]))
    with AuditLog(path) as log:
        log.record(_event(99))
    records = [json.loads(line) for line in _lines(path)]
    assert records[3]["action"] == "audit:damage"
    assert "ends at line 3" in records[3]["problem"] and "records 5" in records[3]["problem"]
    assert records[4]["n"] == 99
    assert "ends at line 3" in caplog.text


def test_refuses_to_extend_a_log_ending_in_garbage(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 2)
    with path.open("ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(AuditError, match="last line is not an audit record"):
        AuditLog(path)


def test_long_lines_are_found_by_the_tail_reader(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record(_event(1, pad="x" * 200_000))
        log.record(_event(2, pad="y" * 100_000))
    with AuditLog(path) as log:
        log.record(_event(3))
    assert verify(path).ok and verify(path).lines == 3


def test_two_writers_on_one_file_keep_one_chain(tmp_path):
    path = tmp_path / "audit.log"
    server, cli = AuditLog(path), AuditLog(path)
    try:
        for n in range(10):
            (server if n % 3 else cli).record(_event(n))
    finally:
        server.close()
        cli.close()
    assert [json.loads(line)["n"] for line in _lines(path)] == list(range(10))
    assert verify(path).ok


async def test_concurrent_arecord_writes_every_line_in_few_batches(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    batches: list[int] = []
    real = log._write_batch

    def counting(bodies: list[str]) -> None:
        batches.append(len(bodies))
        real(bodies)

    log._write_batch = counting  # type: ignore[method-assign]
    acked: set[int] = set()

    async def one(n: int) -> None:
        await log.arecord(_event(n))
        acked.add(n)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for n in range(400):
                nursery.start_soon(one, n)
    log.close()
    assert acked == set(range(400))
    assert sorted(json.loads(line)["n"] for line in _lines(path)) == list(range(400))
    assert verify(path).ok
    assert sum(batches) == 400
    assert len(batches) < 50  # group commit: far fewer fsyncs than lines


async def test_arecord_failure_reaches_every_waiter(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.close()
    with pytest.raises(AuditError, match="closed"):
        await log.arecord(_event(1))


async def test_arecord_bad_event_fails_only_its_caller(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        with pytest.raises(ValueError):
            await log.arecord({"identity": CI, "action": "x", "token": "t"})
        await log.arecord(_event(1))
    assert verify(path).ok and verify(path).lines == 1


def _fields(n: int, obj: str = "abc.narinfo") -> dict[str, str]:
    return {
        "identity": "token:ci",
        "action": "cache:read",
        "resource": "acme/app",
        "decision": "allow",
        "rule": "acme-read",
        "source": "127.0.0.1",
        "object": f"{n}-{obj}",
    }


@pytest.mark.parametrize("request_id", ["0a1b2c3d-17", "has space", 'quo"te'])
@pytest.mark.parametrize("obj", ["x.narinfo", 'we"ird\n\u00e9', ""])
def test_event_body_is_byte_identical_to_the_checked_path(request_id, obj):
    fields = _fields(1, obj)
    fast = event_body(1_700_000_000.123, request_id, **fields)
    assert fast == _body({"request_id": request_id, **fields}, 1_700_000_000.123)
    # The remembered part is reused, the varying parts are not.
    again = event_body(1_700_000_001.5, "other", **_fields(2, obj))
    assert again == _body({"request_id": "other", **_fields(2, obj)}, 1_700_000_001.5)


def test_event_body_refuses_secrets():
    jwt = "eyJhbGciOi.eyJzdWIiOiJ4In0.sig"
    with pytest.raises(ValueError, match="token"):
        event_body(1.0, "r1", **{**_fields(1), "object": f"nar/{jwt}.nar.zst"})
    with pytest.raises(ValueError, match="token"):
        event_body(1.0, "r1", **{**_fields(1), "identity": f"token:{jwt}"})
    with pytest.raises(ValueError, match="secret"):
        event_body(1.0, "r1", **_fields(1), password="x")
    with pytest.raises(ValueError, match="extra"):
        event_body(1.0, "r1", **_fields(1), seq="3")


async def test_submitted_lines_share_batches_and_close_writes_the_rest(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    with trio.fail_after(10):
        for n in range(200):
            log.submit(event_body(log.now(), f"r{n}", **_fields(n)))
            if n % 50 == 0:
                await trio.lowlevel.checkpoint()
        await trio.sleep(0.1)  # well past LAZY_WINDOW: all written without anyone waiting
        assert len(_lines(path)) == 200
        assert log.batches <= 6
        for n in range(200, 210):
            log.submit(event_body(log.now(), f"r{n}", **_fields(n)))
        # A waiting caller cuts the window short and takes the queued lines along.
        await log.arecord_body(event_body(log.now(), "last", **_fields(210)))
        assert len(_lines(path)) == 211
        log.submit(event_body(log.now(), "queued", **_fields(211)))
    log.close()  # written by close, not lost
    objects = [json.loads(line)["object"] for line in _lines(path)]
    assert objects == [f"{n}-abc.narinfo" for n in range(212)]
    assert verify(path).ok


WRITER = """
import os, signal, sys, trio
from nixd.server.access.audit import AuditLog

def tear_at(log, k):
    # Die by SIGKILL in the middle of the k-th write to the log: a torn last line.
    real_write, calls = os.write, [0]
    def write(fd, data):
        if fd == log._fd:
            calls[0] += 1
            if calls[0] == k:
                cut = len(data) // 2
                while cut > 1 and data[cut - 1] == 10:
                    cut -= 1
                real_write(fd, bytes(data[:cut]))
                os.kill(os.getpid(), signal.SIGKILL)
        return real_write(fd, data)
    os.write = write

async def main(path, tear):
    log = AuditLog(path)
    if tear:
        tear_at(log, tear)
    async def task(t):
        for i in range(10**9):
            n = t * 1_000_000 + i
            await log.arecord({"identity": "token:ci", "action": "cache:read", "n": n,
                               "pad": "x" * (5000 if i % 7 == 0 else 10)})
            sys.stdout.write(f"{n}\\n")
            sys.stdout.flush()
    print("ready", flush=True)
    async with trio.open_nursery() as nursery:
        for t in range(16):
            nursery.start_soon(task, t)

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


def test_kill_9_never_loses_an_acknowledged_line(tmp_path):
    """Writers killed from outside at random moments, and killed half-way through a write."""
    path = tmp_path / "audit.log"
    rng = random.Random(1234)
    acked: set[int] = set()
    torn_rounds = 0
    for round_ in range(8):
        tear = rng.randint(2, 40) if round_ % 2 else 0
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(tear)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline()
            assert ready == b"ready\n", proc.stderr.read() if proc.stderr else ready
            if tear:
                proc.wait(timeout=30)  # it kills itself mid-write
            else:
                time.sleep(rng.uniform(0.05, 0.3))
        finally:
            if proc.returncode is None:
                os.kill(proc.pid, signal.SIGKILL)
            out, _err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # the last printed number may itself be cut by the kill
        acked.update(int(x) for x in out.split(b"\n")[:-1] if x)
        result = verify(path)
        assert result.ok, result.describe()
        if tear:
            assert result.torn_tail > 0, result.describe()
            torn_rounds += 1
        written = {json.loads(line)["n"] for line in _lines(path) if line.endswith(b"\n")}
        assert acked <= written, f"lost acknowledged lines: {sorted(acked - written)[:5]}"
    assert acked and torn_rounds == 4
    with AuditLog(path) as log:
        log.record(_event(-1))
    result = verify(path)
    assert result.ok and result.torn_tail == 0, result.describe()
