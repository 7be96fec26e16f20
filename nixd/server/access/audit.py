"""The audit log: one durable, hash-chained JSON line per policy decision and admin change.

Where it lives
    In a file of the state directory (``[audit] file``, this module's :class:`AuditLog`),
    unless the metadata database is PostgreSQL: then the lines are rows of that database
    (:class:`nixd.server.access.audit_db.DatabaseAuditLog`), so that every server instance
    on it extends one chain. Both make the same lines (:func:`line_of`), hashed the same
    way, batched by the same :class:`AuditWriter`; ``nixd-server audit export`` writes the
    table's chain as a file that :func:`verify` accepts. What follows describes the file;
    the table keeps every promise below, in its own way (see that module).

The model
    Each line is a JSON object::

        {"seq": 7, "time": "2026-01-02T03:04:05.678Z", "request_id": "…",
         "identity": "token:ci", "action": "cache:write", "resource": "acme/app",
         "decision": "allow", "rule": "acme-ci", "source": "127.0.0.1", …extra…,
         "prev": "<sha256 hex of line 6's bytes>"}

    ``seq`` is the line number; ``prev`` chains every line to the one before it (line 1 to
    :data:`GENESIS`), hashing the exact bytes of the previous line without its newline. An
    edited line breaks the link to the next one, a removed or reordered line breaks ``seq``
    and the chain, and :func:`verify` names the first bad line and what happened to it.

    The chain cannot see lines cut off the end, nor an edit of the very last line. So after
    every write the log's head (line count and last hash) is written to ``<log>.head``;
    :func:`verify` checks the log still reaches it. The head file is rewritten in place
    without an fsync of its own, after the log's fsync: it never claims a line that is not
    durable, at worst it lags behind after a power cut. (Anyone who can rewrite both files
    can rewrite history; ship lines or heads elsewhere if that matters.)

Durability
    :meth:`AuditLog.record` returns only after the line is written and fsync'ed, so a line
    acknowledged to a client survives a crash. A crash mid-write can leave an incomplete
    last line; it was never acknowledged (the fsync had not returned), so the next writer
    cuts it off with a warning and :func:`verify` reports it as a torn tail, not tampering.

Throughput (group commit)
    An fsync per line would cap the server at a few hundred decisions per second.
    :meth:`AuditLog.arecord` (trio) queues its line in the open batch and waits for that
    batch's ``trio.Event``; one writer task writes a whole batch with one ``write`` and one
    ``fdatasync`` in a worker thread, then sets the event. Lines that arrive meanwhile form
    the next batch. Every caller still returns only once its own line is durable. The
    writer is a trio system task started on first use, so the server owns no extra task;
    use one log from one ``trio.run`` at a time (threads may call :meth:`record` freely).

    The batch window adapts to load: while anyone waits for a line, the writer starts the
    next batch as soon as the last fsync returns, so a batch is whatever arrived during one
    fsync, and a line waits at most two fsyncs. Measured (``bench/server_bench.py``,
    narinfo at wrk -c32, 1 worker, 2 busy cores): 30-31 lines per batch, i.e. nearly
    every connection in flight shares one ``fdatasync`` (~260 CPU-us each here, ~8 us
    per line); a fixed 2 ms window on top made no bigger batches, only slower answers,
    so there is none. :meth:`AuditLog.submit` queues a line nobody waits for (allowed reads with
    ``audit.durable_reads = false``); lines of that kind alone wait up to
    :data:`LAZY_WINDOW` for company, so a busy server fsyncs a few hundred times a second,
    not once per request. :meth:`AuditLog.close` writes whatever is still queued.

Writers
    Several processes may write one log (the server's workers, and ``nixd-server token …``
    recording admin changes): every batch is written under an exclusive ``flock`` and
    first re-reads the tail if another process appended. Within a process a lock
    serializes threads. Processes on several machines cannot share a file: they share the
    database's table instead.

What is not audited is not done
    A line that cannot be written is an :class:`AuditError` (503) for every caller of its
    batch: a request whose decision was not recorded is not answered, an admin command
    whose line cannot be written fails with that error (the change was made first, so
    the failure is what tells the operator it went unrecorded).

Secrets and hostile values
    A line never holds a credential. A field *named* like ``token``, ``password``,
    ``secret`` or ``authorization`` is a bug of the caller (names come from code) and the
    event is refused. Field *values* often come from a client (a URL, a user name, a claim
    of a CI token), so a value is never a reason to skip a line: whatever a client sends,
    the decision is recorded. A value is made safe instead, and the line says so in a
    ``"redacted"`` member (field name -> why, e.g. ``{"object": "token-shaped value"}``):

    - anything shaped like an access token (a JWT) or an API or refresh token is replaced by
      ``[redacted]`` (the rest of the value is kept, so the line still says what was asked);
    - control characters (C0, DEL, C1, and the bidirectional overrides that make text read
      differently than it is) and lone surrogates (bytes that were not UTF-8) become
      U+FFFD, so a line cannot rewrite a terminal or fake another line when decoded;
    - a value longer than :data:`MAX_VALUE` characters is cut there, and the note gives its
      length.

    Identities appear as ``kind:subject``.

API
    ``log = AuditLog(path)``; ``log.record(event)`` from threads / sync code;
    ``await log.arecord(event)`` from trio; ``log.close()``. The hot path of a server builds
    its line with :func:`event_body` (the fields that repeat are checked once and remembered)
    and hands it to ``await log.arecord_body(body)`` or ``log.submit(body)``. ``event`` must hold
    ``identity`` (an :class:`~nixd.server.access.identity.Identity` or ``"kind:subject"``) and
    ``action``; ``request_id``, ``resource``, ``decision`` (``"allow"``/``"deny"``
    or a :class:`~nixd.server.access.policy.Decision`, which also fills ``rule`` and
    ``reason``), ``rule`` and ``source`` are written as null when absent; any other JSON
    fields follow.
    ``verify(path) -> VerifyResult`` (``.ok``, ``.first_bad``, ``.problem``, ``.describe()``).
    Code that takes either kind of log types it as :class:`AuditWriter`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

import trio

from nixd.server.access.identity import Identity
from nixd.server.access.policy import Decision
from nixd.server.errors import ServerError

log = logging.getLogger(__name__)

GENESIS = hashlib.sha256(b"nixd audit log v1").hexdigest()
"""The ``prev`` of line 1."""

HEAD_SUFFIX = ".head"
_HEAD_SIZE = 128
_CORE_FIELDS = ("request_id", "identity", "action", "resource", "decision", "rule", "source")
_RESERVED = frozenset({"seq", "time", "prev", "redacted"})
_SECRET_WORDS = frozenset({"token", "password", "passwd", "secret", "authorization", "cookie"})
_SECRET_VALUE = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # a JWT, signature included
    r"|nixdr?_[0-9a-f]{16}_[A-Za-z0-9_-]{20,}"  # an API token, a refresh credential
)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_HOSTILE = re.compile(f"{_SECRET_VALUE.pattern}|{_CONTROL.pattern}|{_SURROGATE.pattern}")
MAX_VALUE = 1024
"""Characters of one audited value; longer ones are cut (a URL or a claim, not a file)."""
REDACTED = "[redacted]"
_TAIL_CHUNK = 64 * 1024
LAZY_WINDOW = 0.005
"""Seconds a batch of lines nobody waits for gathers more before its write and fsync."""
_PLAIN_ID = re.compile(r"[0-9A-Za-z_.-]{1,64}")


class AuditError(ServerError):
    """The audit log cannot be written (or read back); the request must not proceed.

    503: the server refuses to act without its record, and a client may retry later.
    """

    status = 503
    code = "audit_unavailable"


def _hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def line_of(seq: int, body: str, prev: str) -> bytes:
    """Line ``seq`` of the chain, without its newline: the bytes the next ``prev`` hashes.

    One definition for every place a line is made (the file, the database table, an
    export), so a chain written anywhere verifies everywhere.
    """
    return f'{{"seq":{seq},{body},"prev":"{prev}"}}'.encode()


def line_hash(line: bytes) -> str:
    """The ``prev`` of the line after ``line`` (sha256, hex)."""
    return _hash(line)


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return dt.datetime.fromtimestamp(whole, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _now_rfc3339(seconds: float) -> str:
    """RFC 3339, UTC, milliseconds: ``2026-01-02T03:04:05.678Z`` (cheap: one line each)."""
    millis = int(seconds * 1000)
    return f"{_second(millis // 1000)}.{millis % 1000:03d}Z"


_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


@functools.lru_cache(maxsize=1024)
def _secret_name(key: str) -> bool:
    return bool(set(re.split(r"[^a-z0-9]+", key.lower())) & _SECRET_WORDS)


def _clean(value: str) -> tuple[str, str | None]:
    """``value`` made safe for a line, and why it was changed (None if it was not).

    Tokens are redacted before a long value is cut, so a cut can never leave a token's
    beginning behind in a form the pattern no longer recognizes.
    """
    if len(value) <= MAX_VALUE and not _HOSTILE.search(value):
        return value, None
    why = []
    value, tokens = _SECRET_VALUE.subn(REDACTED, value)
    if tokens:
        why.append("token-shaped value")
    if len(value) > MAX_VALUE:
        why.append(f"cut from {len(value)} characters")
        value = value[:MAX_VALUE]
    value, controls = _CONTROL.subn("\ufffd", value)
    if controls:
        why.append("control characters")
    value, surrogates = _SURROGATE.subn("\ufffd", value)
    if surrogates:
        why.append("not UTF-8")
    return value, ", ".join(why)


def _safe(value: Any, where: str, notes: dict[str, str]) -> Any:
    """``value`` with every string in it cleaned (noted under ``where``); names checked."""
    if type(value) is str:
        clean, why = _clean(value)
        if why is not None:
            notes.setdefault(where, why)
        return clean
    if isinstance(value, Mapping):
        out = {}
        for key, inner in value.items():
            if type(key) is not str:
                raise ValueError(f"audit event field names must be strings, got {key!r}")
            if _secret_name(key):
                raise ValueError(
                    f"audit event field {where}.{key!r} looks like a secret; audit lines "
                    "never hold credentials (log the identity as kind:subject instead)"
                )
            out[key] = _safe(inner, f"{where}.{key}", notes)
        return out
    if isinstance(value, list | tuple):
        return [_safe(inner, where, notes) for inner in value]
    return value


def _prepare(event: Mapping[str, Any], now: float) -> tuple[dict[str, Any], dict[str, str]]:
    """The members of one line in order (without ``seq``/``prev``), cleaned; and the notes."""
    if not isinstance(event, Mapping):
        raise TypeError(f"an audit event is a mapping, got {type(event).__name__}")
    for key in event:
        if type(key) is not str:
            raise ValueError(f"audit event field names must be strings, got {key!r}")
        if _secret_name(key):
            raise ValueError(
                f"audit event field {key!r} looks like a secret; audit lines never "
                "hold credentials (log the identity as kind:subject instead)"
            )
        if key in _RESERVED:
            raise ValueError(f"audit event field {key!r} is set by the log, not the caller")
    identity = event.get("identity")
    if isinstance(identity, Identity):
        identity = identity.render()
    if not isinstance(identity, str) or ":" not in identity:
        raise ValueError(f"audit event needs identity as kind:subject, got {identity!r}")
    action = event.get("action")
    if not isinstance(action, str) or not action:
        raise ValueError(f"audit event needs an action, got {action!r}")
    out: dict[str, Any] = {"time": _now_rfc3339(now)}
    out.update({name: event.get(name) for name in _CORE_FIELDS})
    out["identity"] = identity
    decision = event.get("decision")
    if isinstance(decision, Decision):
        out["decision"] = decision.effect
        out["rule"] = event.get("rule", decision.rule)
        out["reason"] = decision.reason
    out.update((k, v) for k, v in event.items() if k not in out)
    notes: dict[str, str] = {}
    for key, value in out.items():
        if key != "time":
            out[key] = _safe(value, key, notes)
    return out, notes


def _encode(members: Mapping[str, Any]) -> str:
    try:
        text = _ENCODER.encode(members)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit event is not JSON-serializable: {exc}") from exc
    if _SECRET_VALUE.search(text):
        # Only a nested field *name* can still hold one (every value was cleaned); the
        # pattern has no JSON syntax in it, so replacing it keeps the line valid JSON.
        text = _SECRET_VALUE.sub(REDACTED, text)
    return text


def _body(event: Mapping[str, Any], now: float) -> str:
    """The JSON members of one line except ``seq`` and ``prev``: ``"time":…,…`` (no braces).

    Done by the caller, before queueing, so one bad event fails its own caller and never
    the batch it would have shared. Values are cleaned (see "Secrets and hostile values"),
    so only a caller's bug (a secret-named or reserved field, no identity, a value JSON
    cannot hold) raises.
    """
    out, notes = _prepare(event, now)
    if notes:
        out["redacted"] = notes
    return _encode(out)[1:-1]


@functools.lru_cache(maxsize=4096)
def _fixed_members(
    fields: tuple[str, str, str, str, str, str],
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The members from ``identity`` to ``source``, cleaned by :func:`_prepare` once; notes."""
    event = {"request_id": "", **dict(zip(_CORE_FIELDS[1:], fields, strict=True))}
    out, notes = _prepare(event, 0.0)
    text = _encode(out)[1:-1]
    return text[text.index('"identity":') :], tuple(notes.items())


