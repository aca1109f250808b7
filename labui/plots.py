"""Plotly figures for the app (pure functions of event data; no attack logic)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import plotly.graph_objects as go

if TYPE_CHECKING:  # pragma: no cover
    from dager.events import TokensFiltered

ACCEPT = "#16a34a"
REJECT = "#9ca3af"
CUT = "#dc2626"
CAPACITY = "#7c3aed"
LINE = "#2563eb"

_LAYOUT = dict(
    template="plotly_white",
    height=300,
    margin=dict(l=55, r=15, t=45, b=45),
    font=dict(family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", size=12),
    legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    modebar=dict(orientation="v"),  # down the right edge: the toolbar never covers the title
)


@functools.cache
def _empty(title: str, message: str) -> go.Figure:
    """A titled empty figure with a message (cached: built once per process, never mutated;
    the first ``go.Figure`` of a process pays for plotly's validators)."""
    fig = go.Figure()
    fig.update_layout(**_LAYOUT, title=dict(text=title, font=dict(size=14)))
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(color="#6b7280"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def spectrum_figure(
    spectra: dict[int, tuple[Sequence[float], int]],
    hidden_size: int | None,
    capacity: int | None = None,
) -> go.Figure:
    """Singular values of the layer gradients (log scale), the rank cut and the capacity.

    Args:
        spectra: layer -> (singular values descending, chosen rank).
        hidden_size: model width d (the span can hold at most d vectors), or None.
        capacity: a smaller cap than d (a LoRA update: the adapters' k r), drawn
            instead of d; ``None``: the capacity is d.
    """
    title = "Singular values of the shared gradient"
    if not spectra:
        return _empty(title, "waiting for the gradient spectrum…")
    # Built as one dict (shapes and annotations in the layout) rather than with add_vline:
    # the same figure for a third of the CPU, and it is rebuilt while the search runs.
    colours = {1: LINE, 2: "#f59e0b"}
    data: list[dict[str, object]] = []
    shapes: list[dict[str, object]] = []
    notes: list[dict[str, object]] = []
    top = 1.0

    def vline(x: float, colour: str, dash: str, text: str, *, top_edge: bool, left_of: bool,
              row: int = 0) -> None:
        shapes.append(dict(type="line", x0=x, x1=x, xref="x", y0=0, y1=1, yref="y domain",
                           line=dict(color=colour, dash=dash)))
        notes.append(dict(x=x, xref="x", y=1 if top_edge else 0, yref="y domain", text=text, showarrow=False,
                          xanchor="right" if left_of else "left", yanchor="top" if top_edge else "bottom",
                          yshift=-18 * row))

    for layer, (values, rank) in sorted(spectra.items()):
        vals = [max(float(v), 1e-30) for v in values]
        top = max(top, len(vals))
        data.append(dict(
            type="scatter", x=list(range(1, len(vals) + 1)), y=vals, mode="lines",
            name=f"layer {layer}", line=dict(color=colours.get(layer, "#0891b2"), width=2),
            hovertemplate="σ<sub>%{x}</sub> = %{y:.3g}<extra>layer " + str(layer) + "</extra>",
        ))
        # Rank labels at the top, one row per layer, right of their lines; the capacity
        # label at the bottom, left of its line: they never overlap, however close the
        # two ranks are to each other or to d.
        vline(rank + 0.5, CUT if layer == 1 else "#f59e0b", "dash",
              f"rank {rank}" + ("" if layer == 1 else f" (L{layer})"), top_edge=True, left_of=False,
              row=max(int(layer) - 1, 0))
    if capacity:  # LoRA: the A gradients' rank is capped by the adapters, not by d
        vline(capacity, CAPACITY, "dot", f"LoRA capacity {capacity}", top_edge=False, left_of=True)
    elif hidden_size:
        vline(hidden_size, CAPACITY, "dot", f"capacity d={hidden_size}", top_edge=False, left_of=True)
    layout = dict(_LAYOUT, title=dict(text=title, font=dict(size=14)), shapes=shapes, annotations=notes,
                  yaxis=dict(type="log", title=dict(text="singular value"), exponentformat="power"),
                  xaxis=dict(title=dict(text="index"), range=[0, max(top, hidden_size or 0) * 1.02]))
    return go.Figure(dict(data=data, layout=layout))


def distances_figure(
    filters: Sequence[TokensFiltered],
    decode: Callable[[int], str] | None = None,
    *,
    max_points: int = 60,
) -> go.Figure:
    """Per-position span distances of the nearest vocabulary tokens (log scale).

    Each column is a position (or one "bag" column for position-free RoPE checks);
    accepted tokens are green, rejected ones grey, the threshold is a red tick.

    Args:
        filters: :class:`dager.events.TokensFiltered` events, at most one per position.
        decode: token id -> text, for hover labels.
        max_points: nearest tokens drawn per position.
    """
    title = "Layer-1 filter: distance of each vocabulary token to the gradient span"
    if not filters:
        return _empty(title, "waiting for the token filter…")
    acc_x: list[object] = []
    acc_y: list[float] = []
    acc_t: list[str] = []
    rej_x: list[object] = []
    rej_y: list[float] = []
    rej_t: list[str] = []
    thr_x: list[object] = []
    thr_y: list[float] = []
    for f in filters:
        x = "bag" if f.position is None else int(f.position)
        accepted = {int(t) for t in f.token_ids.tolist()}
        dists = f.vocab_distances.tolist()[:max_points]
        ids = f.vocab_token_ids.tolist()[:max_points]
        bound = f.exact_below
        for tid, dist in zip(ids, dists):
            label = repr(decode(int(tid))) if decode else str(tid)
            if bound is not None and dist >= bound:
                label += ", at least"  # a lower bound from the fast filter (exact below the cut)
            if int(tid) in accepted:
                acc_x.append(x), acc_y.append(max(float(dist), 1e-12)), acc_t.append(label)
            else:
                rej_x.append(x), rej_y.append(max(float(dist), 1e-12)), rej_t.append(label)
        thr_x.append(x)
        thr_y.append(max(float(f.threshold), 1e-12))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=rej_x, y=rej_y, mode="markers", name="rejected",
                             marker=dict(color=REJECT, size=5, opacity=0.6), text=rej_t,
                             hovertemplate="%{text} %{y:.2e}<extra>rejected</extra>"))
    fig.add_trace(go.Scatter(x=acc_x, y=acc_y, mode="markers", name="accepted",
                             marker=dict(color=ACCEPT, size=8, line=dict(color="white", width=1)),
                             text=acc_t, hovertemplate="%{text} %{y:.2e}<extra>accepted</extra>"))
    fig.add_trace(go.Scatter(x=thr_x, y=thr_y, mode="markers", name="threshold",
                             marker=dict(color=CUT, symbol="line-ew-open", size=22, line=dict(width=2)),
                             hovertemplate="threshold %{y:.2e}<extra></extra>"))
    fig.update_layout(**_LAYOUT, title=dict(text=title, font=dict(size=14)))
    bounds = {f.exact_below for f in filters} - {None}
    ytitle = "relative distance to span"
    if bounds:  # the fast filter: the plot says which values are lower bounds
        ytitle += f" (a lower bound above {min(bounds):g})"
    fig.update_yaxes(type="log", title=ytitle, exponentformat="power")
    fig.update_xaxes(title="position", type="category" if any(x == "bag" for x in thr_x) else "linear",
                     dtick=1 if len(thr_x) <= 40 else None)
    return fig


def curve_figure(
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    title: str,
    ytitle: str,
    log: bool,
    empty: str,
    colour: str = LINE,
    hline: float | None = None,
    hline_text: str = "",
) -> go.Figure:
    """A single curve over iterations (gradient distance, PSNR)."""
    if not xs:
        return _empty(title, empty)
    fig = go.Figure(go.Scatter(x=list(xs), y=[max(y, 1e-30) if log else y for y in ys],
                               mode="lines", line=dict(color=colour, width=2),
                               hovertemplate="iteration %{x}: %{y:.4g}<extra></extra>"))
    if hline is not None:
        fig.add_hline(y=hline, line=dict(color="#6b7280", dash="dot"), annotation_text=hline_text)
    fig.update_layout(**_LAYOUT, title=dict(text=title, font=dict(size=14)), showlegend=False)
    fig.update_yaxes(type="log" if log else "linear", title=ytitle,
                     exponentformat="power" if log else "none")
    fig.update_xaxes(title="iteration")
    return fig
