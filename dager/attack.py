"""The DAGER attack as one event stream (Petrov et al., NeurIPS 2024, arXiv 2405.15586).

The attacker sees the model (with its tokenizer) and the shared update, nothing else:
not the batch, not the attention mask. :func:`iter_dager` yields typed events from
:mod:`dager.events`; :func:`run_dager` drains it.

Steps: (1) the rank of block 0's attention-input gradient (how many distinct inputs),
(2) the layer-1 token filter over the whole vocabulary, (3) the sequence search with
block 1's span (decoders grow prefixes, encoders assemble sequences), (4) the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from dager.config import DagerConfig
from dager.events import (
    AttackFinished,
    AttackStarted,
    AttackWarning,
    DagerEvent,
    DagerResult,
    PrefixesExtended,
    SearchProgress,
    SentenceRecovered,
    SpectrumComputed,
    TokensFiltered,
)
from dager.layers import BertHooks, DecoderHooks, FamilyHooks, hooks_for
from dager.encoder import encoder_search
from dager.search import Found, Step, Thresholds, Tick, Warn, decoder_greedy, decoder_search
from dager.span import Span, gap_threshold, span_of
from dager.zoo import ModelBundle
from fedclient.errors import LabInputError
from fedclient.update import SharedUpdate

log = logging.getLogger(__name__)

OVER_CAPACITY = 0.95
"""A rank at or above this fraction of d means the span may be saturated."""

POSITION_BLOCK = 16
"""Positions filtered per block; the filter stops at the first block with no token."""


class IncompleteUpdateError(LabInputError):
    """The shared update lacks a parameter the attack reads."""


def required_parameters(bundle: ModelBundle) -> list[str]:
    """Names of the parameters whose update DAGER reads.

    Pass them to ``fedclient.compute_update(parameters=...)`` to compute only those.
    """
    return hooks_for(bundle.model).required_parameters()


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


def _span(hooks: FamilyHooks, update: SharedUpdate, names: list[str], config: DagerConfig, device: str) -> Span:
    matrix = hooks.input_matrix(update, names).to(device)
    return span_of(matrix, tolerance=config.rank_tolerance, by_gap=config.noise_tolerant)


def iter_dager(
    bundle: ModelBundle, update: SharedUpdate, *, config: DagerConfig | None = None
) -> Iterator[DagerEvent]:
    """Recover the client's sentences from its shared update, as a stream of events.

    Args:
        bundle: the model the server sent, with its tokenizer.
        update: the client's shared update (gradients by name, batch size, task).
        config: attack settings; defaults need no tuning.

    Yields:
        One :class:`AttackStarted`, then :class:`SpectrumComputed`,
        :class:`TokensFiltered`, :class:`PrefixesExtended`, :class:`SentenceRecovered`
        and :class:`AttackWarning` events, and one :class:`AttackFinished` last.

    Raises:
        IncompleteUpdateError: the update lacks a parameter the attack reads.
        UnsupportedModelError: the model family has no DAGER hooks.
    """
    config = config or DagerConfig()
    t0 = time.perf_counter()
    hooks = hooks_for(bundle.model)
    names = hooks.required_parameters()
    missing = [n for n in names if n not in update]
    if missing:
        raise IncompleteUpdateError(
            f"The shared update lacks {len(missing)} parameter(s) DAGER reads (e.g. {missing[0]!r}); "
            "share the full update or at least dager.required_parameters(bundle)."
        )
    device = config.device
    yield from _attack(bundle, update, config, hooks, names, device, t0)


# As a decorator, torch.no_grad() re-enters at every resume and restores the caller's grad
# mode at every yield: a ``with`` block around ``yield`` would leave autograd off in the
# consumer's thread while the generator is suspended (and on in another thread resuming it).
@torch.no_grad()
def _attack(
    bundle: ModelBundle,
    update: SharedUpdate,
    config: DagerConfig,
    hooks: FamilyHooks,
    names: list[str],
    device: str,
    t0: float,
) -> Iterator[DagerEvent]:
    d = hooks.hidden_size
    span1 = _span(hooks, update, hooks.attention_parameters(0), config, device)
    over = span1.rank >= OVER_CAPACITY * d
    yield AttackStarted(
        model=bundle.name,
        task=update.task,
        batch_size=update.batch_size,
        hidden_size=d,
        rank=span1.rank,
        over_capacity=over,
        parameters=tuple(names),
    )
    yield _spectrum_event(1, span1)
    if over:
        yield AttackWarning("over_capacity", float(span1.rank))
    if update.padding_side != "right":
        yield AttackWarning("left_padding", 0.0)
    span2 = _span(hooks, update, hooks.attention_parameters(1), config, device)
    yield _spectrum_event(2, span2)
    log.debug("spans done at %.3f s", time.perf_counter() - t0)

    # Layer-1 token filter.
    accepted: dict[int | None, torch.Tensor] = {}
    dists, first_pos = _layer1(hooks, span1)
    thr1 = config.layer1_threshold
    if thr1 is None:
        thr1 = gap_threshold(dists, min_keep=max(1, span1.rank), max_keep=64 * span1.rank + 4096)
    k = min(config.top_k_plot, dists.shape[1])
    for row in range(dists.shape[0]):
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
        )
    del dists
    log.debug("layer-1 filter done at %.3f s", time.perf_counter() - t0)

    found: list[Found] = []
    budget = False
    if isinstance(hooks, DecoderHooks):
        span_mlp = _span(hooks, update, hooks.mlp_parameters(0), config, device)
        log.debug("MLP span done at %.3f s", time.perf_counter() - t0)
        start: tuple[int, ...] = ()
        if bundle.family.prepend_bos and bundle.bos_token_id is not None:
            start = (bundle.bos_token_id,)
        if hooks.positional:
            max_length = max((p for p in accepted if p is not None), default=-1) + 1

            def candidates(pos: int) -> torch.Tensor | None:
                return accepted.get(pos)

        else:
            max_length = hooks.num_positions()
            bag = accepted[None]

            def candidates(pos: int) -> torch.Tensor | None:
                return bag

        thresholds = Thresholds(mlp=config.layer2_threshold, layer2=config.layer2_threshold)
        stream = decoder_search(
            hooks,
            candidates,
            span_mlp,
            span2,
            start=start,
            thresholds=thresholds,
            max_prefixes=config.max_prefixes,
            max_length=max_length,
            noise_tolerant=config.noise_tolerant,
            final_keep=update.batch_size,
        )
    elif isinstance(hooks, BertHooks):
        stream = encoder_search(
            hooks,
            accepted,
            span2,
            special_ids=_special_ids(bundle.tokenizer),
            batch_size=update.batch_size,
            threshold=config.layer2_threshold,
            max_combinations=config.max_combinations,
        )
    else:  # pragma: no cover - every registered hook is one of the two
        raise TypeError(f"unknown hooks type {type(hooks).__name__}")

    for item in stream:
        if isinstance(item, Tick):
            yield SearchProgress(position=item.position, checked=item.checked, seconds=time.perf_counter() - t0)
        elif isinstance(item, Step):
            yield PrefixesExtended(
                position=item.position,
                prefixes=item.prefixes,
                num_prefixes=item.num_prefixes,
                num_checked=item.num_checked,
            )
        elif isinstance(item, Found):
            ids = _finish_ids(bundle, update.task, item.token_ids)
            found.append(Found(ids, item.exact, item.distance))
            yield SentenceRecovered(
                index=len(found) - 1,
                token_ids=ids,
                text=bundle.decode(ids),
                exact=item.exact,
                distance=item.distance,
            )
        elif isinstance(item, Warn):
            if item.code == "budget_exhausted":
                if budget:
                    continue
                budget = True
            yield AttackWarning(item.code, item.value)
        else:  # pragma: no cover
            raise TypeError(f"unknown search item {type(item).__name__}")
    if isinstance(hooks, DecoderHooks) and (not found or over or budget) and len(found) < update.batch_size:
        # Best effort: complete the missing sentences greedily, marked inexact.
        for item in decoder_greedy(
            hooks,
            candidates,
            span2,
            start=start,
            count=update.batch_size - len(found),
            max_length=min(max_length, 4 * hooks.hidden_size),
            exclude={f.token_ids for f in found},
        ):
            ids = _finish_ids(bundle, update.task, item.token_ids)
            found.append(Found(ids, False, item.distance))
            yield SentenceRecovered(
                index=len(found) - 1, token_ids=ids, text=bundle.decode(ids), exact=False, distance=item.distance
            )
    if not found or not all(f.exact for f in found):
        yield AttackWarning("incomplete", float(sum(not f.exact for f in found)))
    result = DagerResult(
        sentences=tuple(bundle.decode(f.token_ids) for f in found),
        token_ids=tuple(f.token_ids for f in found),
        exact=tuple(f.exact for f in found),
        rank=span1.rank,
        hidden_size=d,
        over_capacity=over,
        budget_exhausted=budget,
        seconds=time.perf_counter() - t0,
    )
    yield AttackFinished(result)


def _accepted(drow: torch.Tensor, thr: float) -> torch.Tensor:
    ok = (drow < thr).nonzero().squeeze(1)
    return ok[drow[ok].argsort()]


def _finish_ids(bundle: ModelBundle, task: str, ids: tuple[int, ...]) -> tuple[int, ...]:
    """Add the special tokens the client appended but that carry no gradient.

    Next-token prediction: the appended EOS predicts nothing, so it is not in the span.
    """
    fam = bundle.family
    if task == "next-token" and fam.eos_for_next_token and bundle.eos_token_id is not None:
        if not ids or ids[-1] != bundle.eos_token_id or len(ids) == 1:
            return (*ids, bundle.eos_token_id)
    return tuple(ids)


def _spectrum_event(layer: int, span: Span) -> SpectrumComputed:
    sv = span.singular_values.cpu()
    top = float(sv[0]) if sv.numel() else 0.0
    if 0 < span.rank < sv.numel() and top > 0:
        cut = (float(sv[span.rank - 1]) * float(sv[span.rank])) ** 0.5 / top
    else:
        cut = span.tolerance**0.5
    return SpectrumComputed(layer=layer, singular_values=sv, rank=span.rank, tolerance=cut)


def _layer1(hooks: FamilyHooks, span: Span) -> tuple[torch.Tensor, int]:
    """Layer-1 distances ``(P, V)`` for the occupied positions (or ``(1, V)``).

    Positions are filtered in blocks until a block holds no in-span token: a
    position is occupied when its best token is far closer to the span than the
    vocabulary's typical distance (the geometric middle of the two, in log terms).
    At most ``rank`` positions can be occupied (each needs its own input).
    """
    filt = hooks.layer1_filter(span)
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
    dists = torch.cat(blocks, dim=0)[:max(1, occupied_until)]
    return dists, 0


def _special_ids(tokenizer: object) -> tuple[int, ...]:
    """``(cls, sep, fill)``: the encoder's frame tokens and a neutral filler."""
    cls_id = int(tokenizer.cls_token_id)
    sep_id = int(tokenizer.sep_token_id)
    mask = getattr(tokenizer, "mask_token_id", None)
    return (cls_id, sep_id, int(mask if mask is not None else tokenizer.pad_token_id))
