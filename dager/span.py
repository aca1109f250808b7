"""Span and rank maths of DAGER (Petrov et al. 2024, Sec. 3: low-rank gradients).

For a linear layer ``W`` applied to input rows ``z_i``, the weight gradient is
``sum_i z_i (dL/dy_i)^T``, so its input-side space is ``span{z_i}`` (Lemma 3.1). A
candidate input lies in the batch exactly when its distance to that span is ~0 (Thm. 3.2).

Everything here is pure tensor maths with no model knowledge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NOISE_EDGE = 8.0
"""With ``noise_tolerant``: the rank counts eigenvalues above this multiple of the
noise bulk's median (estimated from the lower half of the spectrum)."""

GAP_FLOOR = 1e-13
"""Relative eigenvalues below this are float32 round-off and never define a gap."""


@dataclass(frozen=True)
class Span:
    """An orthonormal basis of a gradient's input space, and its complement.

    Attributes:
        basis: ``(d, r)`` float64 orthonormal basis of the span.
        singular_values: ``(k,)`` float64, descending: square roots of the Gram
            matrix's leading eigenvalues (the gradient's singular values; all ``d`` of
            them from the full decomposition, the leading ``r + p`` from the fast one).
        rank: r.
        tolerance: the relative eigenvalue cut that produced r.
        gap: ratio of the r-th to the (r+1)-th eigenvalue (large = a clean cut).
        method: ``"full"`` (eigen-decomposition of the ``d x d`` Gram matrix) or
            ``"fast"`` (randomized range finder, see :func:`dager.fastspan.fast_span`).
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    tolerance: float
    gap: float
    method: str = "full"
    complement_: torch.Tensor | None = field(default=None, compare=False, repr=False)
    _casts: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def complement(self) -> torch.Tensor:
        """``(d, d - r)`` float64 orthonormal basis of the complement (built on first use
        when the fast path gave only the basis)."""
        if self.complement_ is not None:
            return self.complement_
        key = ("complement", None, None)
        if key not in self._casts:
            self._casts[key] = complement_of(self.basis)
        return self._casts[key]

    def cast(self, which: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """``basis`` or ``complement`` in a dtype/device, converted once and kept."""
        key = (which, dtype, str(device))
        if key not in self._casts:
            self._casts[key] = getattr(self, which).to(device=device, dtype=dtype)
        return self._casts[key]

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    def distance(self, rows: torch.Tensor) -> torch.Tensor:
        """Relative distances of ``rows`` to the span.

        Args:
            rows: ``(..., d)`` candidate inputs (any float dtype).

        Returns:
            ``(...)`` float64 ``||P_perp y|| / ||y||``.
        """
        return relative_distance(rows, self)

    def complement_directions(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``(d, count)`` float64 orthonormal random directions of the complement.

        Uniformly random in the complement (a Gaussian matrix projected off the span,
        then orthonormalised), without building the whole complement.
        """
        d, r = self.dim, self.rank
        count = min(count, d - r)
        if self.complement_ is not None or r > d // 2:
            comp = self.complement
            mix = torch.randn((d - r, count), generator=generator, dtype=torch.float64).to(comp.device)
            return comp @ torch.linalg.qr(mix).Q
        q = self.basis
        x = torch.randn((d, count), generator=generator, dtype=torch.float64).to(q.device)
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            x = x - q @ (q.T @ x)
        return torch.linalg.qr(x).Q


def complement_of(basis: torch.Tensor) -> torch.Tensor:
    """``(d, d - r)`` orthonormal basis of the complement of orthonormal ``basis`` ``(d, r)``."""
    d, r = basis.shape
    full = torch.linalg.qr(basis, mode="complete").Q  # (d, d): first r columns span the basis
    return full[:, r:].contiguous()


