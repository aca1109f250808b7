"""The fast span: a certified randomized range finder (issue 10).

:func:`dager.span.span_of` tries :func:`fast_span` first. An undefended gradient's
rank (the number of distinct inputs) is far below ``d``, so a cheap sketch of sampled
columns and two passes over the gradient with a ``(d, r + p)`` basis replace the
``d x d`` Gram matrix and its eigen-decomposition; the cut is certified a posteriori,
and any spectrum it cannot certify (a defense's noise, a rank near ``d``) goes back
to the full decomposition.
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

FLOAT32_PASS_MAX_DIM = 1024
"""Up to this ``d`` the first pass over the gradient (``B0 = Q0^T M``) runs in float32:
its round-off only tilts ``W`` a little (the certificate measures the result), and it
halves that pass. Past it the float32 pass saves less than the ``k s^2`` Gram matrix
it then needs (float64 gets ``B0 B0^T`` from the second pass for ``d s^2``), and the
wider tail leaves the certificate less margin."""

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


    def rows_times(self, qt: torch.Tensor) -> torch.Tensor:
        """``Q^T M`` ``(s, k)`` for ``qt = Q^T`` ``(s, d)`` (contiguous output, one pass)."""
        k = self.m.shape[1]
        out = torch.empty((qt.shape[0], k), dtype=torch.float64, device=qt.device)
        for sl, block in self.blocks():
            out[:, sl] = qt @ block
        return out

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        """``M[:, index]`` in float64."""
        return self.m[:, index.to(self.m.device)].to(torch.float64)


def _sketch_rank(y: torch.Tensor, tolerance: float) -> tuple[int, torch.Tensor]:
    """The rank rule applied to a sketch's spectrum, and the sketch's leading
    directions: ``(rank, Y V)`` with ``V`` the eigenvectors of ``Y^T Y``, descending.
    The rank only sizes the sketch, so the Gram matrix's round-off (1e-16 of the
    largest eigenvalue, far below the float32 gradient's own) does not matter."""
    evals, vecs = torch.linalg.eigh(y.T @ y)  # ascending
    evals = evals.flip(0).clamp(min=0.0)
    lead = y @ vecs.flip(1)  # (d, s): orthogonal columns, norms sqrt(evals)
    if float(evals[0]) <= 0.0:
        return 0, lead
    return rank_rule(evals, tolerance), lead


