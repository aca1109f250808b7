"""Sequence search of DAGER: grow prefixes (decoders) or assemble sequences (encoders).

Decoders (Petrov et al. 2024, Sec. 4.2): a prefix is extended by every layer-1
candidate token; block 0 is run on the new token only (a key/value cache holds the
prefix), and an extension survives when its block-1 attention input lies in the
layer-2 span. Beyond the paper, extensions are first checked against the span of
block 0's MLP input weight gradient, which needs no MLP forward, so most wrong
extensions cost one attention step. A prefix with no surviving extension is a whole
sentence.

Encoders (Sec. 4.3) are searched in :mod:`dager.encoder`; the items both searches
yield (:class:`Found`, :class:`Step`, :class:`Tick`, :class:`Warn`) live here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dager.layers import DecoderHooks
from dager.span import Span, gap_threshold

log = logging.getLogger(__name__)

CANDIDATE_CHUNK = 8192
"""(prefix, token) pairs evaluated at once (bounds peak memory)."""

NUM_PROBES = 64
"""Random vocabulary tokens checked at the first step to measure the off-span level."""


@dataclass(frozen=True)
class Found:
    """A finished sequence (internal; the attack turns it into an event)."""

    token_ids: tuple[int, ...]
    exact: bool
    distance: float


@dataclass(frozen=True)
class Step:
    """Progress of the search (internal; the attack turns it into an event)."""

    position: int
    prefixes: tuple[tuple[int, ...], ...]
    num_prefixes: int
    num_checked: int


@dataclass(frozen=True)
class Tick:
    """Heartbeat (internal): the search is working. Searches yield one at least every
    chunk of work (well under a second on a CPU), so the attack can enforce its time
    budget and a face can stop the run promptly between items."""

    position: int | None
    checked: int


@dataclass(frozen=True)
class Warn:
    code: str
    value: float = 0.0


@dataclass
class Thresholds:
    """Layer-2 acceptance thresholds (MLP-input span and block-1 attention span)."""

    mlp: float | None
    layer2: float | None


def split_threshold(accepted: torch.Tensor, rejected: torch.Tensor, ceiling: float = 0.1) -> float:
    """Geometric mean of the accepted cluster's top and the rejected level's bottom."""
    lo = float(accepted.max()) if accepted.numel() else 1e-7
    hi = float(rejected.min()) if rejected.numel() else 1.0
    lo = max(lo, 1e-12)
    hi = max(hi, lo * 1.0001)
    return float(min(math.sqrt(lo * hi), ceiling))


# ---------------------------------------------------------------------------
# Decoder search


@dataclass
class _Beam:
    prefixes: list[tuple[int, ...]]
    k: torch.Tensor  # (n, H, l, dh)
    v: torch.Tensor  # (n, H, l, dh)
    dist: torch.Tensor  # (n,) worst distance along each prefix
    last_h: list[torch.Tensor | None] = field(default_factory=list)


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
    noise_tolerant: bool = False,
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
        noise_tolerant: reserved (the thresholds are already set from the measured
            gap between candidates and probes, which adapts to the noise level).
        probe_generator: seeds the probe tokens.
        final_keep: after an exhausted budget, yield at most this many survivors.

    Yields:
        :class:`Step` after every position, :class:`Found` per sentence,
        :class:`Warn` when the budget is exhausted, :class:`Tick` after every chunk.
    """
    dev = hooks.device
    H, dh = hooks.num_heads, hooks.head_dim
    beam = _Beam(
        prefixes=[()],
        k=torch.zeros((1, H, 0, dh), device=dev),
        v=torch.zeros((1, H, 0, dh), device=dev),
        dist=torch.zeros(1, dtype=torch.float64, device=dev),
    )
    # Feed the given start tokens (they are known, not searched).
    for pos, tok in enumerate(start):
        h, k, v = hooks.extend(torch.tensor([tok], device=dev), pos, beam.k, beam.v)
        beam.k = torch.cat([beam.k, k.unsqueeze(2)], dim=2)  # k: (1, H, dh)
        beam.v = torch.cat([beam.v, v.unsqueeze(2)], dim=2)
        beam.prefixes = [(*beam.prefixes[0], tok)]
    exhausted = False
    first = True
    for pos in range(len(start), max_length):
        cand = candidates(pos)
        if cand is None or cand.numel() == 0 or not beam.prefixes:
            break
        cand = cand.to(dev)
        if start:
            # The given start tokens (BOS) never recur: a run of identical tokens
            # reproduces its first position's inputs exactly under RoPE.
            cand = cand[~torch.isin(cand, torch.tensor(start, device=dev))]
            if cand.numel() == 0:
                break
        n, t = len(beam.prefixes), int(cand.numel())
        if first and (thresholds.mlp is None or thresholds.layer2 is None):
            _calibrate(hooks, cand, pos, beam, span_mlp, span2, thresholds, probe_generator)
        first = False
        keep_pref: list[torch.Tensor] = []
        keep_tok: list[torch.Tensor] = []
        keep_dist: list[torch.Tensor] = []
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        has_ext = torch.zeros(n, dtype=torch.bool, device=dev)
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
        # Prefixes with no valid extension are whole sentences.
        for i in (~has_ext).nonzero().squeeze(1).tolist():
            if len(beam.prefixes[i]) > len(start):
                yield Found(beam.prefixes[i], not exhausted, float(beam.dist[i]))
        if not keep_pref:
            beam.prefixes = []
            yield Step(pos, (), 0, n * t)
            break
        pi = torch.cat(keep_pref)
        ti = torch.cat(keep_tok)
        dist = torch.cat(keep_dist)
        ks = torch.cat(new_k)
        vs = torch.cat(new_v)
        if pi.numel() > max_prefixes:
            exhausted = True
            yield Warn("budget_exhausted", float(max_prefixes))
            order = dist.argsort()[:max_prefixes]
            pi, ti, dist, ks, vs = pi[order], ti[order], dist[order], ks[order], vs[order]
        cand_list = cand.tolist()
        beam = _Beam(
            prefixes=[(*beam.prefixes[p], cand_list[q]) for p, q in zip(pi.tolist(), ti.tolist())],
            k=ks,
            v=vs,
            dist=dist,
        )
        yield Step(pos, tuple(beam.prefixes[:256]), len(beam.prefixes), n * t)
    order = beam.dist.argsort().tolist() if beam.prefixes else []
    if exhausted and final_keep is not None:
        order = order[:final_keep]  # a saturated search: only the nearest survivors
    for i in order:
        prefix = beam.prefixes[i]
        if len(prefix) > len(start):
            yield Found(prefix, not exhausted, float(beam.dist[i]))


