"""The server's web pages for interactive login: sign in, enter the code, approve or deny.

Plain server-rendered HTML forms, no JavaScript::

    GET  /device[?user_code=X]   sign-in form, or (signed in) the code form / the decision page
    POST /device/signin          name + password -> a signed-in session, back to /device
    POST /device/code            the code typed by the person -> the decision page
    POST /device/decide          approve | deny the code
    POST /device/signout

**Sessions.** Every visitor gets a session cookie, but only a signed-in one costs a row.
An anonymous visitor's cookie is *signed, not stored*: ``a.<nonce>.<expiry>.<mac>``, an
HMAC-SHA256 under a random key kept in the database (table ``web_keys``, shared by every
worker), and its CSRF token is derived from the nonce under the same key — so no
number of anonymous ``GET /device`` can fill the database. Signing in replaces the
session with a stored one (32 random bytes; the database keeps only its SHA-256, table
``web_sessions``, schema component ``"web"``), so a session id planted before sign-in is
worthless after it; each account keeps at most ``device.sessions_per_account`` of them
(the oldest go). The cookie is ``HttpOnly``, ``SameSite=Strict``, ``Path=/device`` and,
when the server is reached over https (``device.public_url``), ``Secure`` with the
``__Host-`` prefix. Anonymous sessions live 30 minutes, signed-in ones an hour.

**Throttling** (:mod:`nixd.server.login.throttle`). Wrong passwords are counted per
account name and per source address; wrong user codes — looked up or decided — per
session and per account, and every waiting code counts them too
(:meth:`~nixd.server.login.device.DeviceService.wrong_guess`). A refusal is a 429 page
with ``Retry-After``, audited, and it costs no password hash and no lookup.

**CSRF.** Each session has its own random CSRF token, rendered into every form and checked
(constant time) on every POST, before anything else; a missing or wrong one is a 403. With
``SameSite=Strict`` cookies that is two independent defenses. Pages forbid framing
(``frame-ancestors 'none'``, ``X-Frame-Options: DENY``), so the approve button cannot be
clickjacked, and are never cached.

**What the person sees.** The decision page shows the code (to compare with the terminal),
the client, where the request came from and when it expires; the approve page names the
account that will be logged in. Every sign-in attempt, wrong code, refusal, malformed
form and decision is audited.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import html
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from nixd.bounds import parse_uint
from nixd.errors import FormatError
from nixd.server.access.identity import anonymous
from nixd.server.asgi import Receive, Scope, Send
from nixd.server.bodies import form_fields, read_body
from nixd.server.errors import BadRequest, Throttled
from nixd.server.login.accounts import Account, SignInRejected
from nixd.server.login.device import DeviceService
from nixd.server.login.throttle import source_key
from nixd.server.storage.db import Migration, ensure_schema, is_sqlite, transaction

log = logging.getLogger(__name__)

COOKIE = "nixd_session"
MAX_FORM = 16 * 1024
SECURE_COOKIE = "__Host-nixd_session"
ANONYMOUS_TTL = 30 * 60
SIGNED_IN_TTL = 60 * 60

MIGRATIONS: list[Migration] = [
    # 1: browser sessions of the sign-in page.
    """
    CREATE TABLE web_sessions (
        id_hash    BLOB PRIMARY KEY,
        csrf       TEXT NOT NULL,
        account_id INTEGER REFERENCES accounts(id) ON DELETE CASCADE,
        created    REAL NOT NULL,
        expires    REAL NOT NULL
    );
    CREATE INDEX web_sessions_expires ON web_sessions(expires);
    """,
    # 2: the key anonymous session cookies are signed with (one row).
    """
    CREATE TABLE web_keys (
        id  INTEGER PRIMARY KEY CHECK (id = 1),
        key BLOB NOT NULL
    );
    """,
]

_SECURITY_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    csrf: str
    account: Account | None
    new: bool = False


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(b"nixd-web-session-v1\0" + session_id.encode()).digest()


def _mac(key: bytes, *parts: str) -> str:
    digest = hmac.new(key, "\0".join(parts).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class WebPages:
    """The ``/device`` pages of a :class:`~nixd.server.login.device.DeviceService`."""

    def __init__(self, device: DeviceService) -> None:
        self.device = device
        self._conn = device._conn
        ensure_schema(self._conn, component="web", migrations=MIGRATIONS)
        with transaction(self._conn):
            # Whoever comes first (several workers start at once) sets the key for all.
            self._conn.execute(
                "INSERT INTO web_keys (id, key) VALUES (1, ?) ON CONFLICT DO NOTHING",
                (secrets.token_bytes(32),),
            )
        self._key = bytes(self._conn.execute("SELECT key FROM web_keys").fetchone()[0])

    @property
    def secure(self) -> bool:
        return self.device.settings.public_url.startswith("https://")

    @property
    def cookie_name(self) -> str:
        return SECURE_COOKIE if self.secure else COOKIE

    # -- sessions --------------------------------------------------------------------------

    def _load(self, scope: Scope) -> Session | None:
        wanted = self.cookie_name
        for name, value in scope["headers"]:
            if name != b"cookie":
                continue
            for part in value.decode("latin-1").split(";"):
                key, _, sid = part.strip().partition("=")
                if key != wanted or not sid:
                    continue
                if sid.startswith("a."):
                    anonymous_session = self._anonymous(sid)
                    if anonymous_session is not None:
                        return anonymous_session
                    continue
                row = self._conn.execute(
                    "SELECT csrf, account_id FROM web_sessions WHERE id_hash = ? AND expires > ?",
                    (_hash(sid), self.device.clock()),
                ).fetchone()
                if row is not None:
                    account = (
                        self.device.accounts.by_id(int(row[1])) if row[1] is not None else None
                    )
                    if account is not None and account.disabled_at is not None:
                        account = None
                    return Session(sid, str(row[0]), account)
        return None

    def _anonymous(self, sid: str) -> Session | None:
        """The anonymous session a signed cookie value stands for, if its MAC and time hold."""
        parts = sid.split(".")
        if len(parts) != 4:
            return None
        _, nonce, expires, mac = parts
        if not hmac.compare_digest(mac.encode(), _mac(self._key, "anon", nonce, expires).encode()):
            return None
        try:
            if parse_uint(expires, limit=2**40, what="the session expiry") <= self.device.clock():
                return None
        except FormatError:
            return None
        return Session(sid, _mac(self._key, "csrf", nonce), None)

    def _create(self, account: Account | None, *, replacing: Session | None = None) -> Session:
        now = self.device.clock()
        if account is None:
            # Signed, not stored: an anonymous visitor costs the database nothing.
            nonce = secrets.token_urlsafe(16)
            expires = str(int(now + ANONYMOUS_TTL))
            sid = f"a.{nonce}.{expires}.{_mac(self._key, 'anon', nonce, expires)}"
            return Session(sid, _mac(self._key, "csrf", nonce), None, new=True)
        sid = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        with transaction(self._conn):
            self._conn.execute("DELETE FROM web_sessions WHERE expires <= ?", (now,))
            if replacing is not None:
                self._conn.execute(
                    "DELETE FROM web_sessions WHERE id_hash = ?", (_hash(replacing.id),)
                )
            self._conn.execute(
                "INSERT INTO web_sessions (id_hash, csrf, account_id, created, expires)"
                " VALUES (?, ?, ?, ?, ?)",
                (_hash(sid), csrf, account.id, now, now + SIGNED_IN_TTL),
            )
            # Each sign-in is a row: keep the newest few per account. Among sessions of one
            # instant the later insert wins: SQLite's rowid, PostgreSQL's row position
            # (ctid: insertion order in a table that only ever has rows deleted).
            order = "rowid" if is_sqlite(self._conn) else "ctid"
            self._conn.execute(
                "DELETE FROM web_sessions WHERE account_id = ? AND id_hash NOT IN"  # noqa: S608
                " (SELECT id_hash FROM web_sessions WHERE account_id = ?"
                f" ORDER BY created DESC, {order} DESC LIMIT ?)",
                (account.id, account.id, self.device.settings.sessions_per_account),
            )
        return Session(sid, csrf, account, new=True)

    def _cookie(self, session: Session, *, clear: bool = False) -> tuple[bytes, bytes]:
        attrs = ["Path=/" if self.secure else "Path=/device", "HttpOnly", "SameSite=Strict"]
        if self.secure:
            attrs.append("Secure")
        value = "" if clear else session.id
        if clear:
            attrs.append("Max-Age=0")
        return (b"set-cookie", f"{self.cookie_name}={value}; {'; '.join(attrs)}".encode())

    # -- dispatch --------------------------------------------------------------------------

    async def handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        path: str,
        request_id: str,
        source_ip: str,
    ) -> None:
        method = scope["method"]
        session = self._load(scope)
        if method in ("GET", "HEAD") and path == "/device":
            if session is None:
                session = self._create(None)
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            code = query.get("user_code", "")
            if session.account is None:
                await self._page(send, 200, session, self._signin(session, code))
            elif code:
                await self._show_code(send, session, code, request_id, source_ip)
            else:
                await self._page(send, 200, session, self._enter(session, ""))
            return
        if method != "POST" or path not in (
            "/device/signin",
            "/device/code",
            "/device/decide",
            "/device/signout",
        ):
            await self._page(send, 404, session, _box("Not found", "<p>No such page.</p>"))
            return
        try:
            form = await _read_form(receive)
        except BadRequest as exc:
            await self.device._audit(
                request_id,
                anonymous()
                if session is None or session.account is None
                else session.account.identity(),
                "web:form",
                False,
                "malformed_request",
                source_ip,
                page=path,
                reason=str(exc),
            )
            await self._page(send, 400, session, _box("Bad request", f"<p>{_e(str(exc))}</p>"))
            return
        if session is None or not hmac.compare_digest(
            form.get("csrf", "").encode(), session.csrf.encode()
        ):
            await self.device._audit(
                request_id, anonymous(), "web:csrf", False, "csrf_mismatch", source_ip, page=path
            )
            fresh = session or self._create(None)
            body = _box(
                "Form expired",
                "<p>This form was not sent from this page or has expired.</p>"
                '<p><a href="/device">Start again</a></p>',
            )
            await self._page(send, 403, fresh, body)
            return
        if path == "/device/signin":
            await self._signin_post(send, session, form, request_id, source_ip)
        elif path == "/device/signout":
            with transaction(self._conn):
                self._conn.execute(
                    "DELETE FROM web_sessions WHERE id_hash = ?", (_hash(session.id),)
                )
            await _redirect(send, "/device", self._cookie(session, clear=True))
        elif session.account is None:
            await _redirect(send, "/device")
        elif path == "/device/code":
            await self._show_code(send, session, form.get("user_code", ""), request_id, source_ip)
        else:
            await self._decide(send, session, form, request_id, source_ip)

    async def _signin_post(
        self, send: Send, session: Session, form: Mapping[str, str], request_id: str, source: str
    ) -> None:
        name = form.get("username", "").strip()
        code = form.get("user_code", "")
        keys = (f"signin-account:{name}", f"signin-source:{source_key(source)}")
        throttle = self.device.throttle
        rejected: SignInRejected | None = None
        try:
            message = "Too many failed sign-ins for this account or from this address."
            with throttle.checking(keys, self.device.clock(), message):
                try:
                    account = await self.device.accounts.authenticate(
                        name, form.get("password", "")
                    )
                except SignInRejected as exc:
                    throttle.failure(keys, self.device.clock(), self.device.signin_backoff)
                    rejected = exc
                else:
                    throttle.forget(keys[:1])  # the owner got in; the address keeps its count
        except Throttled as refusal:
            await self.device._audit(
                request_id,
                anonymous(),
                "web:signin",
                False,
                "throttled",
                source,
                user=name[:64],
                retry_after=str(refusal.retry_after_seconds),
            )
            await self._refuse(send, session, refusal, self._signin(session, code, error=""))
            return
        if rejected is not None:
            await self.device._audit(
                request_id,
                anonymous(),
                "web:signin",
                False,
                rejected.reason,
                source,
                user=name[:64],
            )
            await self._page(send, 401, session, self._signin(session, code, error=str(rejected)))
            return
        await self.device._audit(
            request_id, account.identity(), "web:signin", True, "password", source
        )
        fresh = self._create(account, replacing=session)
        target = f"/device?user_code={quote(code)}" if code else "/device"
        await _redirect(send, target, self._cookie(fresh))

    def _guessing(self, session: Session) -> contextlib.AbstractContextManager[None]:
        """One code attempt of this session and account (Throttled while they are blocked)."""
        assert session.account is not None
        keys = (f"guess-session:{_hash(session.id).hex()}", f"guess-account:{session.account.id}")
        return self.device.throttle.checking(
            keys, self.device.clock(), "Too many wrong codes were entered."
        )

    async def _throttled_guess(
        self, send: Send, session: Session, refusal: Throttled, *, ids: tuple[str, str], page: str
    ) -> None:
        """The 429 page of a throttled code attempt, audited; ``ids`` = (request, source)."""
        request_id, source = ids
        assert session.account is not None
        await self.device._audit(
            request_id,
            session.account.identity(),
            page,
            False,
            "throttled",
            source,
            retry_after=str(refusal.retry_after_seconds),
        )
        await self._refuse(send, session, refusal, self._enter(session, "", error=""))

    async def _wrong_code(self, session: Session, request_id: str, source: str) -> None:
        """Count a wrong code against this session, its account and every waiting code.

        A right code resets nothing: whoever holds one valid code (their own) could
        otherwise wipe the count between guesses.
        """
        assert session.account is not None
        now = self.device.clock()
        keys = (f"guess-session:{_hash(session.id).hex()}", f"guess-account:{session.account.id}")
        self.device.throttle.failure(keys, now, self.device.guess_backoff)
        await self.device.wrong_guess(now, request_id, source)

    async def _show_code(
        self, send: Send, session: Session, code: str, request_id: str, source: str
    ) -> None:
        assert session.account is not None
        try:
            with self._guessing(session):
                pending = self.device.lookup(code)
                if pending is None:
                    await self._wrong_code(session, request_id, source)
        except Throttled as refusal:
            await self._throttled_guess(
                send, session, refusal, ids=(request_id, source), page="web:code"
            )
            return
        if pending is None:
            await self.device._audit(
                request_id,
                session.account.identity(),
                "web:code",
                False,
                "code_not_pending",
                source,
                user_code=code[:32],
            )
            error = "That code is unknown, already used or expired. Check your terminal."
            await self._page(send, 404, session, self._enter(session, code, error=error))
            return
        remaining = max(0, int(pending.expires - self.device.clock()))
        body = f"""
