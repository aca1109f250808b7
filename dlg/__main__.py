"""``python -m dlg``: see :mod:`dlg.cli`."""

import sys

from fedclient.threads import configure_cpu_threads

configure_cpu_threads()  # before anything imports torch

from dlg.cli import main  # noqa: E402

sys.exit(main())
