"""How the daemon tells Nix about the proxy: a netrc, a nix.conf fragment, one include line.

nixd owns two files outright and one line of a third:

* the **managed netrc** (0600): the proxy's ``machine 127.0.0.1 login nixd password
  <secret>``, a line per cache server with the current access token, and then every entry
  of the netrc files Nix would have read without nixd (its ``netrc-file``, or
  ``<conf dir>/netrc``) and of configured extra sources. Nix reads one netrc only, so
  nixd merges; the user's own files are read, never written.
* the **fragment** (0644): ``extra-substituters`` = the proxy, the pinned
  ``extra-trusted-public-keys`` and ``netrc-file`` = the managed netrc.
* one ``!include <fragment>`` line at the end of the **main nix.conf**, with a marker
  comment (see :mod:`nixd.nix.nixconf`); every other byte of that file stays as it was.

Every write is an atomic replace (:mod:`nixd.daemon.files`), netrc first, include last, so
Nix never sees an include of a fragment naming a netrc that is not there yet; and since
the line is ``!include``, a missing fragment never breaks Nix. :meth:`NixSetup.apply`
writes only what differs and says what changed: curl reads the netrc on every transfer,
while nix.conf is read when nix-daemon starts, so only a config change needs a restart.
:meth:`NixSetup.remove` undoes exactly what nixd added.

The methods block; the daemon runs them one at a time via ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nixd.daemon import files
from nixd.errors import ConfigError, FormatError
from nixd.nix import nixconf
from nixd.nix.netrc import NetrcEntry, merge_netrc, parse_netrc, render_netrc

logger = logging.getLogger(__name__)

#: The user name the proxy expects in Basic auth (the password is the proxy secret).
PROXY_LOGIN = "nixd"
#: The user name sent to cache servers; they read only the password (the token).
SERVER_LOGIN = "nixd"


@dataclass(frozen=True, slots=True)
class NixSetupConfig:
    """Where the files live, and which netrc files to merge besides nixd's own lines."""

    nix_conf: Path = Path("/etc/nix/nix.conf")
    fragment: Path = Path("/etc/nix/nixd.conf")
    netrc: Path = Path("/etc/nix/nixd.netrc")
    additional_netrc_sources: tuple[Path, ...] = ()
    merge_nix_netrc: bool = True
    """Also merge the netrc Nix used before: main nix.conf's ``netrc-file``, else
    ``<dir of nix.conf>/netrc``."""
    trusted_substituters: bool = True
    """Also write ``extra-trusted-substituters`` (the config is a nix-daemon's)."""


@dataclass(frozen=True, slots=True)
class NixState:
    """What changes at run time: the proxy's address and secret, keys and tokens."""

    proxy_url: str
    proxy_secret: str
    trusted_public_keys: tuple[str, ...] = ()
    server_credentials: tuple[tuple[str, str], ...] = ()
    """(host, access token) pairs for direct ``machine`` lines (e.g. ``nix copy --to``)."""

    def __repr__(self) -> str:  # never show the secret or tokens
        hosts = [host for host, _ in self.server_credentials]
        return (
            f"NixState(proxy_url={self.proxy_url!r}, keys={len(self.trusted_public_keys)}, "
            f"servers={hosts!r})"
        )


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """Which files :meth:`NixSetup.apply` rewrote."""

    netrc_changed: bool = False
    fragment_changed: bool = False
    nix_conf_changed: bool = False

    @property
    def changed(self) -> bool:
        return self.netrc_changed or self.fragment_changed or self.nix_conf_changed

    @property
    def restart_needed(self) -> bool:
        """nix-daemon reads nix.conf at start; a netrc change alone needs no restart."""
        return self.fragment_changed or self.nix_conf_changed

    def __bool__(self) -> bool:
        return self.changed


