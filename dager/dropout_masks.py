"""Layer-1 inputs under embedding dropout, recovered exactly by sparse fitting (issue 11).

A GPT-2 client that trains with dropout feeds block 0 with ``LN(m * x / (1 - p))``: ``x``
is the token-plus-position embedding and ``m`` a 0/1 mask, drawn anew for every token
occurrence, that zeroes about ``p d`` coordinates. The layer-1 span holds these masked
inputs exactly, but the server cannot compute them without the mask, and the clean
``LN(x)`` lies about ``sqrt(p)`` away from the span (0.26-0.33 at p = 0.1), as far as
other tokens of the batch do.

The mask is sparse, though. Up to the norm's scale and shift, the masked input is
``g * x * m + b g + c beta`` (``g``, ``beta``: the norm's weight and bias), so for the
right candidate ``x`` the span holds a vector that differs from ``g * x`` in the ``~p d``
dropped coordinates only. :func:`masked_inputs` finds it in two moves:

1. **Support growth** (batched over candidates): the coordinates where the clean
   candidate misses the span most are freed (their mask value becomes an unknown) and
   the rest is fitted by least squares through the normal equations, which need only the
   span basis's rows at the freed coordinates; the largest remaining misses are freed
   next, for a few rounds.
2. **Certificate**: the fitted mask values are rounded to 0/1, the input
   ``LN(m * x / (1 - p))`` is rebuilt with the norm itself, and it is kept only when
   its relative distance to the span is below :data:`CERTIFY` (true inputs sat at 1e-7 to
   4e-6 on gpt2-small-random, B=8; wrong tokens at 0.2 or more).

When two sentences have the same token at the same position, the span holds two masked
inputs of one candidate (every batch of 8 of the medium set had some). Once one mask is
certified, support growth runs again with that mask's dropped coordinates barred from the
first round: the other copy then fits and the certified one cannot. This probe runs only
while fewer inputs than the span's rank are certified.

Candidates are ranked by their misfit after the first round (true inputs 0.08 or less,
wrong ones 0.1 or more on gpt2-small-random, B=8) and grown to the end in chunks of
:data:`CHUNK`, best first, until the span's rank is accounted for: the first chunk
usually is all there is to do, out of some 2,000 candidates the clean distance lets
through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CERTIFY = 1e-4
"""A rebuilt input is exact when its relative distance to the span is below this."""

FIT_ROUNDS = 4
"""Rounds of support growth."""

NEAR_FIT = 1e-3
"""A least-squares fit at least this close (relative) is rounded to a mask and rebuilt."""

ROUNDINGS = (0.5, 0.3, 0.7, 0.15, 0.85)
"""Cuts tried to round fitted mask values (a fit between two copies lands between 0 and 1)."""

FIT_BYTES = 64 * 2**20
"""Working set of one batch of support growth (candidates are fitted in batches under it)."""

PRUNE = 0.3
"""Candidates whose first-round misfit is above this are not grown further."""

CHUNK = 64
"""Candidates grown to the end at once, best first (at least the rank and a quarter)."""

POLISH = 0.1
"""Coordinates whose embedding is below this fraction of the median are tried both ways."""

POLISHED = 1e-6
"""A certified input closer than this is not polished (float32 round-off is ~1e-7; a
coordinate flipped where the embedding is ~0 left 1e-5)."""

SAME = 1e-3
"""Two certified inputs closer than this (relative) are one."""

COPY_CHUNK = 32
"""Certified candidates probed for copies at once."""

MAX_COPIES = 8
"""The most masked inputs looked for per candidate (sentences sharing a token and position)."""


@dataclass(frozen=True)
class MaskedInput:
    """A layer-1 input recovered with its dropout mask."""

    token: int
    position: int
    z: torch.Tensor  # (d,) float64: the exact normed, masked input
    dropped: torch.Tensor  # (d,) bool: the coordinates the mask zeroed
    distance: float  # relative distance of ``z`` to the span


@dataclass(frozen=True)
class LayerNormTerms:
    """Block 0's input norm: ``weight``, ``bias`` (``None`` for none), ``eps``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        d = y.shape[-1]
        bias = self.bias.to(y.dtype) if self.bias is not None else None
        return F.layer_norm(y, (d,), self.weight.to(y.dtype), bias, self.eps)


