"""``python -m dager``: the DAGER command line (see :mod:`dager.cli`)."""

import sys

from fedclient.threads import configure_cpu_threads

configure_cpu_threads()  # before anything imports torch

from dager.cli import main  # noqa: E402

sys.exit(main())
