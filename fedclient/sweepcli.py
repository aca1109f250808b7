"""Moved to :mod:`labcli.sweep` (argument parsing belongs to the faces, issue 12).

This name keeps old imports working; new code imports :mod:`labcli.sweep`.
"""

from labcli.sweep import (  # noqa: F401 - re-exported
    GRID_NAMES,
    OutputsNotWritten,
    add_sweep_arguments,
    check_grid_name,
    check_sweep_outputs,
    format_row,
    positive_int,
    run_cli_sweep,
    sweep_points,
)

__all__ = [
    "GRID_NAMES",
    "OutputsNotWritten",
    "add_sweep_arguments",
    "check_grid_name",
    "check_sweep_outputs",
    "format_row",
    "positive_int",
    "run_cli_sweep",
    "sweep_points",
]
