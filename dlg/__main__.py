"""``python -m dlg``: see :mod:`dlg.cli`."""

import sys

from dlg.cli import main

sys.exit(main())
