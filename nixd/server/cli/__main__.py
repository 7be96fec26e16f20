"""``python -m nixd.server.cli``: the same as the ``nixd-server`` command."""

import sys

from nixd.server.cli.main import main

sys.exit(main())
