"""Encoder sequence search of DAGER (Petrov et al. 2024, Sec. 4.3).

Two stages share one budget and one record of found sentences (:class:`_EncoderSearch`):
a left-to-right beam over block-0 rows with repairs (:class:`_BeamStage`, new), then,
when :data:`FALLBACK` is set, the earlier assembly search (coordinate descent on whole
sequences, exhaustive enumeration of small lengths). Every sequence or row evaluated
is charged to ``max_combinations`` (a row of a length-``L`` sequence costs ``1/L``), a
:class:`~dager.search.Tick` follows every scored chunk, and an exhausted budget ends
in the ``combinations_capped`` warning. Only sequences whose every block-1 input row
lies in the layer-2 span (the exact check) are reported exact.

What the measurements showed (minilm-l6, pretrained, d=384; medium set, B=8, batch 0:
8 sentences, 147 tokens, 96 distinct, lengths 15..24):

* Layer 1 cannot place tokens at B=8, and no threshold, per-position ranking or
  centring changes that. The embedding is ``LN(tok + pos + type)``, additive up to the
  per-row scale ``1/sigma``, so the span of the 147 true inputs contains each token
  part and each position part separately: its rank is 120 = 96 tokens + 24 positions,
  not 147. Every batch token at every occupied position then lies in the span to
  float32 round-off (best wrong pair 1.7e-7..3e-7, worst true pair 2.5e-7..4.8e-7), so
  ``gap_threshold`` is not what lets 96 candidates through, and the true tokens rank
  anywhere up to 83 of 96 by layer-1 distance. ``[SEP]`` is in the bag, so it passes
  at every position and gives no lengths. At B=4 some batches have fewer pairs than
  tokens + positions, and there layer 1 is position-specific (4 candidates per position).
* Block-0 rows are local. Replacing the token at ``j`` moves rows ``j-1..j+1`` to
  0.1..0.3 and every other row to ~0.02. The row at ``p`` with its left context right,
  one random filler and ``[SEP]`` to its right ranks the true token first among 96 in
  85-93% of positions (top 8: 98-99%). The frame's length barely matters: ``p+3`` does
  as well as the true length. Truncating the sequence (no ``[SEP]``) does not work:
  true rows sit at ~0.1 there. The row before ``p`` (``p`` as its right neighbour)
  alone ranks it first only 32% of the time. So prefixes grow left to right like the
  decoder search, one row per candidate (:class:`_RowModel`: keys and values once per
  prefix, the feed-forward block only on the asked row), and every prefix closed by
  ``[SEP]`` is checked exactly.
* The first positions are weak because they have little left context: the true token
  ranks up to ~10 of 96 at positions 1-2. The beam is wide there
  (:data:`EARLY_WIDTH`). Most misses still happen there (a lost prefix never returns).
* The beam fills with variants of a few sentences (one early token wrong; they score
  almost alike because rows mostly see their neighbours), which crowd the others out:
  at most :data:`FAMILY_SIZE` members of a family (Hamming radius
  :data:`FAMILY_FRACTION` of the length) are kept.
* With the right length the ``[SEP]`` row sits below ~0.1 (0.2 with the wrong length).
  Such near sentences get repairs: single moves scored by rows ``q-1..q+1`` with the
  whole context, and pair moves when those stall. This recovers sentences with one
  or two wrong tokens. Most near endings are unrelated sequences, though, and those
  stay inexact.
* Block 0's MLP-input span (``intermediate.dense``) is exact as well, and 8x cheaper
  per row (no feed-forward). It ranks worse with a random right context (first 73%,
  top 8 90%), and the shared update DAGER asks for does not include it. Not used.
* Result (``benchmarks/dager_bench.py --rows minilm-med-4 minilm-med-8``,
  OMP_NUM_THREADS=1, CPU seconds per batch on a loaded 2-core machine): B=4 90.6%
  exact (29/32) at 5.6 CPU s, B=8 50% (16/32) at 16.6 CPU s. The earlier search got
  33% at 20 s and 0% at 33 s. Targets not met (B=4 >= 95% in 3 s, B=8 >= 90% in 10 s).
  The misses are prefixes lost at positions 1-3. The cost is mostly the feed-forward
  block on ``BEAM_WIDTH x candidates`` rows per position.
* Whole-sequence coordinate descent from random assemblies (the earlier search)
  recovered 0/32 sentences at B=8 in 33 s per batch. The layer-2 score is flat far
  from a sentence, and each move costs ``c`` whole sequences.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import torch

from dager.events import WarningCode
from dager.layers import BertHooks
from dager.search import Found, Step, Tick, Warn
from dager.span import Span

log = logging.getLogger(__name__)


FALLBACK = False
"""Run the assembly search after the beam when sentences are still missing."""

EXHAUSTIVE_CAP = 4096
"""Lengths whose candidate combinations number at most this are enumerated exactly."""

PAIR_SUSPECTS = 4
"""Encoder descent: positions (farthest rows) tried in pairs at a local minimum."""

PAIR_POOL = 12
"""Candidates per suspect position in a pair move: the best single moves of the last
sweep there. Bounds a pair grid at 144 sequences: at B=8 a position holds ~100
layer-1 candidates (the batch's whole bag of tokens), and a full 100x100 grid per
pair spent a 40k budget on one pair move."""

ENCODER_CEILING = 1e-3
"""Encoder layer-2 threshold never exceeds this: in-span sequences sit at float32
round-off (1e-7..1e-5), and a failed assembly can sit far below random probes."""

THRESHOLD_FRACTION = 1e-3
"""Automatic threshold: this fraction of the nearest random probe's worst row."""

NUM_PROBES = 8
"""Random sequences that measure the off-span level."""

PROBE_LOW_ID = 1000
"""Probe tokens are drawn from ids at or above this (BERT vocabularies keep special
and unused tokens below it)."""

MAX_SWEEPS = 8
"""Coordinate-descent sweeps per assembled sequence."""

RESTART_PATIENCE = 4
"""Restarts of a length without a new sentence before the length is dropped."""

IMPROVEMENT = 1e-9
"""A move is kept when it lowers the score by more than this (float noise)."""

SCORE_CHUNK = 128
"""Sequences scored at once; a :class:`Tick` follows each chunk. 128 sequences of ~20
tokens take ~0.25 s on one minilm-l6 CPU thread, so heartbeats stay under ~0.3 s."""

DISTANCE_FLOOR = 1e-12
"""Row distances are clamped here before the log (an exact 0 is round-off)."""


def encoder_search(
    hooks: BertHooks,
    accepted: dict[int | None, torch.Tensor],
    span2: Span,
    *,
    special_ids: tuple[int, ...],
    batch_size: int,
    threshold: float | None,
    max_combinations: int,
    generator: torch.Generator | None = None,
    beam: bool = True,
) -> Iterator[Found | Step | Warn | Tick]:
    """Recover encoder sequences from per-position candidates (Sec. 4.3, heuristic).

    First the beam (:class:`_BeamStage`): prefixes grow left to right. A candidate at
    ``p`` is scored by the distance of its own block-1 input row to the layer-2 span,
    with the prefix to its left and a random filler and ``[SEP]`` to its right. Each
    prefix keeps its outlying children. The beam keeps the best :data:`BEAM_WIDTH`, at
    most :data:`FAMILY_SIZE` per family of near-identical prefixes. Every prefix closed
    by ``[SEP]`` is checked whole (exact check). Near misses with the right length get
    repairs. See the module docstring for the measurements behind this design.

    Then, with ``beam=False`` (or :data:`FALLBACK`), the assembly search:
    sentence ends come first: ``[SEP]`` among a position's layer-1 candidates means a
    sequence of that length may exist. For each length, a sequence is assembled from
    the per-position candidates by coordinate descent on the WHOLE sequence: each
    position in turn tries every candidate there (the others held) and keeps the one
    whose full sequence has the smallest mean log distance of all its block-1 inputs
    to the layer-2 span (attention is bidirectional: a wrong token anywhere perturbs
    every row, so the whole sequence is the score, not the varied row). A sequence
    whose every row lies in the span (worst distance below the threshold) is a
    sentence. At a local minimum of single changes, pairs of the positions whose rows
    are farthest from the span change together (their best :data:`PAIR_POOL` single
    moves each).

    Restarts break the collapse onto one dominant sentence: the B sentences together
    use every layer-1 candidate, so each restart starts from candidates that the
    sentences found so far do not use at that position (a set-cover preference),
    randomised by ``generator``. Lengths are tried longest first (their last
    positions hold only their own tokens), then round-robin until ``batch_size``
    sentences are found or every length stops yielding new ones. Lengths whose
    candidate product is small are enumerated exactly. Every evaluated sequence
    counts against ``max_combinations``.

    Args:
        hooks: BERT-family hooks.
        accepted: position -> layer-1 candidate ids (nearest first).
        span2: span of block 1's attention-input gradient.
        special_ids: ``(cls_id, sep_id)`` and optionally a neutral fill id (unused).
        batch_size: sequences in the client's batch (the most to look for).
        threshold: layer-2 acceptance threshold; ``None``: automatic (a fixed
            fraction of the off-span level measured with random probe sequences,
            capped at :data:`ENCODER_CEILING`).
        max_combinations: budget of evaluated sequences.
        generator: seeds the probes, the beam's fillers and the restarts.
        beam: run the beam stage (the default); ``False`` runs the assembly search
            alone, as before the beam existed.

    Yields:
        :class:`Tick` after every scored chunk, :class:`Step` per beam position
        (the live prefixes) and per assembled sequence, :class:`Found` per sentence (exact ones first, then the nearest
        failed assemblies up to ``batch_size``, marked inexact), and
        :class:`Warn` (``combinations_capped``) when the budget is hit.
    """
    search = _EncoderSearch(
        hooks,
        accepted,
        span2,
        special_ids=special_ids,
        batch_size=batch_size,
        threshold=threshold,
        max_combinations=max_combinations,
        generator=generator,
        beam=beam,
    )
    yield from search.run()


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
    ) -> None:
        self.use_beam = beam
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
        self._cands: dict[int, torch.Tensor] = {}

    # -- small helpers -------------------------------------------------------------

    @property
    def left(self) -> int:
        """Sequences the budget still allows."""
        return self.max_combinations - self.checked

    @property
    def done(self) -> bool:
        return len(self.found) >= self.batch_size or self.left <= 0

    def cands(self, p: int) -> torch.Tensor:
        """``(c,)`` layer-1 candidates at position ``p`` without ``[CLS]``/``[SEP]``."""
        if p not in self._cands:
            c = self.accepted[p].to(self.device)
            self._cands[p] = c[~torch.isin(c, self._specials)]
        return self._cands[p]

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