@functools.lru_cache(maxsize=256)
def _extra_name(key: str) -> str:
    if _secret_name(key):
        raise ValueError(f"audit event field {key!r} looks like a secret")
    if key in _RESERVED or key in _CORE_FIELDS or key != encode_basestring_ascii(key)[1:-1]:
        raise ValueError(f"audit event field {key!r} cannot be an extra field")
    return f',"{key}":'


def event_body(
    now: float,
    request_id: str,
    *,
    identity: str,
    action: str,
    resource: str,
    decision: str,
    rule: str,
    source: str,
    **extra: str,
) -> str:
    """The line body :func:`_body` makes of an event of string fields, but cheap.

    A server's lines repeat everything but the time, the request id and the object: the
    repeating members are cleaned once per distinct value and remembered; only the extra
    (client-controlled) values are looked at each time, with one pattern search when they
    are harmless. Byte-identical to ``_body``, so a reader cannot tell which path wrote a
    line.
    """
    if not _PLAIN_ID.fullmatch(request_id):
        return _body(
            {
                "request_id": request_id,
                "identity": identity,
                "action": action,
                "resource": resource,
                "decision": decision,
                "rule": rule,
                "source": source,
                **extra,
            },
            now,
        )
    fixed, fixed_notes = _fixed_members((identity, action, resource, decision, rule, source))
    parts = [f'"time":"{_now_rfc3339(now)}","request_id":"{request_id}",', fixed]
    notes = list(fixed_notes)
    for key, raw in extra.items():
        name = _extra_name(key)
        value = raw
        if len(raw) > MAX_VALUE or _HOSTILE.search(raw):
            value, why = _clean(raw)
            if why is not None:
                notes.append((key, why))
        parts.append(name)
        parts.append(encode_basestring_ascii(value))
    if notes:
        parts.append(',"redacted":')
        parts.append(_ENCODER.encode(dict(notes)))
    return "".join(parts)


