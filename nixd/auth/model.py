"""The token model shared by the daemon, the refresher and the proxy.

A *credential* is what a login produced (an API token, a CI job's ID token, signed AWS
request material, a refresh credential); it is exchanged at the cache server for an
*access token*: a short-lived JWT that upstream requests carry as ``Authorization:
Bearer``. A :class:`TokenSource` hands out the current access token and renews it on
demand; callers never see the credential.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A short-lived access token; ``repr`` never shows its value."""

    value: str
    expires_at: float
    identity: str  # rendered as kind:subject, e.g. "token:ci-bot"
    issued_at: float = 0.0

    def __repr__(self) -> str:
        return f"AccessToken(identity={self.identity!r}, expires_at={self.expires_at!r})"

    def expired(self, now: float | None = None, *, leeway: float = 0.0) -> bool:
        return (time.time() if now is None else now) >= self.expires_at - leeway


class TokenSource(Protocol):
    """Where upstream clients get the machine's access token."""

    async def get(self) -> AccessToken:
        """The current valid token; waits for a renewal if the current one has expired.

        Raises :class:`nixd.errors.AuthError` when no token can be had (not logged in,
        credential rejected).
        """
        ...

    async def refresh(self, stale: AccessToken | None) -> AccessToken:
        """Renew now because ``stale`` was rejected; concurrent callers share one renewal."""
        ...
