"""DAGER's step 3: the family's sequence search, its items turned into events.

Split from :mod:`dager.attack` (which runs the steps in order): the set-up of the decoder
search (block 1's span, the MLP span, the candidates per position) or the encoder search,
the stream of :class:`~dager.events.PrefixesExtended`, :class:`~dager.events.SentenceRecovered`
and heartbeat events, the decoders' greedy completion of missing sentences, and the partial
sentences reported at the time budget. A test swaps :func:`encoder_search` here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dager.encoder import encoder_search
from dager.encoder_tuning import ENCODER_THREADS
from dager.events import (
    AttackWarning,
    DagerEvent,
    PrefixesExtended,
    SearchProgress,
    SentenceRecovered,
    WarningCode,
)
from dager.layers import BertHooks, DecoderHooks
from dager.placement import place_tokens
from dager.precision import clear_cut
from dager.search import Found, Step, Thresholds, Tick, Warn, decoder_greedy, decoder_search
from dager.span import Span
from dager.zoo import ModelBundle
from fedclient.threads import on_threads

if TYPE_CHECKING:  # pragma: no cover
    from dager.attack import _Run

log = logging.getLogger("dager.attack")  # the attack's log, as before the split


@dataclass(frozen=True)
class _Decoding:
    """What the decoder's greedy completion reuses from the search set-up."""

    candidates: Callable[[int], torch.Tensor | None]
    start: tuple[int, ...]
    max_length: int


def _search_stream(
    run: _Run, accepted: dict[int | None, torch.Tensor], span2: Span
) -> tuple[Iterator[Found | Step | Warn | Tick], _Decoding | None]:
    """Step 3's set-up: the family's sequence search over the accepted tokens."""
    hooks, config, bundle = run.hooks, run.config, run.bundle
    if isinstance(hooks, DecoderHooks):
        span_mlp = run.span(hooks.mlp_parameters(0), rank_hint=span2.rank)
        log.debug("MLP span done at %.3f s", run.deadline.elapsed())
        layer2 = config.layer2_threshold
        if run.block1_unclear and clear_cut(span_mlp):
            # A half-precision update whose block-1 cut is unclear while block 0's MLP-input
            # cut is clear (llama-small-random bf16: ratios 1.21 and 8.0): the MLP-input
            # check, a function of the whole prefix as well, certifies alone.
            layer2, run.unclear_gap = math.inf, None
        start: tuple[int, ...] = ()
        if bundle.family.prepend_bos and bundle.bos_token_id is not None:
            start = (bundle.bos_token_id,)
        if hooks.positional:
            max_length = max((p for p in accepted if p is not None), default=-1) + 1

            def candidates(pos: int) -> torch.Tensor | None:
                return accepted.get(pos)

        else:
            max_length = hooks.num_positions()
            bag = accepted.get(None)

            def candidates(pos: int) -> torch.Tensor | None:
                return bag

        stream = decoder_search(
            hooks,
            candidates,
            span_mlp,
            span2,
            start=start,
            thresholds=Thresholds(
                mlp=config.layer2_threshold, layer2=layer2,
                drift=run.update.kind == "fedavg-delta",
            ),
            max_prefixes=config.max_prefixes,
            max_length=max_length,
            final_keep=run.update.batch_size,
        )
        return stream, _Decoding(candidates, start, max_length)
    if isinstance(hooks, BertHooks):
        placement = None
        if not run.deadline.expired():  # a screen: past the time budget the search goes without it
            gradients = hooks.input_matrix(run.update, hooks.attention_parameters(0))
            placement = place_tokens(hooks.embedding_parts(), gradients, accepted, run.update.batch_size)
        stream = encoder_search(
            hooks,
            accepted,
            span2,
            special_ids=_special_ids(bundle.tokenizer),
            batch_size=run.update.batch_size,
            threshold=config.layer2_threshold,
            max_combinations=config.max_combinations,
            placement=placement,
        )
        return on_threads(stream, ENCODER_THREADS), None
    raise TypeError(f"unknown hooks type {type(hooks).__name__}")  # pragma: no cover


