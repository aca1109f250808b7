"""Steps the decoder searches share: candidates, block sizes, calibration, endings."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch

from dager.hooks_decoder import DecoderHooks, _softmax_attend
from dager.search_items import CHUNK_MACS, NUM_PROBES, SEARCH_BYTES, Found, Thresholds, Tick, split_threshold
from dager.span import Span, gap_threshold

log = logging.getLogger("dager.search")  # the decoder search's log, wherever its steps live


def _candidates_at(
    candidates: Callable[[int], torch.Tensor | None], pos: int, start: tuple[int, ...], dev: torch.device
) -> torch.Tensor | None:
    """Position ``pos``'s candidates on ``dev``, or ``None`` when there are none.

    The given start tokens (BOS) never recur: a run of identical tokens reproduces its
    first position's inputs exactly under RoPE.
    """
    cand = candidates(pos)
    if cand is None or cand.numel() == 0:
        return None
    cand = cand.to(dev)
    if start:
        cand = cand[~torch.isin(cand, torch.tensor(start, device=dev))]
    return cand if cand.numel() else None


def _dead_ends(
    prefixes: list[tuple[int, ...]], dist: torch.Tensor, has_ext: torch.Tensor, exhausted: bool, start: tuple[int, ...]
) -> Iterator[Found]:
    """Prefixes with no valid extension are whole sentences."""
    for i in (~has_ext).nonzero().squeeze(1).tolist():
        if len(prefixes[i]) > len(start):
            yield Found(prefixes[i], not exhausted, float(dist[i]))


def _survivors(
    prefixes: list[tuple[int, ...]], dist: torch.Tensor, exhausted: bool, final_keep: int | None, start: tuple[int, ...]
) -> Iterator[Found]:
    """The prefixes alive at the end, nearest first."""
    order = dist.argsort().tolist() if prefixes else []
    if exhausted and final_keep is not None:
        order = order[:final_keep]  # a saturated search: only the nearest survivors
    for i in order:
        prefix = prefixes[i]
        if len(prefix) > len(start):
            yield Found(prefix, not exhausted, float(dist[i]))


EXACT_MIN_ROWS = 64
"""Fewest pairs one exact block runs through block 0 (unless fewer are waiting).

