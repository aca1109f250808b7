"""The DLG text baseline (the race against DAGER) as display values."""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dlg.events import DlgStarted, TextDlgFinished, TextDlgStep
from labui import plots
from labui.countdown import Countdown, EventFold
from labui.text_view import code_value
from dager.metrics import match_sentences
from labui.textdiff import diff_html

TEXT_DLG_KEYS = ("race_status", "race_loss", "race_sentences")


@dataclass
class TextDlgView(Countdown, EventFold):
    """The DLG text baseline's stream, shown next to DAGER's result."""

    references: Sequence[str] = ()
    normalize: Callable[[str], str] = lambda s: s.strip()  # noqa: E731
    scorer: Callable[[Sequence[str], Sequence[str]], object] | None = None
    clock: Callable[[], float] = time.perf_counter
    budget_s: float | None = None

    started: DlgStarted | None = None
    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    texts: tuple[str, ...] = ()
    finished: TextDlgFinished | None = None
    scores: object | None = None
    t0: float = 0.0
    phase: str = "loading the model and computing the client's update…"
    attack_t0: float | None = None
    dirty: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.t0:
            self.t0 = self.clock()
        self._handlers = {DlgStarted: self._started, TextDlgStep: self._step, TextDlgFinished: self._finished}

    @staticmethod
    def urgent(event: object) -> bool:
        """Start and finish are shown at once; steps are throttled."""
        return isinstance(event, (DlgStarted, TextDlgFinished))

    @property
    def where(self) -> str:
        if self.finished is not None:
            return "the end"
        if self.started is None:
            return "the client's update"
        return f"iteration {self.iterations[-1] if self.iterations else 0} of {self.started.iterations}"

    def _started(self, e: DlgStarted) -> None:
        self.started = e
        self.attack_t0 = self.clock()

    def _step(self, e: TextDlgStep) -> None:
        self.iterations.append(int(e.iteration))
        self.losses.append(float(e.loss))
        self.texts = tuple(e.texts)

    def _finished(self, e: TextDlgFinished) -> None:
        self.finished = e
        self.texts = tuple(e.result.sentences)
        if not self.iterations and e.result.losses:  # steps are throttled: a short run may send none
            self.iterations = list(range(1, len(e.result.losses) + 1))
            self.losses = [float(v) for v in e.result.losses]
        if self.scorer is not None and self.references:
            self.scores = self.scorer(list(self.references), list(e.result.sentences))

    def estimate_s(self) -> float | None:
        """Seconds left at the rate seen so far (capped by the budget), or None before a step."""
        if self.started is None or not self.iterations or self.attack_t0 is None:
            return None
        spent = self.clock() - self.attack_t0
        done = self.iterations[-1]
        left = spent / max(done, 1) * max(self.started.iterations - done, 0)
        if self.budget_s:
            left = min(left, max(self.budget_s - (self.clock() - self.t0), 0.0))
        return left

    def render(self) -> dict[str, object]:
        if self.finished is not None:
            r = self.finished.result
            status = f"**DLG baseline done** in {r.seconds:.1f} s."
            reason = getattr(r, "stop_reason", None)
            if code_value(reason) == "time_budget":
                status += f" It reached the {self.budget_s or 0:.0f} s time budget and shows its best guess."
            sc = self.scores
            if sc is not None:
                status += (f" ROUGE-1 {100 * float(sc.rouge1):.1f}, ROUGE-2 {100 * float(sc.rouge2):.1f}, "
                           f"exact match {100 * float(sc.exact_match):.0f} %.")
        elif self.started is not None:
            last = self.iterations[-1] if self.iterations else 0
            left = self.estimate_s()
            eta = "" if left is None else f", about {left:.0f} s left"
            status = (f"**DLG baseline running:** iteration {last} of {self.started.iterations}{eta}… "
                      f"{self.countdown()}")
        else:
            status = f"**DLG baseline:** {self.phase} {self.countdown()}"
        refs = [self.normalize(r) for r in self.references]
        preds = [t.strip() for t in self.texts]
        items = []
        for pred, ref_i in zip(preds, match_sentences(preds, refs)):
            body = html.escape(pred) if ref_i is None else diff_html(refs[ref_i], pred)
            items.append(f'<li class="gll-sent"><span class="gll-text">{body}</span></li>')
        sentences = (f'<ol class="gll-sents">{"".join(items)}</ol>' if items
                     else '<div class="gll-empty">The baseline\'s guesses appear here.</div>')
        loss = plots.curve_figure(self.iterations, self.losses, title="DLG baseline: gradient distance",
                                  ytitle="gradient distance", log=True, empty="waiting for the first step…")
        return {"race_status": status, "race_loss": loss, "race_sentences": sentences}