def _search_step(run: _Run, stream: Iterator[Found | Step | Warn | Tick]) -> Iterator[DagerEvent]:
    """Step 3: turn the search's items into events; stop it at the time budget."""
    try:
        for item in stream:
            if isinstance(item, Tick):
                yield SearchProgress(position=item.position, checked=item.checked, seconds=run.deadline.elapsed())
            elif isinstance(item, Step):
                run.last_prefixes = item.prefixes
                yield PrefixesExtended(
                    position=item.position,
                    prefixes=item.prefixes,
                    num_prefixes=item.num_prefixes,
                    num_checked=item.num_checked,
                )
            elif isinstance(item, Found):
                ids = _finish_ids(run.bundle, run.update.task, item.token_ids)
                yield _recovered(run, Found(ids, item.exact, item.distance))
            elif isinstance(item, Warn):
                code = WarningCode(item.code)
                if code is WarningCode.BUDGET_EXHAUSTED:
                    if run.budget_exhausted:
                        continue
                    run.budget_exhausted = True
                yield AttackWarning(code, item.value)
            else:  # pragma: no cover
                raise TypeError(f"unknown search item {type(item).__name__}")
            warning = run.out_of_time()
            if warning is not None:
                yield warning
                return
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # frees the search's prefixes and caches now, not at garbage collection


def _greedy_step(run: _Run, decoding: _Decoding, span2: Span) -> Iterator[DagerEvent]:
    """Step 3b (decoders): complete the missing sentences greedily, marked inexact.

    Bounded by the number of missing sentences and by the deadline: past it the
    candidates run dry, which ends the sentence being grown and every later one.
    """

    def candidates(pos: int) -> torch.Tensor | None:
        return None if run.deadline.expired() else decoding.candidates(pos)

    hooks = run.hooks
    assert isinstance(hooks, DecoderHooks)
    for item in decoder_greedy(
        hooks,
        candidates,
        span2,
        start=decoding.start,
        count=run.update.batch_size - len(run.found),
        max_length=min(decoding.max_length, 4 * hooks.hidden_size),
        exclude={f.token_ids for f in run.found},
    ):
        ids = _finish_ids(run.bundle, run.update.task, item.token_ids)
        yield _recovered(run, Found(ids, False, item.distance))
    warning = run.out_of_time()
    if warning is not None:
        yield warning


def _partial_prefixes(run: _Run) -> Iterator[DagerEvent]:
    """At the time budget: the search's surviving prefixes, as inexact partial sentences."""
    start = 1 if run.bundle.family.prepend_bos and run.bundle.bos_token_id is not None else 0
    known = {f.token_ids for f in run.found}
    for prefix in run.last_prefixes:
        if len(run.found) >= run.update.batch_size:
            break
        if len(prefix) > start and prefix not in known:
            yield _recovered(run, Found(prefix, False, 1.0))


def _recovered(run: _Run, item: Found) -> SentenceRecovered:
    run.found.append(item)
    return SentenceRecovered(
        index=len(run.found) - 1,
        token_ids=item.token_ids,
        text=run.bundle.decode(item.token_ids),
        exact=item.exact and run.certifiable,  # dropout, unclear cut: a passed check certifies nothing
        distance=item.distance,
    )


def _finish_ids(bundle: ModelBundle, task: str, ids: tuple[int, ...]) -> tuple[int, ...]:
    """Add the special tokens the client appended but that carry no gradient.

    Next-token prediction: the appended EOS predicts nothing, so it is not in the span.
    """
    fam = bundle.family
    if task == "next-token" and fam.eos_for_next_token and bundle.eos_token_id is not None:
        if not ids or ids[-1] != bundle.eos_token_id or len(ids) == 1:
            return (*ids, bundle.eos_token_id)
    return tuple(ids)


def _special_ids(tokenizer: object) -> tuple[int, ...]:
    """``(cls, sep, fill)``: the encoder's frame tokens and a neutral filler."""
    cls_id = int(tokenizer.cls_token_id)
    sep_id = int(tokenizer.sep_token_id)
    mask = getattr(tokenizer, "mask_token_id", None)
    return (cls_id, sep_id, int(mask if mask is not None else tokenizer.pad_token_id))
