"""Sequence search of DAGER: grow prefixes (decoders) or assemble sequences (encoders).

Decoders (Petrov et al. 2024, Sec. 4.2): a prefix is extended by every layer-1
candidate token; block 0 is run on the new token only (a key/value cache holds the
prefix), and an extension survives when its block-1 attention input lies in the
layer-2 span. Beyond the paper, extensions are first checked against the span of
block 0's MLP input weight gradient, which needs no MLP forward, so most wrong
extensions cost one attention step. A prefix with no surviving extension is a whole
sentence.

Encoders (Sec. 4.3) are searched in :mod:`dager.encoder`. The pieces live in their
own modules, re-exported here under their old names: the items both searches yield
(:class:`Found`, :class:`Step`, :class:`Tick`, :class:`Warn`) and the budgets in
:mod:`dager.search_items`; the screen and key/value tables in
:mod:`dager.decoder_tables`; the shared steps (calibration) in
:mod:`dager.decoder_steps`; the greedy fallback in :mod:`dager.decoder_greedy`; the
slow reference search the tests compare with in :mod:`dager.decoder_reference`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator

import torch

from dager.decoder_greedy import decoder_greedy
from dager.decoder_reference import _RefBeam, _reference_decoder_search
from dager.decoder_steps import _calibrate, _candidates_at, _dead_ends, _exact_block, _layer2_distances, _survivors
from dager.decoder_tables import (
    SCREEN_MARGIN,
    SKETCH,
    SearchStats,
    _advance,
    _Beam,
    _best,
    _Pending,
    _by_weights,
    _chunk_shape,
    _Screen,
    _Selection,
    _start_beam,
)
from dager.hooks_decoder import _attention_weights, _mix_pairs
from dager.layers import DecoderHooks, _softmax_attend
from dager.search_items import (
    CANDIDATE_CHUNK,
    CHUNK_MACS,
    NUM_PROBES,
    SEARCH_BYTES,
    Found,
    Step,
    Thresholds,
    Tick,
    Warn,
    split_threshold,
)
from dager.span import Span

__all__ = [
    "CANDIDATE_CHUNK",
    "CHUNK_MACS",
    "NUM_PROBES",
    "SCREEN_MARGIN",
    "SEARCH_BYTES",
    "SKETCH",
    "Found",
    "SearchStats",
    "Step",
    "Thresholds",
    "Tick",
    "Warn",
    "_Beam",
    "_RefBeam",
    "_Screen",
    "_Selection",
    "_advance",
    "_best",
    "_calibrate",
    "_exact_block",
    "_layer2_distances",
    "_reference_decoder_search",
    "decoder_greedy",
    "decoder_search",
    "split_threshold",
]


def decoder_search(
    hooks: DecoderHooks,
    candidates: Callable[[int], torch.Tensor | None],
    span_mlp: Span,
    span2: Span,
    *,
    start: tuple[int, ...],
    thresholds: Thresholds,
    max_prefixes: int,
    max_length: int,
    probe_generator: torch.Generator | None = None,
    final_keep: int | None = None,
    byte_budget: int = SEARCH_BYTES,
    chunk_macs: float = CHUNK_MACS,
    stats: SearchStats | None = None,
) -> Iterator[Found | Step | Warn | Tick]:
    """Grow prefixes position by position; yield finished sentences as they end.

    Block 0's keys and values depend only on a token and its position, so each
    position's candidates are projected once, and a prefix is a row of indices into
    per-position key/value tables. Every (prefix, token) pair gets its attention
    weights and the :class:`_Screen` bound (from the weights alone while prefixes are
    short); only pairs the screen cannot reject get their mix, the output projection,
    the exact MLP-input span check, the MLP and the block-1 span check (pooled in
    blocks), exactly as in :func:`_reference_decoder_search`.

    Args:
        hooks: the family's decoder hooks.
        candidates: position -> ``(t,)`` layer-1 candidate ids, or ``None`` past the end.
        span_mlp: span of block 0's MLP input weight gradient (early rejection).
        span2: span of block 1's attention input weight gradient.
        start: the given prefix (Llama: ``(bos,)``; GPT-2: empty).
        thresholds: acceptance thresholds; ``None`` entries are set automatically at
            the first step (from the gap between the candidates' distances and those
            of random off-span probe tokens) and then kept.
        max_prefixes: the most prefixes kept alive; the best are kept beyond it.
        max_length: the last position to try is ``max_length - 1``.
        probe_generator: seeds the probe tokens and the screen's directions.
        final_keep: after an exhausted budget, yield at most this many survivors.
        byte_budget: bytes for key/value tables plus one chunk (:data:`SEARCH_BYTES`).
        chunk_macs: multiply-adds per chunk between heartbeats (exact blocks: >= ``EXACT_MIN_ROWS`` pairs).
        stats: filled with what the search held at most, when given.

    Yields:
        :class:`Step` after every position, :class:`Found` per sentence,
        :class:`Warn` when the budget is exhausted, :class:`Tick` after every chunk.
    """
    gen = probe_generator if probe_generator is not None else torch.Generator().manual_seed(0)
    table_budget, chunk_bytes = byte_budget // 2, byte_budget - byte_budget // 2  # tables | one chunk
    memo: dict = {}
    beam = _start_beam(hooks, start)
    exhausted = False
    screen: _Screen | None = None
    exact_pairs = _exact_block(hooks, chunk_macs, chunk_bytes, span_mlp.rank + span2.rank)
    for pos in range(len(start), max_length):
        cand = _candidates_at(candidates, pos, start, hooks.device)
        if cand is None or not beam.prefixes:
            break
        if screen is None:
            screen = yield from _first_step(
                hooks, beam, cand, pos, (span_mlp, span2), thresholds, gen, (chunk_macs, chunk_bytes, exact_pairs), memo
            )
        n, t, l = len(beam.prefixes), int(cand.numel()), int(beam.rows.shape[1])
        blocks = _blocks(hooks, screen, (l, n, t), (chunk_macs, chunk_bytes, exact_pairs), stats)
        select = _Selection(max_prefixes, t, stats)
        has_ext = torch.zeros(n, dtype=torch.bool, device=hooks.device)
        yield from _scan_position(
            hooks, beam, cand, pos, screen, (span_mlp, span2), thresholds, memo, blocks, select, has_ext,
            stats,
        )
        yield from _dead_ends(beam.prefixes, beam.dist, has_ext, exhausted, start)
        if select.order is None:
            beam.prefixes = []
            yield Step(pos, (), 0, n * t)
            break
        beam, cut = yield from _next_beam(beam, select, cand, table_budget, max_prefixes, stats)
        exhausted = exhausted or cut
        yield Step(pos, tuple(beam.prefixes[:256]), len(beam.prefixes), n * t)
    yield from _survivors(beam.prefixes, beam.dist, exhausted, final_keep, start)


def _first_step(
    hooks: DecoderHooks,
    beam: _Beam,
    cand: torch.Tensor,
    pos: int,
    spans: tuple[Span, Span],
    thresholds: Thresholds,
    gen: torch.Generator,
    sizes: tuple[float, int, int],
    memo: dict,
) -> Generator[Tick, None, _Screen]:
    """The first position: missing thresholds (:func:`_calibrate`), then the screen.

    Args:
        sizes: multiply-adds and bytes per chunk, pairs per exact block.
        memo: the search's per-token projections, shared with the calibration.
    """
    if thresholds.mlp is None or thresholds.layer2 is None:
        kc, vc = beam.caches(slice(0, 1))
        yield from _calibrate(hooks, cand, pos, kc, vc, *spans, thresholds, gen, *sizes, memo)
    return _Screen(hooks, spans[0], gen)


def _blocks(
    hooks: DecoderHooks, screen: _Screen, shape: tuple[int, int, int], sizes: tuple[float, int, int],
    stats: SearchStats | None,
) -> tuple[int, int, int]:
    """``(tokens, prefixes)`` per chunk and pairs per exact block, for ``n`` prefixes of
    length ``l`` and ``t`` tokens (``shape = (l, n, t)``; ``sizes`` as :func:`_first_step`'s)."""
    l, n, t = shape
    chunk_macs, chunk_bytes, exact_pairs = sizes
    tb, nb = _chunk_shape(hooks, l, n, t, chunk_macs, chunk_bytes, _by_weights(hooks, screen.active, l))
    if stats is not None:
        stats.max_chunk_pairs = max(stats.max_chunk_pairs, tb * nb, exact_pairs)
    return tb, nb, exact_pairs


def _next_beam(
    beam: _Beam, select: _Selection, cand: torch.Tensor, table_budget: int, max_prefixes: int, stats: SearchStats | None
) -> Generator[Warn, None, tuple[_Beam, bool]]:
    """The next position's beam from the selection; warns when a budget bit.

    Returns:
        The beam, and whether the prefix or table budget dropped extensions.
    """
    exhausted = select.overflow
    if exhausted:
        yield Warn("budget_exhausted", float(max_prefixes))
    pi, ti, dist, kn, vn = select.result()
    beam, cut = _advance(beam, pi, ti, dist, kn, vn, cand, table_budget)
    if cut:
        yield Warn("budget_exhausted", float(len(beam.prefixes)))
    if stats is not None:
        stats.max_table_bytes = max(stats.max_table_bytes, beam.table_bytes())
    return beam, exhausted or cut


def _scan_position(
    hooks: DecoderHooks,
    beam: _Beam,
    cand: torch.Tensor,
    pos: int,
    screen: _Screen,
    spans: tuple[Span, Span],
    thresholds: Thresholds,
    memo: dict,
    blocks: tuple[int, int, int],
    select: _Selection,
    has_ext: torch.Tensor,
    stats: SearchStats | None,
) -> Iterator[Tick]:
    """Check every (prefix, token) pair of one position, chunk by chunk.

    Each chunk gets the attention weights and the screen's bound (from the weights
    alone while prefixes are short, see :func:`_by_weights`; else from the mixes);
    only the pairs the screen cannot reject get their mix and the exact checks
    (:func:`_exact_checks`). Survivors go to ``select``; ``has_ext`` marks the
    prefixes that have one.

    Args:
        spans: ``(span_mlp, span2)``.
        blocks: ``(tokens, prefixes)`` per chunk and the pairs per exact block.
    """
    tb, nb, exact_pairs = blocks
    n, t = len(beam.prefixes), int(cand.numel())
    l = int(beam.rows.shape[1])
    by_weights = _by_weights(hooks, screen.active, l)
    value_rows = screen.value_side(beam.values) if by_weights else None  # (M, H, s), once per position
    pending = _Pending(exact_pairs)
    checked = 0
    for t0 in range(0, t, tb):
        toks = cand[t0 : t0 + tb]
        x, q, k, v = hooks.token_states(toks, pos, memo)
        side = screen.token_side(x) if screen.active else None
        own = (screen.value_side(v), v.norm(dim=-1)) if by_weights else None  # (t, H, s), (t, H)
        m_t = toks.numel()
        for s0 in range(0, n, nb):
            kc, vc = beam.caches(slice(s0, s0 + nb))  # (m, H, l, dh)
            m = kc.shape[0]
            if by_weights:
                attn = _attention_weights(q, kc, k, hooks.attention_scale)  # (m, t, H, l+1)
                prefix_side = (value_rows[beam.rows[s0 : s0 + nb]].transpose(1, 2), vc @ vc.transpose(-1, -2))
                keep = screen.keep_weights(attn, prefix_side, own, side, thresholds.mlp)
                flat_attn = attn.reshape(m * m_t, hooks.num_heads, l + 1)

                def mix_of(sub: torch.Tensor) -> torch.Tensor:
                    return _mix_pairs(flat_attn[sub], vc[sub // m_t], v[sub % m_t])

            else:
                mix = _softmax_attend(q, kc, vc, k, v, hooks.attention_scale)  # (m, t, H*dh)
                keep = screen.keep(mix, side, thresholds.mlp) if screen.active else None
                flat = mix.reshape(m * m_t, -1)

                def mix_of(sub: torch.Tensor) -> torch.Tensor:
                    return flat[sub]

            idx = keep.reshape(-1).nonzero().squeeze(1) if keep is not None else torch.arange(m * m_t, device=x.device)
            if stats is not None:
                stats.screened += int(idx.numel())
            e0 = 0
            while e0 < idx.numel():
                sub = idx[e0 : e0 + pending.room()]
                e0 += sub.numel()
                tl = sub % m_t
                pending.add(x[tl], mix_of(sub), sub // m_t + s0, t0 + tl, k[tl], v[tl])
                if pending.room() == 0:
                    _flush(hooks, spans, thresholds, pending, beam.dist, has_ext, select, t)
                    yield Tick(pos, checked)
            checked += m * m_t
            if stats is not None:
                stats.checked += m * m_t
            yield Tick(pos, checked)
    if pending.count:
        _flush(hooks, spans, thresholds, pending, beam.dist, has_ext, select, t)
        yield Tick(pos, checked)


def _flush(
    hooks: DecoderHooks,
    spans: tuple[Span, Span],
    thresholds: Thresholds,
    pending: _Pending,
    prefix_dist: torch.Tensor,
    has_ext: torch.Tensor,
    select: _Selection,
    t: int,
) -> None:
    """The exact checks of the pooled pairs; survivors go to ``select``."""
    x, mix, pi, ti, k, v = pending.take()
    good, dist = _exact_checks(hooks, spans, thresholds, x, mix)
    if good.numel():
        pi = pi[good]
        has_ext[pi] = True
        select.add(pi * t + ti[good], torch.maximum(dist, prefix_dist[pi]), k[good], v[good])


def _exact_checks(
    hooks: DecoderHooks, spans: tuple[Span, Span], thresholds: Thresholds, x: torch.Tensor, mix: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0 run exactly on ``p`` pairs: the MLP-input span check, then (on those
    that pass) the MLP and the block-1 span check, as the reference search does.

    Args:
        spans: ``(span_mlp, span2)``.
        x: ``(p, d)`` the pairs' token inputs.
        mix: ``(p, H * dh)`` their attention mixes.

    Returns:
        The indices (into the ``p`` pairs) passing both checks, and their distances
        (the larger of the two).
    """
    span_mlp, span2 = spans
    h = x + hooks.attention_output(mix)  # (p, d)
    d_mlp = span_mlp.distance(hooks.mlp_input(h))
    ok = (d_mlp < thresholds.mlp).nonzero().squeeze(1)
    if ok.numel() == 0:
        return ok, d_mlp[ok]
    d2 = span2.distance(hooks.layer2_input(hooks.mlp_residual(h[ok])))
    ok2 = d2 < thresholds.layer2
    return ok[ok2], torch.maximum(d_mlp[ok][ok2], d2[ok2])