@dataclass(eq=False)
class _Batch:
    bodies: list[str] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class AuditWriter(ABC):
    """What every audit log shares: events in, lines out in batches (see "Throughput").

    A subclass owns where the lines go: :meth:`_write_batch` appends one batch durably
    (or raises :class:`AuditError`, having appended nothing it could not stand behind),
    :meth:`_is_open` and :meth:`_release`. :class:`AuditLog` writes the file;
    :class:`nixd.server.access.audit_db.DatabaseAuditLog` a PostgreSQL table.
    """

    def __init__(self, name: str, *, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        """What log messages and errors call this log (a path, a database)."""
        self._clock = clock
        self._writer_token: trio.lowlevel.TrioToken | None = None
        self._pending = _Batch()
        self._work = trio.Event()
        self._urgent = trio.Event()
        self.batches = 0
        """Batches written (one write and one fsync / commit each), for benchmarks and tests."""

    # -- writing ---------------------------------------------------------------------------

    def record(self, event: Mapping[str, Any]) -> None:
        """Append one line; return once it is durable. ValueError for a bad event."""
        self._write_batch([_body(event, self._clock())])

    def now(self) -> float:
        """The log's clock (what :func:`event_body` callers pass as ``now``)."""
        return self._clock()

    async def arecord(self, event: Mapping[str, Any]) -> None:
        """Append one line from trio, sharing write and fsync with concurrent callers.

        Returns once the line is durable. The line joins the open batch; the writer task
        (started on first use in each ``trio.run``) writes whole batches, one at a time.
        """
        await self.arecord_body(_body(event, self._clock()))

    async def arecord_body(self, body: str) -> None:
        """:meth:`arecord` of a body made by :func:`event_body`."""
        batch = self._queue(body)
        self._urgent.set()
        await batch.done.wait()
        if batch.error is not None:
            if isinstance(batch.error, AuditError):
                raise AuditError(str(batch.error)) from batch.error
            raise AuditError(f"{self.name}: audit write failed: {batch.error!r}") from batch.error

    def submit(self, body: str) -> None:
        """Queue a line made by :func:`event_body` without waiting for it (from trio).

        It is written within :data:`LAZY_WINDOW` plus one fsync (or commit), or by
        :meth:`close`; a failed write is logged (and in the file, a failed fsync stops the
        log for every later caller).
        """
        self._queue(body)

    def _queue(self, body: str) -> _Batch:
        token = trio.lowlevel.current_trio_token()
        if self._writer_token is not token:
            self._writer_token = token
            self._pending = _Batch()
            self._work = trio.Event()
            self._urgent = trio.Event()
            trio.lowlevel.spawn_system_task(self._writer, name=f"audit writer {self.name}")
        batch = self._pending
        batch.bodies.append(body)
        self._work.set()
        return batch

    async def _writer(self) -> None:
        """Write each batch with one write and one fsync; release its callers together.

        A system task: it needs no nursery from the server, and trio cancels it when the
        run ends. It never raises: a failed write is handed to that batch's callers.
        """
        while True:
            await self._work.wait()
            if not self._urgent.is_set():
                # Only lines nobody waits for: let more join (cut short by one that is).
                with trio.move_on_after(LAZY_WINDOW):
                    await self._urgent.wait()
            self._work = trio.Event()
            self._urgent = trio.Event()
            batch, self._pending = self._pending, _Batch()
            try:
                # Not abandoned on cancel: a batch is written whole or not at all.
                await trio.to_thread.run_sync(self._write_batch, batch.bodies)
            except Exception as exc:  # handed to every caller of the batch
                log.error("%s: %d audit line(s) not written: %s", self.name, len(batch.bodies), exc)
                batch.error = exc
            finally:
                batch.done.set()

    @abstractmethod
    def _write_batch(self, bodies: list[str]) -> None:
        """Append ``bodies`` durably as one batch, or raise having kept nothing unsound."""

    @abstractmethod
    def _is_open(self) -> bool:
        """Whether the log still holds what it writes to (its files, its connection)."""

    @abstractmethod
    def _release(self) -> None:
        """Let go of the files or connections (after the last batch)."""

    def close(self) -> None:
        """Write the lines still queued, close the files or connections; later records fail."""
        batch, self._pending = self._pending, _Batch()
        if batch.bodies and self._is_open():
            try:
                self._write_batch(batch.bodies)
            except AuditError as exc:
                log.error("%s: %d queued audit line(s) lost: %s", self.name, len(batch.bodies), exc)
                batch.error = exc
            batch.done.set()
        self._release()

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AuditLog(AuditWriter):
    """An append-only, hash-chained, fsync'ed JSON-lines log (see the module docstring)."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(str(path), clock=clock)
        self.path = Path(path)
        self.head_path = Path(f"{self.path}{HEAD_SUFFIX}")
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._end = -1  # file size after our last write; -1 = re-read the tail
        self._seq = 0
        self._prev = GENESIS
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags, 0o600)
            self._head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot open the audit log: {exc.strerror}") from exc
        try:
            with self._lock, self._flocked():
                self._sync_tail()
                damage = self._check_head()
            if damage is not None:
                # Appending would overwrite the head and bury the evidence; put it in the chain.
                log.error("%s: %s", self.path, damage)
                self.record(
                    {"identity": "system:nixd-server", "action": "audit:damage", "problem": damage}
                )
        except BaseException:
            self.close()
            raise

    def _write_batch(self, bodies: list[str]) -> None:
        with self._lock:
            if self._failed is not None:
                raise AuditError(self._failed)
            if self._fd < 0:
                raise AuditError(f"{self.path}: the audit log is closed")
            with self._flocked():
                self._sync_tail()
                seq, prev = self._seq, self._prev
                chunks = []
                for body in bodies:
                    seq += 1
                    line = line_of(seq, body, prev)
                    prev = _hash(line)
                    chunks.append(line)
                    chunks.append(b"\n")
                data = b"".join(chunks)
                start = self._end
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self._fd, view) :]
                except OSError as exc:
                    self._undo(start, exc)
                    raise AuditError(
                        f"{self.path}: cannot write the audit log: {exc.strerror}"
                    ) from exc
                try:
                    # fdatasync: the data and the new size, not the mtime; same guarantee.
                    os.fdatasync(self._fd)
                except OSError as exc:
                    # After a failed fsync the kernel may have dropped the dirty pages; what
                    # is on disk is unknown, so stop rather than chain onto a guess.
                    self._failed = f"{self.path}: fsync failed ({exc.strerror}); audit stopped"
                    log.error("%s", self._failed)
                    raise AuditError(self._failed) from exc
                self._end = start + len(data)
                self._seq, self._prev = seq, prev
                self.batches += 1
                self._write_head()

    def _undo(self, start: int, exc: OSError) -> None:
        """Cut a partial write off, so the file still ends with a whole line."""
        try:
            os.ftruncate(self._fd, start)
        except OSError:
            self._failed = f"{self.path}: write failed ({exc.strerror}) and could not be undone"
            log.error("%s", self._failed)
        else:
            log.error("%s: audit write failed (%s); nothing written", self.path, exc.strerror)

    def _write_head(self) -> None:
        head = json.dumps({"lines": self._seq, "last": self._prev}, separators=(",", ":"))
        data = head.encode().ljust(_HEAD_SIZE - 1) + b"\n"
        try:
            os.pwrite(self._head_fd, data, 0)
        except OSError as exc:
            log.warning("%s: cannot update the head file: %s", self.head_path, exc.strerror)

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot lock the audit log: {exc.strerror}") from exc
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sync_tail(self) -> None:
        """Pick up the chain from the file's last line (after another writer, or at open).

        Called holding the flock, so nobody is mid-write: an incomplete last line is a
        crashed writer's, never acknowledged, and is cut off.
        """
        try:
            size = os.fstat(self._fd).st_size
            if size == self._end:
                return
            tail, tail_start = self._read_tail(size)
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot read the audit log: {exc.strerror}") from exc
        cut = tail.rfind(b"\n") + 1  # 0 if the tail holds no newline (tail_start is then 0)
        if cut < len(tail):
            torn = len(tail) - cut
            try:
                os.ftruncate(self._fd, tail_start + cut)
                os.fsync(self._fd)
            except OSError as exc:
                raise AuditError(
                    f"{self.path}: cannot cut off an incomplete last line: {exc.strerror}"
                ) from exc
            log.warning(
                "%s: cut off an incomplete last line (%d bytes) left by a crash; it was "
                "never acknowledged",
                self.path,
                torn,
            )
            size = tail_start + cut
        complete = tail[:cut]
        if not complete:
            self._seq, self._prev, self._end = 0, GENESIS, size
            return
        last = complete[:-1].rsplit(b"\n", 1)[-1]
        try:
            seq = json.loads(last)["seq"]
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                raise ValueError(seq)
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(
                f"{self.path}: the last line is not an audit record; refusing to extend a "
                "damaged log (run `nixd-server audit verify`)"
            ) from exc
        self._seq, self._prev, self._end = seq, _hash(last), size

    def _check_head(self) -> str | None:
        """What is wrong if the log no longer reaches its head file (cut or last line edited)."""
        head = _read_head(self.head_path)
        if isinstance(head, str):
            return head
        if head is None:
            return None
        lines, last = head
        if lines > self._seq:
            return f"the log ends at line {self._seq} but {self.head_path.name} records {lines}"
        if lines == self._seq and last != self._prev:
            return f"line {lines} does not match {self.head_path.name} (edited)"
        return None

    def _read_tail(self, size: int) -> tuple[bytes, int]:
        """The file from the start of its last complete line on, and that offset."""
        end, tail = size, b""
        while end > 0:
            start = max(0, end - _TAIL_CHUNK)
            tail = os.pread(self._fd, end - start, start) + tail
            end = start
            last_nl = tail.rfind(b"\n")
            before = tail.rfind(b"\n", 0, last_nl) if last_nl > 0 else -1
            if before >= 0:
                return tail[before + 1 :], end + before + 1
        return tail, 0

    def _is_open(self) -> bool:
        return getattr(self, "_fd", -1) >= 0

    def _release(self) -> None:
        for name in ("_fd", "_head_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> AuditLog:
        return self


# -- verifying ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What :func:`verify` found; ``first_bad`` is a 1-based line number."""

    ok: bool
    lines: int
    first_bad: int | None = None
    problem: str | None = None
    torn_tail: int = 0
    head: str = ""
    unit: str = "line"
    """What is counted: ``"line"`` of a file, ``"record"`` of a database table."""

    def describe(self) -> str:
        """One paragraph for ``nixd-server audit verify``."""
        counted = "complete lines" if self.unit == "line" else f"{self.unit}s"
        out = [f"{'OK' if self.ok else 'FAILED'}: {self.lines} {counted} checked"]
        if self.problem and self.first_bad is None:  # the log could not be read at all
            out.append(self.problem)
        elif self.problem:
            out.append(f"{self.unit} {self.first_bad}: {self.problem}")
        if self.torn_tail:
            out.append(
                f"the file ends with an incomplete line ({self.torn_tail} bytes) left by a "
                "crash; it was never acknowledged and the next writer cuts it off"
            )
        if self.head:
            out.append(self.head)
        return "\n".join(out)


@dataclass(frozen=True, slots=True)
class _Line:
    seq: int | None
    prev: str | None
    digest: str


def _parse_line(line: bytes) -> tuple[int, str] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    seq, prev = obj.get("seq"), obj.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str):
        return None
    return seq, prev


