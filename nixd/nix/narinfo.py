"""``.narinfo`` files: what a binary cache says about one store path.

A narinfo is ``Key: value`` lines, each ending in ``\\n`` (Nix 2.8,
``libstore/nar-info.cc``). It names the NAR file (``URL``, ``Compression``, and the
compressed file's ``FileHash``/``FileSize``), the uncompressed NAR (``NarHash``/``NarSize``),
the path's ``References``, ``Deriver``, ``System``, signatures (``Sig``, repeatable) and, for
content-addressed paths, ``CA``.

Trust works through the *fingerprint*
``1;<store path>;sha256:<base32 NarHash>;<NarSize>;<sorted full reference paths, comma-joined>``:
a ``Sig`` is an Ed25519 signature of it. It covers the NAR's hash, size and references
but not the URL, compression or ``FileHash``, so whoever serves a signed narinfo may
recompress the NAR; a verifier must check the decompressed NAR against ``NarHash``.

Parsing follows Nix 2.8 where it is safe and is stricter where Nix is lenient in ways
that could make two readers disagree:

- required: ``StorePath``, ``URL``, ``NarHash``, and a ``NarSize`` above zero; a missing
  ``Compression`` means ``bzip2``; ``Deriver: unknown-deriver`` means no deriver;
- unknown keys are ignored and dropped, as Nix does, so that :meth:`NarInfo.render`
  stays byte-identical to what Nix writes for the same path;
- a key other than ``Sig`` given twice is an error (Nix silently takes the last one,
  which would let a proxy and Nix read different values from the same bytes);
- ``\\r`` anywhere (CRLF files), a line without ``": "``, a missing final newline and
  non-decimal sizes are errors. Every error is a :class:`FormatError` naming the line.

Values are normalised as Nix keeps them: references and signatures are sets (rendered
sorted, without duplicates), hashes are rendered in base32 even when a tool wrote
base16, and ``CA`` in its canonical form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from nixd.bounds import parse_uint
from nixd.errors import FormatError
from nixd.nix.hashes import DIGEST_SIZES, Algo, Hash
from nixd.nix.signing import PublicKey, SecretKey
from nixd.nix.storepath import DEFAULT_STORE_DIR, StorePath

COMPRESSIONS = ("none", "xz", "zstd", "bzip2", "br")
"""Compression methods Nix 2.8 knows; others are kept as given (Nix would fail at fetch)."""

UNKNOWN_DERIVER = "unknown-deriver"
_T = TypeVar("_T")
_MAX_U64 = 2**64 - 1
_SINGLE_KEYS = frozenset(
    {
        "StorePath",
        "URL",
        "Compression",
        "FileHash",
        "FileSize",
        "NarHash",
        "NarSize",
        "References",
        "Deriver",
        "System",
        "CA",
    }
)


@dataclass(frozen=True, slots=True)
class NarInfo:
    """One parsed narinfo; construct it directly to publish a path, or with :meth:`parse`.

    ``file_hash``/``file_size`` may be ``None`` (some caches omit them; Nix never checks
    them). ``references`` and ``sigs`` are normalised to sorted tuples without duplicates.
    """

    store_path: StorePath
    url: str
    compression: str
    file_hash: Hash | None
    file_size: int | None
    nar_hash: Hash
    nar_size: int
    references: tuple[StorePath, ...]
    deriver: StorePath | None
    system: str | None
    sigs: tuple[str, ...]
    ca: str | None
    store_dir: str = DEFAULT_STORE_DIR

    def __post_init__(self) -> None:
        object.__setattr__(self, "references", tuple(sorted(set(self.references))))
        object.__setattr__(self, "sigs", tuple(sorted(set(self.sigs))))
        if not self.url:
            raise FormatError("narinfo URL is empty")
        if not self.compression:
            raise FormatError("narinfo Compression is empty")
        if self.nar_hash.algo != "sha256":
            raise FormatError(f"NarHash must be sha256, not {self.nar_hash.algo}")
        if not 0 < self.nar_size <= _MAX_U64:
            raise FormatError(f"NarSize {self.nar_size} is not a positive 64-bit size")
        if self.file_size is not None and not 0 <= self.file_size <= _MAX_U64:
            raise FormatError(f"FileSize {self.file_size} is not a 64-bit size")
        for key, value in (
            ("URL", self.url),
            ("Compression", self.compression),
            ("System", self.system),
            ("CA", self.ca),
            *(("Sig", s) for s in self.sigs),
        ):
            if value is not None and ("\n" in value or "\r" in value):
                raise FormatError(f"narinfo {key} contains a line break")
        if self.ca is not None:
            _canonical_ca(self.ca)

    @classmethod
    def parse(cls, text: str | bytes, *, store_dir: str = DEFAULT_STORE_DIR) -> NarInfo:
        """Parse a narinfo; raise :class:`FormatError` saying which line is wrong."""
        if isinstance(text, bytes):
            raw = text
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw.count(b"\n", 0, exc.start) + 1
                raise FormatError("narinfo is not UTF-8", where=f"line {bad}") from None
        if "\r" in text:
            bad = text.count("\n", 0, text.index("\r")) + 1
            raise FormatError("carriage return in narinfo (CRLF line ends?)", where=f"line {bad}")
        lines = text.split("\n")
        if lines[-1]:
            raise FormatError("last line does not end in a newline", where=f"line {len(lines)}")
        fields: dict[str, tuple[int, str]] = {}
        sigs: list[str] = []
        for lineno, line in enumerate(lines[:-1], 1):
            key, sep, value = line.partition(": ")
            if not sep:
                raise FormatError(
                    f"expected 'Key: value', got {line[:80]!r}", where=f"line {lineno}"
                )
            if key == "Sig":
                sigs.append(value)
            elif key in _SINGLE_KEYS:
                if key in fields:
                    first = fields[key][0]
                    raise FormatError(
                        f"duplicate {key} (first on line {first})", where=f"line {lineno}"
                    )
                fields[key] = (lineno, value)
            # Any other key is ignored, as Nix does.

        def get(key: str, convert: Callable[[str], _T]) -> _T | None:
            if key not in fields:
                return None
            lineno, value = fields[key]
            try:
                return convert(value)
            except FormatError as exc:
                raise FormatError(f"{key}: {exc}", where=f"line {lineno}") from None

        def need(key: str, convert: Callable[[str], _T]) -> _T:
            value = get(key, convert)
            if value is None:
                raise FormatError(f"narinfo has no {key} line")
            return value

        def store_path(value: str) -> StorePath:
            return StorePath.parse(value, store_dir)

        for key in ("StorePath", "URL", "NarHash", "NarSize"):
            if key not in fields:
                raise FormatError(f"narinfo has no {key} line")
        path = need("StorePath", store_path)
        nar_hash = need("NarHash", _sha256)
        nar_size = need("NarSize", _size)
        if nar_size == 0:
            raise FormatError("NarSize is zero", where=f"line {fields['NarSize'][0]}")
        url = fields["URL"][1]
        if not url:
            raise FormatError("URL is empty", where=f"line {fields['URL'][0]}")
        compression = fields.get("Compression", (0, ""))[1] or "bzip2"
        system = fields.get("System", (0, ""))[1] or None
        return cls(
            store_path=path,
            url=url,
            compression=compression,
            file_hash=get("FileHash", _any_hash),
            file_size=get("FileSize", _size),
            nar_hash=nar_hash,
            nar_size=nar_size,
            references=get("References", _references) or (),
            deriver=get("Deriver", _deriver),
            system=system,
            sigs=tuple(sigs),
            ca=get("CA", _ca),
            store_dir=store_dir,
        )

    def render(self) -> str:
        """The narinfo text, byte-identical to Nix 2.8's ``NarInfo::to_string``.

        ``FileHash``/``FileSize`` lines are left out when unknown (Nix always has them).
        """
        out = [
            f"StorePath: {self.store_path.path(self.store_dir)}\n",
            f"URL: {self.url}\n",
            f"Compression: {self.compression}\n",
        ]
        if self.file_hash is not None:
            out.append(f"FileHash: {self.file_hash.encode('base32')}\n")
        if self.file_size is not None:
            out.append(f"FileSize: {self.file_size}\n")
        out.append(f"NarHash: {self.nar_hash.encode('base32')}\n")
        out.append(f"NarSize: {self.nar_size}\n")
        out.append(f"References: {' '.join(r.basename for r in self.references)}\n")
        if self.deriver is not None:
            out.append(f"Deriver: {self.deriver.basename}\n")
        if self.system:
            out.append(f"System: {self.system}\n")
        out.extend(f"Sig: {sig}\n" for sig in self.sigs)
        if self.ca is not None:
            out.append(f"CA: {_canonical_ca(self.ca)}\n")
        return "".join(out)

    def fingerprint(self) -> bytes:
        """What a ``Sig`` signs; NarHash is always base32 here, whatever the file said."""
        refs = ",".join(r.path(self.store_dir) for r in self.references)
        return (
            f"1;{self.store_path.path(self.store_dir)};{self.nar_hash.encode('base32')};"
            f"{self.nar_size};{refs}"
        ).encode()

    def signed(self, key: SecretKey) -> NarInfo:
        """A copy carrying ``key``'s signature, replacing any earlier one by that key name."""
        prefix = key.name + ":"
        sigs = tuple(s for s in self.sigs if not s.startswith(prefix))
        return dataclasses.replace(self, sigs=(*sigs, key.sign(self.fingerprint())))

    def verify(self, keys: Iterable[PublicKey]) -> list[str]:
        """Names of the ``keys`` that made one of ``sigs``; empty means unverified.

        Content-addressed paths are not special here: Nix trusts a correct ``CA`` without
        a signature, but checking that needs the path's references and name hashed the
        Nix way, which is the caller's business.
        """
        fingerprint = self.fingerprint()
        names: list[str] = []
        for key in keys:
            if key.name not in names and any(key.verify(fingerprint, s) for s in self.sigs):
                names.append(key.name)
        return names