# ---------------------------------------------------------------------------------
# Left-to-right beam over block-0 rows (the first stage; see the module docstring)

BEAM_WIDTH = 32
"""Prefixes kept per position by the beam (after the family rule)."""

BEAM_CHILDREN = 8
"""The most children a prefix may keep at one position."""

BEAM_Z = 2.5
"""A child is kept when its row distance lies this many robust deviations (MAD) below
the median of its siblings' (the best child is always kept)."""

EARLY_POSITIONS = 1
"""Positions 1..this are scored with the least left context (the true token ranks up
to ~10 of 96 at positions 1-2 at B=8): the beam is :data:`EARLY_WIDTH` wide there, so
the root keeps every plausible first token. Widening positions 2-3 as well (96
prefixes, 8 children each) cost 1.6x the time and found fewer sentences (6/16 against
7/16 on two B=8 batches): the early scores are too noisy for a wider beam to help."""

EARLY_WIDTH = 96
"""Beam width at the first :data:`EARLY_POSITIONS` positions."""

FAMILY_FRACTION = 0.34
"""Two prefixes that differ in at most this fraction of their positions are one family
(a sentence and its variants with an early token wrong): they score alike because rows
mostly see their neighbours."""

FAMILY_SIZE = 3
"""Members of one family the beam keeps (the best first), so variants of a few
sentences cannot crowd out the others."""