def decoder_greedy(
    hooks: DecoderHooks,
    candidates: Callable[[int], torch.Tensor | None],
    span2: Span,
    *,
    start: tuple[int, ...],
    count: int,
    max_length: int,
    exclude: set[tuple[int, ...]],
) -> Iterator[Found]:
    """Best effort: ``count`` sentences grown greedily by the smallest layer-2 distance.

    The i-th sentence starts from the i-th nearest first token; each later position
    takes the nearest candidate. A greedy sentence stops where its distance jumps
    (more than 100x its running median) or at ``max_length``. Marked inexact.
    """
    dev = hooks.device
    H, dh = hooks.num_heads, hooks.head_dim
    made = 0
    first_rank = 0
    while made < count and first_rank < 4 * count:
        kc = torch.zeros((1, H, 0, dh), device=dev)
        vc = torch.zeros((1, H, 0, dh), device=dev)
        prefix: list[int] = []
        dists: list[float] = []
        for pos in range(max_length):
            if pos < len(start):
                cand = torch.tensor([start[pos]], device=dev)
            else:
                cand = candidates(pos)
                if cand is None or cand.numel() == 0:
                    break
                cand = cand.to(dev)
                if start:
                    cand = cand[~torch.isin(cand, torch.tensor(start, device=dev))]
                if cand.numel() == 0:
                    break
            h, k, v = hooks.extend(cand, pos, kc, vc)
            d2 = span2.distance(hooks.layer2_input(hooks.mlp_residual(h[0])))
            order = d2.argsort()
            pick = int(order[min(first_rank, order.numel() - 1)]) if pos == len(start) else int(order[0])
            if pos > len(start) and dists and float(d2[pick]) > 100 * sorted(dists)[len(dists) // 2]:
                break
            prefix.append(int(cand[pick]))
            if pos >= len(start):
                dists.append(max(float(d2[pick]), 1e-12))
            kc = torch.cat([kc, k[pick : pick + 1].unsqueeze(2)], dim=2)
            vc = torch.cat([vc, v[pick : pick + 1].unsqueeze(2)], dim=2)
        first_rank += 1
        key = tuple(prefix)
        if len(prefix) > len(start) and key not in exclude:
            exclude.add(key)
            made += 1
            yield Found(key, False, max(dists) if dists else 1.0)


def _calibrate(
    hooks: DecoderHooks,
    cand: torch.Tensor,
    pos: int,
    beam: _Beam,
    span_mlp: Span,
    span2: Span,
    thresholds: Thresholds,
    generator: torch.Generator | None,
) -> None:
    """Set missing thresholds from the first step: candidates vs random probes.

    True extensions sit at round-off level; random tokens are off-span by orders of
    magnitude. The threshold is the geometric mean of the low cluster's top and the
    lowest off-span distance (probes and the candidates above the largest gap).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    probes = torch.randint(0, hooks.vocab_size, (NUM_PROBES,), generator=gen).to(cand.device)
    probes = probes[~torch.isin(probes, cand)]
    tokens = torch.cat([cand, probes])
    h, _, _ = hooks.extend(tokens, pos, beam.k[:1], beam.v[:1])
    h = h[0]
    d_mlp = span_mlp.distance(hooks.mlp_input(h))
    d2 = span2.distance(hooks.layer2_input(hooks.mlp_residual(h)))
    nc = cand.numel()
    for attr, d in (("mlp", d_mlp), ("layer2", d2)):
        if getattr(thresholds, attr) is not None:
            continue
        dc, dp = d[:nc], d[nc:]
        cut = gap_threshold(torch.cat([dc, dp]), min_keep=1)
        low = dc[dc < cut]
        high = torch.cat([dc[dc >= cut], dp])
        setattr(thresholds, attr, split_threshold(low, high))
    log.debug("decoder thresholds: mlp %.3g, layer2 %.3g", thresholds.mlp, thresholds.layer2)
