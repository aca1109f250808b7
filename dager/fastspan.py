"""The fast span: a certified randomized range finder (issue 10).

:func:`dager.span.span_of` tries :func:`fast_span` first. An undefended gradient's
rank (the number of distinct inputs) is far below ``d``, so three products with a
``(d, r + p)`` sketch replace the ``d x d`` Gram matrix and its eigen-decomposition;
the cut is certified a posteriori, and any spectrum it cannot certify (a defense's
noise, a rank near ``d``) goes back to the full decomposition.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from dager.span import Span, rank_rule


FAST_MAX_FRACTION = 0.5
"""The fast path gives up (full decomposition) past this many sketch columns per ``d``:
beyond it its three products with the gradient cost more than the Gram matrix and its
eigenvectors."""

FAST_MIN_DIM = 96
"""Below this ``d`` the full decomposition is cheap and always used."""

OVERSAMPLE = 16
"""Sketch columns beyond the rank (a clean cut needs at least half of them spare)."""

TAIL_MAX = 1e-10
"""The fast path certifies a cut only when the tail (every eigenvalue past the rank,
bounded from above) is below this fraction of the largest: float32 round-off, not a
defense's noise."""

RESIDUAL_PROBES = 10
"""Gaussian probes of the a-posteriori residual bound (Halko et al. 2011, Lemma 4.1:
the bound fails with probability at most ``10^-probes``)."""

_CHUNK_BYTES = 64 * 2**20
"""Float64 bytes of the gradient converted at once by the fast path."""


class _Float64Operator:
    """``M @ X`` and ``M.T @ Y`` in float64 for a float32 ``M``, converting column
    blocks on the fly (a ``(4096, 22016)`` gradient is 0.7 GB in float64)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.m = matrix.detach()
        d, k = matrix.shape
        self.step = max(1, min(k, _CHUNK_BYTES // (8 * max(1, d))))
        self.whole = self.m.to(torch.float64) if self.step >= k else None

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        k = self.m.shape[1]
        if self.whole is not None:
            yield slice(0, k), self.whole
            return
        for start in range(0, k, self.step):
            sl = slice(start, min(k, start + self.step))
            yield sl, self.m[:, sl].to(torch.float64)

    def gram_times(self, x: torch.Tensor) -> torch.Tensor:
        """``M M^T x`` for ``x`` ``(d, s)``, in one pass over ``M``."""
        y = torch.zeros_like(x)
        for _, block in self.blocks():
            y.addmm_(block, block.T @ x)
        return y

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """``M @ w`` for ``w`` ``(k, s)``."""
        y = torch.zeros((self.m.shape[0], w.shape[1]), dtype=torch.float64, device=w.device)
        for sl, block in self.blocks():
            y.addmm_(block, w[sl])
        return y

    def left(self, q: torch.Tensor) -> torch.Tensor:
        """``M.T @ q`` for ``q`` ``(d, s)``."""
        k = self.m.shape[1]
        out = torch.empty((k, q.shape[1]), dtype=torch.float64, device=q.device)
        for sl, block in self.blocks():
            out[sl] = block.T @ q
        return out


def _orthonormal_against(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``y`` after removing its components along ``q``."""
    y = torch.linalg.qr(y).Q
    if q.shape[1]:
        # Project, normalise, twice: what remains of y past q can be 1e-8 of y, and
        # normalising it magnifies the first projection's round-off as much; the second
        # pass brings the blocks back to orthogonal at round-off (|Q^T Q - I| ~ 1e-15,
        # which the float64 span distances of ~1e-7 need).
        for _ in range(2):
            y = torch.linalg.qr(y - q @ (q.T @ y)).Q
    return y


