"""From worker items to frames: fold events into a view, decide when the page changes.

The worker (:class:`labui.jobs.Job`) sends engine events, :class:`ModelReady`,
:class:`UpdateReady` and :class:`~labui.jobs.Tick`; :func:`fold` applies them to a
view and says when to yield; :func:`stream_dager` and :func:`stream_dlg` turn the view
into the tabs' component tuples, skipping what did not change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import gradio as gr

from dager.events import (
    AttackFinished,
    AttackStarted,
    AttackWarning,
    PrefixesExtended,
    SentenceRecovered,
    SpectrumComputed,
    TokensFiltered,
)
from dlg.events import DlgFinished, DlgStarted, LabelsInferred
from labui.image_view import IMAGE_KEYS, DlgView
from labui.jobs import Tick
from labui.text_view import TEXT_KEYS, DagerView
from labui.userfiles import write_gif

YIELD_EVERY_S = 0.1
"""Stream at most ~10 updates a second (plots are re-sent only when they change)."""

URGENT_TEXT = (AttackStarted, SpectrumComputed, TokensFiltered, PrefixesExtended, SentenceRecovered,
               AttackWarning, AttackFinished)
"""DAGER events shown at once (the rest, heartbeats, are throttled)."""
URGENT_IMAGE = (DlgStarted, LabelsInferred, DlgFinished)


@dataclass(frozen=True)
class ModelReady:
    """The text model is loaded (the handler builds its view with it)."""

    bundle: object


@dataclass(frozen=True)
class UpdateReady:
    """The client's update is computed; ``utility`` compares it with the clean gradient."""

    utility: dict[str, float] | None


def emit(view, keys: Sequence[str], force: bool = False, hold: frozenset[str] = frozenset()) -> tuple:  # noqa: ANN001
    """Component values in ``keys`` order; unchanged ones are skipped (not re-sent).

    Keys in ``hold`` that changed are not built or sent now; they stay dirty for a later
    call (``force`` sends everything).
    """
    dirty = set(keys) if force else view.dirty & set(keys)
    send = dirty if force else dirty - hold
    values = view.render(send)
    view.take_dirty()
    view.dirty |= dirty - send
    return tuple(values[k] if k in send else gr.skip() for k in keys)


def result_json(view: DagerView) -> dict[str, object]:
    """The text run as JSON (the ``/dager`` endpoint's last output; keys are API)."""
    out: dict[str, object] = {"recovered": view.predictions,
                              "exact_check": [s.exact for s in view.recovered]}
    if view.finished is not None:
        r = view.finished.result
        out.update(rank=r.rank, hidden_size=r.hidden_size, over_capacity=r.over_capacity,
                   budget_exhausted=r.budget_exhausted, seconds=round(r.seconds, 3),
                   stop_reason=str(getattr(r.stop_reason, "value", r.stop_reason)),
                   first_tokens_seconds=None if view.first_tokens_s is None else round(view.first_tokens_s, 3))
    if view.scores is not None:
        sc = view.scores
        out.update(rouge1=sc.rouge1, rouge2=sc.rouge2, rougeL=sc.rougeL, exact_match=sc.exact_match)
    if view.utility is not None:
        out["utility_cosine"] = view.utility.get("utility_cosine")
    out["done"] = view.finished is not None
    return out


def fold(view, items: Iterator[object], urgent_types: tuple[type, ...], *,  # noqa: ANN001
          clock: Callable[[], float], job=None) -> Iterator[None]:  # noqa: ANN001
    """Fold worker items into ``view``; yield whenever the screen should change.

    At once for ``urgent_types`` and the end of the client's update, otherwise at most
    every :data:`YIELD_EVERY_S` seconds; a :class:`~labui.jobs.Tick` updates the countdown.
    When the worker has sent more items than were shown (``job.backlog()``), they are
    folded first and shown together: one render per burst, so the page never falls
    behind the attack. Both tabs' streams share it, so Stop is honoured the same way.
    """
    last = clock()
    pending = False
    for item in items:
        if isinstance(item, Tick):
            view.tick()
        elif isinstance(item, UpdateReady):
            view.mark_update_done(item.utility)
            pending = True
        else:
            view.apply(item)  # raises TypeError on an unknown event
            pending = pending or isinstance(item, urgent_types)
        if job is not None:
            job.where = view.where
        now = clock()
        behind = job is not None and job.backlog() > 0
        if (pending and not behind) or now - last >= YIELD_EVERY_S:
            last = now
            pending = False
            yield


PLOT_KEYS = frozenset({"spectrum", "distances"})
PLOT_EVERY_S = 1.0
"""The text tab's plots are re-sent at most this often while a run streams: each one
is a plotly figure the browser lays out again, and a burst of them held the first
tokens back by seconds."""
PLOT_HOLD_S = 1.5
"""Before the first tokens are on screen, a changed plot waits at most this long: the
spectrum and the filter arrive a moment before the first tokens, and drawing them then
(a plotly layout in the browser, on the same CPU a Space or a laptop shares) delayed
the tokens; after the first tokens, plots follow at :data:`PLOT_EVERY_S`."""


def stream_dager(view: DagerView, items: Iterator[object], *, clock: Callable[[], float] = time.perf_counter,
                 job=None) -> Iterator[tuple]:  # noqa: ANN001
    """Fold worker items into ``view`` and yield component tuples (text outputs + JSON).

    Yields at once for the events that change what is on screen (spectrum, filter,
    prefixes, sentences, warnings, start, finish), otherwise throttled (:func:`fold`).
    The first recovered tokens go first: plots wait for them (at most
    :data:`PLOT_HOLD_S`) and then follow at most every :data:`PLOT_EVERY_S`; the JSON
    result rides with the plots.
    """
    slow_at = -float("inf")
    plots_waiting: float | None = None
    tokens_shown = False
    for _ in fold(view, items, URGENT_TEXT, clock=clock, job=job):
        now = clock()
        if plots_waiting is None and view.dirty & PLOT_KEYS:
            plots_waiting = now
        first_tokens = not tokens_shown and "grid" in view.dirty and view.first_tokens_s is not None
        held_for_tokens = not tokens_shown and (plots_waiting is None or now - plots_waiting < PLOT_HOLD_S)
        due = not first_tokens and not held_for_tokens and now - slow_at >= PLOT_EVERY_S
        if due:
            slow_at, plots_waiting = now, None
        tokens_shown = tokens_shown or first_tokens
        out = emit(view, TEXT_KEYS, hold=frozenset() if due else PLOT_KEYS)
        yield (*out, result_json(view) if due else gr.skip())
    yield (*emit(view, TEXT_KEYS, force=True), result_json(view))


def skips(n: int) -> tuple:
    return tuple(gr.skip() for _ in range(n))


def emit_plain(view, keys: Sequence[str]) -> tuple:  # noqa: ANN001
    values = view.render()
    return tuple(values[k] for k in keys)


def stream_dlg(view: DlgView, items: Iterator[object], *, clock: Callable[[], float] = time.perf_counter,
               job=None) -> Iterator[tuple]:  # noqa: ANN001
    """Fold DLG worker items into ``view`` and yield the image outputs (throttled, :func:`fold`)."""
    for _ in fold(view, items, URGENT_IMAGE, clock=clock, job=job):
        yield (*emit(view, IMAGE_KEYS), gr.skip())
    yield (*emit(view, IMAGE_KEYS, force=True), write_gif(view))

