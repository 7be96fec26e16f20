"""RFC 9112/9110 grammar as compiled patterns, named as the RFCs name them (cf. h11's _abnf).

Deliberately narrower than h11's where the RFC allows a choice: field values are
``VCHAR / obs-text`` only (h11 lets other control bytes through), obs-fold is not
accepted, and lines end in CRLF only.
"""

from __future__ import annotations

import re

TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
"""RFC 9110 5.6.2 ``token`` (methods, field names)."""
VCHAR = rb"[\x21-\x7e]"
FIELD_VCHAR = rb"[\x21-\x7e\x80-\xff]"
"""``VCHAR / obs-text``: a field value byte other than SP and HTAB."""
FIELD_VALUE = rb"(?:" + FIELD_VCHAR + rb"+(?:[ \t]+" + FIELD_VCHAR + rb"+)*)?"
"""RFC 9110 5.5 ``field-value`` without its surrounding OWS."""
HTTP_VERSION = rb"HTTP/([0-9])\.([0-9])"

REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") (" + VCHAR + rb"+) " + HTTP_VERSION)
"""RFC 9112 3 ``method SP request-target SP HTTP-version``."""
STATUS_LINE = re.compile(HTTP_VERSION + rb" ([0-9]{3})(?: ([ \t\x21-\x7e\x80-\xff]*))?")
"""RFC 9112 4 ``HTTP-version SP status-code SP [ reason-phrase ]``; the SP before an
empty reason may be missing, as many servers leave it out (h11 allows the same)."""
FIELD_LINE = re.compile(rb"(" + TOKEN + rb"):[ \t]*(" + FIELD_VALUE + rb")[ \t]*")
"""RFC 9112 5 ``field-name ":" OWS field-value OWS``."""
BARE_LF = re.compile(rb"(?<!\r)\n")


def comma_tokens(value: bytes) -> list[bytes]:
    """The lower-cased elements of a comma-separated list header (``Connection``)."""
    return [t.strip().lower() for t in value.split(b",")] if value else []
