"""Sweep rows to files: a CSV and a plotly line plot (HTML, and PNG with kaleido).

Moved here from :mod:`fedclient.sweep` (issue 12): the simulated client holds no plotting
and no file formats; the faces (both CLIs, the app) write what a sweep produced. plotly
loads only when a plot is made.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedclient.errors import InvalidConfigError

log = logging.getLogger(__name__)


def write_csv(rows: Sequence[Mapping[str, object]], path: str | Path) -> Path:
    """Write rows to CSV (columns: every key, in order of first appearance)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(row))
    return out


def plot_sweep(
    rows: Sequence[Mapping[str, object]],
    *,
    x: str = "strength",
    y: Sequence[str] = (),
    title: str | None = None,
    x_scale: str = "category",
    y_title: str | None = None,
):  # noqa: ANN201 - plotly.graph_objects.Figure
    """A line plot of metrics ``y`` against ``x``, one trace per metric.

    Args:
        rows: sweep rows.
        x: the x column (``"strength"``, ``"epsilon"``, ...).
        y: metric columns (default: every numeric column except the bookkeeping ones).
        title: the plot title.
        x_scale: ``"category"`` (default: one evenly spaced tick per point, labelled with
            the point's label, which keeps 0 and 1e-4 .. 1e-1 readable on one axis),
            ``"linear"`` or ``"log"`` (points with x <= 0 or non-finite are dropped).
        y_title: the y axis title.

    Raises:
        InvalidConfigError: for an unknown scale or a metric missing from every row.
    """
    import plotly.graph_objects as go

    if x_scale not in ("category", "linear", "log"):
        raise InvalidConfigError(f"Unknown x scale {x_scale!r}: use category, linear or log.")
    bookkeeping = {"label", "axis", "strength", "defense", "epsilon", "seconds", "time_budget_s", x}
    metrics = list(y) or [
        k for k in dict.fromkeys(k for r in rows for k in r)
        if k not in bookkeeping and all(isinstance(r.get(k), (int, float)) for r in rows if k in r)
    ]
    for m in metrics:
        if not any(m in r for r in rows):
            raise InvalidConfigError(f"No sweep row has the metric {m!r}: choose from {sorted({k for r in rows for k in r})}.")
    fig = go.Figure()
    for m in metrics:
        xs: list[object] = []
        ys: list[object] = []
        for r in rows:
            if m not in r:
                continue
            xv = r.get(x)
            if x_scale == "category":
                xs.append(str(r.get("label", xv)))
            else:
                if not isinstance(xv, (int, float)) or not math.isfinite(xv) or (x_scale == "log" and xv <= 0):
                    continue
                xs.append(xv)
            ys.append(r[m])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=m))
    axis_name = next((str(r["axis"]) for r in rows if "axis" in r), x) if x == "strength" else x
    fig.update_layout(
        title=title,
        xaxis_title=axis_name,
        yaxis_title=y_title or (metrics[0] if len(metrics) == 1 else "metric"),
        template="plotly_white",
    )
    fig.update_xaxes(type=x_scale)
    return fig


def save_plot(fig, path: str | Path) -> list[Path]:  # noqa: ANN001 - plotly Figure
    """Write the figure as HTML (always) and PNG (only if ``kaleido`` is installed).

    ``path`` may end in ``.html``, ``.png`` or nothing; both files share its stem.

    Returns:
        The files written.
    """
    base = Path(path)
    if base.suffix.lower() in (".html", ".png"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    html = base.with_suffix(".html")
    fig.write_html(str(html), include_plotlyjs=True)
    written = [html]
    if importlib.util.find_spec("kaleido") is not None:
        png = base.with_suffix(".png")
        try:
            fig.write_image(str(png))
            written.append(png)
        except (ValueError, RuntimeError) as exc:  # kaleido present but no browser/engine
            log.warning("could not write %s: %s", png, exc)
    else:
        log.info("kaleido is not installed: wrote %s only", html)
    return written


__all__ = ["plot_sweep", "save_plot", "write_csv"]