def fast_span(
    matrix: torch.Tensor, *, tolerance: float = 1e-6, rank_hint: int | None = None, seed: int = 0
) -> Span | None:
    """The span by a randomized range finder, or ``None`` when it cannot certify the cut.

    An undefended gradient ``M`` ``(d, k)`` has rank r (the distinct inputs) far below
    ``d`` plus float32 round-off. Three steps find its leading left singular vectors
    (Halko, Martinsson and Tropp 2011, Sec. 4-5), in float64 throughout:

    1. a cheap sketch ``Y0 = M[:, J] Omega`` of ``s`` columns from ``2 s`` random
       columns of ``M`` (Gaussian ``Omega``) gives ``Q0`` ``(d, s)``; its spectrum sizes
       ``s`` (the sketch grows until the rank rule leaves spare columns);
    2. ``B0 = Q0^T M`` (one pass over ``M``) and ``Y1 = M B0^T`` (a second pass):
       with ``B0 B0^T = Q0^T Y1 = V Lambda V^T``, ``W = B0^T V Lambda^{-1/2}`` is an
       orthonormal ``(k, s)`` basis of ``M``'s leading row space and
       ``F = M W = Y1 V Lambda^{-1/2}`` needs no third pass: a power step
       (``range(F) = range(M M^T Q0)``) without forming ``W``;
    3. the eigen-decomposition of ``F^T F`` gives ``F``'s singular values (never above
       ``M``'s: ``W`` is orthonormal) and the basis, the leading ``r`` left singular
       vectors of ``F``.

    Cost: two passes over ``M`` (``2 d k s`` multiply-adds) instead of three for a
    Gaussian sketch with one power step, and ``d^2 k + 9 d^3`` for the Gram matrix
    and its eigenvectors.

    The cut is certified a posteriori: ``M = M W W^T + M (I - W W^T)``, so every
    eigenvalue past r is at most ``(sigma_{r+1}(F) + rho)^2`` where ``rho`` bounds
    ``||M (I - W W^T)||`` (:data:`RESIDUAL_PROBES` Gaussian probes, Halko et al. 2011,
    Lemma 4.1). The fast span is returned only when that bound lies below
    :data:`TAIL_MAX` of the largest eigenvalue and the log-gap at r exceeds every gap
    above it, so the full rule would choose the same r. A sketch that missed a
    direction (the sampled columns did not reach it) shows as a large ``rho`` and is
    retried once with a dense Gaussian sketch of all columns; any other spectrum (a
    defense's noise lifts the tail; a rank near ``d``) returns ``None`` and
    :func:`dager.span.span_of` decomposes the whole Gram matrix.

    Args:
        matrix: ``(d, k)`` input-side matrix of the gradient.
        tolerance: relative eigenvalue cut (as in :func:`dager.span.span_of`).
        rank_hint: a guess of the rank: the first sketch has about ``1.125 hint +
            OVERSAMPLE`` columns (default 112); a hint past :data:`FAST_MAX_FRACTION`
            of d skips the fast path.
        seed: seeds the random sketches (the result does not depend on it beyond
            round-off).

    Returns:
        The span (``method="fast"``), or ``None``.
    """
    d, k = matrix.shape
    limit = int(FAST_MAX_FRACTION * d)
    if d < FAST_MIN_DIM or min(d, k) <= OVERSAMPLE or limit <= 2 * OVERSAMPLE:
        return None
    if rank_hint is not None and rank_hint + OVERSAMPLE > limit:
        return None  # the expected rank is past what the fast path can afford
    gen = torch.Generator().manual_seed(seed)
    op = _Float64Operator(matrix)
    hint = rank_hint if rank_hint is not None else 112
    s = min(limit, max(2 * OVERSAMPLE, hint + hint // 8 + OVERSAMPLE))
    for dense in (False, True):
        precise = dense or d > FLOAT32_PASS_MAX_DIM
        outcome = _attempt(op, s, limit, tolerance, gen, dense=dense, precise=precise)
        if isinstance(outcome, Span) or outcome is None:
            return outcome
        s = outcome  # the sketch missed a direction: retry densely at the size it reached
    return None


def _attempt(
    op: _Float64Operator, s: int, limit: int, tolerance: float, gen: torch.Generator, *, dense: bool, precise: bool
) -> Span | int | None:
    """One sketch: a certified span, ``None`` (decline), or the sketch size reached when
    the residual shows a missed direction (worth a dense sketch)."""
    d, k = op.m.shape
    dev = op.m.device
    f64 = torch.float64
    while True:
        if dense or 2 * s >= k:
            omega = torch.randn((k, s), generator=gen, dtype=f64).to(dev)
            y0 = op.right(omega)  # (d, s) M Omega: a pass over M
        else:
            cols = torch.randperm(k, generator=gen)[: 2 * s]
            omega = torch.randn((2 * s, s), generator=gen, dtype=f64).to(dev)
            y0 = op.columns(cols) @ omega  # (d, s) M[:, J] Omega
        r0, lead = _sketch_rank(y0, tolerance)
        if r0 + OVERSAMPLE // 2 <= s:
            # Keep the sketch's leading r0 + p directions (the passes over M cost s
            # each), as unit columns: their orthogonality does not matter below.
            q0 = lead[:, : min(s, r0 + OVERSAMPLE + r0 // 16)]
            q0 = q0 / q0.norm(dim=0).clamp(min=1e-300)
            break
        if s >= limit:
            return None
        s = min(limit, max(s + 2 * OVERSAMPLE, int(1.25 * s)))
    if precise:
        b0 = op.rows_times(q0.T.contiguous())  # (s, k) B0 = Q0^T M
    else:
        b0 = (q0.T.to(torch.float32) @ op.m.to(torch.float32)).to(f64)  # (s, k) B0 ~ Q0^T M
    s = q0.shape[1]
    probes = torch.randn((k, RESIDUAL_PROBES), generator=gen, dtype=f64).to(dev)
    both = op.right(torch.cat([b0.T, probes], dim=1))  # one pass: M B0^T and M omega
    y1, m_probes = both[:, :s], both[:, s:]  # (d, s) Y1 = M B0^T = M M^T Q0; (d, p)
    # B0 B0^T: from Y1 when B0 is exactly Q0^T M (an s x d x s product), else directly.
    gram = q0.T @ y1 if precise else b0 @ b0.T  # (s, s)
    lam, vec = torch.linalg.eigh(0.5 * (gram + gram.T))  # ascending
    top0 = float(lam[-1])
    if top0 <= 0.0:
        # The sampled columns are all zero (a dense sketch may find others); a dense
        # sketch that finds nothing: an all-zero gradient, the full path reports rank 0.
        return None if dense else s
    keep = lam > 1e-20 * top0  # directions B0 does not reach carry nothing
    lam, vec = lam[keep], vec[:, keep]
    scale = vec * lam.rsqrt()  # (s, s') V Lambda^{-1/2}: W = B0^T scale is orthonormal
    f = y1 @ scale  # (d, s') F = M W
    evals, fvec = torch.linalg.eigh(f.T @ f)  # squared singular values of F, ascending
    evals = evals.flip(0).clamp(min=0.0)
    fvec = fvec.flip(1)
    top = float(evals[0])
    r = rank_rule(evals, tolerance)
    if r + OVERSAMPLE // 2 > evals.numel():
        # No spare columns left after all: the sampled columns reached fewer directions
        # than M has (a dense sketch may reach them), or the rank is past the sketch.
        return None if dense or r + OVERSAMPLE > limit else r + OVERSAMPLE
    # rho: Gaussian probes of M (I - W W^T) = M omega - F W^T omega, W^T = scale^T B0
    # (no (k, s) W; the subtraction cancels to 1e-16 of M omega, far below the tail).
    res = m_probes - f @ (scale.T @ (b0 @ probes))  # (d, p)
    rho = 10.0 * math.sqrt(2.0 / math.pi) * float(res.norm(dim=0).max())
    head = float(evals[r]) if r < evals.numel() else 0.0
    tail = (math.sqrt(head) + rho) ** 2
    if tail > TAIL_MAX * top:
        # A tail F itself shows is the spectrum's (noise): decline. A clean F with a
        # large residual means the sketch missed a direction M has: a dense one may not.
        return s if (head <= TAIL_MAX * top and not dense) else None
    logs = evals[:r].clamp(min=1e-300).log()
    inner = float((logs[:-1] - logs[1:]).max()) if r > 1 else 0.0
    if math.log(float(evals[r - 1]) / max(tail, 1e-300)) <= inner:
        return None  # a larger gap inside the signal: leave the choice to the full rule
    basis = f @ fvec[:, :r]  # (d, r): F's leading left singular vectors, unnormalised
    basis = torch.linalg.qr(basis).Q  # Householder: orthonormal to round-off (|Q^T Q - I| ~ 1e-15)
    return Span(
        basis=basis.contiguous(),
        singular_values=evals.sqrt(),
        rank=r,
        tolerance=tolerance,
        gap=float(evals[r - 1]) / max(tail, 1e-300),
        method="fast",
    )