def gram_spectrum(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of ``M M^T`` in float64.

    Args:
        matrix: ``(d, k)`` whose column space is the span (k may exceed d).

    Returns:
        eigenvalues ``(d,)`` descending (clamped at 0) and eigenvectors ``(d, d)``.
    """
    m = matrix.to(torch.float64)
    gram = m @ m.T  # (d, d)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals = evals.flip(0).clamp(min=0.0)
    evecs = evecs.flip(1)
    return evals, evecs


def rank_rule(evals: torch.Tensor, tolerance: float) -> int:
    """The default rank: the relative cut, extended down to the largest log-gap.

    The relative cut, extended down to the spectrum's largest gap when that lies
    below it: gradients reaching layer 2 through many layers can be weak
    (eigenvalues ~1e-7 of the largest) yet far above float32 round-off (~1e-15).
    """
    top = float(evals[0])
    r = int((evals > tolerance * top).sum())
    return max(r, largest_log_gap(evals / top, floor=GAP_FLOOR))


def span_of(
    matrix: torch.Tensor,
    *,
    tolerance: float = 1e-6,
    rank: int | None = None,
    by_gap: bool = False,
    method: str = "auto",
    rank_hint: int | None = None,
) -> Span:
    """The span of a gradient's input space with an automatic rank.

    The rank counts eigenvalues above ``tolerance`` times the largest (float64: in
    float32 the round-off floor swallows the small true eigenvalues). With
    ``by_gap`` the cut is instead the largest gap of the log-spectrum above the
    round-off floor, which still finds the signal when noise lifts every eigenvalue.

    ``method="auto"`` first tries :func:`dager.fastspan.fast_span` (a randomized range
    finder, far cheaper when the rank is well below ``d``) and falls back to the full
    eigen-decomposition when its a-posteriori checks do not certify a clean cut
    (noise from a defense, a rank near ``d``); ``rank`` and ``by_gap`` always use the
    full decomposition, whose whole spectrum they read.

    Args:
        matrix: ``(d, k)`` input-side matrix of the gradient.
        tolerance: relative eigenvalue cut.
        rank: force this rank (used for tests and ablations).
        by_gap: choose the rank at the largest spectral gap instead.
        method: ``"auto"`` (fast when certified, else full) or ``"full"``.
        rank_hint: a guess of the rank (e.g. a related layer's): sizes the fast
            path's first sketch.

    Raises:
        ValueError: for an unknown ``method``.
    """
    if method == "auto":
        if rank is None and not by_gap:
            from dager.fastspan import fast_span  # it builds on this module's Span

            fast = fast_span(matrix, tolerance=tolerance, rank_hint=rank_hint)
            if fast is not None:
                return fast
    elif method != "full":
        raise ValueError(f"unknown span method {method!r}")
    evals, evecs = gram_spectrum(matrix)
    d = evals.shape[0]
    top = float(evals[0]) if d else 0.0
    if top <= 0.0:
        r = 0
    elif rank is not None:
        r = max(0, min(int(rank), d))
    elif by_gap:
        # Noise lifts every eigenvalue to a Marchenko-Pastur bulk whose edges differ by
        # about 14x for a (d, 3d) Gaussian matrix; its median is the lower half's
        # median. Keep what stands clearly above the bulk's upper edge.
        r_exact = max(int((evals > tolerance * top).sum()), largest_log_gap(evals / top, floor=GAP_FLOOR))
        lower = evals[d // 2 :]
        floor = float(lower.median()) if lower.numel() else 0.0
        r_noise = int((evals > NOISE_EDGE * floor).sum())
        r = min(r_exact, r_noise) if floor > GAP_FLOOR * top else r_exact
    else:
        r = rank_rule(evals, tolerance)
    return span_from_spectrum(evals, evecs, r, tolerance=tolerance)


def span_from_spectrum(evals: torch.Tensor, evecs: torch.Tensor, r: int, *, tolerance: float) -> Span:
    """The :class:`Span` of the top ``r`` eigenvectors of a full Gram decomposition.

    Args:
        evals: ``(d,)`` eigenvalues, descending (as :func:`gram_spectrum` returns them).
        evecs: ``(d, d)`` their eigenvectors, in columns.
        r: the rank cut.
        tolerance: recorded on the span.
    """
    d = evals.shape[0]
    gap = float(evals[r - 1] / max(float(evals[r]), 1e-300)) if 0 < r < d else math.inf
    return Span(
        basis=evecs[:, :r].contiguous(),
        complement_=evecs[:, r:].contiguous(),
        singular_values=evals.sqrt(),
        rank=r,
        tolerance=tolerance,
        gap=gap,
    )


def largest_log_gap(relative: torch.Tensor, *, floor: float = GAP_FLOOR) -> int:
    """How many leading values precede the largest ratio gap (values descending).

    Only gaps that start above ``floor`` count (below it lies round-off), but a gap
    may end below it: the drop from the weakest signal to round-off is usually the cut.
    """
    vals = relative.clamp(min=1e-300)
    above = int((vals > floor).sum())
    if above == 0:
        return 0
    if above == vals.numel():
        if above == 1:
            return 1
        logs = vals.log()
        return int((logs[:-1] - logs[1:]).argmax()) + 1
    logs = vals[: above + 1].log()
    gaps = logs[:-1] - logs[1:]  # (above,) drop after each value above the floor
    return int(gaps.argmax()) + 1


SCREEN_CUT = 0.05
"""Float32 basis-side estimates below this are recomputed in float64 (the estimate's
round-off is ~1e-3, so rows above it are off the span either way)."""


def relative_distance(rows: torch.Tensor, span: Span, *, fast: bool = False) -> torch.Tensor:
    """``||P_perp y|| / ||y||`` for each row, computed on the cheaper side.

    A large span measures the complement component directly in float32 (no
    cancellation, accurate to ~1e-7). A small span projects onto the basis and
    subtracts, which cancels: float32 leaves ~1e-3 of round-off. So the basis side
    screens in float32 and recomputes in float64 only the rows estimated below
    :data:`SCREEN_CUT` (the others keep their estimate, off the span by far more
    than its error), unless ``fast`` asks for the float32 estimate alone.
    """
    r = span.rank
    d = span.dim
    if r == 0:
        return torch.ones(rows.shape[:-1], dtype=torch.float64, device=rows.device)
    if fast or r < d - r:
        y = rows.to(torch.float32)
        norm2 = (y * y).sum(-1)
        inside = y @ span.cast("basis", torch.float32, y.device)  # (..., r)
        perp2 = (norm2 - (inside * inside).sum(-1)).clamp(min=0.0)
        out = (perp2 / norm2.clamp(min=1e-30)).sqrt().to(torch.float64)
        if fast:
            return out
        near = (out < SCREEN_CUT).nonzero(as_tuple=True)
        if near[0].numel():
            y64 = rows[near].to(torch.float64)
            in64 = y64 @ span.cast("basis", torch.float64, y64.device)
            n64 = (y64 * y64).sum(-1)
            p64 = (n64 - (in64 * in64).sum(-1)).clamp(min=0.0)
            out[near] = (p64 / n64.clamp(min=1e-300)).sqrt()
        return out
    y = rows.to(torch.float32)
    outside = y @ span.cast("complement", torch.float32, y.device)  # (..., d - r)
    perp2 = (outside * outside).sum(-1).to(torch.float64)
    norm2 = (y * y).sum(-1).to(torch.float64)
    return (perp2 / norm2.clamp(min=1e-300)).sqrt()


def exact_relative_distance(rows: torch.Tensor, span: Span) -> torch.Tensor:
    """``||P_perp y|| / ||y||`` in float64 throughout (for thin margins)."""
    y = rows.to(torch.float64)
    if span.rank == 0:
        return torch.ones(y.shape[:-1], dtype=torch.float64, device=y.device)
    if span.rank < span.dim // 2:
        inside = y @ span.basis.to(y.device)
        perp2 = ((y * y).sum(-1) - (inside * inside).sum(-1)).clamp(min=0.0)
    else:
        outside = y @ span.complement.to(y.device)
        perp2 = (outside * outside).sum(-1)
    return (perp2 / (y * y).sum(-1).clamp(min=1e-300)).sqrt()


def gap_threshold(
    distances: torch.Tensor, *, min_keep: int = 1, max_keep: int | None = None, ceiling: float = 0.5
) -> float:
    """An acceptance threshold at the largest log-gap of sorted distances.

    In-span candidates sit at round-off level (1e-7..1e-5), the rest orders of
    magnitude higher; the largest ratio between neighbours in the sorted list
    separates them. The cut keeps at least ``min_keep`` values (e.g. the rank: at
    least that many inputs are in the span) and at most ``max_keep``.

    Args:
        distances: ``(n,)`` relative distances (any order).
        min_keep: the fewest values the threshold must accept.
        max_keep: the most values it may accept.
        ceiling: never accept distances above this.

    Returns:
        The geometric mean of the last kept and the first rejected distance.
    """
    flat = distances.reshape(-1).to(torch.float64)
    n = flat.numel()
    if n == 0:
        return 0.0
    hi = n if max_keep is None else min(n, max_keep + 1)
    vals, _ = torch.topk(flat, k=hi, largest=False)  # ascending
    # Below ~1e-8 differences are float32 round-off, not a gap (an exact 0 vs 1e-7).
    vals = vals.clamp(min=1e-8)
    lo = max(1, min(min_keep, hi))
    if hi <= lo:
        return float(min(vals[-1].item() * 1.0000001, ceiling))
    logs = vals.log()
    gaps = logs[lo:hi] - logs[lo - 1 : hi - 1]  # gap after keeping k = lo..hi-1 values
    k = lo + int(gaps.argmax())  # keep k values
    thr = math.sqrt(float(vals[k - 1]) * float(vals[k]))
    return float(min(thr, ceiling))