def _size(value: str) -> int:
    try:
        return parse_uint(value, limit=_MAX_U64, what="size")
    except FormatError:
        raise FormatError(f"{value[:40]!r} is not a decimal 64-bit size") from None


def _any_hash(value: str) -> Hash:
    return Hash.parse(value)  # needs the algorithm prefix (or SRI), like parseAnyPrefixed


def _sha256(value: str) -> Hash:
    h = _any_hash(value)
    if h.algo != "sha256":
        raise FormatError(f"must be a sha256 hash, not {h.algo}")
    return h


def _references(value: str) -> tuple[StorePath, ...]:
    return tuple(StorePath.from_basename(b) for b in value.split(" ") if b)


def _deriver(value: str) -> StorePath | None:
    return None if value == UNKNOWN_DERIVER else StorePath.from_basename(value)


def _ca(value: str) -> str | None:
    return _canonical_ca(value) if value else None


def _canonical_ca(value: str) -> str:
    """Parse a content address as Nix 2.8 does and render it canonically (base32)."""
    method, _, rest = value.partition(":")
    recursive = ""
    if method == "fixed" and rest.startswith("r:"):
        recursive, rest = "r:", rest[2:]
    elif method not in ("fixed", "text"):
        raise FormatError(f"content address {value[:80]!r} is not 'fixed:...' or 'text:...'")
    algo, sep, digest = rest.partition(":")
    if not sep or algo not in DIGEST_SIZES:
        raise FormatError(f"content address {value[:80]!r} has no known hash algorithm")
    if method == "text" and algo != "sha256":
        raise FormatError(f"text content address {value[:80]!r} must use sha256")
    if ":" in digest or "-" in digest:
        raise FormatError(f"content address {value[:80]!r} has a malformed hash")
    a: Algo = algo  # type: ignore[assignment]
    return f"{method}:{recursive}{Hash.parse(digest, algo=a).encode('base32')}"