def _perp(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` minus their projection on the span of ``basis`` (d, r)."""
    return v - (v @ basis) @ basis.T


def _distance(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return _perp(z, basis).norm(dim=-1) / z.norm(dim=-1).clamp_min(1e-300)


def _grow(
    gx: torch.Tensor, basis: torch.Tensor, extra: torch.Tensor, *, rounds: int, start: int,
    bar: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support growth for ``N`` candidates at once.

    Args:
        gx: ``(N, d)`` the norm's weight times each clean candidate.
        basis: ``(d, r)`` the span.
        extra: ``(e, d)`` directions with free coefficients, already off the span
            (the norm's weight and bias).
        rounds: rounds of growth.
        start: coordinates freed in the first round (later rounds free ``start // 3``).
        bar: ``(N, d)`` coordinates the first round may not free (known masks).

    Returns:
        ``T`` ``(N, k)`` the freed coordinates, ``u`` ``(N, k)`` their fitted mask minus
        one, and the relative misfit ``(N,)``.
    """
    n, d = gx.shape
    k = min(d, start + (rounds - 1) * (start // 3))  # freed coordinates after the last round
    per_row = 8 * (2 * (k + extra.shape[0]) ** 2 + k * basis.shape[1] + 4 * d)  # normal matrix, basis rows
    step = max(1, FIT_BYTES // per_row)
    if n > step:  # a bounded working set, whatever the number of candidates
        parts = [_grow(gx[i : i + step], basis, extra, rounds=rounds, start=start,
                       bar=None if bar is None else bar[i : i + step]) for i in range(0, n, step)]
        return tuple(torch.cat(t) for t in zip(*parts))  # type: ignore[return-value]
    r0 = _perp(gx, basis)
    ee = extra @ extra.T  # (e, e)
    c0 = torch.linalg.lstsq(ee.expand(n, *ee.shape), -(r0 @ extra.T).unsqueeze(-1)).solution[..., 0]
    res = r0 + c0 @ extra
    freed = torch.zeros(n, d, dtype=torch.bool)
    rows = torch.arange(n).unsqueeze(1)
    for round_ in range(rounds):
        score = res.abs().masked_fill(freed if round_ or bar is None else bar, -1.0)
        new = score.topk(start if round_ == 0 else start // 3, dim=1).indices
        freed[rows, new] = True
        T = freed.nonzero()[:, 1].view(n, -1)  # every row frees the same number
        u, res = _solve(gx, r0, basis, extra, T)
    rel = res.norm(dim=1) / gx.norm(dim=1).clamp_min(1e-300)
    return T, u, rel


def _solve(
    gx: torch.Tensor, r0: torch.Tensor, basis: torch.Tensor, extra: torch.Tensor, T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with the mask free at ``T`` ``(N, k)``: ``u`` (mask minus one) and the residual.

    The normal equations need only the basis's rows at ``T``: the freed columns are
    ``g_i x_i P e_i`` (``P`` the projection off the span), with ``e_i . P e_j = d_ij - q_i . q_j``.
    """
    n, d = gx.shape
    e = extra.shape[0]
    g_t = gx.gather(1, T)  # (N, k)
    q_t = basis[T]  # (N, k, r)
    k = T.shape[1]
    m_ss = -(q_t @ q_t.transpose(1, 2)) * (g_t.unsqueeze(2) * g_t.unsqueeze(1))
    m_ss.diagonal(dim1=1, dim2=2).add_(g_t * g_t)
    m_se = g_t.unsqueeze(2) * extra.T[T]  # (N, k, e)
    ee = extra @ extra.T
    normal = torch.cat([torch.cat([m_ss, m_se], 2), torch.cat([m_se.transpose(1, 2), ee.expand(n, e, e)], 2)], 1)
    rhs = -torch.cat([g_t * r0.gather(1, T), r0 @ extra.T], 1)
    scale = normal.diagonal(dim1=1, dim2=2).abs().amax(1).clamp_min(1e-300)
    normal.diagonal(dim1=1, dim2=2).add_(1e-13 * scale.unsqueeze(1))
    w = torch.linalg.solve(normal, rhs.unsqueeze(-1))[..., 0]
    u, c = w[:, :k], w[:, k:]
    s = torch.zeros(n, d, dtype=gx.dtype).scatter_(1, T, g_t * u)
    return u, r0 + _perp(s, basis) + c @ extra


def _extra_directions(norm: LayerNormTerms, dtype: torch.dtype) -> torch.Tensor:
    """``(e, d)``: the norm's weight, and its bias when it has a nonzero one (free coefficients)."""
    raw = [norm.weight.to(dtype)]
    if norm.bias is not None and bool(norm.bias.any()):
        raw.append(norm.bias.to(dtype))
    return torch.stack(raw)


def _rebuild(x: torch.Tensor, dropped: torch.Tensor, norm: LayerNormTerms, rate: float) -> torch.Tensor:
    return norm.apply(x.masked_fill(dropped, 0.0) / (1.0 - rate))


def masked_inputs(
    candidates: list[tuple[int, int]],
    x: torch.Tensor,
    basis: torch.Tensor,
    norm: LayerNormTerms,
    rate: float,
    *,
    rank: int,
    expired: Callable[[], bool] = lambda: False,
) -> list[MaskedInput]:
    """The certified masked layer-1 inputs among ``candidates`` (those found before
    ``expired`` says the time budget is spent, checked between chunks).

    Args:
        candidates: ``(token, position)`` pairs, one per row of ``x``.
        x: ``(N, d)`` float64 their clean block-0 inputs (before the norm).
        basis: ``(d, r)`` float64 the layer-1 span.
        norm: block 0's input norm.
        rate: the dropout rate.
        rank: the span's rank (the number of inputs to find).

    Returns:
        One :class:`MaskedInput` per recovered input (several for a candidate that
        fills its position in several sentences).
    """
    if not candidates:
        return []
    gx = norm.weight.to(x.dtype) * x
    extra = _perp(_extra_directions(norm, x.dtype), basis)
    d = x.shape[1]
    start = min(d // 3, max(16, round(2 * rate * d)))  # about twice the dropped coordinates
    _, _, first = _grow(gx, basis, extra, rounds=1, start=start)
    order = first.argsort()
    order = order[first[order] < PRUNE]
    if order.numel() == 0:
        return []
    found: list[MaskedInput] = []
    for chunk in order.split(max(CHUNK, rank + rank // 4)):
        if expired():
            break
        T, u, rel = _grow(gx[chunk], basis, extra, rounds=FIT_ROUNDS, start=start)
        certified = []
        for row in (rel < NEAR_FIT).nonzero()[:, 0].tolist():
            i = int(chunk[row])
            item = _round(candidates[i], x[i], T[row], u[row], basis, norm, rate)
            if item is not None:
                found.append(item)
                certified.append((i, item))
        if len(found) < rank and certified:
            found += _copies(candidates, x, gx, basis, extra, norm, rate, certified, start, rank - len(found))
        if len(found) >= rank:
            break
    return found


def _round(
    cand: tuple[int, int], x: torch.Tensor, T: torch.Tensor, u: torch.Tensor, basis: torch.Tensor,
    norm: LayerNormTerms, rate: float,
) -> MaskedInput | None:
    """The fitted mask values rounded to 0/1 and certified (the first cut that certifies).

    A fit between two copies' masks (values near -1/2) is split: the coordinate nearest
    -1/2 is kept out of the mask and the fit redone, which leaves one copy only.
    """
    for split in range(2):
        for cut in ROUNDINGS:
            dropped = torch.zeros(x.shape[0], dtype=torch.bool)
            dropped[T[u < -cut]] = True
            item = _certify(cand, x, dropped, basis, norm, rate)
            if item is not None:
                return item
        if split:
            break
        keep = torch.ones_like(T, dtype=torch.bool)
        keep[(u + 0.5).abs().argmin()] = False
        T = T[keep]
        gx = (norm.weight.to(x.dtype) * x).unsqueeze(0)
        extra = _perp(_extra_directions(norm, x.dtype), basis)
        u = _solve(gx, _perp(gx, basis), basis, extra, T.unsqueeze(0))[0][0]
    return None


def _certify(
    cand: tuple[int, int], x: torch.Tensor, dropped: torch.Tensor, basis: torch.Tensor, norm: LayerNormTerms, rate: float
) -> MaskedInput | None:
    z = _rebuild(x, dropped, norm, rate)
    dist = float(_distance(z, basis))
    if dist >= CERTIFY:
        return None
    if dist < POLISHED:
        return MaskedInput(token=cand[0], position=cand[1], z=z, dropped=dropped, distance=dist)
    # The fit cannot tell kept from dropped where the embedding is ~0 (both miss the span
    # by little): try each such coordinate both ways and keep the closer input.
    small = (x.abs() < POLISH * x.abs().median()).nonzero()[:, 0]
    for i in small[x[small].abs().argsort(descending=True)].tolist():
        flip = dropped.clone()
        flip[i] = ~flip[i]
        z2 = _rebuild(x, flip, norm, rate)
        d2 = float(_distance(z2, basis))
        if d2 < dist:
            dropped, z, dist = flip, z2, d2
    return MaskedInput(token=cand[0], position=cand[1], z=z, dropped=dropped, distance=dist)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One input twice (masks that differ only where the embedding is ~0 give one input)."""
    return float((a - b).norm() / a.norm()) < SAME


def _copies(
    candidates: list[tuple[int, int]],
    x: torch.Tensor,
    gx: torch.Tensor,
    basis: torch.Tensor,
    extra: torch.Tensor,
    norm: LayerNormTerms,
    rate: float,
    certified: list[tuple[int, MaskedInput]],
    start: int,
    missing: int,
) -> list[MaskedInput]:
    """Further masks of certified candidates (``missing`` of them expected): support
    growth with the known masks barred."""
    known: dict[int, list[torch.Tensor]] = {}
    zs: dict[int, list[torch.Tensor]] = {}
    for i, item in certified:
        known.setdefault(i, []).append(item.dropped)
        zs.setdefault(i, []).append(item.z)
    new: list[MaskedInput] = []
    # Probed best first (certified order: a candidate with copies fits its clean input
    # best), a chunk at a time, until the span's rank is accounted for.
    order = list(dict.fromkeys(i for i, _ in certified))
    for at in range(0, len(order), COPY_CHUNK):
        todo = order[at : at + COPY_CHUNK]
        for _ in range(MAX_COPIES - 1):
            if not todo:
                break
            bar = torch.stack([torch.stack(known[i]).any(0) for i in todo])
            T, u, rel = _grow(gx[todo], basis, extra, rounds=FIT_ROUNDS + 2, start=start, bar=bar)  # the bar costs rounds
            nxt = []
            for row, i in enumerate(todo):
                if rel[row] >= NEAR_FIT:
                    continue
                item = _round(candidates[i], x[i], T[row], u[row], basis, norm, rate)
                if item is None or any(_same(item.z, z) for z in zs[i]):
                    continue
                new.append(item)
                known[i].append(item.dropped)
                zs[i].append(item.z)
                nxt.append(i)
            todo = nxt
        if len(new) >= missing:
            break
    return new
