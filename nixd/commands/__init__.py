"""One module per ``nixd`` command group; see :mod:`nixd.cli`."""
