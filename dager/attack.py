"""The DAGER attack as one event stream (Petrov et al., NeurIPS 2024, arXiv 2405.15586).

The attacker sees the model (with its tokenizer) and the shared update, nothing else:
not the batch, not the attention mask. :func:`iter_dager` yields typed events from
:mod:`dager.events`; :func:`run_dager` drains it.

Steps: (1) the rank of block 0's attention-input gradient (how many distinct inputs),
(2) the layer-1 token filter over the whole vocabulary, (3) the sequence search with
block 1's span (decoders grow prefixes, encoders assemble sequences), (4) the result.

Every run has a bounded cost (issue 13). A layer-1 span at or near full rank (a
defense's noise lifts every eigenvalue; a batch over the model's capacity fills it)
rejects no token, so the exact search cannot run: the verdict comes at step 1
(``span_full``) and the run ends there, unless the noise-tolerant best effort is asked
for. ``DagerConfig.time_budget_s`` is checked in the filter, after every item the
search yields (it yields a heartbeat at least every chunk of work) and in the greedy
completion; at the deadline the run ends with what it found (``time_budget``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import torch

from dager.config import DagerConfig
from dager.events import (
    AttackFinished,
    AttackStarted,
    AttackWarning,
    DagerEvent,
    DagerResult,
    SpectrumComputed,
    StopReason,
    TokensFiltered,
    WarningCode,
)
from dager.attack_search import _Decoding, _greedy_step, _partial_prefixes, _search_step, _search_stream
from dager.dropout_search import Input, distance_cut, dropout_search, masked_candidates
from dager.layers import SCREEN, DecoderHooks, FamilyHooks, hooks_for
from dager.lora import as_base_update, capacity, is_lora_update
from dager.precision import clear_cut, half_precision_span, is_half, span_tolerance
from dager.search import Found
from dager.span import Span, gap_threshold, span_of
from dager.zoo import ModelBundle
from fedclient.errors import LabInputError
from fedclient.update import SharedUpdate

log = logging.getLogger(__name__)

OVER_CAPACITY = 0.95
"""A rank at or above this fraction of d means the span may be saturated."""

POSITION_BLOCK = 16
"""Positions filtered per block; the filter stops at the first block with no token."""

BOUND_SAFE = 0.5 * SCREEN
"""Layer-1 thresholds at or above this are applied to fully computed distances only
(the lower-bound filter is exact below ``SCREEN``; half of it covers float32 round-off)."""


class IncompleteUpdateError(LabInputError):
    """The shared update lacks a parameter the attack reads."""


def required_parameters(bundle: ModelBundle, *, dropout: bool = False) -> list[str]:
    """Names of the parameters whose update DAGER reads.

    Pass them to ``fedclient.compute_update(parameters=...)`` to compute only those.
    With ``dropout`` (a client that trains with dropout on) they include block 0's
    attention output projection, which the dropout search reads.
    """
    hooks = hooks_for(bundle.model)
    names = hooks.required_parameters()
    if dropout:
        return names
    optional = set(hooks.optional_parameters())
    return [n for n in names if n not in optional]


def run_dager(
    bundle: ModelBundle, update: SharedUpdate, *, config: DagerConfig | None = None
) -> DagerResult:
    """Run the attack to the end and return its result (drains :func:`iter_dager`)."""
    result: DagerResult | None = None
    for event in iter_dager(bundle, update, config=config):
        if isinstance(event, AttackFinished):
            result = event.result
    if result is None:  # pragma: no cover - iter_dager always finishes
        raise RuntimeError("the DAGER stream ended without a result")
    return result


def iter_dager(
    bundle: ModelBundle, update: SharedUpdate, *, config: DagerConfig | None = None
) -> Iterator[DagerEvent]:
    """Recover the client's sentences from its shared update, as a stream of events.

    The cost is bounded: a full layer-1 span (a defense's noise, or a batch over the
    model's capacity) ends the run at the rank step (``span_full``) unless
    ``config.noise_tolerant`` asks for the best effort, and ``config.time_budget_s``
    ends it with what was found (``time_budget``).

    Args:
        bundle: the model the server sent, with its tokenizer.
        update: the client's shared update (gradients by name, batch size, task).
        config: attack settings; defaults need no tuning.

    Yields:
        One :class:`AttackStarted`, then :class:`SpectrumComputed`,
        :class:`TokensFiltered`, :class:`PrefixesExtended`, :class:`SearchProgress`,
        :class:`SentenceRecovered` and :class:`AttackWarning` events, and one
        :class:`AttackFinished` last.

    Raises:
        IncompleteUpdateError: the update lacks a parameter the attack reads.
        UnsupportedModelError: the model family has no DAGER hooks.
    """
    config = config or DagerConfig()
    t0 = _now()
    hooks = hooks_for(bundle.model)
    names = hooks.required_parameters()
    # A LoRA client shares adapters: the span is read from their A gradients (dager.lora).
    lora_capacity = capacity(update, hooks.attention_parameters(0), hooks.hidden_size)
    lora_capacity2 = capacity(update, hooks.attention_parameters(1), hooks.hidden_size)
    update = as_base_update(update, names, bundle.model, hooks.hidden_size)
    optional = set(hooks.optional_parameters())
    missing = [n for n in names if n not in update and n not in optional]
    if missing:
        raise IncompleteUpdateError(
            f"The shared update lacks {len(missing)} parameter(s) DAGER reads (e.g. {missing[0]!r}); "
            "share the full update or at least dager.required_parameters(bundle)."
        )
    deadline = _Deadline(t0, config.time_budget_s)
    run = _Run(bundle=bundle, update=update, config=config, hooks=hooks, deadline=deadline, capacity=lora_capacity,
               capacity2=lora_capacity2)
    yield from _attack(run, names)


def _now() -> float:
    """The attack's clock (a module function, so tests can inject a fake one)."""
    return time.perf_counter()


@dataclass(frozen=True)
class _Deadline:
    """The time budget of one run, measured from ``start`` on :func:`_now`."""

    start: float
    budget: float | None

    def elapsed(self) -> float:
        return _now() - self.start

    def expired(self) -> bool:
        return self.budget is not None and self.elapsed() >= self.budget


@dataclass
class _Run:
    """One attack's inputs and what it has found so far (internal)."""

    bundle: ModelBundle
    update: SharedUpdate
    config: DagerConfig
    hooks: FamilyHooks
    deadline: _Deadline
    found: list[Found] = field(default_factory=list)
    budget_exhausted: bool = False
    stop: StopReason = StopReason.COMPLETE
    last_prefixes: tuple[tuple[int, ...], ...] = ()
    capacity: int = 0  # distinct inputs the span can hold: d, or k r for a LoRA update (0: d)
    capacity2: int = 0  # the same for block 1's span (LoRA: its own adapters' k r)
    unclear_gap: float | None = None  # a half-precision span's ratio at an unclear cut (dager.precision.CLEAR_CUT)
    block1_unclear: bool = False  # only block 1's span was unclear (block 0's MLP check may stand in)

    masks_solved: bool = False  # dropout: the search solved for the masks (dager.dropout_search)

    @property
    def dropout_rate(self) -> float:
        """The client's dropout rate (the server set it; 0: none)."""
        return float(self.update.info.get("dropout_rate", 0.0))

    @property
    def certifiable(self) -> bool:
        """Whether the exact check can certify a sentence: not on an update trained with
        dropout (its layer inputs carry masks the server cannot know) unless the dropout
        search solved for the masks, nor on a half-precision one whose span has no clear
        edge above the rounding (issue 11)."""
        return (self.dropout_rate <= 0.0 or self.masks_solved) and self.unclear_gap is None

    def span(self, names: list[str], rank_hint: int | None = None) -> Span:
        """The span of the named weights' input space (``rank_hint`` sizes the fast path's
        first sketch: a related layer's rank)."""
        matrix = self.hooks.input_matrix(self.update, names).to(self.config.device)
        if is_half(matrix.dtype) and not self.config.noise_tolerant:
            # A bf16/fp16 update: cut above its rounding bulk, not at the fp32 rule (dager.precision).
            span = half_precision_span(matrix, tolerance=self.config.rank_tolerance)
            if not clear_cut(span):
                self.unclear_gap = min(span.gap, self.unclear_gap or span.gap)
            return span
        tolerance = span_tolerance(self.update.kind, self.config.rank_tolerance)  # FedAvg: drift directions too
        return span_of(matrix, tolerance=tolerance, by_gap=self.config.noise_tolerant, rank_hint=rank_hint)

    def out_of_time(self) -> AttackWarning | None:
        """The ``time_budget`` warning the first time the deadline has passed, else ``None``."""
        if self.stop is StopReason.TIME_BUDGET or not self.deadline.expired():
            return None
        self.stop = StopReason.TIME_BUDGET
        log.debug("time budget of %.3g s reached", self.deadline.budget)
        return AttackWarning(WarningCode.TIME_BUDGET, float(self.deadline.budget or 0.0))


# As a decorator, torch.no_grad() re-enters at every resume and restores the caller's grad
# mode at every yield: a ``with`` block around ``yield`` would leave autograd off in the
# consumer's thread while the generator is suspended (and on in another thread resuming it).
@torch.no_grad()
def _attack(run: _Run, names: list[str]) -> Iterator[DagerEvent]:
    span1, over = yield from _rank_step(run, names)
    if over and not run.config.noise_tolerant:
        # A (nearly) full span rejects no token: the exact search cannot run, and
        # trying fills memory with whole-vocabulary candidates (issue 13).
        run.stop = StopReason.SPAN_FULL
        yield AttackWarning(WarningCode.SPAN_FULL, float(span1.rank))
        yield _finished(run, span1, over)
        return
    if run.dropout_rate > 0.0:
        if _dropout_ready(run):
            yield from _dropout_step(run, span1)
            yield _finished(run, span1, over)
            return
        yield AttackWarning(WarningCode.DROPOUT, run.dropout_rate)
    # Block 1 sees every token with its own prefix: more inputs than layer 1, where
    # repeated tokens coincide (at one position; anywhere under RoPE, about half).
    more = span1.rank // 4 if run.hooks.positional else span1.rank
    before = run.unclear_gap
    span2 = run.span(run.hooks.attention_parameters(1), rank_hint=span1.rank + more)
    yield _spectrum_event(2, span2)
    if before is None and run.unclear_gap is not None:
        run.block1_unclear = True
    d = run.hooks.hidden_size
    if not over and run.capacity2 and run.capacity2 < d and span2.rank >= OVER_CAPACITY * run.capacity2:
        # LoRA: block 1 reads one input per distinct prefix, more than layer 1's (token,
        # position) inputs; a rank-capped block-1 span cannot hold them all (dager.lora).
        over = True
        yield AttackWarning(WarningCode.OVER_CAPACITY, float(span2.rank))
    log.debug("spans done at %.3f s", run.deadline.elapsed())
    accepted = yield from _filter_step(run, span1)
    decoding: _Decoding | None = None
    stream = None
    if run.stop is StopReason.COMPLETE:
        stream, decoding = _search_stream(run, accepted, span2)  # may clear an unclear block-1 cut
    if run.unclear_gap is not None:
        yield AttackWarning(WarningCode.UNCLEAR_CUT, float(run.unclear_gap))
    if stream is not None:
        yield from _search_step(run, stream)
    if decoding is not None and run.stop is StopReason.COMPLETE:
        if (not run.found or over or run.budget_exhausted) and len(run.found) < run.update.batch_size:
            yield from _greedy_step(run, decoding, span2)
    if run.stop is StopReason.TIME_BUDGET:
        yield from _partial_prefixes(run)
    if not run.found or not all(f.exact for f in run.found):
        yield AttackWarning(WarningCode.INCOMPLETE, float(sum(not f.exact for f in run.found)))
    yield _finished(run, span1, over)


def _dropout_ready(run: _Run) -> bool:
    """Whether the dropout search can run: a decoder whose attention-output gradient is shared."""
    hooks = run.hooks
    if not isinstance(hooks, DecoderHooks) or is_lora_update(run.update):
        return False  # a LoRA update's frozen output projection shares nothing to check against
    names = hooks.optional_parameters()
    return bool(names) and all(n in run.update for n in names)


def _dropout_step(run: _Run, span1: Span) -> Iterator[DagerEvent]:
    """Steps 2-3 on a client that trained with dropout: masked inputs, then certified
    prefixes through block 0's attention output (:mod:`dager.dropout_search`)."""
    hooks, rate = run.hooks, run.dropout_rate
    basis1 = span1.basis.double().cpu()
    span_o = run.span(hooks.attention_output_parameters(0), rank_hint=span1.rank)
    run.masks_solved = True
    start: list[Input] = []
    bos = run.bundle.bos_token_id if run.bundle.family.prepend_bos else None
    if hooks.embedding_dropout:
        dists, first_pos = _layer1(hooks, span1, run.deadline, lower_bounds=False)
        by_pos = masked_candidates(hooks, dists, first_pos, basis1, rate, span1.rank, expired=run.deadline.expired)
        warning = run.out_of_time()
        if warning is not None:  # the masked inputs took the budget: nothing certified
            run.masks_solved = False
            yield warning
            return
        for pos in sorted(by_pos):
            ids = torch.tensor([c.token for c in by_pos[pos]])
            row = dists[pos - first_pos]
            top_d, top_i = torch.topk(row, k=min(run.config.top_k_plot, row.shape[0]), largest=False)
            yield TokensFiltered(position=pos, token_ids=ids, distances=row[ids], threshold=distance_cut(rate),
                                 vocab_distances=top_d, vocab_token_ids=top_i)
        max_length = max(by_pos, default=-1) + 1
        if sum(len(v) for v in by_pos.values()) < span1.rank:
            # An input not found cuts its sentence short there, and a cut sentence would
            # still pass every check: with inputs missing no sentence is certified.
            run.masks_solved = False
            yield AttackWarning(WarningCode.DROPOUT, rate)

        def candidates(pos: int) -> list[Input]:
            return by_pos.get(pos, [])
    else:
        accepted = yield from _filter_step(run, span1)
        bag = accepted.get(None, torch.zeros(0, dtype=torch.long))
        inputs = [Input(int(t), z) for t, z in zip(bag.tolist(), hooks.normed_inputs(bag, 0))]
        if bos is not None:
            start = [Input(bos, hooks.normed_inputs(torch.tensor([bos]), 0)[0])]
            inputs = [i for i in inputs if i.token != bos]
        max_length = min(hooks.num_positions(), span1.rank + len(start) + 1) if span1.rank else 0

        def candidates(pos: int) -> list[Input]:
            return inputs
    stream = dropout_search(hooks, span_o.basis.double().cpu(), rate, candidates, start=start,
                            max_length=max_length, max_prefixes=run.config.max_prefixes)
    yield from _search_step(run, stream)
    if not run.found or not all(f.exact for f in run.found):
        yield AttackWarning(WarningCode.INCOMPLETE, float(sum(not f.exact for f in run.found)))


def _rank_step(run: _Run, names: list[str]) -> Generator[DagerEvent, None, tuple[Span, bool]]:
    """Step 1: the layer-1 rank and the capacity verdict (a fraction of a second)."""
    d = run.hooks.hidden_size
    # About 16 tokens per sentence size the first sketch (it grows as needed); without
    # positions (RoPE) repeated tokens share one input, about half of them in a batch.
    per_sentence = 16 if run.hooks.positional else 8
    span1 = run.span(run.hooks.attention_parameters(0), rank_hint=per_sentence * run.update.batch_size)
    over = span1.rank >= OVER_CAPACITY * min(d, run.capacity or d)
    yield AttackStarted(
        model=run.bundle.name,
        task=run.update.task,
        batch_size=run.update.batch_size,
        hidden_size=d,
        rank=span1.rank,
        over_capacity=over,
        parameters=tuple(names),
        capacity=run.capacity if 0 < run.capacity < d else None,
    )
    yield _spectrum_event(1, span1)
    if over:
        yield AttackWarning(WarningCode.OVER_CAPACITY, float(span1.rank))
    if run.update.padding_side != "right":
        yield AttackWarning(WarningCode.LEFT_PADDING, 0.0)
    return span1, over


def _filter_step(run: _Run, span1: Span) -> Generator[DagerEvent, None, dict[int | None, torch.Tensor]]:
    """Step 2: the layer-1 token filter, one :class:`TokensFiltered` per position."""
    hooks, config = run.hooks, run.config
    accepted: dict[int | None, torch.Tensor] = {}
    dists, first_pos = _layer1(hooks, span1, run.deadline, lower_bounds=True)
    exact_below: float | None = SCREEN
    thr1 = _layer1_threshold(config, dists, span1)
    if thr1 >= BOUND_SAFE:
        # Above the cut the filter reported lower bounds: a threshold this high (noise)
        # could accept pairs by them, so every distance is computed in full.
        dists, first_pos = _layer1(hooks, span1, run.deadline, lower_bounds=False)
        exact_below = None
        thr1 = _layer1_threshold(config, dists, span1)
    k = min(config.top_k_plot, dists.shape[1])
    for row in range(dists.shape[0]):
        warning = run.out_of_time()
        if warning is not None:
            yield warning
            break
        drow = dists[row]
        top_d, top_i = torch.topk(drow, k=k, largest=False)
        ok = top_i[top_d < thr1] if int((drow < thr1).sum()) <= k else _accepted(drow, thr1)
        pos = (first_pos + row) if hooks.positional else None
        accepted[pos] = ok
        yield TokensFiltered(
            position=pos,
            token_ids=ok.cpu(),
            distances=drow[ok].cpu(),
            threshold=float(thr1),
            vocab_distances=top_d.cpu(),
            vocab_token_ids=top_i.cpu(),
            exact_below=exact_below,
        )
    log.debug("layer-1 filter done at %.3f s", run.deadline.elapsed())
    return accepted


def _finished(run: _Run, span1: Span, over: bool) -> AttackFinished:
    found = run.found
    return AttackFinished(
        DagerResult(
            sentences=tuple(run.bundle.decode(f.token_ids) for f in found),
            token_ids=tuple(f.token_ids for f in found),
            exact=tuple(f.exact and run.certifiable for f in found),  # as the SentenceRecovered events say
            rank=span1.rank,
            hidden_size=run.hooks.hidden_size,
            over_capacity=over,
            budget_exhausted=run.budget_exhausted,
            seconds=run.deadline.elapsed(),
            stop_reason=run.stop,
        )
    )


def _layer1_threshold(config: DagerConfig, dists: torch.Tensor, span1: Span) -> float:
    """The configured layer-1 threshold, or the largest gap of the distances."""
    if config.layer1_threshold is not None:
        return float(config.layer1_threshold)
    return gap_threshold(dists, min_keep=max(1, span1.rank), max_keep=64 * span1.rank + 4096)


def _accepted(drow: torch.Tensor, thr: float) -> torch.Tensor:
    ok = (drow < thr).nonzero().squeeze(1)
    return ok[drow[ok].argsort()]


def _spectrum_event(layer: int, span: Span) -> SpectrumComputed:
    sv = span.singular_values.cpu()
    top = float(sv[0]) if sv.numel() else 0.0
    if 0 < span.rank < sv.numel() and top > 0:
        cut = (float(sv[span.rank - 1]) * float(sv[span.rank])) ** 0.5 / top
    else:
        cut = span.tolerance**0.5
    return SpectrumComputed(layer=layer, singular_values=sv, rank=span.rank, tolerance=cut)


def _layer1(
    hooks: FamilyHooks, span: Span, deadline: _Deadline, *, lower_bounds: bool = False
) -> tuple[torch.Tensor, int]:
    """Layer-1 distances ``(P, V)`` for the occupied positions (or ``(1, V)``).

    With ``lower_bounds`` distances above the filter's float32 cut (``SCREEN``) may be
    lower bounds (exact below it; see ``dager.layers.BOUND_DIRECTIONS``).

    Positions are filtered in blocks until a block holds no in-span token: a
    position is occupied when its best token is far closer to the span than the
    vocabulary's typical distance (the geometric middle of the two, in log terms).
    At most ``rank`` positions can be occupied (each needs its own input). Past the
    deadline no further block is computed (the filter then covers fewer positions).
    """
    filt = hooks.layer1_filter(span, lower_bounds=lower_bounds)
    if not hooks.positional:
        return filt.distances(range(0, 1)), 0
    limit = min(hooks.num_positions(), max(1, span.rank))
    blocks: list[torch.Tensor] = []
    occupied_until = 0
    typical = None
    floor = None
    for start in range(0, limit, POSITION_BLOCK):
        block = filt.distances(range(start, min(limit, start + POSITION_BLOCK)))
        mins = block.min(dim=1).values  # (b,)
        if typical is None:
            typical = float(block[0].median())
            floor = float(mins[0])
        floor = min(floor, float(mins.min()))
        occ = mins < (max(floor, 1e-12) * typical) ** 0.5
        blocks.append(block)
        if bool(occ.any()):
            occupied_until = start + int(occ.nonzero().max()) + 1
        if not bool(occ.all()):
            break  # occupied positions are contiguous from 0: this block holds the end
        if deadline.expired():
            break
    dists = torch.cat(blocks, dim=0)[:max(1, occupied_until)]
    return dists, 0


