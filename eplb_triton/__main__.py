"""``python -m eplb_triton``: the ``eplb-triton`` command."""

import sys

from .cli import main

sys.exit(main())
