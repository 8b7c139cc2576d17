"""``python -m sdpo_cli``: the ``sdpo`` command line."""

import sys

from .main import main

sys.exit(main())
