"""The metadata a publisher sends with a release: one JSON object, checked and bounded.

It arrives before the tarball in the body of ``PUT /api/v1/flakes/ORG/NAME/releases/V``
(:mod:`nixd.server.http.flakes`), ``X-Nixd-Metadata-Length`` bytes long::

    {"visibility": "private" | "public",       # required
     "description": "a tool",                  # optional, at most 1024 characters
     "commit": "<40 or 64 hex digits>",        # optional (the git commit of the tree)
     "ref": "refs/tags/v0.1.0",                # optional, at most 256 characters
     "lock": {...} | null,                     # optional: the flake.lock as JSON
     "outputs": {"packages.x86_64-linux.default": "/nix/store/<h>-name", ...}}

Every bound is checked before anything is stored, and a refusal names the field, so a
publisher learns exactly what to fix. Unknown keys are refused: a typo must not be
silently dropped from an immutable release.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from nixd.bounds import load_json
from nixd.errors import FormatError
from nixd.nix.storepath import StorePath

MAX_METADATA_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_DESCRIPTION = 1024
MAX_REF = 256
MAX_OUTPUTS = 256
MAX_ATTR = 256
VISIBILITIES = ("private", "public")
_KEYS = frozenset({"visibility", "description", "commit", "ref", "lock", "outputs"})
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_ATTR = re.compile(r"[A-Za-z0-9_.'\"+-]+")
ATTR_RE = _ATTR
"""An output attribute path as ``--include-output`` records it (resolve checks it too)."""


class MetadataError(FormatError):
    """The release metadata is malformed or out of bounds (a 400 naming the field)."""


@dataclass(frozen=True, slots=True)
class ReleaseMetadata:
    """What a release records besides its source tree."""

    visibility: str
    description: str = ""
    commit: str = ""
    ref: str = ""
    lock: dict[str, Any] | None = None
    outputs: dict[str, str] = field(default_factory=dict)


def _text(data: dict[str, Any], key: str, limit: int) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise MetadataError(f'release metadata: "{key}" must be a string')
    if len(value) > limit:
        raise MetadataError(f'release metadata: "{key}" is longer than {limit} characters')
    if any(ord(c) < 0x20 and c not in "\t\n" for c in value):
        raise MetadataError(f'release metadata: "{key}" holds control characters')
    return value


def parse_metadata(raw: bytes) -> ReleaseMetadata:
    """The metadata in ``raw`` (JSON), or :class:`MetadataError` saying what is wrong."""
    try:
        data = load_json(
            raw, max_bytes=MAX_METADATA_BYTES, max_depth=MAX_DEPTH, what="the release metadata"
        )
    except FormatError as exc:
        raise MetadataError(str(exc)) from exc
    if not isinstance(data, dict):
        raise MetadataError("the release metadata must be a JSON object")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise MetadataError(
            f"release metadata: unknown keys {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_KEYS))})"
        )
    visibility = data.get("visibility")
    if visibility not in VISIBILITIES:
        raise MetadataError('release metadata: "visibility" must be "private" or "public"')
    commit = _text(data, "commit", 64)
    if commit and not _COMMIT.fullmatch(commit):
        raise MetadataError('release metadata: "commit" must be 40 or 64 lower-case hex digits')
    lock = data.get("lock")
    if lock is not None and not isinstance(lock, dict):
        raise MetadataError('release metadata: "lock" must be the flake.lock object or null')
    outputs = data.get("outputs", {})
    if not isinstance(outputs, dict):
        raise MetadataError('release metadata: "outputs" must be an object {attr: store path}')
    if len(outputs) > MAX_OUTPUTS:
        raise MetadataError(f'release metadata: more than {MAX_OUTPUTS} "outputs"')
    checked: dict[str, str] = {}
    for attr, path in outputs.items():
        if len(attr) > MAX_ATTR or not _ATTR.fullmatch(attr):
            raise MetadataError(f"release metadata: output attribute {attr[:80]!r} is not valid")
        if not isinstance(path, str):
            raise MetadataError(f"release metadata: output {attr} must be a store path string")
        try:
            checked[attr] = StorePath.parse(path).path()
        except FormatError as exc:
            raise MetadataError(f"release metadata: output {attr}: {exc}") from exc
    return ReleaseMetadata(
        visibility=str(visibility),
        description=_text(data, "description", MAX_DESCRIPTION),
        commit=commit,
        ref=_text(data, "ref", MAX_REF),
        lock=lock,
        outputs=checked,
    )
