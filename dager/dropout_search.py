"""DAGER's decoder search on a client that trained with dropout (issue 11).

Dropout multiplies layer inputs by random 0/1 masks (scaled by ``1/(1-p)``) that the
server cannot know, so the clean inputs it computes miss the spans by about ``sqrt(p)``
and the usual exact checks reject everything true. Two things stay exact, though:

* **Block 0's attention inputs.** GPT-2 masks the embedding sum before the norm;
  :mod:`dager.dropout_masks` recovers each masked input, mask included, by sparse fitting
  (Llama drops nothing there: its layer-1 inputs are the clean ones).
* **Block 0's attention output**, the heads' mix before the output projection, which the
  projection's gradient spans. Attention dropout zeroes single attention weights, so
  head ``h`` of position ``i`` mixes ``sum_k d_hk P_hik v_hk / (1 - p)`` with unknown
  ``d_hk`` in {0, 1}: the output lies in the span of the prefix's value vectors, head by
  head, whatever the mask.

The search grows prefixes position by position, as :mod:`dager.search` does, with a
different check. A candidate extends a prefix when

1. **Screen** (necessary, exact): some combination of the candidate's value columns
   (one per head, each in its head's block) lies in the attention-output span plus the
   span of the prefix's value columns. The prefix's part is projected once per prefix,
   so a candidate costs a ``(d, H)`` projection and an ``H x H`` eigenvalue problem.
2. **Certificate**: the mask is solved for. The combinations of all value columns that
   lie in the span form a small null space (this output, the prefix's earlier ones, and
   other sentences' outputs over the same tokens); divided by the candidate's attention
   weights ``P / (1 - p)`` they are shares of each kept weight. The mask is the point of
   it nearest to all ones in L1 (iteratively reweighted least squares; random sets of
   rows assumed kept as the fallback), rounded to 0/1 and refitted. The output rebuilt
   from that mask must lie in the span to :data:`CERTIFY`, and must read the candidate.

Three things the measurements asked for (gpt2-small-random and llama-small-random, B=8,
p = 0.1, the medium set):

* Under RoPE a repeated token has one value vector at every position: its positions
  share a column per head, whose share is snapped to a sum of a subset of their
  weights. A repeat adds no column, so the screen cannot judge it; it goes to the
  certificate only when the prefix's null space has a direction its own earlier outputs
  do not account for (without that, near-uniform attention let "If If If" pass).
* Llama's BOS starts every sentence, so every sentence's first output lies on its
  columns: their shares are free in the null space and are left unsnapped.
* Sentences sharing a prefix give the candidate's columns several directions into the
  span: all of them enter the null space.

Only certified extensions survive, so every sentence the search returns is exact in the
same sense as the fp32 checks: a rebuilt input or output within float32 round-off of its
span (true ones sat at 1e-7..1e-6, wrong ones at 0.1 or more). A sentence whose next
input was not found would end early and still pass, so the attack certifies nothing when
the layer-1 inputs found fall short of the span's rank. The value spans must not fill
the space: the screen needs ``H (i + 1) + rank < d`` at position ``i`` (GPT-2 small at
B=8: ``i`` up to ~50); past it, or past the prefix budget, the search stops and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dager.hooks_decoder import DecoderHooks
from dager.search_items import Found, Step, Tick, Warn


CERTIFY = 1e-4
"""A rebuilt attention output is exact when its relative distance to the span is below this."""

SCREEN = 1e-3
"""The screen passes a pair when its smallest singular value, relative, is below this."""

RANGE_CUT = 1e-5
"""Singular values of a prefix's off-span value columns below this (relative) are its null
space: the combinations that lie in the span (float32 round-off sits near 1e-7)."""

MAX_REPEATS = 10
"""Positions of one repeated value whose subsets are enumerated (the last ones)."""

IRLS_ITERATIONS = 20
"""Reweighted least-squares iterations of the L1 fit of a mask (true masks rounded and
refitted after 10 on llama-small-random, or needed the random rows in any case)."""

IRLS_CHECK = 10
"""Iterations between tries to round and refit the L1 point (true masks round early)."""

TRIALS = 64
"""Random row sets tried at once when solving for an attention mask."""

TRIAL_BATCHES = 2
"""Batches of :data:`TRIALS` before a candidate is given up."""

MIN_KEPT = 0.5
"""A solved mask keeps at least this fraction of its single-position weights (the rest is
dropped with probability ``p``; all-zero solutions are not masks)."""

ROUGH = 0.1
"""A trial's shares within this of 0 or 1 are refitted on all rows (few rows: round-off grows)."""

