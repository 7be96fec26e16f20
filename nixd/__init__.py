"""nixd: an identity-aware Nix binary cache that just works on a machine."""

__version__ = "0.1.0"
