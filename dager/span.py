"""Span and rank maths of DAGER (Petrov et al. 2024, Sec. 3: low-rank gradients).

For a linear layer ``W`` applied to input rows ``z_i``, the weight gradient is
``sum_i z_i (dL/dy_i)^T``, so its input-side space is ``span{z_i}`` (Lemma 3.1). A
candidate input lies in the batch exactly when its distance to that span is ~0 (Thm. 3.2).

Everything here is pure tensor maths with no model knowledge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GAP_FLOOR = 1e-13
"""Relative eigenvalues below this are float32 round-off and never define a gap."""


@dataclass(frozen=True)
class Span:
    """An orthonormal basis of a gradient's input space, and its complement.

    Attributes:
        basis: ``(d, r)`` float64 orthonormal basis of the span.
        complement: ``(d, d - r)`` float64 orthonormal basis of its complement.
        singular_values: ``(d,)`` float64, descending: square roots of the Gram
            matrix's eigenvalues (the gradient's singular values).
        rank: r.
        tolerance: the relative eigenvalue cut that produced r.
        gap: ratio of the r-th to the (r+1)-th eigenvalue (large = a clean cut).
    """

    basis: torch.Tensor
    complement: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    tolerance: float
    gap: float

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


def span_of(
    matrix: torch.Tensor, *, tolerance: float = 1e-6, rank: int | None = None, by_gap: bool = False
) -> Span:
    """The span of a gradient's input space with an automatic rank.

    The rank counts eigenvalues above ``tolerance`` times the largest (float64: in
    float32 the round-off floor swallows the small true eigenvalues). With
    ``by_gap`` the cut is instead the largest gap of the log-spectrum above the
    round-off floor, which still finds the signal when noise lifts every eigenvalue.

    Args:
        matrix: ``(d, k)`` input-side matrix of the gradient.
        tolerance: relative eigenvalue cut.
        rank: force this rank (used for tests and ablations).
        by_gap: choose the rank at the largest spectral gap instead.
    """
    evals, evecs = gram_spectrum(matrix)
    d = evals.shape[0]
    top = float(evals[0]) if d else 0.0
    if top <= 0.0:
        r = 0
    elif rank is not None:
        r = max(0, min(int(rank), d))
    elif by_gap:
        r = largest_log_gap(evals / top, floor=GAP_FLOOR)
    else:
        # The relative cut, extended down to the spectrum's largest gap when that lies
        # below it: gradients reaching layer 2 through many layers can be weak
        # (eigenvalues ~1e-7 of the largest) yet far above float32 round-off (~1e-15).
        r = int((evals > tolerance * top).sum())
        r = max(r, largest_log_gap(evals / top, floor=GAP_FLOOR))
    if 0 < r < d:
        gap = float(evals[r - 1] / max(float(evals[r]), 1e-300))
    else:
        gap = math.inf
    return Span(
        basis=evecs[:, :r].contiguous(),
        complement=evecs[:, r:].contiguous(),
        singular_values=evals.sqrt(),
        rank=r,
        tolerance=tolerance,
        gap=gap,
    )


def largest_log_gap(relative: torch.Tensor, *, floor: float = GAP_FLOOR) -> int:
    """How many leading values precede the largest ratio gap (values descending)."""
    vals = relative[relative > floor]
    if vals.numel() <= 1:
        return int(vals.numel())
    logs = vals.log()
    gaps = logs[:-1] - logs[1:]  # (n-1,) drops between neighbours
    # A tail reaching the floor is a gap too: round-off below it.
    k = int(gaps.argmax()) + 1
    if vals.numel() < relative.numel() and float(logs[-1] - math.log(floor)) > float(gaps.max()):
        k = int(vals.numel())
    return k


def relative_distance(rows: torch.Tensor, span: Span) -> torch.Tensor:
    """``||P_perp y|| / ||y||`` for each row, computed on the cheaper side.

    A small span projects onto the basis in float64 (a subtraction that float32
    would ruin); a large one measures the complement component directly, which has
    no cancellation, so float32 suffices there.
    """
    r = span.rank
    d = span.dim
    if r == 0:
        return torch.ones(rows.shape[:-1], dtype=torch.float64, device=rows.device)
    if r < d // 2:
        y = rows.to(torch.float64)
        norm2 = (y * y).sum(-1)
        inside = y @ span.basis.to(y.device)  # (..., r)
        perp2 = (norm2 - (inside * inside).sum(-1)).clamp(min=0.0)
    else:
        y = rows.to(torch.float32)
        comp = _complement32(span).to(y.device)
        outside = y @ comp  # (..., d - r)
        perp2 = (outside * outside).sum(-1).to(torch.float64)
        norm2 = (y * y).sum(-1).to(torch.float64)
    return (perp2 / norm2.clamp(min=1e-300)).sqrt()


_COMP32: dict[int, torch.Tensor] = {}


def _complement32(span: Span) -> torch.Tensor:
    # Cached float32 copy per span object (spans are immutable); weak on purpose: small.
    key = id(span.complement)
    cached = _COMP32.get(key)
    if cached is None or cached.shape != span.complement.shape:
        if len(_COMP32) > 8:
            _COMP32.clear()
        cached = span.complement.to(torch.float32)
        _COMP32[key] = cached
    return cached


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
    vals = vals.clamp(min=1e-300)
    lo = max(1, min(min_keep, hi))
    if hi <= lo:
        return float(min(vals[-1].item() * 1.0000001, ceiling))
    logs = vals.log()
    gaps = logs[lo:hi] - logs[lo - 1 : hi - 1]  # gap after keeping k = lo..hi-1 values
    k = lo + int(gaps.argmax())  # keep k values
    thr = math.sqrt(float(vals[k - 1]) * float(vals[k]))
    return float(min(thr, ceiling))
