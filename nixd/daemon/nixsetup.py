"""How the daemon tells Nix about the proxy: a netrc, a nix.conf fragment, one include line.

nixd owns two files outright and one line of a third:

* the **managed netrc** (0600): the proxy's ``machine 127.0.0.1 login nixd password
  <secret>``, a line per cache server with the current access token, and then every entry
  of the netrc files Nix would have read without nixd (its ``netrc-file``, or
  ``<conf dir>/netrc``) and of configured extra sources. Nix reads one netrc only, so
  nixd merges; the user's own files are read, never written.
* the **fragment** (0644): ``extra-substituters`` = the proxy, the pinned
  ``extra-trusted-public-keys``, ``netrc-file`` = the managed netrc, and
  :data:`NIX_SETTINGS`.
* one ``!include <fragment>`` line at the end of the **include file**, with a marker
  comment (see :mod:`nixd.nix.nixconf`); every other byte of that file stays as it was.

Which file gets the include line depends on who manages Nix's configuration
(``[nix] nix_conf_managed_by``, :data:`MANAGED_BY`):

* ``"nixd"``: the main nix.conf, always (a plain Debian/macOS install);
* ``"external"``: none. NixOS (``/etc/nix/nix.conf`` is a link into the store, and the
  ``services.nixd`` module adds the include), nix-darwin, home-manager or configuration
  management own nix.conf; nixd writes its fragment and netrc and touches nothing else;
* ``"auto"`` (the default) picks per machine: Determinate Nix's layout (nix.conf, which
  determinate-nixd rewrites, includes ``nix.custom.conf`` beside it, where tools are to put
  their settings) gets the line in ``nix.custom.conf``; a symlinked nix.conf is external;
  anything else is ``"nixd"``.

After writing, :meth:`NixSetup.apply` checks whether Nix will read the fragment: it
follows the includes from the main nix.conf in Nix's order (:meth:`NixSetup.effect_problem`)
and says what to do when the fragment is not reached, or when a later line undoes one of
its settings. The daemon hands that to ``nixd login``, which then fails with the
instruction instead of claiming success.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
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

ManagedBy = Literal["auto", "nixd", "external"]
MANAGED_BY: tuple[ManagedBy, ...] = ("auto", "nixd", "external")
"""Who manages nix.conf: see the module docstring."""
CUSTOM_CONF = "nix.custom.conf"
"""Determinate Nix's file for settings of other tools, beside its nix.conf."""
MAX_INCLUDE_DEPTH = 8
"""Deepest include chain followed when checking that Nix reads the fragment."""
MAX_INCLUDED_FILES = 64
"""Most files read for that check (Nix itself has no limit; a loop would be endless)."""
MAX_CONF_BYTES = 1 << 20
"""A config file larger than this is not read for the check (nor merged from)."""
NIX_SETTINGS = {"narinfo-cache-negative-ttl": "0"}
"""Other settings of the fragment. Nix keeps no negative narinfo entries: the proxy
answers real misses from its own negative cache, and answers 404 for an upstream it
cannot reach (so that a build goes on, see :mod:`nixd.proxy.errors`); Nix's hour-long
memory of those would hide the paths once the upstream is back."""
#: settings whose plain (non-``extra-``) form after nixd's include undoes nixd's value
_OVERRIDABLE = ("substituters", "trusted-substituters", "trusted-public-keys", "netrc-file")


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
    managed_by: ManagedBy = "auto"
    """Who manages nix.conf; decides where the include line goes (module docstring)."""


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
    """Which files :meth:`NixSetup.apply` rewrote, and whether Nix reads the fragment."""

    netrc_changed: bool = False
    fragment_changed: bool = False
    nix_conf_changed: bool = False
    """The include file (nix.conf or nix.custom.conf) was rewritten."""
    problem: str | None = None
    """Why Nix does not use nixd's settings and what to do; None when it does."""
    include_file: str | None = field(default=None, compare=False)
    """The file nixd keeps its include line in; None when nix.conf is managed elsewhere."""

    @property
    def in_effect(self) -> bool:
        """Nix reads the fragment, and nothing after it undoes the fragment's settings."""
        return self.problem is None

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

    @staticmethod
    def _read_text(path: Path) -> str | None:
        """A config file's text (through a symlink, as Nix reads it), None when absent."""
        data = files.read_if_exists(path)
        return None if data is None else _decode(data)

    def _main_text(self) -> str | None:
        return self._read_text(self.config.nix_conf)

    @property
    def custom_conf(self) -> Path:
        """Where Determinate Nix's ``nix.custom.conf`` would be, beside the main nix.conf."""
        return self.config.nix_conf.parent / CUSTOM_CONF

    def is_determinate_layout(self, main_text: str | None) -> bool:
        """The main nix.conf includes ``nix.custom.conf`` beside it (Determinate Nix)."""
        if main_text is None:
            return False
        wanted = os.path.normpath(self.custom_conf)
        for _number, kind, value in _conf_lines(main_text):
            if (
                kind in ("include", "!include")
                and os.path.normpath(self.config.nix_conf.parent / value) == wanted
            ):
                return True
        return False

    def include_target(self, main_text: str | None) -> tuple[Path | None, str | None]:
        """The file that gets nixd's include line, or None and the reason (for the report)."""
        mode = self.config.managed_by
        main = self.config.nix_conf
        if mode == "external":
            return None, '[nix] nix_conf_managed_by = "external" says it is managed elsewhere'
        target = main
        if mode == "auto" and self.is_determinate_layout(main_text):
            target = self.custom_conf
        if target.is_symlink():
            owner = "NixOS, nix-darwin or home-manager"
            if target == main and os.path.realpath(main).startswith("/nix/store/"):
                owner = "NixOS or nix-darwin (a link into the Nix store)"
            return None, f"{target} is a symlink (managed by {owner}), which nixd does not replace"
        return target, None

    def netrc_sources(self, *texts: str | None) -> list[Path]:
        """The user's netrc files to merge, in priority order (ours excluded).

        ``texts`` are the main nix.conf and then the include file, in the order Nix reads
        them: the last ``netrc-file`` set wins, as in Nix.
        """
        sources = list(self.config.additional_netrc_sources)
        if self.config.merge_nix_netrc:
            named = None
            for text in texts:
                if text is None:
                    continue
                try:
                    named = (
                        nixconf.find_setting(
                            nixconf.remove_include(text) or "",
                            "netrc-file",
                            source=str(self.config.nix_conf),
                        )
                        or named
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

    def render_netrc(self, state: NixState, *texts: str | None) -> str:
        """The managed netrc: proxy line, server lines, then the user's entries."""
        host = urlsplit(state.proxy_url).hostname
        if not host:
            raise ConfigError(f"proxy URL {state.proxy_url!r} has no host")
        ours = [NetrcEntry(host, PROXY_LOGIN, state.proxy_secret)]
        ours += [NetrcEntry(h, SERVER_LOGIN, token) for h, token in state.server_credentials]
        render_netrc(ours)  # our own values must be clean: fail loudly, never skip
        merged = merge_netrc(ours, *self._user_entries(self.netrc_sources(*texts)))
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
            NIX_SETTINGS,
            trusted_substituters=self.config.trusted_substituters,
        )

    # -- applying --------------------------------------------------------------------

    def _clean(self) -> None:
        for path in (self.config.netrc, self.config.fragment, self.config.nix_conf):
            files.clean_stale_temp_files(path)
        if self.custom_conf.exists():
            files.clean_stale_temp_files(self.custom_conf)

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

    @staticmethod
    def _rewrite(path: Path, text: str) -> None:
        """Replace a config file the user owns, keeping its mode and owner."""
        meta = files.file_mode(path)
        mode, owner = (0o644, None) if meta is None else (meta[0], (meta[1], meta[2]))
        files.atomic_write(path, _encode(text), mode=mode, owner=owner)

    def apply(self, state: NixState) -> ApplyResult:
        """Bring the files in line with ``state``; say which changed and whether Nix reads them.

        Everything is rendered (and so validated) before the first write: a bad value
        raises :class:`FormatError` and leaves every file as it was. The netrc and the
        fragment are always written; the include line only where nixd may keep it. A
        failure to add that line is not raised but reported in
        :attr:`ApplyResult.problem`, with what to do.
        """
        self._clean()
        main_text = self._main_text()
        target, why_not = self.include_target(main_text)
        target_text = None
        if target is not None:
            target_text = main_text if target == self.config.nix_conf else self._read_text(target)
        custom_text = None
        if self.is_determinate_layout(main_text):
            is_custom = target == self.custom_conf
            custom_text = target_text if is_custom else self._read_text(self.custom_conf)
        netrc = self.render_netrc(state, main_text, custom_text).encode()
        fragment = self.render_fragment(state).encode()
        new_target = None
        if target is not None:
            new_target = nixconf.ensure_include(target_text, str(self.config.fragment))
        netrc_changed = self._write_if_changed(self.config.netrc, netrc, 0o600)
        fragment_changed = self._write_if_changed(self.config.fragment, fragment, 0o644)
        conf_changed = False
        write_error = None
        if target is not None and new_target is not None and new_target != target_text:
            try:
                self._rewrite(target, new_target)
            except ConfigError as exc:
                write_error = str(exc)
                logger.debug("cannot add the include of %s: %s", self.config.fragment, exc)
            else:
                logger.info("added the include of %s to %s", self.config.fragment, target)
                conf_changed = True
        if target is not None and target != self.config.nix_conf:
            conf_changed |= self._drop_stale_include(self.config.nix_conf)
        reached, problem = self._effect()
        if problem is not None:
            problem = self._advice(problem, reached, why_not, write_error, target)
        return ApplyResult(
            netrc_changed,
            fragment_changed,
            conf_changed,
            problem=problem,
            include_file=None if target is None else str(target),
        )

    def _drop_stale_include(self, path: Path) -> bool:
        """Remove nixd's own include line from ``path`` (left from another layout)."""
        if path.is_symlink():
            return False
        text = self._read_text(path)
        if text is None:
            return False
        restored = nixconf.remove_include(text)
        if restored == text:
            return False
        try:
            if restored is None:
                files.remove_file(path)
            else:
                self._rewrite(path, restored)
        except ConfigError as exc:
            logger.warning("cannot remove nixd's old include line from %s: %s", path, exc)
            return False
        logger.info("removed nixd's include line from %s", path)
        return True

    def _advice(
        self,
        problem: str,
        reached: bool,
        why_not: str | None,
        write_error: str | None,
        target: Path | None,
    ) -> str:
        """The problem, why nixd did not fix it itself, and the line or option to add."""
        line = f"!include {self.config.fragment}"
        main = self.config.nix_conf
        if reached:
            return f"{problem}; move `{line}` after it, then restart nix-daemon"
        if write_error is not None:
            return (
                f"{problem}: nixd could not add `{line}` ({write_error}). Add that line at "
                f"the end of {target or main} yourself (or of its source, if a tool manages it, "
                f'and then set [nix] nix_conf_managed_by = "external"), then restart '
                "nix-daemon"
            )
        if why_not is not None:
            return (
                f"{problem}: {why_not}. Add `{line}` where that file is made: on NixOS "
                "`services.nixd.enable = true;` adds it (or `nix.extraOptions = "
                f'"{line}";`), then `nixos-rebuild switch`; elsewhere add it at the end of '
                f"{main} and restart nix-daemon"
            )
        return f"{problem}. Add `{line}` at the end of {main}, then restart nix-daemon"

    def effect_problem(self) -> str | None:
        """Why Nix, reading the main nix.conf now, would not use the fragment; None if it would.

        Follows ``include``/``!include`` lines the way Nix 2.8 does (relative to the
        including file's directory, in file order), to a bounded depth and count.
        """
        return self._effect()[1]

    def _effect(self) -> tuple[bool, str | None]:
        """(the fragment is included at all, the problem or None); see :meth:`effect_problem`.

        Follows ``include``/``!include`` lines the way Nix 2.8 does (relative to the
        including file's directory, in file order), to a bounded depth and count.
        """
        fragment = os.path.normpath(self.config.fragment)
        reached: list[bool] = [False]
        after: list[str] = []
        budget = [MAX_INCLUDED_FILES]

        def visit(path: str, depth: int) -> None:
            if depth > MAX_INCLUDE_DEPTH or budget[0] <= 0:
                return
            budget[0] -= 1
            try:
                data = files.read_if_exists(path)
            except ConfigError:
                return  # Nix skips an unreadable file silently, too
            if data is None or len(data) > MAX_CONF_BYTES:
                return
            for number, kind, value in _conf_lines(_decode(data)):
                if kind in ("include", "!include"):
                    child = os.path.normpath(os.path.join(os.path.dirname(path), value))
                    if child == fragment or _same_file(child, fragment):
                        reached[0] = True
                        after.clear()  # a later include of it applies it again
                    else:
                        visit(child, depth + 1)
                elif reached[0] and kind in _OVERRIDABLE:
                    after.append(f"`{kind} = ...` in {path}:{number}")

        visit(str(self.config.nix_conf), 0)
        if not reached[0]:
            return False, (
                f"Nix does not read nixd's settings: {self.config.nix_conf} does not "
                f"include {self.config.fragment}"
            )
        if after:
            return True, (
                f"Nix does not use all of nixd's settings: {after[0]} comes after the "
                f"include of {self.config.fragment} and undoes its setting"
            )
        return True, None

    def remove(self) -> bool:
        """Undo :meth:`apply` (logout): include line(s), fragment, managed netrc. Changed?"""
        self._clean()
        changed = False
        for path in (self.config.nix_conf, self.custom_conf):
            changed |= self._drop_stale_include(path)
        for path in (self.config.fragment, self.config.netrc):
            if files.remove_file(path):
                logger.info("removed %s", path)
                changed = True
        return changed


def _conf_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, name, value) of each include and setting, leniently as for a check.

    Unlike :func:`nixd.nix.nixconf.parse_nix_conf` this never raises: lines Nix would
    refuse are skipped (Nix itself would then refuse the whole file, which the check
    cannot fix anyway).
    """
    result = []
    for number, raw in enumerate(text.split("\n"), start=1):
        tokens = [
            t for t in raw.split("#", 1)[0].replace("\t", " ").replace("\r", " ").split(" ") if t
        ]
        if len(tokens) == 2 and tokens[0] in ("include", "!include"):
            result.append((number, tokens[0], tokens[1]))
        elif len(tokens) >= 2 and tokens[1] == "=":
            result.append((number, tokens[0], " ".join(tokens[2:])))
    return result


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