def _read_head(path: Path) -> tuple[int, str] | str | None:
    """(lines, last hash); a message if the head file is damaged; None if there is none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if not data.strip():
        return None
    try:
        head = json.loads(data)
        lines, last = head["lines"], head["last"]
        if not isinstance(lines, int) or not isinstance(last, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return f"{path} is damaged"
    return lines, last


def verify(path: str | Path) -> VerifyResult:
    """Check the chain of an audit log and that it reaches its head file.

    Streams the file once; only when something is wrong is it read again to tell an
    edited line from a removed or reordered one.
    """
    path = Path(path)
    head_path = Path(f"{path}{HEAD_SUFFIX}")
    head = _read_head(head_path)  # before the log: the head never claims an unwritten line
    if isinstance(head, str):
        return VerifyResult(False, 0, 1, head)
    prev, n, torn = GENESIS, 0, 0
    try:
        with path.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    torn = len(raw)
                    break
                n += 1
                line = raw[:-1]
                parsed = _parse_line(line)
                if parsed is None:
                    return VerifyResult(
                        False, n - 1, n, "not an audit record (not a JSON object with seq/prev)"
                    )
                seq, line_prev = parsed
                if seq != n or line_prev != prev:
                    first_bad, problem = _diagnose(path, n, seq, line_prev, prev)
                    return VerifyResult(False, n - 1, first_bad, problem)
                prev = _hash(line)
                if head is not None and n == head[0] and prev != head[1]:
                    return VerifyResult(
                        False,
                        n - 1,
                        n,
                        f"line {n} was edited: its hash does not match {head_path.name}",
                    )
    except FileNotFoundError:
        return VerifyResult(False, 0, None, f"{path}: no such audit log")
    except OSError as exc:
        return VerifyResult(False, 0, None, f"{path}: cannot read: {exc.strerror}")
    if head is None:
        note = f"no {head_path.name}: lines cut off the end could go unnoticed"
    elif head[0] > n:
        missing = head[0] - n
        return VerifyResult(
            False,
            n,
            n + 1,
            f"the log was truncated: {missing} line(s) after line {n} are missing "
            f"({head_path.name} records {head[0]} lines)",
            torn,
        )
    else:
        note = f"{head_path.name}: the log reaches its recorded head (line {head[0]})"
    return VerifyResult(True, n, None, None, torn, note)


def _diagnose(path: Path, n: int, seq: int, line_prev: str, prev: str) -> tuple[int, str]:
    """Tell what happened at line ``n``, where ``seq`` or ``prev`` is not as expected."""
    lines: list[_Line] = []
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            parsed = _parse_line(raw[:-1])
            digest = _hash(raw[:-1])
            lines.append(_Line(*parsed, digest) if parsed else _Line(None, None, digest))
    if seq != n:
        later = next((i for i in range(n, len(lines)) if lines[i].seq == n), None)
        if later is not None:
            return n, (
                f"out of order: holds record {seq}, and record {n} is at line {later + 1} "
                "(lines were reordered)"
            )
        if seq > n:
            gone = f"record {n} was" if seq == n + 1 else f"records {n}..{seq - 1} were"
            return n, f"{gone} removed (this line holds record {seq})"
        return n, f"holds record {seq} again (a line was duplicated or moved)"
    if n == 1:
        return 1, "prev is not the genesis hash: the log does not start with its first record"
    target = next((i for i, line in enumerate(lines) if line.digest == line_prev), None)
    if target is not None and target != n - 2:
        return n, f"prev points at line {target + 1}, not line {n - 1}: lines were reordered"
    return n - 1, f"was edited: its hash does not match the prev recorded in line {n}"
