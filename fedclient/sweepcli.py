"""Command-line pieces of a defense sweep, shared by ``python -m dager sweep`` and
``python -m dlg sweep``.

Attack-agnostic (this module imports no attack): each CLI adds the common options with
:func:`add_sweep_arguments`, turns them into grid points with :func:`sweep_points`,
and hands an ``attack(defense) -> metrics`` callable to :func:`run_cli_sweep`, which
streams one table row per point to stdout, then writes the CSV and the HTML plot.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from fedclient.client import Defense
from fedclient.errors import InvalidConfigError
from fedclient.sweep import GRIDS, SweepPoint, grid, iter_sweep, plot_sweep, save_plot, write_csv

# grid name -> keyword of its value list in fedclient.sweep
_VALUE_KEYWORD = {"noise": "sigmas", "prune": "fractions", "mask": "fractions", "dp": "noise_multipliers"}


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1, with a one-line error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _values(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,1e-3,1e-2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--grid``, ``--values``, ``--variance``, ``--csv`` and ``--plot``.

    ``--grid`` is not given ``choices`` on purpose: :func:`sweep_points` rejects an
    unknown name with a sentence that lists the known ones.
    """
    parser.add_argument(
        "--grid", required=True, metavar="NAME", help=f"defense grid to sweep: {', '.join(GRIDS)}"
    )
    parser.add_argument(
        "--values",
        type=_values,
        default=None,
        metavar="V1,V2,...",
        help="override the grid's levels: noise sigmas, prune/mask fractions or DP noise multipliers "
        "(0 is the undefended baseline)",
    )
    parser.add_argument(
        "--variance",
        action="store_true",
        help="with --grid noise: read --values as noise variances (DLG's convention), sigma = sqrt(variance)",
    )
    parser.add_argument("--csv", required=True, type=Path, help="where to write the sweep table (CSV)")
    parser.add_argument("--plot", type=Path, default=None, help="also write the plot (HTML; PNG too if kaleido is installed)")


def sweep_points(args: argparse.Namespace) -> list[SweepPoint]:
    """The grid points the options ask for.

    Raises:
        InvalidConfigError: unknown grid name, ``--values`` for a grid without levels,
            ``--variance`` without the noise grid, or an invalid level.
    """
    name = str(args.grid).strip().lower()
    if name not in GRIDS:
        raise InvalidConfigError(f"Unknown --grid {args.grid!r}: use one of {', '.join(GRIDS)}.")
    kwargs: dict[str, object] = {}
    if args.variance and name != "noise":
        raise InvalidConfigError("--variance applies only to --grid noise: drop it, or use --grid noise.")
    if args.values is not None:
        keyword = _VALUE_KEYWORD.get(name)
        if keyword is None:
            raise InvalidConfigError(f"--grid {name} has fixed levels (fp32, fp16, int8): drop --values.")
        values = list(args.values)
        if args.variance:
            if any(not math.isfinite(v) or v < 0 for v in values):
                raise InvalidConfigError(f"--values for noise variances must be numbers >= 0, got {args.values!r}.")
            values = [math.sqrt(v) for v in values]
        kwargs[keyword] = values
    elif args.variance:
        raise InvalidConfigError("--variance needs --values (the noise variances, e.g. 0,1e-4,1e-3,1e-2).")
    points = grid(name, **kwargs)  # the defenses validate each level
    if args.variance:
        # Relabel with the variance, as DLG's figures do.
        points = [
            SweepPoint(
                label="none" if v == 0 else f"var={v:g}",
                strength=p.strength,
                defense=p.defense,
                axis=p.axis,
                extra={**p.extra, "variance": v},
            )
            for p, v in zip(points, args.values)
        ]
    return points


def check_sweep_outputs(args: argparse.Namespace) -> None:
    """Fail before any attack when ``--csv`` or ``--plot`` cannot be written.

    Raises:
        InvalidConfigError: a path is a folder or its folder does not exist / is read-only.
    """
    for option, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path is None:
            continue
        if path.is_dir():
            raise InvalidConfigError(f"{option} {str(path)!r} is a folder: give a file name such as sweep.csv.")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise InvalidConfigError(f"The folder of {option} ({str(parent)!r}) does not exist: create it first.")
        if not os.access(parent, os.W_OK):
            raise InvalidConfigError(f"Cannot write to the folder {str(parent)!r} of {option}: pick another place.")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf"
        return f"{value:.3g}" if abs(value) >= 1000 or (value != 0 and abs(value) < 1e-3) else f"{value:.3f}"
    return str(value)


def format_row(row: Mapping[str, object], columns: Sequence[str], widths: Sequence[int]) -> str:
    """One fixed-width table line (missing cells print as ``-``)."""
    return "  ".join(_cell(row.get(c)).ljust(w) for c, w in zip(columns, widths)).rstrip()


def run_cli_sweep(
    points: Sequence[SweepPoint],
    attack: Callable[[Defense | None], Mapping[str, float]],
    *,
    metrics: Sequence[str],
    csv_path: Path,
    plot_path: Path | None,
    title: str,
    out: TextIO | None = None,
) -> list[dict[str, object]]:
    """Run the sweep, print each row as it finishes, then write the CSV (and plot).

    Args:
        points: the grid.
        attack: ``attack(defense)`` -> metrics (attack scores and the utility cost).
        metrics: the attack-success columns (plotted, and shown first in the table).
        csv_path: where to write the CSV (one row per point).
        plot_path: where to write the plot, or ``None``.
        title: the table header line and plot title.
        out: the stream for the table (default: stdout).

    Returns:
        The rows, as written to the CSV.
    """
    stream = out if out is not None else sys.stdout
    columns = ["label", *metrics, "utility_cosine", "epsilon", "seconds"]
    widths = [max(len(c), 16 if c == "label" else 8) for c in columns]
    print(title, file=stream)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=stream, flush=True)
    rows: list[dict[str, object]] = []
    for row in iter_sweep(points, attack):
        rows.append(row)
        print(format_row(row, columns, widths), file=stream, flush=True)
    write_csv(rows, csv_path)
    written = [csv_path]
    if plot_path is not None:
        written.extend(save_plot(plot_sweep(rows, y=list(metrics), title=title), plot_path))
    total = sum(float(r["seconds"]) for r in rows)  # type: ignore[arg-type]
    print(f"{len(rows)} point(s) in {total:.1f} s; wrote {', '.join(str(p) for p in written)}", file=stream)
    return rows


__all__ = ["add_sweep_arguments", "check_sweep_outputs", "format_row", "run_cli_sweep", "sweep_points"]
