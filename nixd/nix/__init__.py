"""Pure Nix formats: bytes in, values out.

Nothing here does network I/O or imports trio; the other rooms of nixd build on these
modules. Every parser raises :class:`nixd.errors.FormatError` saying what and where.
"""