def _decode(data: bytes) -> str:
    # surrogateescape keeps any byte of the user's file through a decode/encode round trip.
    return data.decode("utf-8", errors="surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


class NixSetup:
    """Writes and removes nixd's Nix integration as described in the module docstring."""

    def __init__(self, config: NixSetupConfig) -> None:
        self.config = config

    # -- what to write ---------------------------------------------------------------

    def _main_text(self) -> str | None:
        path = self.config.nix_conf
        if path.is_symlink():
            raise ConfigError(
                f"{path} is a symlink (managed by NixOS or home-manager?); nixd will not "
                f"replace it. Add `!include {self.config.fragment}` to its source instead."
            )
        data = files.read_if_exists(path)
        return None if data is None else _decode(data)

    def netrc_sources(self, main_text: str | None) -> list[Path]:
        """The user's netrc files to merge, in priority order (ours excluded)."""
        sources = list(self.config.additional_netrc_sources)
        if self.config.merge_nix_netrc:
            named = None
            if main_text is not None:
                try:
                    named = nixconf.find_setting(
                        nixconf.remove_include(main_text) or "",
                        "netrc-file",
                        source=str(self.config.nix_conf),
                    )
                except FormatError as exc:
                    logger.warning("cannot read netrc-file from %s: %s", self.config.nix_conf, exc)
            default = self.config.nix_conf.parent / "netrc"
            sources.append(Path(named) if named else default)
        own = os.path.abspath(self.config.netrc)
        unique: list[Path] = []
        for source in sources:
            if os.path.abspath(source) != own and source not in unique:
                unique.append(source)
        return unique

    def _user_entries(self, sources: Sequence[Path]) -> list[list[NetrcEntry]]:
        result = []
        for source in sources:
            data = files.read_if_exists(source)
            if data is None:
                continue
            try:
                entries = parse_netrc(data, source=str(source))
            except FormatError as exc:
                logger.warning("not merging %s: %s", source, exc)
                continue
            kept = []
            for entry in entries:
                try:
                    render_netrc([entry])
                except FormatError as exc:
                    logger.warning(
                        "not merging the %s entry of %s: %s",
                        entry.machine or "default",
                        source,
                        exc.message,
                    )
                    continue
                kept.append(entry)
            result.append(kept)
        return result

    def render_netrc(self, state: NixState, main_text: str | None) -> str:
        """The managed netrc: proxy line, server lines, then the user's entries."""
        host = urlsplit(state.proxy_url).hostname
        if not host:
            raise ConfigError(f"proxy URL {state.proxy_url!r} has no host")
        ours = [NetrcEntry(host, PROXY_LOGIN, state.proxy_secret)]
        ours += [NetrcEntry(h, SERVER_LOGIN, token) for h, token in state.server_credentials]
        render_netrc(ours)  # our own values must be clean: fail loudly, never skip
        merged = merge_netrc(ours, *self._user_entries(self.netrc_sources(main_text)))
        return (
            "# Written by nixd: its proxy and cache servers, then entries merged from your\n"
            "# netrc files (which nixd never changes). Edits here are overwritten.\n"
            + render_netrc(merged)
        )

    def render_fragment(self, state: NixState) -> str:
        return nixconf.render_nix_conf_fragment(
            [state.proxy_url],
            state.trusted_public_keys,
            str(self.config.netrc),
            trusted_substituters=self.config.trusted_substituters,
        )

    # -- applying --------------------------------------------------------------------

    def _clean(self) -> None:
        for path in (self.config.netrc, self.config.fragment, self.config.nix_conf):
            files.clean_stale_temp_files(path)

    @staticmethod
    def _write_if_changed(path: Path, data: bytes, mode: int) -> bool:
        current = files.read_if_exists(path)
        meta = files.file_mode(path)
        if current == data and meta is not None and meta[0] == mode:
            return False
        files.make_dirs(path.parent, 0o755)
        files.atomic_write(path, data, mode=mode)
        logger.info("wrote %s", path)
        return True

    def apply(self, state: NixState) -> ApplyResult:
        """Bring the three files in line with ``state``; say which ones changed.

        Everything is rendered (and so validated) before the first write: a bad value
        raises :class:`FormatError` and leaves every file as it was.
        """
        self._clean()
        main_text = self._main_text()
        netrc = self.render_netrc(state, main_text).encode()
        fragment = self.render_fragment(state).encode()
        new_main = nixconf.ensure_include(main_text, str(self.config.fragment))
        netrc_changed = self._write_if_changed(self.config.netrc, netrc, 0o600)
        fragment_changed = self._write_if_changed(self.config.fragment, fragment, 0o644)
        conf_changed = False
        if new_main != main_text:
            meta = files.file_mode(self.config.nix_conf)
            mode, owner = (0o644, None) if meta is None else (meta[0], (meta[1], meta[2]))
            files.atomic_write(self.config.nix_conf, _encode(new_main), mode=mode, owner=owner)
            logger.info("added the include of %s to %s", self.config.fragment, self.config.nix_conf)
            conf_changed = True
        return ApplyResult(netrc_changed, fragment_changed, conf_changed)

    def remove(self) -> bool:
        """Undo :meth:`apply` (logout): include line, fragment, managed netrc. Changed?"""
        self._clean()
        changed = False
        main_text = self._main_text()
        if main_text is not None:
            restored = nixconf.remove_include(main_text)
            if restored is None:
                changed |= files.remove_file(self.config.nix_conf)
            elif restored != main_text:
                meta = files.file_mode(self.config.nix_conf) or (0o644, 0, 0)
                files.atomic_write(
                    self.config.nix_conf,
                    _encode(restored),
                    mode=meta[0],
                    owner=(meta[1], meta[2]),
                )
                changed = True
            if changed:
                logger.info("removed the nixd include from %s", self.config.nix_conf)
        for path in (self.config.fragment, self.config.netrc):
            if files.remove_file(path):
                logger.info("removed %s", path)
                changed = True
        return changed
