"""Text views: DAGER's event stream (and the DLG text baseline) as display values.

A view accumulates events with :meth:`apply` and renders with :meth:`render`, which
returns a dict ``component key -> value`` (plotly figures, HTML, Markdown). Only the
keys whose content changed since the last render are listed in :attr:`dirty`, so the
app can skip re-sending unchanged plots.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dager.events import (
    AttackFinished,
    AttackStarted,
    AttackWarning,
    PrefixesExtended,
    SearchProgress,
    SentenceRecovered,
    SpectrumComputed,
    TokensFiltered,
)
from dlg.events import DlgStarted, TextDlgFinished, TextDlgStep
from labui import plots
from labui.textdiff import diff_html, match

TEXT_KEYS = ("status", "spectrum", "distances", "grid", "sentences", "metrics")
"""The DAGER view's outputs, in the order the app wires them."""

WARNINGS = {
    "over_capacity": "The batch has about as many distinct tokens as the model is wide "
    "(rank {value:.0f}): exact recovery is no longer guaranteed; this is a best effort.",
    "budget_exhausted": "The search stopped at its budget ({value:.0f} candidates) before "
    "finishing; some sentences may be missing or incomplete.",
    "noisy_spectrum": "The gradient spectrum looks noisy or saturated (a defense?): the "
    "span checks are unreliable, results are a best effort.",
    "combinations_capped": "The encoder search hit its cap on combinations ({value:.0f}).",
    "incomplete": "Some sentences could not be completed exactly ({value:.0f}).",
    "left_padding": "The update was computed on left-padded batches; positions are shifted.",
}


def _fmt_token(text: str) -> str:
    """A token for a grid cell: spaces made visible, HTML-escaped."""
    shown = text.replace(" ", "·").replace("\n", "⏎") or "∅"
    return html.escape(shown)


