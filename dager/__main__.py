"""``python -m dager``: the DAGER command line (see :mod:`dager.cli`)."""

import sys

from dager.cli import main

sys.exit(main())
