"""AWS logins: an AWS principal proves itself by a signed ``sts:GetCallerIdentity`` request.

The client never sends credentials. It signs (SigV4, with whatever credentials it has:
instance profile, container role, profile, env) a ``GetCallerIdentity`` request for the
server's configured STS endpoint, including the header ``X-Nixd-Server-Audience: <this
server's audience>`` in what is signed, and sends the request itself as JSON
(kind ``aws``)::

    {"kind": "aws", "request": {"method": "POST", "url": "https://sts.amazonaws.com/",
     "headers": {"Host": ..., "X-Amz-Date": ..., "X-Nixd-Server-Audience": ...,
                 "Authorization": "AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., ..."},
     "body": "Action=GetCallerIdentity&Version=2011-06-15"}}

The server checks what it can before forwarding — the URL is exactly a configured
endpoint (scheme, host, port, path ``/``, no query), ``Host`` is that endpoint's, the body
is exactly ``Action=GetCallerIdentity&Version=2011-06-15``, the signature scope is
``<date>/<configured region>/sts/aws4_request``, the signed headers include ``host`` (the
``Host`` header may be left out: botocore signs it without setting it),
``x-amz-date`` and the audience header, whose value is a configured audience, and
``X-Amz-Date`` is within ``max_skew`` — then sends it *itself* to the configured endpoint
(only the signed headers and ``Authorization`` go along) and believes only STS's answer.
**STS verifies the signature**: a request changed after signing (a body, a header, the
audience swapped to ours) is refused there; the checks here make sure the request cannot
be aimed anywhere else, cannot be one meant for another server (the audience is signed),
and cannot be an old one replayed.

The identity is STS's ``Arn``: an assumed role
``arn:aws:sts::ACCT:assumed-role/ROLE/SESSION`` becomes subject
``arn:aws:iam::ACCT:role/ROLE`` (so policies name roles, not sessions; a role's path is
not in the STS ARN) with attributes ``account``, ``role``, ``session``, ``arn`` (as STS
said), ``user_id`` and ``org`` from the ``[[aws]]`` entry whose ``accounts`` hold the
account; other principals (IAM users) keep their ARN as subject. An account no entry
lists is refused (403, ``unknown_account``); a listed principal the policy does not know
gets a token and no access.
"""

from __future__ import annotations

import logging
import re
import time
from calendar import timegm
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from xml.etree import ElementTree

import httpx

from nixd.errors import ConfigError
from nixd.server.access.identity import Identity
from nixd.server.config import AwsSection
from nixd.server.login.exchange import ExchangeRejected

log = logging.getLogger(__name__)

AUDIENCE_HEADER = "x-nixd-server-audience"
"""The header (signed) that names the server a request is meant for."""
STS_VERSION = "2011-06-15"
STS_BODY = {"Action": "GetCallerIdentity", "Version": STS_VERSION}
HTTP_TIMEOUT = 15.0
MAX_RESPONSE = 64 * 1024
_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-f]+)"
)
_ASSUMED_ROLE_RE = re.compile(r"arn:([a-z-]+):sts::(\d{12}):assumed-role/([^/]+)/(.+)")
_ARN_RE = re.compile(r"arn:[a-z-]+:(iam|sts)::\d{12}:\S+")