BINARY = 1e-3
"""A refitted share within this of 0 or 1 counts as a mask value (the certificate decides)."""


@dataclass(frozen=True)
class Input:
    """A candidate block-0 attention input at a position: its token and normed input."""

    token: int
    z: torch.Tensor  # (d,) float64


class _Heads:
    """Value columns laid out head by head in ``d`` coordinates, and their off-span parts."""

    def __init__(self, basis_o: torch.Tensor, num_heads: int, head_dim: int) -> None:
        self.q = basis_o  # (d, r) attention-output span
        self.H, self.dh = num_heads, head_dim
        self.d = basis_o.shape[0]

    def columns(self, v: torch.Tensor) -> torch.Tensor:
        """``(..., H, dh)`` per-head vectors -> ``(..., H, d)``, each in its head's block."""
        out = v.new_zeros(*v.shape[:-1], self.d)
        for h in range(self.H):
            out[..., h, h * self.dh : (h + 1) * self.dh] = v[..., h, :]
        return out

    def off_span(self, cols: torch.Tensor) -> torch.Tensor:
        return cols - (cols @ self.q) @ self.q.T

    def distance(self, o: torch.Tensor) -> float:
        return float(self.off_span(o).norm() / o.norm().clamp_min(1e-300))


@dataclass
class _Prefix:
    """A certified prefix: its block-0 keys and values, its distinct value columns and
    the decomposition of their off-span parts the checks reuse."""

    tokens: tuple[int, ...]
    keys: torch.Tensor  # (n, H, dh)
    values: torch.Tensor  # (n, H, dh)
    group: torch.Tensor  # (n,) index of each position's distinct value row
    uniq: torch.Tensor  # (m, H, dh) distinct value rows
    rows: torch.Tensor  # (a,) the nonzero columns among the m H (Llama's BOS values are 0)
    cols: torch.Tensor  # (a, d) those columns
    range_: torch.Tensor  # (d, rho) orthonormal range of their off-span parts
    inverse: torch.Tensor  # (a, d): least-squares solve of the off-span columns
    null: torch.Tensor  # (a, k) combinations of the columns that lie in the span
    distance: float = 0.0
    nstart: int = 0  # positions every sentence starts with (their shares are left free)
    outputs: int = 0  # independent outputs in the span on the columns past the start

    @property
    def own(self) -> int:
        """The outputs of its own positions past the start (each certified one)."""
        return len(self.tokens) - self.nstart

    @classmethod
    def build(cls, heads: _Heads, tokens: tuple[int, ...], keys: torch.Tensor, values: torch.Tensor,
              distance: float = 0.0, nstart: int = 0) -> _Prefix:
        n = values.shape[0]
        if n:
            uniq, group = torch.unique(values.reshape(n, -1), dim=0, return_inverse=True)
            uniq = uniq.view(-1, heads.H, heads.dh)
        else:
            uniq, group = values, torch.zeros(0, dtype=torch.long)
        cols = heads.columns(uniq).reshape(-1, heads.d)
        rows = (cols.abs().amax(1) > 0).nonzero()[:, 0]
        cols = cols[rows]
        off = heads.off_span(cols)  # (a, d)
        u, s, vh = torch.linalg.svd(off.T, full_matrices=False)  # off.T = u diag(s) vh
        keep = s > RANGE_CUT * float(s[0]) if s.numel() else s.bool()
        inverse = vh[keep].T @ (u[:, keep] / s[keep]).T  # (a, d)
        null = vh[~keep].T
        past = ~torch.isin(rows // heads.H, group[:nstart])  # rows past the start's columns
        sv = torch.linalg.svdvals(null[past]) if null.numel() and bool(past.any()) else null.new_zeros(0)
        outputs = int((sv > 1e-6 * float(sv[0])).sum()) if sv.numel() else 0
        return cls(tokens, keys, values, group, uniq, rows, cols, u[:, keep], inverse, null, distance, nstart, outputs)


def _weights(q: torch.Tensor, keys: torch.Tensor, scale: float, rate: float) -> torch.Tensor:
    """``(n, H)`` attention weights of the query over ``keys``, over ``1 - p`` (kept ones)."""
    return torch.einsum("hd,nhd->nh", q, keys).mul(scale).softmax(0) / (1.0 - rate)


def _screen(heads: _Heads, prefix: _Prefix, v: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Which candidates' outputs can lie in the span, for one prefix (all candidates at once).

    Args:
        v: ``(c, H, dh)`` the candidates' values; ``off``: ``(c, H, d)`` their columns off the span.

    Returns:
        ``same`` ``(c,)``: the prefix's distinct value row a candidate repeats (-1: none;
        such a candidate adds no column and always goes to the certificate), and per
        candidate the ``(H, t)`` combinations of its columns that reach the span and the
        prefix's columns (``None``: screened out, or a repeat).
    """
    m = prefix.uniq.shape[0]
    flat = v.reshape(v.shape[0], -1)
    eq = (flat.unsqueeze(1) == prefix.uniq.reshape(1, m, flat.shape[1])).all(-1)  # (c, m)
    same = torch.full((v.shape[0],), -1, dtype=torch.long)
    if m:
        same = torch.where(eq.any(1), eq.float().argmax(1), same)
    rest = off - (off @ prefix.range_) @ prefix.range_.T
    evals, evecs = torch.linalg.eigh(rest @ rest.transpose(1, 2))  # (c, H), (c, H, H)
    limit = (SCREEN**2) * (off * off).sum(-1).amax(-1)  # (c,)
    near = evals.clamp_min(0.0) <= limit.unsqueeze(1)
    ys = [None if same[j] >= 0 or not bool(near[j].any()) else evecs[j][:, near[j]] for j in range(v.shape[0])]
    return same, ys


def _extend(
    heads: _Heads, prefix: _Prefix, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rate: float,
    same: int, y: torch.Tensor | None, off: torch.Tensor,
) -> float:
    """Whether one candidate's attention output can lie in the span: its mask solved for
    (see the module docstring); the rebuilt output's relative distance (1.0: none).

    Args:
        q, k, v: ``(H, dh)`` the candidate's query, key and value at the new position.
        same, y: from :func:`_screen`; ``off``: ``(H, d)`` its columns off the span.
    """
    m = prefix.uniq.shape[0]
    if same >= 0:  # a repeated value: no new column, the prefix's null space only
        if prefix.outputs <= prefix.own:
            return 1.0  # its own earlier outputs account for every direction: none left for this one
        group = torch.cat([prefix.group, torch.tensor([same])])
        null, cols, rows = prefix.null, prefix.cols, prefix.rows
    elif y is None:
        return 1.0  # no combination of its columns reaches the span: screened out
    else:
        x = -prefix.inverse @ (off.T @ y)  # (a, t): sentences sharing the prefix give t > 1
        null = torch.cat([
            torch.cat([prefix.null, x], 1),
            torch.cat([prefix.null.new_zeros(heads.H, prefix.null.shape[1]), y], 1),
        ])
        cols = torch.cat([prefix.cols, heads.columns(v)])
        rows = torch.cat([prefix.rows, m * heads.H + torch.arange(heads.H)])
        group = torch.cat([prefix.group, torch.tensor([m])])
        m += 1
    if null.shape[1] == 0:
        return 1.0
    weights = _weights(q, torch.cat([prefix.keys, k.unsqueeze(0)]), scale, rate)  # (n + 1, H)
    full = torch.zeros(m, heads.H, dtype=weights.dtype).index_add_(0, group, weights)  # all kept
    scaled = null / full.reshape(-1)[rows].unsqueeze(1).clamp_min(1e-300)  # shares of the all-kept weight
    # The start's columns (Llama's BOS) hold every sentence's first output: their shares
    # are free in the null space, carry nothing of the sentence, and are not snapped.
    free = torch.zeros(m, dtype=torch.bool)
    free[group[: prefix.nstart]] = True
    free_rows = free.repeat_interleave(heads.H)[rows]
    single = torch.bincount(group, minlength=m).eq(1).repeat_interleave(heads.H)[rows] & ~free_rows
    e = _shares(scaled, single, ~free_rows)
    if e is None:
        return 1.0
    shares = torch.ones(m * heads.H, dtype=e.dtype)
    shares[rows] = e  # a zero column's share is moot
    share, reads = _snap(shares.view(m, heads.H), group, weights, full, free)
    if not reads:
        return 1.0  # an output that does not read the candidate is an earlier one
    return heads.distance((share * full).reshape(-1)[rows] @ cols)


def _shares(scaled: torch.Tensor, single: torch.Tensor, fitted: torch.Tensor) -> torch.Tensor | None:
    """The point of the null space whose single-position shares are all 0 or 1, most of them 1.

    Dropout keeps each weight with probability ``1 - p``, so the mask is the point
    nearest to all ones in L1 over the ``fitted`` rows (iteratively reweighted least
    squares). Its rounding is refitted on every single-position row, which must then
    agree to :data:`BINARY`. Random sets of rows assumed kept are the fallback (a null
    space with directions on few rows can leave the L1 point between two masks).
    """
    scaled = scaled[:, scaled[fitted].abs().amax(0) > 0]  # directions on free rows only: moot
    sub = scaled[fitted]
    ones = torch.ones(sub.shape[0], dtype=scaled.dtype)
    eye = torch.eye(scaled.shape[1], dtype=scaled.dtype)
    a = torch.linalg.lstsq(sub, ones.unsqueeze(1), driver="gelsd").solution[:, 0]
    for it in range(1, IRLS_ITERATIONS + 1):
        w = 1.0 / (sub @ a - ones).abs().clamp_min(1e-9)
        normal = (sub.T * w) @ sub
        a = torch.linalg.solve(normal + 1e-14 * float(normal.diagonal().amax()) * eye, (sub.T * w) @ ones)
        if it % IRLS_CHECK == 0 and bool(single.any()):
            e = (scaled @ a)[single]
            fit = _refit(scaled, single, e)
            if fit is not None:
                return scaled @ fit
    if not bool(single.any()):
        return scaled @ a  # repeated values only: the subset sums are snapped after
    k = scaled.shape[1]
    rows = single.nonzero()[:, 0]
    if rows.numel() < k:
        return None
    gen = torch.Generator().manual_seed(k * 7919 + rows.numel())
    for _ in range(TRIAL_BATCHES):
        pick = rows[torch.rand(TRIALS, rows.numel(), generator=gen).argsort(1)[:, :k]]  # (T, k)
        square = scaled[pick]  # (T, k, k)
        ridge = 1e-12 * square.abs().amax((1, 2), keepdim=True) * torch.eye(k, dtype=scaled.dtype)
        sol = torch.linalg.solve(square + ridge, torch.ones(TRIALS, k, 1, dtype=scaled.dtype))  # (T, k, 1)
        es = (scaled @ sol[..., 0].T).T[:, single]  # (T, rows)
        off = (es - es.round()).abs().amax(1)
        for t in (off < ROUGH).nonzero()[:, 0].tolist():
            a = _refit(scaled, single, es[t])
            if a is not None:
                return scaled @ a
    return None


def _refit(scaled: torch.Tensor, single: torch.Tensor, e: torch.Tensor) -> torch.Tensor | None:
    """Coefficients of the shares refitted to ``e`` rounded (0/1 on single-position rows),
    when they agree."""
    target = e.round()
    if bool(((target != 0) & (target != 1)).any()) or float(target.mean()) < MIN_KEPT:
        return None
    a = torch.linalg.lstsq(scaled[single], target.unsqueeze(1), driver="gelsd").solution[:, 0]
    if float((scaled[single] @ a - target).abs().amax()) >= BINARY:
        return None
    return a


def _snap(
    e: torch.Tensor, group: torch.Tensor, weights: torch.Tensor, full: torch.Tensor, free: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """Each ``(column, head)`` share of the all-kept weight snapped to an achievable one
    (0 or 1 for a single position; a subset sum for repeated values), and whether the
    last position's weight is kept in some head."""
    share = torch.where(free.unsqueeze(1), e, (e > 0.5).to(e.dtype))
    last = int(group[-1])
    reads = bool(share[last].any())
    for g in range(e.shape[0]):
        members = (group == g).nonzero()[:, 0]
        if members.numel() < 2 or bool(free[g]):
            continue
        members = members[-MAX_REPEATS:]
        k = members.numel()
        subsets = torch.tensor([[(s >> i) & 1 for i in range(k)] for s in range(1 << k)], dtype=e.dtype)  # (2^k, k)
        sums = subsets @ weights[members] / full[g].clamp_min(1e-300)  # (2^k, H)
        best = (sums - e[g]).abs().argmin(0)  # (H,)
        share[g] = sums.gather(0, best.unsqueeze(0))[0]
        if g == last:
            reads = bool(subsets[best, -1].any())
    return share, reads


def dropout_search(
    hooks: DecoderHooks,
    basis_o: torch.Tensor,
    rate: float,
    candidates: Callable[[int], list[Input]],
    *,
    start: list[Input],
    max_length: int,
    max_prefixes: int,
) -> Iterator[Found | Step | Tick | Warn]:
    """Grow certified prefixes position by position (see the module docstring).

    Args:
        hooks: the decoder family's hooks.
        basis_o: ``(d, r)`` float64 the span of block 0's attention outputs.
        rate: the client's dropout rate.
        candidates: the certified inputs at a position (GPT-2: masked inputs found there;
            Llama: every token of the layer-1 bag).
        start: the inputs every sentence starts with (Llama's BOS), or none.
        max_length: the last position to try, plus one.
        max_prefixes: the most prefixes kept alive (the ``budget_exhausted`` warning).

    Yields:
        :class:`Step` per position, :class:`Tick` heartbeats, one :class:`Found` per
        sentence (exact), and :class:`Warn` when a budget or the span's room stops it.
    """
    heads = _Heads(basis_o, hooks.num_heads, hooks.head_dim)
    scale = hooks.attention_scale
    prefixes = [_start_prefix(hooks, heads, start)]
    for pos in range(len(start), max_length):
        if heads.H * (pos + 1) + basis_o.shape[1] >= heads.d:
            yield Warn("budget_exhausted", float(pos))  # the value spans fill the space
            break
        cands = candidates(pos)
        if not cands:
            break
        q, k, v = hooks.projections_of(torch.stack([c.z for c in cands]), pos)
        off = heads.off_span(heads.columns(v))  # (c, H, d)
        grown: list[_Prefix] = []
        checked = 0
        for prefix in prefixes:
            extended = False
            same, ys = _screen(heads, prefix, v, off)
            checked += len(cands)
            for j, cand in enumerate(cands):
                if same[j] < 0 and ys[j] is None:
                    continue
                dist = _extend(heads, prefix, q[j], k[j], v[j], scale, rate, int(same[j]), ys[j], off[j])
                if dist < CERTIFY:
                    extended = True
                    grown.append(_Prefix.build(
                        heads, prefix.tokens + (cand.token,), torch.cat([prefix.keys, k[j : j + 1]]),
                        torch.cat([prefix.values, v[j : j + 1]]), max(prefix.distance, dist), prefix.nstart,
                    ))
            if not extended and len(prefix.tokens) > len(start):
                yield Found(prefix.tokens, True, prefix.distance)
            yield Tick(pos, checked)
        if len(grown) > max_prefixes:
            yield Warn("budget_exhausted", float(len(grown)))
            grown = grown[:max_prefixes]
        prefixes = grown
        yield Step(pos, tuple(p.tokens for p in prefixes[:64]), len(prefixes), checked)
        if not prefixes:
            return
    for prefix in prefixes:
        if len(prefix.tokens) > len(start):
            yield Found(prefix.tokens, True, prefix.distance)


def _start_prefix(hooks: DecoderHooks, heads: _Heads, start: list[Input]) -> _Prefix:
    H, dh = hooks.num_heads, hooks.head_dim
    keys = torch.zeros(0, H, dh, dtype=torch.float64)
    values = torch.zeros(0, H, dh, dtype=torch.float64)
    for pos, item in enumerate(start):
        _, k, v = hooks.projections_of(item.z.unsqueeze(0), pos)
        keys, values = torch.cat([keys, k]), torch.cat([values, v])
    return _Prefix.build(heads, tuple(i.token for i in start), keys, values, nstart=len(start))


def distance_cut(rate: float) -> float:
    """Clean layer-1 distances below this make a (token, position) a candidate for the
    sparse fit: a masked input sits about ``sqrt(p)`` from its clean one (0.17-0.33
    measured at p = 0.1), random tokens near 0.9."""
    return min(0.8, 1.5 * rate**0.5)


MAX_PER_POSITION = 512
"""The most candidates per position handed to the sparse fit (the closest ones)."""


def masked_candidates(
    hooks: DecoderHooks, dists: torch.Tensor, first_pos: int, basis1: torch.Tensor, rate: float, rank: int,
    expired: Callable[[], bool] = lambda: False,
) -> dict[int, list[Input]]:
    """GPT-2's masked layer-1 inputs by position, from the clean layer-1 distances ``(P, V)``."""
    from dager.dropout_masks import masked_inputs

    cut = distance_cut(rate)
    pairs: list[tuple[int, int]] = []
    rows: list[torch.Tensor] = []
    for row in range(dists.shape[0]):
        near = (dists[row] < cut).nonzero()[:, 0]
        if near.numel() > MAX_PER_POSITION:
            near = near[dists[row, near].topk(MAX_PER_POSITION, largest=False).indices]
        if near.numel():
            pairs += [(int(t), first_pos + row) for t in near.tolist()]
            rows.append(hooks.token_inputs(near, first_pos + row).detach().double())
    if not pairs:
        return {}
    found = masked_inputs(pairs, torch.cat(rows), basis1, hooks.input_norm(), rate, rank=rank, expired=expired)
    by_pos: dict[int, list[Input]] = {}
    for item in found:
        by_pos.setdefault(item.position, []).append(Input(item.token, item.z))
    return by_pos