SEP_NEAR = 0.1
"""An ending whose [SEP] row lies below this relative distance has the right length
(a wrong length puts the [SEP] row at ~0.2 on minilm-l6) and is repaired when inexact."""

REPAIR_ROUNDS = 4
"""Coordinate-repair rounds of one near sentence."""

REPAIR_POSITIONS = 3
"""Positions (the worst rows' tokens) re-chosen per repair round."""

PAIR_SHORTLIST = 6
"""Candidates per position in a repair's pair move (its best single moves): 36 whole
sequences per pair."""

MAX_REPAIRS_PER_STEP = 4
"""Near endings repaired at one beam step (best [SEP] rows first)."""


@dataclass
class _Prefix:
    """A beam entry: its tokens, the sum of its settled rows' log distances and the log
    distance of its newest row (measured with its right neighbour still unknown)."""

    ids: tuple[int, ...]
    settled: float
    last: float

    @property
    def score(self) -> float:
        return self.settled + self.last


class _RowModel:
    """Block 0's output at chosen rows of many sequences that differ at one position.

    In block 0 a row depends on the whole sequence only through attention; the keys and
    values of a sequence are computed once, a candidate token contributes its own
    key/value at the varied position, and only the asked rows go through the
    feed-forward block (the expensive part). So scoring ``c`` candidates at one position
    costs ``c`` rows per asked row, not ``c`` sequences of ``L`` rows.
    """

    def __init__(self, hooks: BertHooks) -> None:
        self.hooks = hooks
        self.blk = hooks.blocks[0]
        self.att = self.blk.attention.self
        self.heads = int(self.att.num_attention_heads)
        self.head_dim = int(self.att.attention_head_size)

    def embed(self, ids: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Embeddings of ``(n, L)`` sequences, or of ``(c,)`` tokens all at ``position``."""
        if position is None:
            return self.hooks.emb(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        pos = torch.full((1, ids.shape[0]), position, dtype=torch.long, device=ids.device)
        return self.hooks.emb(input_ids=ids.unsqueeze(0), token_type_ids=torch.zeros_like(pos), position_ids=pos)[0]

    def rows(self, ctx: torch.Tensor, position: int, cand: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``(m, c, len(rows), d)``: rows of each context with each candidate at ``position``.

        Args:
            ctx: ``(m, L)`` sequences (the token at ``position`` is ignored).
            position: the varied position.
            cand: ``(c,)`` candidate tokens there.
            rows: row indices to compute (any, including ``position``).
        """
        m, L = ctx.shape
        c = int(cand.shape[0])
        H, dh = self.heads, self.head_dim
        att = self.att
        e_ctx = self.embed(ctx)  # (m, L, d)
        e_c = self.embed(cand, position)  # (c, d)
        k_ctx = att.key(e_ctx).reshape(m, L, H, dh)
        v_ctx = att.value(e_ctx).reshape(m, L, H, dh)
        k_c = att.key(e_c).reshape(c, H, dh)
        v_c = att.value(e_c).reshape(c, H, dh)
        scale = 1.0 / math.sqrt(dh)
        others = torch.arange(L, device=ctx.device) != position
        k_o, v_o = k_ctx[:, others], v_ctx[:, others]  # (m, L-1, H, dh)
        outs = []
        for r in rows:
            if r == position:
                q = att.query(e_c).reshape(c, H, dh)
                s_o = torch.einsum("chd,mlhd->mchl", q, k_o) * scale  # (m, c, H, L-1)
                s_c = ((q * k_c).sum(-1) * scale).expand(m, c, H).unsqueeze(-1)  # (m, c, H, 1)
                resid = e_c.expand(m, c, -1)
            else:
                q = att.query(e_ctx[:, r]).reshape(m, H, dh)
                s_o = torch.einsum("mhd,mlhd->mhl", q, k_o).unsqueeze(1).expand(m, c, H, L - 1) * scale
                s_c = torch.einsum("mhd,chd->mch", q, k_c).unsqueeze(-1) * scale
                resid = e_ctx[:, r].unsqueeze(1).expand(m, c, -1)
            a = torch.cat([s_o, s_c], dim=-1).softmax(-1)
            mix = torch.einsum("mchl,mlhd->mchd", a[..., :-1], v_o) + a[..., -1:] * v_c  # (m, c, H, dh)
            outs.append((mix.reshape(m * c, H * dh), resid.reshape(m * c, -1)))
        mix = torch.cat([o[0] for o in outs])
        resid = torch.cat([o[1] for o in outs])
        hidden = self.blk.attention.output(mix, resid)  # dense + residual + LayerNorm
        out = self.blk.output(self.blk.intermediate(hidden), hidden)  # (R*m*c, d)
        return out.reshape(len(rows), m, c, -1).permute(1, 2, 0, 3)


class _BeamStage:
    """The beam and its repairs, run on an :class:`_EncoderSearch`'s shared state."""

    def __init__(self, search: "_EncoderSearch") -> None:
        self.s = search
        self.rm = _RowModel(search.hooks)
        self.tried: set[tuple[int, ...]] = set()

    def log_dist(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """Log relative distances of ``(..., d)`` rows; charges them as ``1/length``
        sequence each (the budget counts sequences of block-0 work)."""
        self.s.charge_rows(int(rows.shape[:-1].numel()), length)
        return self.s.span2.distance(rows).clamp(min=DISTANCE_FLOOR).log()

    def run(self) -> Iterator[Found | Step | Tick]:
        """Grow prefixes from ``[CLS]`` to the last occupied position; at each
        position first close every prefix with ``[SEP]`` (exact check), then extend."""
        s = self.s
        positions = sorted(p for p in s.accepted if p is not None)
        if not positions:
            return
        last = max(positions)
        beam = [_Prefix((s.cls_id,), 0.0, 0.0)]
        for p in range(1, last + 1):
            if s.done or not beam:
                return
            if p >= 2:
                yield from self.endings(beam, p)
                if s.done:
                    return
            cand = s.cands(p)
            if p >= last or cand.numel() == 0:
                return
            beam = yield from self.extend(beam, p, cand)
            yield Step(p, tuple(b.ids for b in beam), len(beam), s.checked)

    def extend(self, beam: list[_Prefix], p: int, cand: torch.Tensor) -> Generator[Tick, None, list[_Prefix]]:
        """Children of every prefix at position ``p``, scored by row ``p`` (its left
        neighbours known, a random filler and ``[SEP]`` to its right)."""
        s = self.s
        c = int(cand.numel())
        fill = int(cand[int(torch.randint(c, (1,), generator=s.gen))])
        L = p + 3
        # [CLS] prefix <candidate> <filler> [SEP]; the token written at p is ignored.
        ctx = torch.tensor([[*b.ids, s.sep_id, fill, s.sep_id] for b in beam], device=s.device)  # (m, L)
        per_chunk = max(1, (SCORE_CHUNK * L) // c)
        parts = []
        for start in range(0, len(beam), per_chunk):
            out = self.rm.rows(ctx[start : start + per_chunk], p, cand, [p])[:, :, 0]  # (m', c, d)
            parts.append(self.log_dist(out, L))
            yield s.tick(L)
            if s.left <= 0:
                return []  # out of budget: the beam ends here
        r = torch.cat(parts)  # (m, c)
        med = r.median(dim=1, keepdim=True).values
        mad = (r - med).abs().median(dim=1, keepdim=True).values.clamp(min=1e-6)
        z = (r - med) / mad
        # Every parent keeps its best children while the beam has room (the root keeps
        # a beam's worth: first tokens have the least context and rank worst), then the
        # outliers among its best BEAM_CHILDREN; with few candidates all go on.
        width = EARLY_WIDTH if p <= EARLY_POSITIONS else BEAM_WIDTH
        sure = max(1, width // len(beam))
        order = z.argsort(dim=1)[:, : max(sure, BEAM_CHILDREN)]
        children: list[_Prefix] = []
        for i, b in enumerate(beam):
            keep = [
                j
                for n, j in enumerate(order[i].tolist())
                if n < sure or (n < BEAM_CHILDREN and (c <= BEAM_CHILDREN or float(z[i, j]) < -BEAM_Z))
            ]
            kept = cand[keep]
            settled = torch.zeros(len(keep), dtype=torch.float64)
            if p >= 2:
                # The parent's newest row, now with its right neighbour known.
                out = self.rm.rows(ctx[i : i + 1], p, kept, [p - 1])[0, :, 0]
                settled = self.log_dist(out, L)
            for n, j in enumerate(keep):
                children.append(_Prefix((*b.ids, int(cand[j])), b.settled + float(settled[n]), float(r[i, j])))
        yield s.tick(L)
        return _by_family(children, p, width)

    def endings(self, beam: list[_Prefix], p: int) -> Iterator[Found | Tick]:
        """Every prefix closed by ``[SEP]`` at ``p``, checked whole; near ones repaired."""
        s = self.s
        seqs = torch.tensor([[*b.ids, s.sep_id] for b in beam], device=s.device)  # (m, p+1)
        dist = []
        for start in range(0, int(seqs.shape[0]), SCORE_CHUNK):
            dist.append(s.rows(seqs[start : start + SCORE_CHUNK]))
            yield s.tick(p + 1)
        d = torch.cat(dist)  # (m', p+1)
        seqs = seqs[: int(d.shape[0])]
        worst = d.max(-1).values
        near = []
        for i in range(int(seqs.shape[0])):
            item = s.record(seqs[i], float(worst[i]))
            if item is not None:
                yield item
            elif float(worst[i]) >= s.thr and float(d[i, -1]) < SEP_NEAR:
                near.append((float(d[i, -1]), i))
        for _, i in sorted(near)[:MAX_REPAIRS_PER_STEP]:
            if s.done:
                return
            key = tuple(seqs[i].tolist())
            if key in self.tried:
                continue
            self.tried.add(key)
            seq, w = yield from self.repair(seqs[i].clone())
            item = s.record(seq, w)
            if item is not None:
                yield item

    def repair(self, seq: torch.Tensor) -> Generator[Tick, None, tuple[torch.Tensor, float]]:
        """Re-choose the tokens at the worst rows, each with its whole context known
        (rows ``q-1..q+1`` scored for every candidate at ``q``)."""
        s = self.s
        L = int(seq.shape[0])
        d = s.rows(seq.unsqueeze(0))[0]
        for _round in range(REPAIR_ROUNDS):
            if float(d.max()) < s.thr or s.left <= 0:
                break
            suspects = [int(q) for q in d[1 : L - 1].argsort(descending=True)[:REPAIR_POSITIONS] + 1]
            changed = False
            shortlist: dict[int, torch.Tensor] = {}
            for q in suspects:
                cand = s.cands(q)
                if cand.numel() <= 1:
                    continue
                rows = [r for r in (q - 1, q, q + 1) if 1 <= r <= L - 1]
                out = self.rm.rows(seq.unsqueeze(0), q, cand, rows)[0]  # (c, R, d)
                score = self.log_dist(out, L).sum(-1)
                shortlist[q] = cand[score.argsort()[:PAIR_SHORTLIST]]
                best = int(cand[int(score.argmin())])
                if best != int(seq[q]):
                    seq[q] = best
                    changed = True
                yield s.tick(L)
            if not changed:
                # A local minimum of single moves (two neighbouring tokens wrong): the
                # worst row's token and a neighbour change together, scored whole.
                seq, changed = yield from self.pair_repair(seq, d, shortlist)
                if not changed:
                    break
            d = s.rows(seq.unsqueeze(0))[0]
        return seq, float(d.max())

    def pair_repair(
        self, seq: torch.Tensor, d: torch.Tensor, shortlist: dict[int, torch.Tensor]
    ) -> Generator[Tick, None, tuple[torch.Tensor, bool]]:
        """Two neighbouring positions at the worst row, each from its best single
        moves; returns the best pair's sequence if it lowers the mean log distance."""
        s = self.s
        L = int(seq.shape[0])
        j = int(d[1 : L - 1].argmax()) + 1
        base = float(d.clamp(min=DISTANCE_FLOOR).log().mean())
        best: tuple[float, torch.Tensor] | None = None
        for a, b in ((j - 1, j), (j, j + 1)):
            if a < 1 or b > L - 2:
                continue
            pa = shortlist.get(a, s.cands(a)[:PAIR_SHORTLIST])
            pb = shortlist.get(b, s.cands(b)[:PAIR_SHORTLIST])
            if pa.numel() == 0 or pb.numel() == 0:
                continue
            grid = torch.cartesian_prod(pa, pb).reshape(-1, 2)
            seqs = seq.unsqueeze(0).repeat(int(grid.shape[0]), 1)
            seqs[:, a], seqs[:, b] = grid[:, 0], grid[:, 1]
            score, _ = yield from s.score_chunks(seqs)
            i = int(score.argmin())
            if float(score[i]) < base - IMPROVEMENT and (best is None or float(score[i]) < best[0]):
                best = (float(score[i]), seqs[i].clone())
        if best is None:
            return seq, False
        return best[1], True


def _by_family(children: list[_Prefix], p: int, width: int) -> list[_Prefix]:
    """The best ``width`` children, at most :data:`FAMILY_SIZE` per family."""
    children.sort(key=lambda c: c.score)
    radius = int(FAMILY_FRACTION * p)
    leaders: list[torch.Tensor] = []
    counts: list[int] = []
    kept: list[_Prefix] = []
    for c in children:
        x = torch.tensor(c.ids)
        family = None
        if leaders and radius > 0:  # radius 0: distinct prefixes are distinct families
            close = ((torch.stack(leaders) != x).sum(-1) <= radius).nonzero()
            if close.numel():
                family = int(close[0])
        if family is None:
            leaders.append(x)
            counts.append(1)
            kept.append(c)
        elif counts[family] < FAMILY_SIZE:
            counts[family] += 1
            kept.append(c)
        if len(kept) >= width:
            break
    return kept