With few rows block 0's MLP only streams its weights: at d = 4096 (541 MB of SwiGLU
weights) one row costs 27 ms on one CPU core and a row of a 64-row block 6.6 ms. A
64-row block there takes ~0.4 s, still a prompt heartbeat."""


def _exact_block(hooks: DecoderHooks, chunk_macs: float, chunk_bytes: int, rank: int) -> int:
    """How many (prefix, token) pairs one block runs through block 0 exactly: a chunk's
    work, but at least :data:`EXACT_MIN_ROWS` (within the chunk's bytes)."""
    d, f = hooks.hidden_size, hooks.mlp_width
    macs = d * hooks.num_heads * hooks.head_dim + 3 * d * f + 2 * d * min(d, rank + 2)
    by_bytes = max(1, int(chunk_bytes / (4 * (8 * d + 3 * f))))
    return min(by_bytes, max(EXACT_MIN_ROWS, int(chunk_macs / macs)))


def _layer2_distances(
    hooks: DecoderHooks,
    tokens: torch.Tensor,
    pos: int,
    kc: torch.Tensor,
    vc: torch.Tensor,
    span2: Span,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-1 span distances ``(t,)`` of one prefix's extensions, with their keys/values."""
    parts, ks, vs = [], [], []
    for t0 in range(0, tokens.numel(), block):
        h, k, v = hooks.extend(tokens[t0 : t0 + block], pos, kc, vc)
        parts.append(span2.distance(hooks.layer2_input(hooks.mlp_residual(h[0]))))
        ks.append(k)
        vs.append(v)
    return torch.cat(parts), torch.cat(ks), torch.cat(vs)


def _calibrate(
    hooks: DecoderHooks,
    cand: torch.Tensor,
    pos: int,
    kc: torch.Tensor,
    vc: torch.Tensor,
    span_mlp: Span,
    span2: Span,
    thresholds: Thresholds,
    generator: torch.Generator,
    chunk_macs: float = CHUNK_MACS,
    chunk_bytes: int = SEARCH_BYTES // 2,
    block: int | None = None,
    memo: dict | None = None,
) -> Iterator[Tick]:
    """Set missing thresholds from the first step: candidates vs random probes.

    True extensions sit at round-off level; random tokens are off-span by orders of
    magnitude. Each threshold is the geometric mean of the low cluster's top and the
    lowest off-span distance (probes and the candidates above the largest gap).

    The MLP-input distances of every candidate need only block 0's attention. The
    block-1 distances need the MLP (at d = 4096 the bulk of the cost), so they are
    measured on the pairs that threshold can matter for: the candidates that pass
    the MLP-input check (the search rejects the others before their MLP) and the
    probes. Runs in blocks (the candidates may be the whole vocabulary) and yields a
    :class:`Tick` after each.

    Args:
        kc, vc: ``(1, H, l, dh)`` the first prefix's key/value cache.
        generator: draws the probe tokens.
        memo: the search's per-token projections (:meth:`DecoderHooks.token_states`),
            so the candidates' are computed once for calibration and search.
    """
    if block is None:
        block = _exact_block(hooks, chunk_macs, chunk_bytes, span_mlp.rank + span2.rank)
    probes = torch.randint(0, hooks.vocab_size, (NUM_PROBES,), generator=generator).to(cand.device)
    probes = probes[~torch.isin(probes, cand)]
    nc = cand.numel()
    tokens = torch.cat([cand, probes])
    parts = []
    for t0 in range(0, tokens.numel(), block):
        h = _one_prefix(hooks, tokens[t0 : t0 + block], pos, kc, vc, memo)
        parts.append(span_mlp.distance(hooks.mlp_input(h)))
        yield Tick(pos, 0)
    d_mlp = torch.cat(parts)
    if thresholds.mlp is None:
        thresholds.mlp = _split_at_gap(d_mlp[:nc], d_mlp[nc:], drift=thresholds.drift)
    if thresholds.layer2 is None:
        passing = cand[d_mlp[:nc] < thresholds.mlp]
        rows = torch.cat([passing, probes])
        parts = []
        for t0 in range(0, rows.numel(), block):
            h = _one_prefix(hooks, rows[t0 : t0 + block], pos, kc, vc, memo)
            parts.append(span2.distance(hooks.layer2_input(hooks.mlp_residual(h))))
            yield Tick(pos, 0)
        d2 = torch.cat(parts)
        thresholds.layer2 = _split_at_gap(d2[: passing.numel()], d2[passing.numel() :], drift=thresholds.drift)
    log.debug("decoder thresholds: mlp %.3g, layer2 %.3g", thresholds.mlp, thresholds.layer2)


def _one_prefix(
    hooks: DecoderHooks, tokens: torch.Tensor, pos: int, kc: torch.Tensor, vc: torch.Tensor, memo: dict | None
) -> torch.Tensor:
    """``(t, d)`` residual stream after block 0's attention: one prefix extended by
    each token (:meth:`DecoderHooks.extend` through the search's projections memo)."""
    x, q, k, v = hooks.token_states(tokens, pos, memo)
    return x + hooks.attention_output(_softmax_attend(q, kc, vc, k, v, hooks.attention_scale)[0])


DRIFT_GAP = 10.0
"""With drift (a FedAvg delta), the smallest ratio between neighbouring sorted distances
that counts as a gap between clusters."""


def _split_at_gap(dc: torch.Tensor, dp: torch.Tensor, *, drift: bool = False) -> float:
    """A threshold from candidate distances ``dc`` and probe distances ``dp``: below
    the largest gap is the true cluster, above it (with every probe) the off-span.

    With ``drift`` the cut is the highest gap of at least :data:`DRIFT_GAP` below the
    lowest probe (measured on a FedAvg delta, lr 1e-4, one epoch: true first tokens at
    5e-7 and 2e-3..2e-2, probes from 0.6; the largest gap split the true ones), falling
    back to the largest gap when there is none."""
    cut = gap_threshold(torch.cat([dc, dp]), min_keep=1)
    if drift and dp.numel():
        cut = _highest_gap(dc[dc < dp.min()], float(dp.min()), default=cut)
    return split_threshold(dc[dc < cut], torch.cat([dc[dc >= cut], dp]))


def _highest_gap(below: torch.Tensor, off: float, *, default: float) -> float:
    """The geometric middle of the highest gap of at least :data:`DRIFT_GAP` among the
    sorted distances ``below`` and the off-span level ``off``; ``default`` if none."""
    vals = torch.cat([below.to(torch.float64).clamp(min=1e-8).sort().values,
                      torch.tensor([off], dtype=torch.float64)])
    for i in range(vals.numel() - 1, 0, -1):
        if float(vals[i] / vals[i - 1]) >= DRIFT_GAP:
            return math.sqrt(float(vals[i]) * float(vals[i - 1]))
    return default