@dataclass
class DagerView:
    """Accumulated state of one DAGER run, for display.

    Attributes:
        references: the sentences the user typed (the demo's evaluator knows them).
        token_text: token id -> text (special tokens included), for the grid.
        special_ids: ids shown muted in the grid (BOS/EOS/CLS/SEP/pad).
        normalize: maps a typed sentence to what the tokenizer can represent (e.g.
            BERT lowercases), so "matches the original" is judged fairly.
        model_note: an honest sentence about the model (e.g. random init).
        scorer: ``(references, predictions) -> scores`` with attributes ``rouge1``,
            ``rouge2``, ``exact_match`` (and optionally ``rougeL``, ``token_accuracy``).
        clock: a monotonic clock (injectable for tests).
    """

    references: Sequence[str] = ()
    token_text: Callable[[int], str] = str
    special_ids: frozenset[int] = frozenset()
    normalize: Callable[[str], str] = lambda s: s.strip()  # noqa: E731
    model_note: str = ""
    scorer: Callable[[Sequence[str], Sequence[str]], object] | None = None
    clock: Callable[[], float] = time.perf_counter

    started: AttackStarted | None = None
    spectra: dict[int, tuple[list[float], int]] = field(default_factory=dict)
    filters: dict[object, TokensFiltered] = field(default_factory=dict)
    prefixes: PrefixesExtended | None = None
    progress: SearchProgress | None = None
    recovered: list[SentenceRecovered] = field(default_factory=list)
    warnings: list[AttackWarning] = field(default_factory=list)
    finished: AttackFinished | None = None
    scores: object | None = None
    t0: float = 0.0
    phase: str = "computing the client's update…"
    update_s: float | None = None
    first_tokens_s: float | None = None
    finished_s: float | None = None
    dirty: set[str] = field(default_factory=lambda: set(TEXT_KEYS))
    _figs: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.t0 = self.clock()
        self._handlers = {
            AttackStarted: self._started,
            SpectrumComputed: self._spectrum,
            TokensFiltered: self._filtered,
            PrefixesExtended: self._prefixes,
            SearchProgress: self._progress,
            SentenceRecovered: self._sentence,
            AttackWarning: self._warning,
            AttackFinished: self._finished,
        }

    # -- events ------------------------------------------------------------------

    def apply(self, event: object) -> None:
        """Fold one event into the view.

        Raises:
            TypeError: for an event type this view does not know.
        """
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"DagerView cannot display a {type(event).__name__} event")
        handler(event)

    def mark_update_done(self) -> None:
        """The client's update is computed; the attack starts (for the timings)."""
        self.update_s = self.clock() - self.t0
        self.phase = "the attacker reads the shared gradient…"
        self.dirty |= {"status", "metrics"}

    def _started(self, e: AttackStarted) -> None:
        self.started = e
        self.dirty |= {"status", "spectrum"}

    def _spectrum(self, e: SpectrumComputed) -> None:
        self.spectra[int(e.layer)] = ([float(v) for v in e.singular_values.tolist()], int(e.rank))
        self.dirty |= {"spectrum", "status"}

    def _filtered(self, e: TokensFiltered) -> None:
        self.filters[e.position] = e
        self.dirty |= {"distances", "status"}

    def _mark_tokens(self) -> None:
        if self.first_tokens_s is None:
            self.first_tokens_s = self.clock() - self.t0

    def _prefixes(self, e: PrefixesExtended) -> None:
        self.prefixes = e
        if e.prefixes:
            self._mark_tokens()
        self.dirty |= {"grid", "status"}

    def _progress(self, e: SearchProgress) -> None:
        self.progress = e
        self.dirty.add("status")

    def _sentence(self, e: SentenceRecovered) -> None:
        self.recovered.append(e)
        self._mark_tokens()
        self.dirty |= {"grid", "sentences", "status"}

    def _warning(self, e: AttackWarning) -> None:
        self.warnings.append(e)
        self.dirty.add("status")

    def _finished(self, e: AttackFinished) -> None:
        self.finished = e
        self.finished_s = self.clock() - self.t0
        # Sentences the stream did not announce one by one still show up.
        seen = {s.token_ids for s in self.recovered}
        for i, (ids, text, exact) in enumerate(
            zip(e.result.token_ids, e.result.sentences, e.result.exact)
        ):
            if tuple(ids) not in seen:
                self.recovered.append(SentenceRecovered(len(self.recovered), tuple(ids), text, exact, 0.0))
        if self.scorer is not None and self.references:
            self.scores = self.scorer(list(self.references), list(e.result.sentences))
        self.dirty |= set(TEXT_KEYS)

    # -- rendering ---------------------------------------------------------------

    @property
    def predictions(self) -> list[str]:
        return [s.text for s in self.recovered]

    def render(self) -> dict[str, object]:
        """All outputs; :attr:`dirty` lists the ones that changed (then it is cleared)."""
        if "spectrum" in self.dirty or "spectrum" not in self._figs:
            self._figs["spectrum"] = plots.spectrum_figure(
                self.spectra, self.started.hidden_size if self.started else None
            )
        if "distances" in self.dirty or "distances" not in self._figs:
            ordered = sorted(self.filters.values(), key=lambda f: -1 if f.position is None else f.position)
            self._figs["distances"] = plots.distances_figure(ordered, self.token_text)
        out = {
            "status": self.status_markdown(),
            "spectrum": self._figs["spectrum"],
            "distances": self._figs["distances"],
            "grid": self.grid_html(),
            "sentences": self.sentences_html(),
            "metrics": self.metrics_markdown(),
        }
        return out

    def take_dirty(self) -> set[str]:
        """The keys changed since the last call (and reset)."""
        d, self.dirty = self.dirty, set()
        return d

    def status_markdown(self) -> str:
        lines: list[str] = []
        if self.model_note:
            lines.append(self.model_note)
        s = self.started
        if s is None:
            lines.append(f"**Running:** {self.phase}")
        else:
            verdict = (
                "⚠️ over capacity: best effort" if s.over_capacity
                else "within capacity: exact recovery expected"
            )
            lines.append(
                f"**{html.escape(s.model)}** · task *{s.task}* · batch {s.batch_size} · "
                f"rank **{s.rank}** of d = {s.hidden_size} ({verdict})"
            )
        if self.finished is None and s is not None:
            progress = f"{len(self.recovered)} sentence(s) recovered"
            if self.prefixes is not None:
                progress += f", search at position {self.prefixes.position} with {self.prefixes.num_prefixes} prefix(es)"
            lines.append(f"**Running:** {progress}…")
        elif self.finished is not None:
            r = self.finished.result
            lines.append(
                f"**Done:** {len(r.sentences)} sentence(s) in {r.seconds:.2f} s "
                f"({sum(r.exact)} passed the exact check)."
            )
        for w in self.warnings:
            template = WARNINGS.get(w.code, "Warning: {code} ({value:g}).")
            lines.append("⚠️ " + template.format(code=w.code, value=w.value))
        return "\n\n".join(lines)

    def _cell(self, tid: int) -> str:
        cls = "gll-special" if tid in self.special_ids else "gll-tok"
        return f'<td class="{cls}" title="id {tid}">{_fmt_token(self.token_text(tid))}</td>'

    def grid_html(self, max_rows: int = 24) -> str:
        """A token grid: recovered sentences, then the search's live prefixes."""
        rows: list[tuple[str, tuple[int, ...]]] = []
        done = [s.token_ids for s in self.recovered]
        for s in self.recovered:
            rows.append(("gll-row-exact" if s.exact else "gll-row-inexact", s.token_ids))
        if self.prefixes is not None and self.finished is None:
            for p in self.prefixes.prefixes:
                if any(d[: len(p)] == tuple(p) for d in done):
                    continue
                rows.append(("gll-row-live", tuple(p)))
        if not rows:
            return '<div class="gll-empty">The token grid fills in as the search recovers tokens.</div>'
        width = max(len(ids) for _, ids in rows[:max_rows])
        head = "".join(f"<th>{i}</th>" for i in range(width))
        body = []
        for n, (cls, ids) in enumerate(rows[:max_rows]):
            mark = {"gll-row-exact": "✓", "gll-row-inexact": "≈", "gll-row-live": "…"}[cls]
            cells = "".join(self._cell(int(t)) for t in ids)
            cells += '<td class="gll-pad"></td>' * (width - len(ids))
            body.append(f'<tr class="{cls}"><th>{mark}</th>{cells}</tr>')
        more = len(rows) - max_rows
        extra = f'<div class="gll-note">… and {more} more prefixes</div>' if more > 0 else ""
        return (
            '<div class="gll-grid-wrap"><table class="gll-grid"><thead><tr><th></th>'
            f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>{extra}"
        )

    def sentences_html(self) -> str:
        """Recovered sentences with exact/inexact marks and a diff against the originals."""
        if not self.recovered:
            return '<div class="gll-empty">Recovered sentences appear here.</div>'
        refs = [self.normalize(r) for r in self.references]
        preds = [s.text.strip() for s in self.recovered]
        pairs = match(preds, refs)
        items = []
        for s, pred, ref_i in zip(self.recovered, preds, pairs):
            check = (
                '<span class="gll-badge gll-exact" title="every prefix passed the span check">exact check ✓</span>'
                if s.exact else
                '<span class="gll-badge gll-inexact" title="best-effort completion">inexact ≈</span>'
            )
            if ref_i is None:
                verdict, body = '<span class="gll-badge gll-miss">no original left</span>', html.escape(pred)
            elif pred == refs[ref_i]:
                verdict, body = '<span class="gll-badge gll-same">= original</span>', html.escape(pred)
            else:
                verdict, body = '<span class="gll-badge gll-diff">differs</span>', diff_html(refs[ref_i], pred)
            items.append(f'<li class="gll-sent">{check}{verdict}<span class="gll-text">{body}</span></li>')
        return f'<ol class="gll-sents">{"".join(items)}</ol>'

    def metrics_markdown(self) -> str:
        if self.finished is None:
            first = "–" if self.first_tokens_s is None else f"{self.first_tokens_s:.2f} s"
            upd = "" if self.update_s is None else f"Client update computed after {self.update_s:.2f} s. "
            return f"{upd}First tokens after {first}. Scores appear when the attack finishes."
        r = self.finished.result
        lines = ["| metric | value |", "|---|---|"]
        sc = self.scores
        if sc is not None:
            lines.append(f"| ROUGE-1 F1 | {100 * float(sc.rouge1):.1f} |")
            lines.append(f"| ROUGE-2 F1 | {100 * float(sc.rouge2):.1f} |")
            if hasattr(sc, "rougeL"):
                lines.append(f"| ROUGE-L F1 | {100 * float(sc.rougeL):.1f} |")
            lines.append(f"| exact match | {100 * float(sc.exact_match):.0f} % |")
            if hasattr(sc, "token_accuracy"):
                lines.append(f"| token accuracy | {100 * float(sc.token_accuracy):.1f} % |")
        lines.append(f"| sentences recovered | {len(r.sentences)} of {len(self.references) or r.rank} |")
        lines.append(f"| layer-1 rank / d | {r.rank} / {r.hidden_size} |")
        if self.update_s is not None:
            lines.append(f"| client update computed | {self.update_s:.2f} s |")
        if self.first_tokens_s is not None:
            lines.append(f"| first tokens shown | {self.first_tokens_s:.2f} s |")
        lines.append(f"| attack time | {r.seconds:.2f} s |")
        if self.finished_s is not None:
            lines.append(f"| total (update + attack) | {self.finished_s:.2f} s |")
        return "\n".join(lines)


