"""The decoder search's working set: the screen, the key/value tables, the selection.

Block 0's keys and values depend only on a token and its position, so a live prefix
is a row of indices into per-position tables (:class:`_Beam`); each position's
survivors are merged chunk by chunk into a bounded :class:`_Selection`, and
:func:`_advance` builds the next beam within the table budget. :class:`_Screen`
rejects most wrong pairs before their exact check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dager.hooks_decoder import DecoderHooks
from dager.span import Span

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
        self.r_heads = self.r.reshape(hooks.num_heads, -1, self.r.shape[1])  # (H, dh, s)
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
        self.head_norm = _head_norms(cw, H)  # (H,)
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
        z = mix @ self.r + side[0]  # (m, t, s)
        spread = (mix.reshape(m, t, self.num_heads, -1).norm(dim=-1) * self.head_norm).sum(-1)  # (m, t)
        return self._passes(z, spread, side[1], threshold)

    def value_side(self, values: torch.Tensor) -> torch.Tensor:
        """``(M, H, s)``: value rows ``(M, H, dh)`` through ``R`` head by head.

        ``mix @ R`` is linear in the attention weights, ``sum_h sum_j a_hj (v_hj R_h)``,
        so a value row's ``v_hj R_h`` is computed once, not once per pair.
        """
        return torch.einsum("mhd,hds->mhs", values.to(torch.float32), self.r_heads)

    def keep_weights(
        self,
        attn: torch.Tensor,
        prefix_side: tuple[torch.Tensor, torch.Tensor],
        value_side: tuple[torch.Tensor, torch.Tensor],
        side: tuple[torch.Tensor, torch.Tensor],
        threshold: float,
    ) -> torch.Tensor:
        """:meth:`keep` from the attention weights alone: the mixes are never formed.

        ``z`` comes from :meth:`value_side` rows (``H l s`` per pair instead of
        ``d (l + s)``); each head's ``|mix_h|`` is bounded by ``|m_h| + a_self |v_self|``,
        with the prefix part ``|m_h|^2 = a^T G a`` read from the prefix's value Gram
        matrix ``G`` (``H l^2`` per pair). Its spread is never below :meth:`keep`'s, so
        it keeps every pair :meth:`keep` keeps.

        Args:
            attn: ``(m, t, H, l + 1)`` attention weights (the token's own last).
            prefix_side: the prefixes' ``(m, H, l, s)`` value rows through ``R`` and
                ``(m, H, l, l)`` value Gram matrices.
            value_side: the tokens' ``(t, H, s)`` own value rows through ``R`` and
                ``(t, H)`` value norms.
            side: :meth:`token_side` of the t tokens.
            threshold: the MLP-input acceptance threshold.
        """
        vr, gram = prefix_side
        vr_self, v_norm = value_side
        a_p, a_s = attn[..., :-1], attn[..., -1]  # (m, t, H, l), (m, t, H)
        z = torch.einsum("nthl,nhls->nts", a_p, vr) + torch.einsum("nth,ths->nts", a_s, vr_self) + side[0]
        ga = torch.einsum("nthl,nhlk->nthk", a_p, gram)  # (m, t, H, l)
        prefix_norm = (ga * a_p).sum(-1).clamp(min=0.0).sqrt() * (1 + 1e-5)  # round-off slack: stays a bound
        spread = ((prefix_norm + a_s * v_norm) * self.head_norm).sum(-1)  # (m, t)
        return self._passes(z, spread, side[1], threshold)

    def _passes(self, z: torch.Tensor, spread: torch.Tensor, e_norm: torch.Tensor, threshold: float) -> torch.Tensor:
        """The bound's test from ``z`` ``(m, t, s)`` and the spread ``(m, t)`` of ``|u|``."""
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


def _head_norms(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """``(H,)`` float32 upper bounds on the spectral norms of ``weight``'s head blocks.

    From each head's ``(dh, dh)`` Gram matrix, formed in float32 (at d = 4096 the float64
    products cost a second per search) with rigorous slack: a float32 product is within
    ``d u |W|^T |W|`` of the exact one entrywise (Higham 2002, Sec. 3.5), so the top
    eigenvalue is within ``d u |W_h|_F^2``; rounding ``W`` to float32 adds ``u |W_h|_F``.

    Args:
        weight: ``(d, H * dh)`` float64.
    """
    d = weight.shape[0]
    u = 2.0**-24
    w32 = weight.to(torch.float32).reshape(d, heads, -1).permute(1, 0, 2)  # (H, d, dh)
    gram = (w32.transpose(1, 2) @ w32).to(torch.float64)  # (H, dh, dh)
    frob2 = weight.reshape(d, heads, -1).pow(2).sum(dim=(0, 2))  # (H,) float64
    top = torch.linalg.eigvalsh(gram)[:, -1].clamp(min=0) + 1.01 * d * u * frob2
    return (top.sqrt() * (1 + 1e-6) + 2 * u * frob2.sqrt() + 1e-12).to(torch.float32)


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


class _Pending:
    """Pairs the screen kept, pooled across chunks until an exact block is full.

    Each chunk keeps few pairs (about one true extension per live prefix in it), and
    the exact checks read block 0's weights once per call whatever the rows: pooled,
    the weights are read once per block of ``limit`` pairs instead of once per chunk.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[tuple[torch.Tensor, ...]] = []
        self.count = 0

    def room(self) -> int:
        return self.limit - self.count

    def add(self, *rows: torch.Tensor) -> None:
        """Rows of equal length: inputs, mixes, prefix and token indices, keys, values."""
        if rows[0].shape[0]:
            self.parts.append(rows)
            self.count += int(rows[0].shape[0])

    def take(self) -> tuple[torch.Tensor, ...]:
        rows = tuple(torch.cat(col) for col in zip(*self.parts))
        self.parts, self.count = [], 0
        return rows


def _best(order: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Indices by distance, ties by (prefix, token): deterministic whatever the chunking."""
    by_order = order.argsort()
    by_dist = dist[by_order].argsort(stable=True)
    return by_order[by_dist]


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


def _start_beam(hooks: DecoderHooks, start: tuple[int, ...]) -> _Beam:
    """The first beam: one prefix holding the given start tokens (known, not searched)."""
    dev = hooks.device
    H, dh = hooks.num_heads, hooks.head_dim
    beam = _Beam(
        prefixes=[()],
        rows=torch.zeros((1, 0), dtype=torch.long, device=dev),
        keys=torch.zeros((0, H, dh), device=dev),
        values=torch.zeros((0, H, dh), device=dev),
        dist=torch.zeros(1, dtype=torch.float64, device=dev),
    )
    for pos, tok in enumerate(start):
        _, _, k, v = hooks.token_states(torch.tensor([tok], device=dev), pos)
        beam.rows = torch.cat([beam.rows, torch.full((1, 1), beam.keys.shape[0], device=dev)], dim=1)
        beam.keys = torch.cat([beam.keys, k])
        beam.values = torch.cat([beam.values, v])
        beam.prefixes = [(*beam.prefixes[0], tok)]
    return beam


def _by_weights(hooks: DecoderHooks, screen_active: bool, l: int) -> bool:
    """Whether a position screens from the attention weights (:meth:`_Screen.keep_weights`).

    Its per-pair cost ``H l (s + l)`` beats forming the mixes (``d l``) while the
    prefixes are shorter than a head (``l < dh``); with no prefix there is nothing to mix.
    """
    return screen_active and 0 < l < hooks.head_dim


def _chunk_shape(
    hooks: DecoderHooks, l: int, n: int, t: int, chunk_macs: float, chunk_bytes: int, by_weights: bool = False
) -> tuple[int, int]:
    """One chunk: ``(tokens, prefixes)`` per block, a block of tokens (projected once)
    times a block of ``n`` prefixes of length ``l``, within the chunk's work and bytes."""
    H, dh = hooks.num_heads, hooks.head_dim
    d = hooks.hidden_size
    if by_weights:
        pair_macs = (l + 1) * H * dh + H * l * (SKETCH + l + 2)
        pair_bytes = 4 * (4 * H * (l + 2) + 2 * SKETCH + 4)
    else:
        pair_macs = 2 * (l + 1) * H * dh + (SKETCH + 4) * H * dh
        pair_bytes = 4 * (4 * H * (l + 2) + 3 * H * dh + 2 * SKETCH)
    token_bytes = 4 * (2 * d + 4 * H * dh + SKETCH + 2)
    prefix_bytes = 4 * (2 * l * H * dh + H * l * (SKETCH + l))
    pairs = max(1, int(min(chunk_macs / pair_macs, 0.5 * chunk_bytes / pair_bytes)))
    tb = max(1, min(t, pairs, int(0.25 * chunk_bytes / token_bytes)))
    nb = max(1, min(n, pairs // tb, int(0.25 * chunk_bytes / max(1, prefix_bytes))))
    return tb, nb
