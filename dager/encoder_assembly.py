"""The encoder search's shared state and its assembly stage (see :mod:`dager.encoder`).

:class:`_EncoderSearch` holds what both stages share (the budget, the scoring of
whole sequences, the threshold calibration, the record of found sentences) and runs
them: the beam (:class:`dager.encoder_beam._BeamStage`) first, then, when
sentences are missing, the assembly search (coordinate descent on whole sequences,
exhaustive enumeration of small lengths).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import torch

from dager.encoder_beam import _BeamStage
from dager.encoder_tuning import (
    DISTANCE_FLOOR,
    ENCODER_CEILING,
    EXHAUSTIVE_CAP,
    FALLBACK,
    IMPROVEMENT,
    MAX_SWEEPS,
    NUM_PROBES,
    PAIR_POOL,
    PAIR_SUSPECTS,
    PROBE_LOW_ID,
    RESTART_PATIENCE,
    SCORE_CHUNK,
    THRESHOLD_FRACTION,
)
from dager.events import WarningCode
from dager.hooks_bert import BertHooks
from dager.placement import Placement
from dager.search_items import Found, Step, Tick, Warn
from dager.span import Span

log = logging.getLogger("dager.encoder")  # the encoder search's log, wherever its steps live


@dataclass
class _Descent:
    """One sequence being descended: its score and, per position, the scores of the
    single moves tried there last (aligned with the position's candidates)."""

    seq: torch.Tensor  # (L,)
    score: float
    worst: float
    move_scores: dict[int, torch.Tensor] = field(default_factory=dict)


class _EncoderSearch:
    """State and steps of one encoder search (see :func:`encoder_search`)."""

    def __init__(
        self,
        hooks: BertHooks,
        accepted: dict[int | None, torch.Tensor],
        span2: Span,
        *,
        special_ids: tuple[int, ...],
        batch_size: int,
        threshold: float | None,
        max_combinations: int,
        generator: torch.Generator | None,
        beam: bool = True,
        placement: Placement | None = None,
    ) -> None:
        self.use_beam = beam
        self.narrowed = placement.narrowed if placement is not None else None
        self.located = placement.located if placement is not None else {}
        self.narrow = False  # the beam's first passes read ``narrowed`` (dager.placement)
        self.hooks = hooks
        self.accepted = accepted
        self.span2 = span2
        self.cls_id, self.sep_id = special_ids[:2]
        self.batch_size = batch_size
        self.threshold = threshold
        self.max_combinations = max_combinations
        self.device = hooks.device
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.checked = 0
        self._row_work = 0.0  # block-0 rows evaluated singly, in sequences (see charge_rows)
        self.thr = 0.0
        self.found: list[torch.Tensor] = []
        self.keys: set[tuple[int, ...]] = set()
        self.results: list[tuple[torch.Tensor, float]] = []
        self._specials = torch.tensor([self.cls_id, self.sep_id], device=self.device)
        self._cands: dict[tuple[int, bool], torch.Tensor] = {}

    # -- small helpers -------------------------------------------------------------

    @property
    def left(self) -> int:
        """Sequences the budget still allows."""
        return self.max_combinations - self.checked

    @property
    def done(self) -> bool:
        return len(self.found) >= self.batch_size or self.left <= 0

    def cands(self, p: int) -> torch.Tensor:
        """``(c,)`` layer-1 candidates at position ``p`` without ``[CLS]``/``[SEP]`` (the
        placement's narrower ones while :attr:`narrow` is set)."""
        source = self.narrowed if self.narrow and self.narrowed is not None else self.accepted
        key = (p, source is self.accepted)
        if key not in self._cands:
            c = source[p].to(self.device)
            self._cands[key] = c[~torch.isin(c, self._specials)]
        return self._cands[key]

    def rows(self, seqs: torch.Tensor) -> torch.Tensor:
        """``(n, L)`` distances of every block-1 input row to the layer-2 span (charged)."""
        self.checked += int(seqs.shape[0])
        return self.span2.distance(self.hooks.layer2_inputs(seqs))

    def charge_rows(self, n: int, length: int) -> None:
        """Charge ``n`` single rows of sequences of ``length`` to the budget: a row
        costs ``1/length`` of a sequence (the budget counts sequences of block-0 work)."""
        self._row_work += n / max(1, length)
        whole = int(self._row_work)
        self.checked += whole
        self._row_work -= whole

    def score(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n,)`` mean log row distance (the descent's objective) and worst row."""
        d = self.rows(seqs)
        return d.clamp(min=DISTANCE_FLOOR).log().mean(-1), d.max(-1).values

    def score_chunks(self, seqs: torch.Tensor) -> Generator[Tick, None, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`score` in chunks of :data:`SCORE_CHUNK`, a :class:`Tick` after each."""
        L = int(seqs.shape[1])
        parts = []
        for start in range(0, int(seqs.shape[0]), SCORE_CHUNK):
            parts.append(self.score(seqs[start : start + SCORE_CHUNK]))
            yield self.tick(L)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def frame(self, L: int) -> torch.Tensor:
        """``(L,)`` ``[CLS] ? ... ? [SEP]`` with the inside left to fill."""
        seq = torch.empty(L, dtype=torch.long, device=self.device)
        seq[0] = self.cls_id
        seq[L - 1] = self.sep_id
        return seq

    def tick(self, L: int) -> Tick:
        return Tick(L - 1, self.checked)

    # -- the steps -----------------------------------------------------------------

    def calibrate(self, lengths: list[int]) -> float:
        """The layer-2 threshold: given, or a fraction of random probes' worst rows.

        Probes are not charged to the budget (they are not candidates).
        """
        L0 = max(lengths)
        probe = torch.randint(PROBE_LOW_ID, self.hooks.vocab_size, (NUM_PROBES, L0), generator=self.gen)
        probe = probe.to(self.device)
        probe[:, 0] = self.cls_id
        probe[:, L0 - 1] = self.sep_id
        probes_worst = self.span2.distance(self.hooks.layer2_inputs(probe)).max(-1).values
        thr = self.threshold
        if thr is None:
            thr = min(ENCODER_CEILING, THRESHOLD_FRACTION * float(probes_worst.min()))
        log.debug("encoder layer-2 threshold %.3g (probes from %.3g)", thr, float(probes_worst.min()))
        return thr

    def initial(self, L: int, greedy: bool) -> torch.Tensor | None:
        """Per position a candidate no found sentence uses there (nearest or random)."""
        seq = self.frame(L)
        for p in range(1, L - 1):
            c = self.cands(p)
            if c.numel() == 0:
                return None
            used = [int(s[p]) for s in self.found if s.shape[0] > p + 1]
            free = c[~torch.isin(c, torch.tensor(used, dtype=c.dtype, device=self.device))] if used else c
            pool = free if free.numel() else c
            j = 0 if greedy else int(torch.randint(int(pool.numel()), (1,), generator=self.gen))
            seq[p] = pool[j]
        return seq

    def descend(self, seq: torch.Tensor) -> Generator[Tick, None, tuple[torch.Tensor, float]]:
        """Coordinate descent from ``seq``; returns ``(seq, worst)`` (``yield from``).

        Sweeps try every candidate at every position; at a local minimum a pair
        move may continue the descent. Stops in the span, out of budget, or after
        :data:`MAX_SWEEPS` sweeps.
        """
        L = int(seq.shape[0])
        s, w = self.score(seq.unsqueeze(0))
        state = _Descent(seq, float(s[0]), float(w[0]))
        for _sweep in range(MAX_SWEEPS):
            changed = yield from self.sweep(state)
            if self.settled(state):
                break
            if not changed:
                moved = yield from self.pair_move(state)
                if not moved:
                    break
        yield self.tick(L)
        return state.seq, state.worst

    def settled(self, state: _Descent) -> bool:
        """In the span, or out of budget: the descent stops."""
        return state.worst < self.thr or self.left <= 0

    def sweep(self, state: _Descent) -> Generator[Tick, None, bool]:
        """One pass over the positions, keeping each position's best single move."""
        L = int(state.seq.shape[0])
        changed = False
        for p in range(1, L - 1):
            if self.settled(state):
                return changed
            c = self.cands(p)
            if c.numel() <= 1:
                continue
            seqs = state.seq.unsqueeze(0).repeat(int(c.numel()), 1)
            seqs[:, p] = c
            s, w = yield from self.score_chunks(seqs)
            state.move_scores[p] = s
            i = int(s.argmin())
            if float(s[i]) < state.score - IMPROVEMENT:
                state.seq, state.score, state.worst = seqs[i].clone(), float(s[i]), float(w[i])
                changed = True
        return changed

    def pair_pool(self, state: _Descent, p: int) -> torch.Tensor:
        """The candidates a pair move tries at ``p``: the best single moves of the last
        sweep (in candidate order), or all when they are few or unscored."""
        c = self.cands(p)
        s = state.move_scores.get(p)
        if c.numel() <= PAIR_POOL or s is None or s.numel() != c.numel():
            return c
        keep = torch.zeros(c.numel(), dtype=torch.bool, device=c.device)
        keep[s.argsort()[:PAIR_POOL]] = True
        return c[keep]

    def pair_move(self, state: _Descent) -> Generator[Tick, None, bool]:
        """Change two positions at once (a local minimum of single changes, e.g. two
        swapped tokens): the rows farthest from the span are the suspects. Returns
        whether the score improved."""
        seq = state.seq
        L = int(seq.shape[0])
        rows = self.rows(seq.unsqueeze(0))[0]
        movable = [p for p in range(1, L - 1) if self.cands(p).numel() > 1]
        suspects = sorted(movable, key=lambda p: -float(rows[p]))[:PAIR_SUSPECTS]
        best: tuple[float, torch.Tensor, float] | None = None
        for a in range(len(suspects)):
            for b in range(a + 1, len(suspects)):
                pa, pb = suspects[a], suspects[b]
                grid = torch.cartesian_prod(self.pair_pool(state, pa), self.pair_pool(state, pb))
                seqs = seq.unsqueeze(0).repeat(int(grid.shape[0]), 1)
                seqs[:, pa] = grid[:, 0]
                seqs[:, pb] = grid[:, 1]
                s, w = yield from self.score_chunks(seqs)
                i = int(s.argmin())
                if float(s[i]) < state.score - IMPROVEMENT and (best is None or float(s[i]) < best[0]):
                    best = (float(s[i]), seqs[i].clone(), float(w[i]))
        if best is None:
            return False
        state.score, state.seq, state.worst = best
        return True

    def record(self, seq: torch.Tensor, worst: float, *, keep_inexact: bool = True) -> Found | None:
        """Keep an assembled sequence; a new one in the span is a sentence."""
        if keep_inexact or worst < self.thr:
            self.results.append((seq, worst))
        key = tuple(seq.tolist())
        if worst < self.thr and key not in self.keys:
            self.keys.add(key)
            self.found.append(seq)
            return Found(key, True, worst)
        return None

    def enumerate_length(self, L: int, pools: list[torch.Tensor]) -> Iterator[Found | Step | Tick]:
        """All ``[CLS] pools... [SEP]`` sequences of one length, verified in chunks."""
        kept = yield from self._enumerate(L, pools)
        for seq, worst in kept:
            item = self.record(seq, worst)
            if item is not None:
                yield item
        yield Step(L - 1, (tuple(self.results[-1][0].tolist()),), len(self.found), self.checked)

    def _enumerate(
        self, L: int, pools: list[torch.Tensor]
    ) -> Generator[Tick, None, list[tuple[torch.Tensor, float]]]:
        """The ``batch_size`` nearest of all combinations (``yield from``); every
        combination evaluated is charged to the budget."""
        combos = torch.cartesian_prod(*pools) if len(pools) > 1 else pools[0].reshape(-1, 1)
        combos = combos.reshape(combos.shape[0], -1)
        n = int(combos.shape[0])
        seqs = self.frame(L).unsqueeze(0).repeat(n, 1)
        seqs[:, 1 : L - 1] = combos
        worst_parts = []
        for start in range(0, n, SCORE_CHUNK):
            worst_parts.append(self.rows(seqs[start : start + SCORE_CHUNK]).max(-1).values)
            yield self.tick(L)
        worst = torch.cat(worst_parts)
        order = worst.argsort()[: self.batch_size]
        return [(seqs[i].clone(), float(worst[i])) for i in order.tolist()]

    def assemble(self, L: int, greedy: bool) -> Generator[Found | Step | Tick, None, bool | None]:
        """One restart at length ``L``; returns whether it found a new sentence (``None``:
        the length cannot be assembled)."""
        seq = self.initial(L, greedy)
        if seq is None:
            return None
        seq, worst = yield from self.descend(seq)
        item = self.record(seq, worst)
        yield Step(L - 1, (tuple(seq.tolist()),), len(self.found), self.checked)
        if item is not None:
            yield item
        return item is not None

    def best_effort(self) -> Iterator[Found]:
        """Fill up to the batch size with the nearest failed assemblies (inexact)."""
        for seq, worst in sorted(self.results, key=lambda r: r[1]):
            if len(self.found) >= self.batch_size:
                break
            key = tuple(seq.tolist())
            if key in self.keys:
                continue
            self.keys.add(key)
            self.found.append(seq)
            yield Found(key, False, worst)

    def run(self) -> Iterator[Found | Step | Warn | Tick]:
        """Lengths longest first, then round-robin restarts (see :func:`encoder_search`)."""
        positions = sorted(p for p in self.accepted if p is not None)
        lengths = [p + 1 for p in positions if p >= 2 and bool((self.accepted[p] == self.sep_id).any())]
        if not lengths:
            return
        self.thr = self.calibrate(lengths)
        if self.use_beam:
            yield from _BeamStage(self).run()
        # The assembly stage runs alone, after the beam with FALLBACK, or when the beam
        # found nothing: the beam relies on block-0 rows seeing mostly their neighbours
        # (pretrained BERTs); a random-init model's rows see the whole sequence.
        assemble = not self.use_beam or FALLBACK or not self.found
        order = sorted(lengths, reverse=True) if assemble else []
        misses = {L: 0 for L in order}
        first_round = True
        while order and not self.done:
            for L in list(order):
                if self.done:
                    break
                pools = [self.cands(p) for p in range(1, L - 1)]
                if any(c.numel() == 0 for c in pools):
                    order.remove(L)
                    continue
                if math.prod(int(c.numel()) for c in pools) <= min(EXHAUSTIVE_CAP, self.left):
                    # Few combinations: enumerate them all (the paper's exhaustive search).
                    yield from self.enumerate_length(L, pools)
                    order.remove(L)
                    continue
                new = yield from self.assemble(L, greedy=first_round)
                if new is None:
                    order.remove(L)
                elif new:
                    misses[L] = 0
                else:
                    misses[L] += 1
                    if misses[L] >= RESTART_PATIENCE:
                        order.remove(L)
            first_round = False
        if self.left <= 0:
            yield Warn(WarningCode.COMBINATIONS_CAPPED.value, float(self.max_combinations))
        yield from self.best_effort()
