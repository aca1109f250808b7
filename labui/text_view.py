"""Text views: DAGER's event stream (and the DLG text baseline) as display values.

A view accumulates events with :meth:`apply` and renders with :meth:`render`, which
returns a dict ``component key -> value`` (plotly figures, HTML, Markdown). Only the
keys whose content changed since the last render are listed in :attr:`dirty`, so the
app can skip re-sending unchanged plots.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable, Sequence
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
    WarningCode,
)
from labui import plots
from labui.countdown import Countdown, EventFold
from labui.labels import LORA_WARNINGS, SPAN_FULL, SPAN_FULL_LORA, VOCABULARY, WARNINGS
from dager.metrics import match_sentences
from labui.textdiff import diff_html

TEXT_KEYS = ("status", "spectrum", "distances", "grid", "sentences", "metrics")
"""The DAGER view's outputs, in the order the app wires them."""

def code_value(code: object) -> str:
    """A warning code or stop reason as its string value (enums and plain strings alike)."""
    return str(getattr(code, "value", code))


def _fmt_token(text: str) -> str:
    """A token for a grid cell: spaces made visible, HTML-escaped."""
    shown = text.replace(" ", "·").replace("\n", "⏎") or "∅"
    return html.escape(shown)


@dataclass
class DagerView(Countdown, EventFold):
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
    noise_tolerant: bool = False
    budget_s: float | None = None
    t0: float = 0.0

    started: AttackStarted | None = None
    spectra: dict[int, tuple[list[float], int]] = field(default_factory=dict)
    filters: dict[object, TokensFiltered] = field(default_factory=dict)
    prefixes: PrefixesExtended | None = None
    progress: SearchProgress | None = None
    recovered: list[SentenceRecovered] = field(default_factory=list)
    warnings: list[AttackWarning] = field(default_factory=list)
    finished: AttackFinished | None = None
    scores: object | None = None
    utility: dict[str, float] | None = None
    phase: str = "computing the client's update…"
    update_s: float | None = None
    first_tokens_s: float | None = None
    finished_s: float | None = None
    dirty: set[str] = field(default_factory=lambda: set(TEXT_KEYS))
    _figs: dict[str, object] = field(default_factory=dict)
    _pairs: object | None = None

    def __post_init__(self) -> None:
        if not self.t0:
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

    def mark_update_done(self, utility: dict[str, float] | None = None) -> None:
        """The client's update is computed; the attack starts (for the timings).

        Args:
            utility: :func:`fedclient.defenses.utility_cost` of a defended update.
        """
        self.update_s = self.clock() - self.t0
        self.utility = utility
        self.phase = "the attacker reads the shared gradient…"
        self.dirty |= {"status", "metrics"}

    @property
    def where(self) -> str:
        """Where the run is, for "Stopped at ..."."""
        if self.finished is not None:
            return "the end"
        if self.started is None:
            return "the client's update" if self.update_s is None else "the rank step"
        found = f"{len(self.recovered)} sentence(s) recovered"
        if self.prefixes is not None:
            return f"position {self.prefixes.position + 1} of the search ({found})"
        if self.progress is not None and self.progress.position is not None:
            return f"position {self.progress.position + 1} of the search ({found})"
        return f"the token filter ({found})"

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
        self._pairs = None
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
        self._pairs = None
        if self.scorer is not None and self.references:
            # The same predictions as the per-sentence badges: the counts cannot disagree.
            self.scores = self.scorer(list(self.references), self.predictions)
        self.dirty |= set(TEXT_KEYS)

    # -- rendering ---------------------------------------------------------------

    @property
    def predictions(self) -> list[str]:
        return [s.text for s in self.recovered]

    def render(self, keys: Iterable[str] | None = None) -> dict[str, object]:
        """The outputs in ``keys`` (all when None); only those are built.

        :attr:`dirty` lists the ones that changed (:meth:`take_dirty` clears it). The
        plots are built only when asked for, so a stream that holds them back (to show
        the first tokens sooner) does not pay for them either.
        """
        wanted = set(TEXT_KEYS) if keys is None else set(keys)
        out: dict[str, object] = {}
        if "status" in wanted:
            out["status"] = self.status_markdown()
        if "spectrum" in wanted:
            if "spectrum" in self.dirty or "spectrum" not in self._figs:
                self._figs["spectrum"] = plots.spectrum_figure(
                    self.spectra, self.started.hidden_size if self.started else None,
                    self.started.capacity if self.started else None,
                )
            out["spectrum"] = self._figs["spectrum"]
        if "distances" in wanted:
            if "distances" in self.dirty or "distances" not in self._figs:
                ordered = sorted(self.filters.values(), key=lambda f: -1 if f.position is None else f.position)
                self._figs["distances"] = plots.distances_figure(ordered, self.token_text)
            out["distances"] = self._figs["distances"]
        if "grid" in wanted:
            out["grid"] = self.grid_html()
        if "sentences" in wanted:
            out["sentences"] = self.sentences_html()
        if "metrics" in wanted:
            out["metrics"] = self.metrics_markdown()
        return out

    def take_dirty(self) -> set[str]:
        """The keys changed since the last call (and reset)."""
        d, self.dirty = self.dirty, set()
        return d

    # -- evaluation (the app knows the originals; the attacker does not) ---------------

    def judgements(self) -> list[tuple[str, int | None]]:
        """Per recovered sentence: (``"match"`` | ``"differs"`` | ``"unmatched"``, reference index).

        Uses the scorer's matching (the one behind the metrics table), so the badges,
        the status counts and "exact match" always agree.
        """
        if not self.references:
            return [("unmatched", None)] * len(self.recovered)
        if self._pairs is None or len(self._pairs) != len(self.recovered):
            preds = self.predictions
            out: list[tuple[str, int | None]] = [("unmatched", None)] * len(preds)
            if self.scorer is not None and preds:
                for pair in self.scorer(list(self.references), preds).pairs:
                    if pair.prediction_index is not None:
                        out[pair.prediction_index] = ("match" if pair.exact else "differs", pair.reference_index)
            else:
                refs = [self.normalize(r) for r in self.references]
                for i, (pred, ref_i) in enumerate(zip(preds, match_sentences([p.strip() for p in preds], refs))):
                    if ref_i is not None:
                        same = " ".join(self.normalize(pred).split()) == refs[ref_i]
                        out[i] = ("match" if same else "differs", ref_i)
            self._pairs = out
        return list(self._pairs)

    @property
    def num_matching(self) -> int:
        """Recovered sentences equal to their original (evaluation)."""
        return sum(kind == "match" for kind, _ in self.judgements())

    @property
    def span_full(self) -> bool:
        """The span was full: the exact attack could not run."""
        if any(code_value(w.code) == WarningCode.SPAN_FULL.value for w in self.warnings):
            return True
        reason = None if self.finished is None else getattr(self.finished.result, "stop_reason", None)
        return code_value(reason) == "span_full"

    def verdict(self) -> str | None:
        """One line on a defended run: did the defense hold, and what did it cost?"""
        if self.utility is None or self.finished is None:
            return None
        kept = f"the update kept {float(self.utility.get('utility_cosine', float('nan'))):.3f} of its direction"
        n = len(self.references)
        if self.span_full:
            return f"**Verdict:** defense held: the span is full, the exact attack could not run; {kept}."
        if self.scores is None or not n:
            return f"**Verdict:** {kept}."
        exact = self.scores.num_exact
        rouge = 100 * float(self.scores.rouge1)
        if exact == 0 and rouge < 50:
            head = f"defense held: no sentence recovered, ROUGE-1 {rouge:.1f} (below 50)"
        elif exact < n:
            head = f"defense partly held: {exact} of {n} sentences recovered exactly, ROUGE-1 {rouge:.1f}"
        else:
            head = f"defense failed: all {n} sentences recovered exactly"
        return f"**Verdict:** {head}; {kept}."

    def status_markdown(self) -> str:
        lines: list[str] = []
        if self.model_note:
            lines.append(self.model_note)
        s = self.started
        if s is None:
            lines.append(f"**Running:** {self.phase}")
        else:
            if self.noise_tolerant:
                verdict = "noise-tolerant mode: candidates are ranked by distance, nothing is guaranteed exact"
            elif self.span_full:
                verdict = "the span is full"
            elif s.over_capacity:
                verdict = "⚠️ over capacity: best effort"
            else:
                verdict = "within capacity: the span check can be exact"
            room = (f"of d = {s.hidden_size}" if s.capacity is None
                    else f"of the LoRA adapters' capacity {s.capacity} (d = {s.hidden_size})")
            lines.append(
                f"**{html.escape(s.model)}** · task *{s.task}* · batch {s.batch_size} · "
                f"rank **{s.rank}** {room} ({verdict})"
            )
        lora = s is not None and s.capacity is not None
        if self.span_full:
            lines.append(SPAN_FULL_LORA if lora else SPAN_FULL)
        if self.finished is None and s is not None:
            progress = f"{len(self.recovered)} sentence(s) recovered"
            if self.prefixes is not None:
                progress += (f", search at position {self.prefixes.position} with "
                             f"{self.prefixes.num_prefixes} prefix(es)")
            elif self.progress is not None and self.progress.position is not None:
                progress += f", searching position {self.progress.position + 1}"
            lines.append(f"**Running:** {progress}…")
        elif self.finished is not None:
            r = self.finished.result
            line = f"**Done:** {len(self.recovered)} sentence(s) in {r.seconds:.2f} s"
            if not self.noise_tolerant:
                line += f"; {sum(x.exact for x in self.recovered)} passed the span check"
            if self.references:
                line += f"; {self.num_matching} of {len(self.references)} match the original (evaluation)"
            lines.append(line + ".")
            v = self.verdict()
            if v:
                lines.append(v)
        if self.finished is None:
            lines.append(self.countdown())
        for w in self.warnings:
            code = code_value(w.code)
            if code == WarningCode.SPAN_FULL.value:
                continue  # said once, above
            template = (LORA_WARNINGS if lora else {}).get(code) or WARNINGS.get(code, "Warning: {code} ({value:g}).")
            lines.append("⚠️ " + template.format(code=code, value=w.value) if not template.startswith("⏱")
                         else template.format(code=code, value=w.value))
        return "\n\n".join(lines)

    def grid_html(self, max_rows: int = 24) -> str:
        """A token grid: recovered sentences (green only when they match the original),
        then the search's live prefixes. Long sentences wrap onto several lines."""
        rows: list[tuple[str, tuple[int, ...]]] = []
        done = [s.token_ids for s in self.recovered]
        for s, (kind, _) in zip(self.recovered, self.judgements()):
            cls = {"match": "gll-row-match", "differs": "gll-row-differs"}.get(kind, "gll-row-unjudged")
            rows.append((cls, s.token_ids))
        if self.prefixes is not None and self.finished is None:
            for p in self.prefixes.prefixes:
                if any(d[: len(p)] == tuple(p) for d in done):
                    continue
                rows.append(("gll-row-live", tuple(p)))
        if not rows:
            return '<div class="gll-empty">The token grid fills in as the search recovers tokens.</div>'
        marks = {"gll-row-match": ("✓", "matches original"), "gll-row-differs": ("✗", "differs from the original"),
                 "gll-row-unjudged": ("•", "recovered"), "gll-row-live": ("…", "live prefix")}
        body = []
        for cls, ids in rows[:max_rows]:
            mark, title = marks[cls]
            cells = "".join(self._span_cell(i, int(t)) for i, t in enumerate(ids))
            body.append(f'<div class="gll-row {cls}" title="{title}"><span class="gll-mark">{mark}</span>{cells}</div>')
        more = len(rows) - max_rows
        extra = f'<div class="gll-note">… and {more} more prefixes</div>' if more > 0 else ""
        return f'<div class="gll-grid-wrap"><div class="gll-grid">{"".join(body)}</div></div>{extra}'

    def _span_cell(self, position: int, tid: int) -> str:
        cls = "gll-special" if tid in self.special_ids else "gll-tok"
        return (f'<span class="gll-cell {cls}" title="position {position}, id {tid}">'
                f"{_fmt_token(self.token_text(tid))}</span>")

    def sentences_html(self) -> str:
        """Recovered sentences with the attacker's check, the evaluation and a word diff."""
        if not self.recovered:
            return '<div class="gll-empty">Recovered sentences appear here.</div>'
        items = []
        for s, (kind, ref_i) in zip(self.recovered, self.judgements()):
            pred = s.text.strip()
            if self.noise_tolerant:
                check = ('<span class="gll-badge gll-check-na" title="noise-tolerant mode ranks candidates; '
                         'it checks nothing exactly">ranked guess</span>')
            elif s.exact:
                check = ('<span class="gll-badge gll-check" title="every prefix lies in the gradient\'s span: '
                         'what the attacker knows">span check passed</span>')
            else:
                check = ('<span class="gll-badge gll-check-failed" title="a best-effort completion">'
                         "span check failed</span>")
            body = html.escape(pred)
            if kind == "unmatched" or ref_i is None:
                verdict = ('<span class="gll-badge gll-miss">no original left</span>' if self.references else "")
            else:
                typed = self.references[ref_i].strip()
                seen = self.normalize(typed)
                if kind == "match":
                    verdict = '<span class="gll-badge gll-same">matches original</span>'
                    if " ".join(typed.split()) != seen:
                        verdict += (f'<span class="gll-badge gll-seen" title="you typed: {html.escape(typed)}">'
                                    "as the tokenizer sees it</span>")
                else:
                    verdict = '<span class="gll-badge gll-diff">differs</span>'
                    body = diff_html(seen, " ".join(self.normalize(pred).split()) or pred)
            items.append(f'<li class="gll-sent">{check}{verdict}<span class="gll-text">{body}</span></li>')
        return f'<ol class="gll-sents">{"".join(items)}</ol>'

    def metrics_markdown(self) -> str:
        if self.finished is None:
            first = "–" if self.first_tokens_s is None else f"{self.first_tokens_s:.2f} s"
            upd = "" if self.update_s is None else f"Client update computed after {self.update_s:.2f} s. "
            return (f"{upd}First tokens found by the server after {first} (from the start of the run). "
                    "Scores appear when the attack finishes.")
        r = self.finished.result
        lines = ["| metric | value |", "|---|---|"]
        sc = self.scores
        if sc is not None:
            lines.append(f"| ROUGE-1 F1 | {100 * float(sc.rouge1):.1f} |")
            lines.append(f"| ROUGE-2 F1 | {100 * float(sc.rouge2):.1f} |")
            if hasattr(sc, "rougeL"):
                lines.append(f"| ROUGE-L F1 | {100 * float(sc.rougeL):.1f} |")
            lines.append(f"| exact match (matches original) | {100 * float(sc.exact_match):.0f} % "
                         f"({self.num_matching} of {len(self.references)}) |")
            if hasattr(sc, "token_accuracy"):
                lines.append(f"| token accuracy | {100 * float(sc.token_accuracy):.1f} % |")
        lines.append(f"| sentences recovered | {len(self.recovered)} of {len(self.references) or r.rank} |")
        if not self.noise_tolerant:
            lines.append(f"| span check passed | {sum(x.exact for x in self.recovered)} |")
        lines.append(f"| layer-1 rank / d | {r.rank} / {r.hidden_size} |")
        if self.utility is not None:
            lines.append(f"| update direction kept (cosine) | {float(self.utility.get('utility_cosine', 0)):.3f} |")
        if self.update_s is not None:
            lines.append(f"| client update computed | {self.update_s:.2f} s |")
        if self.first_tokens_s is not None:
            # The server's clock, from when the run started on the server; what the visitor
            # saw (click to tokens on screen) is measured in the browser, under the table.
            lines.append(f"| first tokens found (server, from the start of the run) | {self.first_tokens_s:.2f} s |")
        lines.append(f"| attack time | {r.seconds:.2f} s |")
        if self.finished_s is not None:
            lines.append(f"| total (update + attack) | {self.finished_s:.2f} s |")
        return "\n".join(lines) + "\n\n" + VOCABULARY
