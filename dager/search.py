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

from dager.layers import DecoderHooks, _softmax_attend
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


SEARCH_BYTES = 512 * 2**20
"""Byte budget of the decoder search's working set (issue 13).

Half of it bounds the block-0 key/value tables of the live prefixes: when the kept
prefixes would need more, the farthest are dropped (``budget_exhausted``). The other
half bounds one chunk's intermediates (candidate projections, gathered caches,
attention scores and mixes, MLP activations of the pairs checked exactly). Survivors
of a position are merged into a running best-``max_prefixes`` selection after every
chunk, so nothing grows with the number of (prefix, token) pairs: a noisy update whose
span admits every token costs time (stopped by the attack's time budget), not memory.
"""

CHUNK_MACS = 2.5e8
"""Multiply-adds per chunk of work (~0.1 s of one CPU core); a :class:`Tick` follows each."""

SKETCH = 16
"""Random directions of the MLP-input span's complement read by the screen."""

SCREEN_MARGIN = 1e-4
"""Slack (in relative distance) the screen adds to the threshold before it rejects.

The screen's bound and the exact check are both float32 computations with relative
round-off near 1e-6; wrong extensions of random and trained models sit at 1e-2..1,
so this slack costs nothing and covers the round-off of both sides many times over."""


class _Screen:
    """A cheap, never-wrong lower bound on the MLP-input span distance of a pair.

    Petrov et al. (2024, Sec. 4.2) test every (prefix, token) extension by running
    block 0; the costly parts are the attention output projection (``d^2`` per pair)
    and the projection onto the span (``d * r``). Both are linear up to the norm, so
    this screen reads only ``s`` orthonormal directions ``P`` of the span's complement:
    ``|P^T y| <= |P_perp y|`` for every ``y``, and for the norm's input
    ``u = c(h)`` (``h = x + W mix + b``)

    * ``P^T (gamma * u) = z0(token) + R mix`` with ``R = (c(gamma * P))^T W`` (``s`` rows),
    * ``|u| <= |c(x + b)| + sum_h |c W_h| |mix_h|`` (per-head spectral norms),
    * ``|y| <= max|gamma| sqrt(d) + |beta|`` (a norm's output has ``|u| / sigma <= sqrt(d)``).

    So per pair it costs ``s * d`` on top of the attention itself, and a pair whose
    bound exceeds the threshold (plus :data:`SCREEN_MARGIN`) would fail the exact check.
    Pairs it keeps go through the exact check unchanged.
    """

    def __init__(self, hooks: DecoderHooks, span: Span, generator: torch.Generator) -> None:
        terms = hooks.mlp_norm_terms()
        dev = hooks.device
        f64 = torch.float64
        d = span.dim
        free = d - span.rank
        self.active = free > 0
        if not self.active:
            return  # a full span admits everything: nothing to screen
        if free > SKETCH:
            basis = span.complement_directions(SKETCH, generator).to(dev, f64)  # (d, s) orthonormal
        else:
            basis = span.complement.to(dev, f64)  # (d, d - r)
        gamma = terms.gamma.to(dev, f64)
        weight = terms.out_weight.to(dev, f64)  # (d, H * dh)
        pg = gamma.unsqueeze(1) * basis  # (d, s)
        if terms.centred:
            pg = pg - pg.mean(0, keepdim=True)  # P^T diag(g) C h = (C diag(g) P)^T h
        self.pg = pg.to(torch.float32)
        self.r = (weight.T @ pg).to(torch.float32)  # (H * dh, s)
        bias = terms.out_bias.to(dev, f64) if terms.out_bias is not None else torch.zeros(d, dtype=f64, device=dev)
        self.bias = bias.to(torch.float32)
        self.centred = terms.centred
        self.eps = terms.eps
        self.d = d
        beta = terms.beta.to(dev, f64) if terms.beta is not None else None
        self.w = (beta @ basis).to(torch.float32) if beta is not None else None  # (s,)
        self.y_max = float(gamma.abs().max()) * math.sqrt(d) + (float(beta.norm()) if beta is not None else 0.0)
        H = hooks.num_heads
        cw = weight - weight.mean(0, keepdim=True) if terms.centred else weight
        heads = cw.reshape(d, H, -1).permute(1, 0, 2)  # (H, d, dh)
        gram = heads.transpose(1, 2) @ heads  # (H, dh, dh)
        # Spectral norms from each head's Gram matrix, with slack for its round-off.
        self.head_norm = (torch.linalg.eigvalsh(gram)[:, -1].clamp(min=0).sqrt() * (1 + 1e-6) + 1e-12).to(
            torch.float32
        )  # (H,)
        self.num_heads = H

    def token_side(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z0`` ``(t, s)`` and ``|c(x + b)|`` ``(t,)`` of candidate inputs ``x`` ``(t, d)``."""
        xb = x.to(torch.float32) + self.bias
        z0 = xb @ self.pg
        if self.centred:
            xb = xb - xb.mean(-1, keepdim=True)
        return z0, xb.norm(dim=-1)

    def keep(self, mix: torch.Tensor, side: tuple[torch.Tensor, torch.Tensor], threshold: float) -> torch.Tensor:
        """``(m, t)`` True where the exact check might accept the pair.

        Args:
            mix: ``(m, t, H * dh)`` attention mixes of m prefixes x t tokens.
            side: :meth:`token_side` of the t tokens.
            threshold: the MLP-input acceptance threshold.
        """
        m, t, hd = mix.shape
        z0, e_norm = side
        z = mix @ self.r + z0  # (m, t, s)
        spread = (mix.reshape(m, t, self.num_heads, -1).norm(dim=-1) * self.head_norm).sum(-1)  # (m, t)
        u_hi = e_norm + spread
        lam_lo = torch.rsqrt(u_hi * u_hi / self.d + self.eps)
        if self.w is None:
            lower = lam_lo * z.norm(dim=-1)
        else:
            u_lo = (e_norm - spread).clamp(min=0.0)
            lam_hi = torch.rsqrt(u_lo * u_lo / self.d + self.eps)
            zz = (z * z).sum(-1).clamp(min=1e-30)
            lam = (-(z @ self.w) / zz).clamp(min=lam_lo, max=lam_hi)  # argmin of |lam z + w|
            lower = (lam.unsqueeze(-1) * z + self.w).norm(dim=-1)
        return lower / self.y_max <= threshold + SCREEN_MARGIN


@dataclass
class _Beam:
    """Live prefixes; block-0 keys/values live once per (position, token) in tables."""

    prefixes: list[tuple[int, ...]]
    rows: torch.Tensor  # (n, l) long: each position's row in keys/values
    keys: torch.Tensor  # (M, H, dh)
    values: torch.Tensor  # (M, H, dh)
    dist: torch.Tensor  # (n,) worst distance along each prefix

    def caches(self, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, H, l, dh)`` key and value caches of the prefixes in ``sl``."""
        rows = self.rows[sl]
        return self.keys[rows].transpose(1, 2), self.values[rows].transpose(1, 2)

    def table_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass
class SearchStats:
    """What a decoder search held at most (for tests and benchmarks)."""

    max_selected: int = 0
    """Most (prefix, token) survivors held at once (running selection plus one chunk's)."""
    max_table_bytes: int = 0
    max_chunk_pairs: int = 0
    screened: int = 0
    """Pairs the screen passed on to the exact check."""
    checked: int = 0


class _Selection:
    """The best ``limit`` survivors of one position, merged chunk by chunk."""

    def __init__(self, limit: int, t: int, stats: SearchStats | None) -> None:
        self.limit = limit
        self.t = t
        self.stats = stats
        self.order: torch.Tensor | None = None  # (k,) prefix * t + token
        self.dist: torch.Tensor | None = None
        self.k: torch.Tensor | None = None  # (k, H, dh) the new token's key
        self.v: torch.Tensor | None = None
        self.overflow = False

    def add(self, order: torch.Tensor, dist: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.order is not None:
            order = torch.cat([self.order, order])
            dist = torch.cat([self.dist, dist])
            k = torch.cat([self.k, k])
            v = torch.cat([self.v, v])
        if self.stats is not None:
            self.stats.max_selected = max(self.stats.max_selected, int(order.numel()))
        if order.numel() > self.limit:
            self.overflow = True
            keep = _best(order, dist)[: self.limit]
            order, dist, k, v = order[keep], dist[keep], k[keep], v[keep]
        self.order, self.dist, self.k, self.v = order, dist, k, v

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix and token indices, distances, keys, values: in (prefix, token)
        order, or nearest first when the budget bit (as the reference search)."""
        assert self.order is not None
        idx = _best(self.order, self.dist) if self.overflow else self.order.argsort()
        order = self.order[idx]
        return order // self.t, order % self.t, self.dist[idx], self.k[idx], self.v[idx]


def _best(order: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Indices by distance, ties by (prefix, token): deterministic whatever the chunking."""
    by_order = order.argsort()
    by_dist = dist[by_order].argsort(stable=True)
    return by_order[by_dist]


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
    byte_budget: int = SEARCH_BYTES,
    chunk_macs: float = CHUNK_MACS,
    stats: SearchStats | None = None,
) -> Iterator[Found | Step | Warn | Tick]:
    """Grow prefixes position by position; yield finished sentences as they end.

    Block 0's keys and values depend only on a token and its position, so each
    position's candidates are projected once, and a prefix is a row of indices into
    per-position key/value tables. Every (prefix, token) pair gets the attention mix
    (scores and weighted sum) and the :class:`_Screen` bound; only pairs the screen
    cannot reject run the output projection, the exact MLP-input span check, the MLP
    and the block-1 span check, exactly as in :func:`_reference_decoder_search`.

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
        probe_generator: seeds the probe tokens and the screen's directions.
        final_keep: after an exhausted budget, yield at most this many survivors.
        byte_budget: bytes for key/value tables plus one chunk (:data:`SEARCH_BYTES`).
        chunk_macs: multiply-adds per chunk between heartbeats.
        stats: filled with what the search held at most, when given.

    Yields:
        :class:`Step` after every position, :class:`Found` per sentence,
        :class:`Warn` when the budget is exhausted, :class:`Tick` after every chunk.
    """
    dev = hooks.device
    H, dh = hooks.num_heads, hooks.head_dim
    d = hooks.hidden_size
    gen = probe_generator if probe_generator is not None else torch.Generator().manual_seed(0)
    table_budget = byte_budget // 2
    chunk_bytes = byte_budget - table_budget
    memo: dict = {}
    beam = _Beam(
        prefixes=[()],
        rows=torch.zeros((1, 0), dtype=torch.long, device=dev),
        keys=torch.zeros((0, H, dh), device=dev),
        values=torch.zeros((0, H, dh), device=dev),
        dist=torch.zeros(1, dtype=torch.float64, device=dev),
    )
    # Feed the given start tokens (they are known, not searched).
    for pos, tok in enumerate(start):
        _, _, k, v = hooks.token_states(torch.tensor([tok], device=dev), pos)
        beam.rows = torch.cat([beam.rows, torch.full((1, 1), beam.keys.shape[0], device=dev)], dim=1)
        beam.keys = torch.cat([beam.keys, k])
        beam.values = torch.cat([beam.values, v])
        beam.prefixes = [(*beam.prefixes[0], tok)]
    exhausted = False
    first = True
    screen: _Screen | None = None
    exact_pairs = _exact_block(hooks, chunk_macs, chunk_bytes, span_mlp.rank + span2.rank)
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
        l = int(beam.rows.shape[1])
        if first and (thresholds.mlp is None or thresholds.layer2 is None):
            kc, vc = beam.caches(slice(0, 1))
            yield from _calibrate(
                hooks, cand, pos, kc, vc, span_mlp, span2, thresholds, gen, chunk_macs, chunk_bytes, exact_pairs
            )
        first = False
        if screen is None:
            screen = _Screen(hooks, span_mlp, gen)
        # Chunk: a block of tokens (projected once) x a block of prefixes.
        pair_macs = 2 * (l + 1) * H * dh + (SKETCH + 4) * H * dh
        pair_bytes = 4 * (4 * H * (l + 2) + 3 * H * dh + 2 * SKETCH)
        token_bytes = 4 * (2 * d + 4 * H * dh + SKETCH + 2)
        prefix_bytes = 4 * 2 * l * H * dh
        pairs = max(1, int(min(chunk_macs / pair_macs, 0.5 * chunk_bytes / pair_bytes)))
        tb = max(1, min(t, pairs, int(0.25 * chunk_bytes / token_bytes)))
        nb = max(1, min(n, pairs // tb, int(0.25 * chunk_bytes / max(1, prefix_bytes))))
        if stats is not None:
            stats.max_chunk_pairs = max(stats.max_chunk_pairs, tb * nb)
        select = _Selection(max_prefixes, t, stats)
        has_ext = torch.zeros(n, dtype=torch.bool, device=dev)
        checked = 0
        for t0 in range(0, t, tb):
            toks = cand[t0 : t0 + tb]
            x, q, k, v = hooks.token_states(toks, pos, memo)
            side = screen.token_side(x) if screen.active else None
            m_t = toks.numel()
            for s0 in range(0, n, nb):
                kc, vc = beam.caches(slice(s0, s0 + nb))
                mix = _softmax_attend(q, kc, vc, k, v, hooks.attention_scale)  # (m, tb, H*dh)
                m = mix.shape[0]
                if screen.active:
                    idx = screen.keep(mix, side, thresholds.mlp).reshape(-1).nonzero().squeeze(1)
                else:
                    idx = torch.arange(m * m_t, device=dev)
                flat = mix.reshape(m * m_t, -1)
                if stats is not None:
                    stats.screened += int(idx.numel())
                for e0 in range(0, int(idx.numel()), exact_pairs):
                    sub = idx[e0 : e0 + exact_pairs]
                    ti = sub % m_t
                    h = x[ti] + hooks.attention_output(flat[sub])  # (p, d)
                    d_mlp = span_mlp.distance(hooks.mlp_input(h))
                    ok = d_mlp < thresholds.mlp
                    if bool(ok.any()):
                        h2 = hooks.mlp_residual(h[ok])
                        d2 = span2.distance(hooks.layer2_input(h2))
                        ok2 = d2 < thresholds.layer2
                        good = sub[ok][ok2]
                        if good.numel():
                            pi = good // m_t + s0
                            tl = good % m_t
                            dist = torch.maximum(torch.maximum(d_mlp[ok][ok2], d2[ok2]), beam.dist[pi])
                            has_ext[pi] = True
                            select.add(pi * t + t0 + tl, dist, k[tl], v[tl])
                    if e0 + exact_pairs < idx.numel():
                        yield Tick(pos, checked)
                checked += m * m_t
                if stats is not None:
                    stats.checked += m * m_t
                yield Tick(pos, checked)
        # Prefixes with no valid extension are whole sentences.
        for i in (~has_ext).nonzero().squeeze(1).tolist():
            if len(beam.prefixes[i]) > len(start):
                yield Found(beam.prefixes[i], not exhausted, float(beam.dist[i]))
        if select.order is None:
            beam.prefixes = []
            yield Step(pos, (), 0, n * t)
            break
        if select.overflow:
            exhausted = True
            yield Warn("budget_exhausted", float(max_prefixes))
        pi, ti, dist, kn, vn = select.result()
        beam, cut = _advance(beam, pi, ti, dist, kn, vn, cand, table_budget)
        if cut:
            exhausted = True
            yield Warn("budget_exhausted", float(len(beam.prefixes)))
        if stats is not None:
            stats.max_table_bytes = max(stats.max_table_bytes, beam.table_bytes())
        yield Step(pos, tuple(beam.prefixes[:256]), len(beam.prefixes), n * t)
    order = beam.dist.argsort().tolist() if beam.prefixes else []
    if exhausted and final_keep is not None:
        order = order[:final_keep]  # a saturated search: only the nearest survivors
    for i in order:
        prefix = beam.prefixes[i]
        if len(prefix) > len(start):
            yield Found(prefix, not exhausted, float(beam.dist[i]))


def _advance(
    beam: _Beam,
    pi: torch.Tensor,
    ti: torch.Tensor,
    dist: torch.Tensor,
    kn: torch.Tensor,
    vn: torch.Tensor,
    cand: torch.Tensor,
    table_budget: int,
) -> tuple[_Beam, bool]:
    """The next beam: the selected extensions, with tables holding only used rows.

    Returns the beam and whether the table budget dropped prefixes (the farthest go).
    """
    # One table row per distinct new token (the pairs carry duplicates).
    uniq, inv = ti.unique(return_inverse=True)
    first = torch.full((uniq.numel(),), ti.numel(), dtype=torch.long, device=ti.device)
    first.scatter_reduce_(0, inv, torch.arange(ti.numel(), device=ti.device), reduce="amin")
    base = beam.keys.shape[0]
    rows = torch.cat([beam.rows[pi], (base + inv).unsqueeze(1)], dim=1)  # (k, l + 1)
    keys = torch.cat([beam.keys, kn[first]])
    values = torch.cat([beam.values, vn[first]])
    row_bytes = 2 * keys[0].numel() * keys.element_size()
    cut = False
    used = rows.unique()
    if used.numel() * row_bytes > table_budget:
        # Keep the nearest prefixes whose rows fit (binary search on how many).
        order = _best(torch.arange(dist.numel(), device=dist.device), dist)
        lo, hi = 1, dist.numel()
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if rows[order[:mid]].unique().numel() * row_bytes <= table_budget:
                lo = mid
            else:
                hi = mid - 1
        keep = order[:lo].sort().values  # keep the selection's order
        pi, ti, dist, rows = pi[keep], ti[keep], dist[keep], rows[keep]
        used = rows.unique()
        cut = True
    if used.numel() < keys.shape[0]:
        keys, values = keys[used], values[used]
        rows = torch.searchsorted(used, rows)
    cand_list = cand.tolist()
    prefixes = [(*beam.prefixes[p], cand_list[q]) for p, q in zip(pi.tolist(), ti.tolist())]
    return _Beam(prefixes=prefixes, rows=rows, keys=keys, values=values, dist=dist), cut


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
    block = _exact_block(hooks, CHUNK_MACS, SEARCH_BYTES // 2, span2.rank)
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
            d2, k, v = _layer2_distances(hooks, cand, pos, kc, vc, span2, block)
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


def _exact_block(hooks: DecoderHooks, chunk_macs: float, chunk_bytes: int, rank: int) -> int:
    """How many (prefix, token) pairs one chunk runs through block 0 exactly."""
    d, f = hooks.hidden_size, hooks.mlp_width
    macs = d * hooks.num_heads * hooks.head_dim + 3 * d * f + 2 * d * min(d, rank + 2)
    return max(1, int(min(chunk_macs / macs, chunk_bytes / (4 * (8 * d + 3 * f)))))


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
) -> Iterator[Tick]:
    """Set missing thresholds from the first step: candidates vs random probes.

    True extensions sit at round-off level; random tokens are off-span by orders of
    magnitude. The threshold is the geometric mean of the low cluster's top and the
    lowest off-span distance (probes and the candidates above the largest gap).
    Runs the first prefix's extensions in blocks (the candidates may be the whole
    vocabulary) and yields a :class:`Tick` after each.

    Args:
        kc, vc: ``(1, H, l, dh)`` the first prefix's key/value cache.
        generator: draws the probe tokens.
    """
    if block is None:
        block = _exact_block(hooks, chunk_macs, chunk_bytes, span_mlp.rank + span2.rank)
    probes = torch.randint(0, hooks.vocab_size, (NUM_PROBES,), generator=generator).to(cand.device)
    probes = probes[~torch.isin(probes, cand)]
    tokens = torch.cat([cand, probes])
    mlp_parts, l2_parts = [], []
    for t0 in range(0, tokens.numel(), block):
        h, _, _ = hooks.extend(tokens[t0 : t0 + block], pos, kc, vc)
        h = h[0]
        mlp_parts.append(span_mlp.distance(hooks.mlp_input(h)))
        l2_parts.append(span2.distance(hooks.layer2_input(hooks.mlp_residual(h))))
        yield Tick(pos, 0)
    d_mlp = torch.cat(mlp_parts)
    d2 = torch.cat(l2_parts)
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


# ---------------------------------------------------------------------------
# The reference: the per-pair search before the screen (slow; tests compare with it)


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
    beam = _RefBeam(
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
            gen = probe_generator if probe_generator is not None else torch.Generator().manual_seed(0)
            for _ in _calibrate(hooks, cand, pos, beam.k[:1], beam.v[:1], span_mlp, span2, thresholds, gen):
                pass
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
        beam = _RefBeam(
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
