"""Store paths: ``<store dir>/<32-char base32 hash>-<name>``.

The rules are Nix's ``checkName``: a name of at most 211 characters from
``[A-Za-z0-9+-._?=]``. Names may start with a period (``nix-store --add .bashrc`` makes
``<hash>-.bashrc``), but, as in Nix since 2.20, a name whose first dash-separated
component is ``.`` or ``..`` is refused; Nix 2.8 accepts those, though nothing makes them.
Nix 2.8 also does not check the dash after the hash; we require it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from nixd.errors import FormatError
from nixd.nix import base32
from nixd.nix.hashes import Hash

DEFAULT_STORE_DIR = "/nix/store"
HASH_LEN = 32
MAX_NAME_LEN = 211
_NAME = re.compile(r"[A-Za-z0-9+\-._?=]+")


@dataclass(frozen=True, slots=True, order=True)
class StorePath:
    """A store path, kept as its hash part and name; the store dir is separate."""

    hash_part: str
    name: str

    def __post_init__(self) -> None:
        validate_hash_part(self.hash_part)
        validate_name(self.name)

    @classmethod
    def from_basename(cls, basename: str) -> StorePath:
        """Parse ``<hash>-<name>``."""
        if len(basename) < HASH_LEN + 2 or basename[HASH_LEN] != "-":
            raise FormatError(f"{basename!r} is not a store path basename (<hash>-<name>)")
        return cls(basename[:HASH_LEN], basename[HASH_LEN + 1 :])

    @classmethod
    def parse(cls, path: str, store_dir: str = DEFAULT_STORE_DIR) -> StorePath:
        """Parse a full path directly inside ``store_dir``."""
        prefix = store_dir.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise FormatError(f"path {path!r} is not in the Nix store {store_dir}")
        rest = path[len(prefix) :]
        if "/" in rest:
            raise FormatError(f"path {path!r} is inside a store path, not a store path")
        return cls.from_basename(rest)

    @property
    def basename(self) -> str:
        return f"{self.hash_part}-{self.name}"

    def path(self, store_dir: str = DEFAULT_STORE_DIR) -> str:
        """The full path in ``store_dir``."""
        return f"{store_dir.rstrip('/')}/{self.basename}"

    def __str__(self) -> str:
        return self.basename


def validate_hash_part(hash_part: str) -> None:
    """Raise unless ``hash_part`` is 32 characters of Nix base32."""
    if len(hash_part) != HASH_LEN:
        raise FormatError(f"store path hash {hash_part!r} must be {HASH_LEN} characters")
    base32.decode(hash_part)


def validate_name(name: str) -> None:
    """Raise unless ``name`` is a valid store path name."""
    if not name:
        raise FormatError("store path name is empty")
    if len(name) > MAX_NAME_LEN:
        raise FormatError(f"store path name is longer than {MAX_NAME_LEN} characters")
    if name.split("-", 1)[0] in (".", ".."):
        raise FormatError(f"store path name {name!r} starts with the component '.' or '..'")
    if not _NAME.fullmatch(name):
        raise FormatError(f"store path name {name!r} has a character outside [A-Za-z0-9+-._?=]")


def make_store_path(
    type_: str, inner: Hash, name: str, store_dir: str = DEFAULT_STORE_DIR
) -> StorePath:
    """Nix's ``makeStorePath``: the path named by ``<type>:<algo>:<hex>:<store dir>:<name>``.

    The sha256 of that text, folded to 20 bytes by XOR (``compressHash``), in Nix base32.
    """
    validate_name(name)
    text = f"{type_}:{inner.encode('base16')}:{store_dir.rstrip('/')}:{name}"
    digest = hashlib.sha256(text.encode()).digest()
    folded = bytearray(20)
    for i, byte in enumerate(digest):
        folded[i % 20] ^= byte
    return StorePath(base32.encode(bytes(folded)), name)


def fixed_output_path(
    nar_hash: Hash, name: str = "source", store_dir: str = DEFAULT_STORE_DIR
) -> StorePath:
    """The content-addressed path of a tree with this NAR hash and no references.

    What ``nix-store --add-fixed --recursive sha256``, ``nix store add-path`` and a
    fetched tarball (``fixed:r:sha256:...``) get: Nix's ``makeFixedOutputPath`` for
    recursive sha256, which hashes ``source:sha256:<hex>:<store dir>:<name>``. Other
    algorithms take another route in Nix and are not needed here, so they are refused.
    """
    if nar_hash.algo != "sha256":
        raise FormatError(
            f"a recursive fixed-output path needs a sha256 NAR hash, not {nar_hash.algo}"
        )
    return make_store_path("source", nar_hash, name, store_dir)
