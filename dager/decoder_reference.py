"""The reference decoder search: the per-pair search before the screen.

Slow; kept so that tests can check that :func:`dager.search.decoder_search` finds
exactly what it finds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dager.decoder_steps import _calibrate, _candidates_at, _dead_ends, _survivors
from dager.hooks_decoder import DecoderHooks
from dager.search_items import CANDIDATE_CHUNK, Found, Step, Thresholds, Tick, Warn
from dager.span import Span


@dataclass
class _RefBeam:
    prefixes: list[tuple[int, ...]]
    k: torch.Tensor  # (n, H, l, dh)
    v: torch.Tensor  # (n, H, l, dh)
    dist: torch.Tensor  # (n,) worst distance along each prefix
    last_h: list[torch.Tensor | None] = field(default_factory=list)


def _reference_decoder_search(
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
) -> Iterator[Found | Step | Warn | Tick]:
    """Grow prefixes position by position; yield finished sentences as they end.

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
        probe_generator: seeds the probe tokens.
        final_keep: after an exhausted budget, yield at most this many survivors.

    Yields:
        :class:`Step` after every position, :class:`Found` per sentence,
        :class:`Warn` when the budget is exhausted, :class:`Tick` after every chunk.
    """
    dev = hooks.device
    beam = _ref_start(hooks, start)
    exhausted = False
    first = True
    for pos in range(len(start), max_length):
        cand = _candidates_at(candidates, pos, start, dev)
        if cand is None or not beam.prefixes:
            break
        n, t = len(beam.prefixes), int(cand.numel())
        if first and (thresholds.mlp is None or thresholds.layer2 is None):
            gen = probe_generator if probe_generator is not None else torch.Generator().manual_seed(0)
            for _ in _calibrate(hooks, cand, pos, beam.k[:1], beam.v[:1], span_mlp, span2, thresholds, gen):
                pass
        first = False
        keep: tuple[list[torch.Tensor], ...] = ([], [], [], [], [])
        has_ext = torch.zeros(n, dtype=torch.bool, device=dev)
        yield from _reference_scan(hooks, beam, cand, pos, (span_mlp, span2), thresholds, has_ext, keep)
        keep_pref = keep[0]
        yield from _dead_ends(beam.prefixes, beam.dist, has_ext, exhausted, start)
        if not keep_pref:
            beam.prefixes = []
            yield Step(pos, (), 0, n * t)
            break
        if sum(int(p.numel()) for p in keep_pref) > max_prefixes:
            exhausted = True
            yield Warn("budget_exhausted", float(max_prefixes))
        beam = _ref_next(beam, keep, cand, max_prefixes)
        yield Step(pos, tuple(beam.prefixes[:256]), len(beam.prefixes), n * t)
    yield from _survivors(beam.prefixes, beam.dist, exhausted, final_keep, start)


def _ref_start(hooks: DecoderHooks, start: tuple[int, ...]) -> _RefBeam:
    """The first beam: the given start tokens fed through block 0 (known, not searched)."""
    dev = hooks.device
    H, dh = hooks.num_heads, hooks.head_dim
    beam = _RefBeam(
        prefixes=[()],
        k=torch.zeros((1, H, 0, dh), device=dev),
        v=torch.zeros((1, H, 0, dh), device=dev),
        dist=torch.zeros(1, dtype=torch.float64, device=dev),
    )
    for pos, tok in enumerate(start):
        h, k, v = hooks.extend(torch.tensor([tok], device=dev), pos, beam.k, beam.v)
        beam.k = torch.cat([beam.k, k.unsqueeze(2)], dim=2)  # k: (1, H, dh)
        beam.v = torch.cat([beam.v, v.unsqueeze(2)], dim=2)
        beam.prefixes = [(*beam.prefixes[0], tok)]
    return beam


def _ref_next(
    beam: _RefBeam, keep: tuple[list[torch.Tensor], ...], cand: torch.Tensor, max_prefixes: int
) -> _RefBeam:
    """The next beam from a position's survivors: the nearest ``max_prefixes`` when
    there are more (ties in the order found)."""
    pi, ti, dist, ks, vs = (torch.cat(part) for part in keep)
    if pi.numel() > max_prefixes:
        order = dist.argsort()[:max_prefixes]
        pi, ti, dist, ks, vs = pi[order], ti[order], dist[order], ks[order], vs[order]
    cand_list = cand.tolist()
    return _RefBeam(
        prefixes=[(*beam.prefixes[p], cand_list[q]) for p, q in zip(pi.tolist(), ti.tolist())],
        k=ks,
        v=vs,
        dist=dist,
    )


def _reference_scan(
    hooks: DecoderHooks,
    beam: _RefBeam,
    cand: torch.Tensor,
    pos: int,
    spans: tuple[Span, Span],
    thresholds: Thresholds,
    has_ext: torch.Tensor,
    keep: tuple[list[torch.Tensor], ...],
) -> Iterator[Tick]:
    """Extend every prefix by every candidate, a chunk of prefixes at a time.

    Appends each chunk's survivors to ``keep`` (prefix and token indices, distances,
    key and value caches) and marks their prefixes in ``has_ext``.

    Args:
        spans: ``(span_mlp, span2)``.
    """
    span_mlp, span2 = spans
    keep_pref, keep_tok, keep_dist, new_k, new_v = keep
    n, t = len(beam.prefixes), int(cand.numel())
    chunk = max(1, CANDIDATE_CHUNK // t)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        h, k, v = hooks.extend(cand, pos, beam.k[s:e], beam.v[s:e])  # h: (m, t, d)
        m = e - s
        h = h.reshape(m * t, -1)
        d_mlp = span_mlp.distance(hooks.mlp_input(h))  # (m*t,)
        ok = d_mlp < thresholds.mlp
        idx = ok.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        h2 = hooks.mlp_residual(h[idx])
        d2 = span2.distance(hooks.layer2_input(h2))
        ok2 = d2 < thresholds.layer2
        idx2 = idx[ok2]
        if idx2.numel() == 0:
            continue
        pi = idx2 // t + s  # prefix index
        ti = idx2 % t  # token index
        dist = torch.maximum(torch.maximum(d_mlp[idx2], d2[ok2]), beam.dist[pi])
        has_ext[pi] = True
        keep_pref.append(pi)
        keep_tok.append(ti)
        keep_dist.append(dist)
        new_k.append(torch.cat([beam.k[pi], k[ti].unsqueeze(2)], dim=2))
        new_v.append(torch.cat([beam.v[pi], v[ti].unsqueeze(2)], dim=2))
        yield Tick(pos, e * t)