def _endpoint_key(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _rejected(message: str, code: str = "invalid_request", reason: str | None = None) -> Exception:
    return ExchangeRejected(f"AWS request refused: {message}", code=code, reason=reason)


class AwsExchanger:
    """The ``aws`` exchange for the configured ``[[aws]]`` entries."""

    kind: str = "aws"

    def __init__(
        self,
        trusts: Sequence[AwsSection],
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not trusts:
            raise ConfigError("no [[aws]] entries: nothing to trust")
        self.trusts = tuple(trusts)
        self._clock = clock
        self._transport = transport

    async def identify(self, body: Mapping[str, Any], source_ip: str | None) -> Identity:
        request = body.get("request")
        if not isinstance(request, dict):
            raise _rejected('"request" must be the signed request {"method", "url", ...}')
        method, url, raw_headers, payload = (
            request.get(k) for k in ("method", "url", "headers", "body")
        )
        if not isinstance(method, str) or not isinstance(url, str) or not isinstance(payload, str):
            raise _rejected('"method", "url" and "body" must be strings')
        if not isinstance(raw_headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw_headers.items()
        ):
            raise _rejected('"headers" must map names to strings')
        headers = {k.lower(): v.strip() for k, v in raw_headers.items()}
        trusts = self._check_target(method, url, headers, payload)
        signed = self._check_signature_shape(headers, trusts)
        audience = headers[AUDIENCE_HEADER]
        trusts = [t for t in trusts if t.audience == audience]
        if not trusts:
            expected = " or ".join(sorted({repr(t.audience) for t in self.trusts}))
            raise _rejected(
                f"it is signed for audience {audience!r}, not this server ({expected})",
                "wrong_audience",
            )
        self._check_date(headers, trusts)
        forward = {k: v for k, v in headers.items() if k in signed or k == "authorization"}
        # Both recomputed by httpx, from the configured endpoint and the body; the
        # signature covers what the client signed, so STS refuses any difference.
        forward.pop("content-length", None)
        forward.pop("host", None)
        arn, account, user_id = await self._call_sts(trusts[0].sts_endpoint, forward, payload)
        return self._identity(arn, account, user_id, trusts)

    # -- checks before forwarding ---------------------------------------------------------

    def _check_target(
        self, method: str, url: str, headers: Mapping[str, str], payload: str
    ) -> list[AwsSection]:
        parts = urlsplit(url)
        target = (parts.scheme, parts.netloc.lower())
        trusts = [t for t in self.trusts if _endpoint_key(t.sts_endpoint) == target]
        if not trusts or parts.path not in ("", "/") or parts.query or parts.fragment:
            endpoints = ", ".join(sorted({t.sts_endpoint for t in self.trusts}))
            raise _rejected(
                f"it is for {parts.scheme}://{parts.netloc}{parts.path}, "
                f"not this server's STS endpoint ({endpoints})",
                "wrong_endpoint",
            )
        if headers.get("host", target[1]).lower() != target[1]:
            raise _rejected(
                f"its Host header {headers.get('host')!r} is not {target[1]!r}", "wrong_endpoint"
            )
        if method.upper() != "POST":
            raise _rejected(f"method {method!r}: GetCallerIdentity is sent as POST")
        try:
            fields = parse_qsl(payload, keep_blank_values=True, strict_parsing=True)
        except ValueError as exc:
            raise _rejected("the body is not a form") from exc
        if len(fields) != len(STS_BODY) or dict(fields) != STS_BODY:
            raise _rejected(
                "the body must be exactly Action=GetCallerIdentity&Version=" + STS_VERSION,
                reason=f"body={payload[:200]!r}",
            )
        return trusts

    def _check_signature_shape(
        self, headers: Mapping[str, str], trusts: Sequence[AwsSection]
    ) -> set[str]:
        match = _AUTH_RE.fullmatch(headers.get("authorization", ""))
        if match is None:
            raise _rejected("no AWS4-HMAC-SHA256 Authorization header", "invalid_signature")
        credential, signed_list, _ = match.groups()
        scope = credential.split("/")
        if len(scope) != 5 or scope[3:] != ["sts", "aws4_request"]:
            raise _rejected(
                f"credential scope {'/'.join(scope[1:])!r} is not STS's", "wrong_endpoint"
            )
        regions = {t.region for t in trusts}
        if scope[2] not in regions:
            raise _rejected(
                f"it is signed for region {scope[2]!r}, not {' or '.join(sorted(regions))}",
                "wrong_endpoint",
            )
        signed = set(signed_list.split(";"))
        missing = {"host", "x-amz-date", AUDIENCE_HEADER} - signed
        if missing:
            raise _rejected(
                f"the signature must cover {', '.join(sorted(missing))}", "invalid_signature"
            )
        absent = {h for h in signed if h not in headers and h != "host"}
        if absent:
            raise _rejected(f"signed headers are missing: {', '.join(sorted(absent))}")
        if scope[1] != headers["x-amz-date"][:8]:
            raise _rejected("the credential scope date is not X-Amz-Date's", "invalid_signature")
        return signed

    def _check_date(self, headers: Mapping[str, str], trusts: Sequence[AwsSection]) -> None:
        stamp = headers["x-amz-date"]
        try:
            signed_at = timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
        except ValueError as exc:
            raise _rejected(f"X-Amz-Date {stamp!r} is not a SigV4 date") from exc
        skew = self._clock() - signed_at
        limit = max(t.max_skew for t in trusts)
        if abs(skew) > limit:
            when = "old" if skew > 0 else "in the future"
            raise _rejected(
                f"it was signed {abs(skew):.0f} s {'ago' if skew > 0 else 'ahead'}; "
                f"sign a fresh one (limit {limit:.0f} s)",
                "stale_request",
                reason=f"x-amz-date {when} by {abs(skew):.0f} s",
            )

    # -- STS ----------------------------------------------------------------------------

    async def _call_sts(
        self, endpoint: str, headers: dict[str, str], payload: str
    ) -> tuple[str, str, str]:
        url = urlsplit(endpoint)._replace(path="/", query="", fragment="").geturl()
        try:
            async with httpx.AsyncClient(
                timeout=HTTP_TIMEOUT, follow_redirects=False, transport=self._transport
            ) as client:
                response = await client.post(url, headers=headers, content=payload.encode())
        except httpx.HTTPError as exc:
            raise ExchangeRejected(
                "the STS endpoint could not be reached; try again later",
                code="sts_unavailable",
                reason=f"{url}: {exc!r}",
                status=502,
            ) from exc
        text = response.content[:MAX_RESPONSE]
        if response.status_code in (400, 401, 403):
            code, message = _sts_error(text)
            raise ExchangeRejected(
                f"AWS request refused: STS said {code}: {message}",
                code="sts_rejected",
                reason=f"STS {response.status_code} {code}: {message}",
            )
        if response.status_code != 200:
            raise ExchangeRejected(
                "the STS endpoint failed; try again later",
                code="sts_unavailable",
                reason=f"{url} answered HTTP {response.status_code}",
                status=502,
            )
        return _caller_identity(text)

    def _identity(
        self, arn: str, account: str, user_id: str, trusts: Sequence[AwsSection]
    ) -> Identity:
        for trust in trusts:
            if "*" in trust.accounts or account in trust.accounts:
                break
        else:
            raise ExchangeRejected(
                f"AWS account {account} is not accepted here",
                code="unknown_account",
                reason=f"arn={arn}",
                status=403,
            )
        attrs = {"account": account, "arn": arn, "user_id": user_id, "org": trust.org}
        subject = arn
        assumed = _ASSUMED_ROLE_RE.fullmatch(arn)
        if assumed is not None:
            partition, acct, role, session = assumed.groups()
            subject = f"arn:{partition}:iam::{acct}:role/{role}"
            attrs.update(role=role, session=session)
        return Identity(kind="aws", subject=subject, attributes=attrs)


def _find(root: ElementTree.Element, name: str) -> str:
    for element in root.iter():
        if element.tag in (name, _NS + name) and element.text:
            return element.text.strip()
    return ""


def _sts_error(text: bytes) -> tuple[str, str]:
    try:
        root = ElementTree.fromstring(text)  # noqa: S314 - see _caller_identity
    except ElementTree.ParseError:
        return "error", "unreadable answer"
    return _find(root, "Code") or "error", _find(root, "Message") or "no message"


def _caller_identity(text: bytes) -> tuple[str, str, str]:
    """``(Arn, Account, UserId)`` of a GetCallerIdentityResponse.

    The XML comes from the configured STS endpoint, never from the client, is at most
    MAX_RESPONSE bytes, and ElementTree resolves no external entities (expat >= 2.4
    also refuses entity-expansion bombs).
    """
    try:
        root = ElementTree.fromstring(text)  # noqa: S314 - trusted source, see above
    except ElementTree.ParseError as exc:
        raise ExchangeRejected(
            "the STS endpoint sent an unreadable answer",
            code="sts_unavailable",
            reason=f"GetCallerIdentity: {exc}",
            status=502,
        ) from exc
    arn, account, user_id = (_find(root, n) for n in ("Arn", "Account", "UserId"))
    if not _ARN_RE.fullmatch(arn) or not (len(account) == 12 and account.isdigit()):
        raise ExchangeRejected(
            "the STS endpoint sent no caller identity",
            code="sts_unavailable",
            reason=f"GetCallerIdentity: arn={arn!r} account={account!r}",
            status=502,
        )
    if arn.split(":")[4] != account:
        raise ExchangeRejected(
            "the STS answer is inconsistent",
            code="sts_unavailable",
            reason=f"GetCallerIdentity: arn={arn!r} account={account!r}",
            status=502,
        )
    return arn, account, user_id
