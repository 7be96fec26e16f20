"""The exchangers a server config enables, by ``kind``.

Separate from :mod:`nixd.server.login.exchange` (the interface) so that the exchangers
import the interface and this registry imports the exchangers: no import circle.
"""

from __future__ import annotations

from nixd.server.config import ServerConfig
from nixd.server.login.aws import AwsExchanger
from nixd.server.login.exchange import Exchanger
from nixd.server.login.oidc import GITHUB, GITLAB, OidcExchanger


def open_exchangers(config: ServerConfig) -> dict[str, Exchanger]:
    """The exchangers the config enables (``[[github]]``, ``[[gitlab]]``, ``[[aws]]``)."""
    exchangers: dict[str, Exchanger] = {}
    if config.github:
        exchangers[GITHUB.exchange_kind] = OidcExchanger(GITHUB, config.github)
    if config.gitlab:
        exchangers[GITLAB.exchange_kind] = OidcExchanger(GITLAB, config.gitlab)
    if config.aws:
        exchangers[AwsExchanger.kind] = AwsExchanger(config.aws)
    return exchangers