def fast_span(
    matrix: torch.Tensor, *, tolerance: float = 1e-6, rank_hint: int | None = None, seed: int = 0
) -> Span | None:
    """The span by a randomized range finder, or ``None`` when it cannot certify the cut.

    An undefended gradient ``M`` ``(d, k)`` has rank r (the distinct inputs) far below
    ``d`` plus float32 round-off. Sketching ``M M^T Omega`` (one power step,
    Halko, Martinsson and Tropp 2011, Alg. 4.3) for Gaussian ``Omega`` ``(d, s)``
    captures its range once ``s > r``; ``B = Q^T M`` then has ``M``'s leading singular
    values and ``Q U_B`` its leading singular vectors, in float64 throughout. Cost:
    ``3 d k s`` multiply-adds instead of ``d^2 k`` for the Gram matrix and ``~9 d^3``
    for its eigenvectors. The sketch grows by blocks until the rank rule of
    :func:`dager.span.span_of` finds a cut with spare columns.

    The cut is certified a posteriori: the captured eigenvalues never exceed the true
    ones (interlacing), and every eigenvalue past r is at most
    ``(sqrt(lambda_{r+1}(B B^T)) + rho)^2`` where ``rho`` bounds ``||(I - QQ^T) M||``
    (:data:`RESIDUAL_PROBES` Gaussian probes). The fast span is returned only when
    that bound lies below :data:`TAIL_MAX` of the largest eigenvalue and the log-gap
    at r exceeds every gap above it, so the full rule would choose the same r. Any
    other spectrum (a defense's noise lifts the tail; a rank near ``d``) returns
    ``None`` and :func:`dager.span.span_of` decomposes the whole Gram matrix.

    Args:
        matrix: ``(d, k)`` input-side matrix of the gradient.
        tolerance: relative eigenvalue cut (as in :func:`dager.span.span_of`).
        rank_hint: a guess of the rank: the first sketch has about ``1.125 hint +
            OVERSAMPLE`` columns (default 112); a hint past :data:`FAST_MAX_FRACTION`
            of d skips the fast path.
        seed: seeds the Gaussian sketches (the result does not depend on it beyond
            round-off).

    Returns:
        The span (``method="fast"``), or ``None``.
    """
    d, k = matrix.shape
    limit = int(FAST_MAX_FRACTION * d)
    if d < FAST_MIN_DIM or min(d, k) <= OVERSAMPLE or limit <= 2 * OVERSAMPLE:
        return None
    dev = matrix.device
    f64 = torch.float64
    gen = torch.Generator().manual_seed(seed)
    op = _Float64Operator(matrix)
    q = torch.zeros((d, 0), dtype=f64, device=dev)
    bt = torch.zeros((k, 0), dtype=f64, device=dev)  # M^T Q
    if rank_hint is not None and rank_hint + OVERSAMPLE > limit:
        return None  # the expected rank is past what the fast path can afford
    hint = rank_hint if rank_hint is not None else 112
    s = min(limit, max(2 * OVERSAMPLE, hint + hint // 8 + OVERSAMPLE))
    while True:
        omega = torch.randn((d, s - q.shape[1]), generator=gen, dtype=f64).to(dev)
        y = op.gram_times(omega)  # (d, new) = M M^T Omega
        qn = _orthonormal_against(q, y)
        q = torch.cat([q, qn], dim=1)
        bt = torch.cat([bt, op.left(qn)], dim=1)
        evals, vecs = torch.linalg.eigh(bt.T @ bt)  # B B^T, (s, s) ascending
        evals = evals.flip(0).clamp(min=0.0)
        top = float(evals[0])
        if top <= 0.0:
            return None  # an all-zero gradient: let the full path report rank 0
        r = rank_rule(evals, tolerance)
        if r + OVERSAMPLE // 2 <= s:
            # A cut with spare columns: certified, or a tail that more columns would not
            # lower (a defense's noise) and the full decomposition must judge.
            return _certified(op, q, bt, evals, vecs.flip(1), r, tolerance, gen)
        if s >= limit:
            return None
        s = min(limit, max(s + 2 * OVERSAMPLE, int(1.25 * s)))  # grow by blocks: each costs its columns only


def _certified(
    op: _Float64Operator,
    q: torch.Tensor,
    bt: torch.Tensor,
    evals: torch.Tensor,
    vecs: torch.Tensor,
    r: int,
    tolerance: float,
    gen: torch.Generator,
) -> Span | None:
    """The fast span at rank r if the residual bound certifies the cut, else ``None``."""
    top = float(evals[0])
    probes = torch.randn((op.m.shape[1], RESIDUAL_PROBES), generator=gen, dtype=torch.float64).to(q.device)
    res = op.right(probes)  # (d, p) M omega
    for _ in range(2):
        res = res - q @ (q.T @ res)
    rho = 10.0 * math.sqrt(2.0 / math.pi) * float(res.norm(dim=0).max())
    tail = (math.sqrt(float(evals[r])) + rho) ** 2
    if tail > TAIL_MAX * top:
        return None
    logs = evals[:r].clamp(min=1e-300).log()
    inner = float((logs[:-1] - logs[1:]).max()) if r > 1 else 0.0
    if math.log(float(evals[r - 1]) / max(tail, 1e-300)) <= inner:
        return None  # a larger gap inside the signal: leave the choice to the full rule
    basis = q @ vecs[:, :r]  # (d, r), orthonormal to round-off (both factors are)
    return Span(
        basis=basis.contiguous(),
        singular_values=evals.sqrt(),
        rank=r,
        tolerance=tolerance,
        gap=float(evals[r - 1]) / max(tail, 1e-300),
        method="fast",
    )
