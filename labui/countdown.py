"""What every running view shares: the countdown, the once-a-second tick, the event fold.

The text and image views (and the DLG text race) used to carry their own copies of
both; a view mixes :class:`Countdown` in and provides ``clock``, ``t0``, ``budget_s``
and a ``dirty`` set of output keys.
"""

from __future__ import annotations

from collections.abc import Callable


class Countdown:
    """Mixin: elapsed seconds against the run's time budget, on the ``status`` output."""

    clock: Callable[[], float]
    t0: float
    budget_s: float | None
    dirty: set[str]
    _shown_second: int = -1

    def tick(self) -> None:
        """Time passed with no event: the status changes when the shown second does."""
        second = int(self.clock() - self.t0)
        if second != self._shown_second:
            self._shown_second = second
            self.dirty.add("status")

    def countdown(self) -> str:
        """E.g. ``⏱ 12 s of the 60 s budget``."""
        elapsed = self.clock() - self.t0
        budget = f" of the {self.budget_s:.0f} s budget" if self.budget_s else ""
        return f"⏱ {elapsed:.0f} s{budget}"


class EventFold:
    """Mixin: fold one engine event into a view by its type (``_handlers``, set by the view).

    One dispatch for every view, on event types rather than names; an unknown type is a
    programming error and raises.
    """

    _handlers: dict[type, Callable[[object], None]]

    def apply(self, event: object) -> None:
        """Fold one event into the view.

        Raises:
            TypeError: for an event type this view does not know.
        """
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"{type(self).__name__} cannot display a {type(event).__name__} event")
        handler(event)