<h1>Log in a device?</h1>
<p>A <b>{_e(pending.client_id)}</b> login started from <b>{_e(pending.source or "?")}</b>
asks to act as you.</p>
<p class="code">{_e(pending.user_code)}</p>
<p class="hint">Approve only if this is the code your terminal shows.
It expires in {remaining // 60} min {remaining % 60} s.</p>
<form method="post" action="/device/decide">
  {_csrf(session)}
  <input type="hidden" name="user_code" value="{_e(pending.user_code)}">
  <button type="submit" name="decision" value="approve" id="approve" class="primary">
    Approve as {_e(session.account.name)}</button>
  <button type="submit" name="decision" value="deny" id="deny">Deny</button>
</form>
{self._whoami(session)}"""
        await self._page(send, 200, session, _box("Approve login", body))

    async def _decide(
        self, send: Send, session: Session, form: Mapping[str, str], request_id: str, source: str
    ) -> None:
        assert session.account is not None
        decision = form.get("decision")
        if decision not in ("approve", "deny"):
            await self._page(send, 400, session, _box("Bad request", "<p>No decision.</p>"))
            return
        approve = decision == "approve"
        code = form.get("user_code", "")
        try:
            with self._guessing(session):
                done = await self.device.decide(
                    code, session.account, approve=approve, source_ip=source, request_id=request_id
                )
                if not done:
                    # Deciding is looking up too: a wrong code here is a guess like any other.
                    await self._wrong_code(session, request_id, source)
        except Throttled as refusal:
            await self._throttled_guess(
                send, session, refusal, ids=(request_id, source), page="web:decide"
            )
            return
        if not done:
            error = "That code is no longer waiting (used, decided or expired)."
            await self._page(send, 409, session, self._enter(session, "", error=error))
            return
        if approve:
            title, text = "Approved", "The device is logged in. You can close this page."
        else:
            title, text = "Denied", "The request was denied. Nothing was logged in."
        body = f'<h1 id="result">{title}</h1><p>{text}</p>{self._whoami(session)}'
        await self._page(send, 200, session, _box(title, body))

    # -- pages -----------------------------------------------------------------------------

    def _signin(self, session: Session, code: str, *, error: str = "") -> str:
        body = f"""
<h1>Sign in to nixd</h1>
{_error(error)}
<form method="post" action="/device/signin">
  {_csrf(session)}
  <input type="hidden" name="user_code" value="{_e(code)}">
  <label>User name <input name="username" id="username" autocomplete="username"
    autocapitalize="none" required autofocus></label>
  <label>Password <input name="password" id="password" type="password"
    autocomplete="current-password" required></label>
  <button type="submit" id="signin" class="primary">Sign in</button>
</form>"""
        return _box("Sign in", body)

    def _enter(self, session: Session, code: str, *, error: str = "") -> str:
        body = f"""
<h1>Enter the code</h1>
<p>Type the code shown by <code>nixd login</code> in your terminal.</p>
{_error(error)}
<form method="post" action="/device/code">
  {_csrf(session)}
  <label>Code <input name="user_code" id="user_code" value="{_e(code)}" placeholder="XXXX-XXXX"
    autocomplete="off" autocapitalize="characters" spellcheck="false" required autofocus></label>
  <button type="submit" id="continue" class="primary">Continue</button>
</form>
{self._whoami(session)}"""
        return _box("Enter code", body)

    def _whoami(self, session: Session) -> str:
        if session.account is None:
            return ""
        return f"""
<form method="post" action="/device/signout" class="who">
  {_csrf(session)}
  Signed in as <b>{_e(session.account.name)}</b> ({_e(session.account.org)})
  <button type="submit" class="link">Sign out</button>
</form>"""

    async def _refuse(
        self, send: Send, session: Session, refusal: Throttled, form_page: str
    ) -> None:
        """A throttled attempt: 429 with Retry-After, the form again, and when to retry."""
        wait = refusal.retry_after_seconds
        note = _error(f"{refusal} Try again in {wait} s.")
        body = form_page.replace("</h1>", f"</h1>\n{note}", 1)
        await self._page(send, refusal.status, session, body, extra=refusal.headers())

    async def _page(
        self,
        send: Send,
        status: int,
        session: Session | None,
        html_body: str,
        *,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        headers = list(_SECURITY_HEADERS)
        headers.extend((k.encode(), v.encode()) for k, v in (extra or {}).items())
        if session is not None and session.new:
            headers.append(self._cookie(session))
        body = html_body.encode()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _csrf(session: Session) -> str:
    return f'<input type="hidden" name="csrf" value="{_e(session.csrf)}">'


def _error(text: str) -> str:
    return f'<p class="error" id="error">{_e(text)}</p>' if text else ""


_STYLE = """
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;
background:#eef1f5;font:16px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1c2430}
main{background:#fff;border-radius:12px;box-shadow:0 4px 24px rgba(20,30,50,.12);
padding:2rem 2.5rem;width:min(26rem,90vw)}
h1{font-size:1.4rem;margin:0 0 1rem}
.brand{font-weight:700;color:#5277c3;letter-spacing:.05em;margin-bottom:.5rem}
label{display:block;margin:.8rem 0;font-weight:600}
input{display:block;width:100%;box-sizing:border-box;margin-top:.3rem;padding:.6rem;
font-size:1rem;border:1px solid #c5cdd8;border-radius:6px}
button{font-size:1rem;padding:.6rem 1.2rem;border-radius:6px;border:1px solid #c5cdd8;
background:#fff;cursor:pointer;margin:.8rem .5rem 0 0}
button.primary{background:#5277c3;border-color:#5277c3;color:#fff}
button.link{border:0;background:none;color:#5277c3;padding:0;margin:0;font-size:.9rem}
.code{font:700 2rem/1.2 ui-monospace,monospace;letter-spacing:.15em;text-align:center;
background:#f3f6fb;border-radius:8px;padding:.8rem;margin:1rem 0}
.hint{color:#5a6676;font-size:.9rem}
.error{background:#fdecec;color:#a4161a;padding:.6rem .8rem;border-radius:6px}
.who{margin-top:1.5rem;padding-top:1rem;border-top:1px solid #e3e8ef;font-size:.9rem;
color:#5a6676}
"""


def _box(title: str, inner: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · nixd</title><style>{_STYLE}</style></head>
<body><main><div class="brand">nixd</div>{inner}</main></body></html>
"""


async def _redirect(send: Send, location: str, *cookies: tuple[bytes, bytes]) -> None:
    headers = [
        (b"location", location.encode()),
        (b"cache-control", b"no-store"),
        (b"content-length", b"0"),
        *cookies,
    ]
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _read_form(receive: Receive) -> dict[str, str]:
    """A page's form (bounded by :mod:`nixd.server.bodies`); BadRequest if it is not one."""
    body = await read_body(receive, limit=MAX_FORM, what="the form")
    return form_fields(body, what="the form", max_fields=16)
