"""Command-line pieces of a defense sweep, shared by ``python -m dager sweep`` and
``python -m dlg sweep``.

It lived in ``fedclient.sweepcli`` (still importable there); argument parsing belongs
to the faces, not to the simulated client (issue 12). Attack-agnostic (this module
imports no attack): each CLI adds the common options with
:func:`add_sweep_arguments`, turns them into grid points with :func:`sweep_points`,
and hands an ``attack(defense) -> metrics`` callable to :func:`run_cli_sweep`, which
streams one table row per point to stdout, then writes the CSV and the HTML plot.

Torch-free at import (issue 13): the grids and defenses load inside :func:`sweep_points`
and :func:`run_cli_sweep`, after the options have been checked. The CSV and the plot
hold scores of private data: they are written with mode 0600 (:mod:`labcli.outputs`),
and an interrupted sweep still writes the rows it finished.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from fedclient.errors import InvalidConfigError
from labcli.outputs import check_distinct, check_output_path, lost_sentence, save_results
from labcli.runtime import positive_int

if TYPE_CHECKING:
    from fedclient.client import Defense
    from fedclient.sweep import SweepPoint

GRID_NAMES = ("noise", "prune", "mask", "precision", "dp")
"""The names of :data:`fedclient.sweep.GRIDS`, known without importing torch (a test
keeps them in step)."""

# grid name -> keyword of its value list in fedclient.sweep
_VALUE_KEYWORD = {"noise": "sigmas", "prune": "fractions", "mask": "fractions", "dp": "noise_multipliers"}


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
        "--grid", required=True, metavar="NAME", help=f"defense grid to sweep: {', '.join(GRID_NAMES)}"
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


def check_grid_name(args: argparse.Namespace) -> str:
    """The ``--grid`` name, lower-cased, checked without importing torch.

    Raises:
        InvalidConfigError: an unknown name, or ``--variance``/``--values`` that do not
            fit the grid.
    """
    name = str(args.grid).strip().lower()
    if name not in GRID_NAMES:
        raise InvalidConfigError(f"Unknown --grid {args.grid!r}: use one of {', '.join(GRID_NAMES)}.")
    if args.variance and name != "noise":
        raise InvalidConfigError("--variance applies only to --grid noise: drop it, or use --grid noise.")
    if args.values is not None and name not in _VALUE_KEYWORD:
        raise InvalidConfigError(f"--grid {name} has fixed levels (fp32, fp16, int8): drop --values.")
    if args.values is None and args.variance:
        raise InvalidConfigError("--variance needs --values (the noise variances, e.g. 0,1e-4,1e-3,1e-2).")
    return name


def sweep_points(args: argparse.Namespace) -> list[SweepPoint]:
    """The grid points the options ask for.

    Raises:
        InvalidConfigError: unknown grid name, ``--values`` for a grid without levels,
            ``--variance`` without the noise grid, or an invalid level.
    """
    from fedclient.sweep import SweepPoint, grid

    name = check_grid_name(args)
    kwargs: dict[str, object] = {}
    if args.values is not None:
        values = list(args.values)
        if args.variance:
            if any(not math.isfinite(v) or v < 0 for v in values):
                raise InvalidConfigError(f"--values for noise variances must be numbers >= 0, got {args.values!r}.")
            values = [math.sqrt(v) for v in values]
        kwargs[_VALUE_KEYWORD[name]] = values
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
        labcli.outputs.OutputPathError: a path is a folder, a device, or its folder is
            missing, not a folder, or refuses a new file.
    """
    check_output_path("--csv", args.csv, example="sweep.csv")
    if args.plot is not None:
        check_output_path("--plot", args.plot, example="sweep.html")
    check_distinct({"--csv": args.csv, "--plot": args.plot})


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
    attack: Callable[[Defense | None], Mapping[str, object]],
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
    from fedclient.sweep import iter_sweep
    from labcli.sweepfiles import plot_sweep, save_plot, write_csv

    stream = out if out is not None else sys.stdout
    columns = ["label", *metrics, "utility_cosine", "epsilon", "seconds"]
    widths = [max(len(c), 16 if c == "label" else 8) for c in columns]
    print(title, file=stream)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=stream, flush=True)
    rows: list[dict[str, object]] = []
    try:
        for row in iter_sweep(points, attack):
            rows.append(row)
            print(format_row(row, columns, widths), file=stream, flush=True)
    except KeyboardInterrupt:
        # Keep the finished points (Ctrl-C or SIGTERM), then let the CLI exit as interrupted.
        if rows:
            written, lost = _write_outputs(rows, csv_path, None, metrics, title, write_csv, plot_sweep, save_plot)
            where = ", ".join(str(p) for p in written) or "nowhere"
            print(f"interrupted after {len(rows)} of {len(points)} point(s); wrote {where}", file=sys.stderr)
            for sentence in lost:
                print(f"error: {sentence}", file=sys.stderr)
        raise
    written, lost = _write_outputs(rows, csv_path, plot_path, metrics, title, write_csv, plot_sweep, save_plot)
    total = sum(float(str(r["seconds"])) for r in rows)  # iter_sweep times every row
    print(f"{len(rows)} point(s) in {total:.1f} s; wrote {', '.join(str(p) for p in written)}", file=stream)
    if lost:
        raise OutputsNotWritten(" ".join(lost))
    return rows


class OutputsNotWritten(Exception):
    """A sweep output could not be written where asked (the message says where it went)."""


def _write_outputs(
    rows: Sequence[Mapping[str, object]],
    csv_path: Path,
    plot_path: Path | None,
    metrics: Sequence[str],
    title: str,
    write_csv: Callable[..., object],
    plot_sweep: Callable[..., object],
    save_plot: Callable[..., object],
) -> tuple[list[Path], list[str]]:
    """Write the CSV (and plot) privately; returns ``(files written, sentences about failures)``."""
    written: list[Path] = []
    lost: list[str] = []
    saved = save_results(csv_path, lambda p: write_csv(rows, p), prog="sweep")
    written.extend(saved.paths)
    if not saved.ok:
        lost.append(lost_sentence("--csv", csv_path, saved))
    if plot_path is not None:
        fig = plot_sweep(rows, y=list(metrics), title=title)
        saved = save_results(plot_path, lambda p: save_plot(fig, p), prog="sweep")
        written.extend(saved.paths)
        if not saved.ok:
            lost.append(lost_sentence("--plot", plot_path, saved))
    return written, lost


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