TEXT_DLG_KEYS = ("race_status", "race_loss", "race_sentences")


@dataclass
class TextDlgView:
    """The DLG text baseline's stream, shown next to DAGER's result."""

    references: Sequence[str] = ()
    normalize: Callable[[str], str] = lambda s: s.strip()  # noqa: E731
    scorer: Callable[[Sequence[str], Sequence[str]], object] | None = None
    clock: Callable[[], float] = time.perf_counter

    started: DlgStarted | None = None
    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    texts: tuple[str, ...] = ()
    finished: TextDlgFinished | None = None
    scores: object | None = None
    t0: float = 0.0

    def __post_init__(self) -> None:
        self.t0 = self.clock()
        self._handlers = {DlgStarted: self._started, TextDlgStep: self._step, TextDlgFinished: self._finished}

    def apply(self, event: object) -> None:
        """Fold one event into the view.

        Raises:
            TypeError: for an event type this view does not know.
        """
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"TextDlgView cannot display a {type(event).__name__} event")
        handler(event)

    def _started(self, e: DlgStarted) -> None:
        self.started = e

    def _step(self, e: TextDlgStep) -> None:
        self.iterations.append(int(e.iteration))
        self.losses.append(float(e.loss))
        self.texts = tuple(e.texts)

    def _finished(self, e: TextDlgFinished) -> None:
        self.finished = e
        self.texts = tuple(e.result.sentences)
        if self.scorer is not None and self.references:
            self.scores = self.scorer(list(self.references), list(e.result.sentences))

    def render(self) -> dict[str, object]:
        if self.finished is not None:
            r = self.finished.result
            status = f"**DLG baseline done** in {r.seconds:.1f} s."
            sc = self.scores
            if sc is not None:
                status += (f" ROUGE-1 {100 * float(sc.rouge1):.1f}, ROUGE-2 {100 * float(sc.rouge2):.1f}, "
                           f"exact match {100 * float(sc.exact_match):.0f} %.")
        elif self.started is not None:
            last = self.iterations[-1] if self.iterations else 0
            status = f"**DLG baseline running:** iteration {last} of {self.started.iterations}…"
        else:
            status = "**DLG baseline:** computing the client's update…"
        refs = [self.normalize(r) for r in self.references]
        preds = [t.strip() for t in self.texts]
        items = []
        for pred, ref_i in zip(preds, match(preds, refs)):
            body = html.escape(pred) if ref_i is None else diff_html(refs[ref_i], pred)
            items.append(f'<li class="gll-sent"><span class="gll-text">{body}</span></li>')
        sentences = (f'<ol class="gll-sents">{"".join(items)}</ol>' if items
                     else '<div class="gll-empty">The baseline\'s guesses appear here.</div>')
        loss = plots.curve_figure(self.iterations, self.losses, title="DLG baseline: gradient distance",
                                  ytitle="gradient distance", log=True, empty="waiting for the first step…")
        return {"race_status": status, "race_loss": loss, "race_sentences": sentences}
