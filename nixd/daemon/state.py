"""What the daemon remembers across restarts: the login, and the proxy's local secret.

``state.json`` (0600, in ``state_dir``) holds the server URL, the login method and its
state (:meth:`~nixd.auth.methods.LoginMethod.to_state`, which may hold a secret: so the
daemon can renew without a new login), the pinned server keys, the last access token (so a
restart does not need an exchange) and the identity as the server describes it. Version 1
files (an API token as ``credential``) are still read; they are written back as version 2.
``proxy-secret`` (0600) is the password the proxy demands from Nix, written into the
managed netrc. Both are written atomically (temp file + fsync + rename + directory fsync):
a crash leaves the old or the new file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nixd.auth import methods
from nixd.auth.methods import LoginMethod
from nixd.auth.model import AccessToken
from nixd.auth.token import TokenMethod
from nixd.daemon.files import atomic_write, make_dirs
from nixd.errors import ConfigError, LoginFailed

log = logging.getLogger(__name__)

STATE_VERSION = 2


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600, creating its directory."""
    make_dirs(Path(path).parent, 0o700)
    atomic_write(path, data, mode=0o600)


@dataclass(frozen=True, slots=True)
class LoginState:
    """A login as persisted; ``repr`` shows no secret (the dataclass fields hide theirs)."""

    server_url: str
    method: LoginMethod
    pinned_keys: tuple[str, ...]
    token: AccessToken | None = None
    logged_in_at: float = 0.0
    #: the identity as ``GET /api/v1/token/status`` describes it, e.g. github:acme/app@ref
    display_identity: str | None = None

    def to_json(self) -> dict[str, Any]:
        token = self.token
        return {
            "version": STATE_VERSION,
            "server_url": self.server_url,
            "method": {"name": self.method.name, "state": self.method.to_state()},
            "display_identity": self.display_identity,
            "pinned_keys": list(self.pinned_keys),
            "logged_in_at": self.logged_in_at,
            "token": None
            if token is None
            else {
                "value": token.value,
                "expires_at": token.expires_at,
                "identity": token.identity,
                "issued_at": token.issued_at,
            },
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> LoginState:
        try:
            version = data["version"]
            if version == 1:  # an API token login, before login methods
                if data["credential"]["kind"] != "token":
                    raise ValueError(f"unknown credential kind {data['credential']['kind']!r}")
                method: LoginMethod = TokenMethod(str(data["credential"]["secret"]))
            elif version == STATE_VERSION:
                method = methods.from_state(str(data["method"]["name"]), data["method"]["state"])
            else:
                raise ValueError(f"unknown version {version!r}")
            t = data["token"]
            token = (
                None
                if t is None
                else AccessToken(
                    value=str(t["value"]),
                    expires_at=float(t["expires_at"]),
                    identity=str(t["identity"]),
                    issued_at=float(t["issued_at"]),
                )
            )
            return cls(
                server_url=str(data["server_url"]),
                method=method,
                pinned_keys=tuple(str(k) for k in data["pinned_keys"]),
                token=token,
                logged_in_at=float(data.get("logged_in_at", 0.0)),
                display_identity=str(data["display_identity"])
                if data.get("display_identity")
                else None,
            )
        except (KeyError, TypeError, ValueError, LoginFailed) as exc:
            raise ConfigError(f"{where}: damaged login state ({exc}); log in again") from exc


def load_state(path: str) -> LoginState | None:
    """The saved login, or None when logged out."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the login state: {exc}") from exc
    return LoginState.from_json(data, path)


def save_state(path: str, state: LoginState) -> None:
    write_private(path, json.dumps(state.to_json(), indent=1).encode() + b"\n")


def clear_state(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def ensure_proxy_secret(path: str) -> str:
    """The proxy's local secret, created (random, 0600) on first use."""
    try:
        with open(path, encoding="ascii") as f:
            secret = f.read().strip()
        if secret:
            return secret
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the proxy secret: {exc}") from exc
    secret = secrets.token_urlsafe(32)
    write_private(path, secret.encode() + b"\n")
    log.info("created the proxy secret %s", path)
    return secret
