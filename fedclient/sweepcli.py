"""Moved to :mod:`labcli.sweep` (argument parsing belongs to the faces, issue 12).

The old names still resolve, lazily, so old imports keep working; fedclient itself
imports no argparse. New code imports :mod:`labcli.sweep`.
"""

from __future__ import annotations

from fedclient.lazy import lazy_exports

_MOVED = {
    name: "labcli.sweep"
    for name in (
        "GRID_NAMES",
        "OutputsNotWritten",
        "add_sweep_arguments",
        "check_grid_name",
        "check_sweep_outputs",
        "format_row",
        "positive_int",
        "run_cli_sweep",
        "sweep_points",
    )
}

__all__ = sorted(_MOVED)

__getattr__, __dir__ = lazy_exports(__name__, _MOVED)
