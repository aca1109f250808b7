"""Precision-aware rank cut: DAGER's spans from a half-precision (bf16/fp16) update.

A client that trains in bf16 or fp16 shares an update whose every entry carries a
rounding error of up to the dtype's unit round-off ``u`` (``2^-8`` for bf16, ``2^-11``
for fp16) relative to its value, plus the round-off of the half-precision products
that computed it. That error is a full-rank matrix ``E``: it lifts the Gram matrix's
``d - r`` zero eigenvalues to a bulk whose level is predictable from the update alone,

    ``nu = u^2 * trace(G G^T) / d``

(the mean eigenvalue of ``E E^T`` when every entry's error is about ``u`` of its value;
``trace(G G^T)`` is the gradient's squared Frobenius norm). Measured on the embedded
models' medium-set batches (B=8, bf16), the largest rounding eigenvalue sat at
1.3-1.9 ``nu`` and the weakest true input direction at 16-100 ``nu``, in all three spans
DAGER reads (tiny d=256 test models: rounding up to 2.9 ``nu``, true directions down to
5.9 ``nu``; a synthetic spectrum with one dominant direction: rounding up to 3.7 ``nu``); in fp32 the same spectra fall to ~1e-16 of the largest eigenvalue.

The fp32 rule (a relative cut at 1e-6 of the largest eigenvalue, extended to the largest
log-gap of the whole spectrum) fails here: a block-1 span's weak true directions lie
below 1e-6 of the largest, and the largest log-gap of a bf16 spectrum may lie between
its few dominant directions. :func:`half_precision_rank` instead cuts at the largest
ratio gap that straddles the predicted noise level (the eigenvalue above the cut at least
:data:`SIGNAL_FLOOR` ``nu``, the one below at most :data:`NOISE_CEILING` ``nu``), extended
to every eigenvalue above :data:`NOISE_CUT` ``nu``. Nothing is
tuned per run: ``u`` comes from the update's dtype, ``nu`` from its norm.

What no rank cut can undo: the client's layer inputs were computed in half precision,
the attacker's in fp32, so a true input lies within ~``u`` to ~10 ``u`` (relative) of
the span instead of ~1e-7. The thresholds DAGER derives from the gap between in-span and
off-span distances adapt to that (off-span distances are ~0.9 at d = 768).
"""

from __future__ import annotations

import math

import torch

from dager.span import Span, gram_spectrum, span_from_spectrum

HALF_DTYPES = (torch.bfloat16, torch.float16)
"""Dtypes whose round-off DAGER's fp32 rank rule cannot absorb."""

SIGNAL_FLOOR = 3.0
"""A cut's upper eigenvalue must be at least this many ``nu`` (rounding never reached 2)."""

NOISE_CEILING = 12.0
"""A cut's lower eigenvalue must be at most this many ``nu`` (true directions sat at 16+)."""

NOISE_CUT = 5.0
"""Eigenvalues above this many ``nu`` are always kept (rounding reached 3.7 at most)."""

CLEAR_CUT = 2.0
"""A half-precision cut is clear when the eigenvalue above it is at least this many times
the one below it. Below that the true directions run on into the rounding bulk, and the
weakest of them are lost: llama-small-random in bf16 (medium set, B=8, batch 1) had block
1's true spectrum go down to 1.05 ``nu`` against a bulk up to about 2 ``nu``; its cut at
rank 124 of 131 had ratio 1.21 and two sentences came back cut short yet passed every
check. Clear cuts measured: 2.23 and up (tiny d=256 models 2.23-8.6, gpt2-small-random
7.2-12, llama-small-random's other batches 1.58-3.5 in bf16 and 31+ in fp16)."""

DELTA_TOLERANCE = 1e-10
"""Relative eigenvalue cut for a FedAvg weight delta (instead of the fp32 rule's 1e-6).

Over several local steps the weights drift, so the client's inputs at step s differ
from the attacker's (computed with the weights it sent) by ~lr * s of a gradient: the
delta's spectrum decays smoothly from the true inputs into weak drift directions,
without the clean gap a FedSGD gradient has at float32 round-off. Measured on
gpt2-small-random (medium set, B=8, 2 epochs of minibatches of 2, lr 1e-4): with the
1e-6 cut block 1's span had rank 126 and true inputs lay up to 0.33 from it (two
sentences cut short, 6/8); with 1e-10, rank 158, they lay within ~1e-2 (random vectors
at ~0.87) and 8/8 came back; with 1e-13 (rank 245) the true inputs' distances spread
over three decades and the search's automatic layer-2 threshold split them (1/8). The
lr x epochs table of ``benchmarks/client_bench.py`` checks the one value elsewhere."""


def span_tolerance(kind: str, tolerance: float) -> float:
    """The relative eigenvalue cut for an update of ``kind`` (see :data:`DELTA_TOLERANCE`).

    Args:
        kind: the update's kind (``"fedsgd-gradient"`` or ``"fedavg-delta"``).
        tolerance: the configured cut (kept for gradients, and when it is lower).
    """
    if kind == "fedavg-delta":
        return min(tolerance, DELTA_TOLERANCE)
    return tolerance


def round_off(dtype: torch.dtype) -> float:
    """The unit round-off of ``dtype``.

    Raises:
        ValueError: for a dtype that is not a floating type DAGER reads.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"no round-off known for {dtype}")
    return torch.finfo(dtype).eps / 2  # eps: the distance from 1 to the next value


def is_half(dtype: torch.dtype) -> bool:
    """True for bf16 and fp16 (the update's round-off needs :func:`half_precision_rank`)."""
    return dtype in HALF_DTYPES


def noise_level(evals: torch.Tensor, dtype: torch.dtype) -> float:
    """``nu``: the mean Gram eigenvalue that rounding to ``dtype`` adds.

    Args:
        evals: ``(d,)`` float64 eigenvalues of ``G G^T`` (any order, clamped at 0).
        dtype: the dtype the update was shared in.
    """
    d = int(evals.numel())
    if d == 0:
        return 0.0
    return round_off(dtype) ** 2 * float(evals.sum()) / d


def half_precision_rank(evals: torch.Tensor, dtype: torch.dtype) -> int:
    """The rank of a rounded gradient's input space: its eigenvalues above the rounding bulk.

    Args:
        evals: ``(d,)`` float64 eigenvalues of ``G G^T``, descending.
        dtype: the dtype the update was shared in.

    Returns:
        The position of the largest ratio gap whose upper side is at least
        :data:`SIGNAL_FLOOR` ``nu`` and whose lower side is at most :data:`NOISE_CEILING`
        ``nu``, or the count of eigenvalues above :data:`NOISE_CUT` ``nu`` when larger.
    """
    nu = noise_level(evals, dtype)
    if nu <= 0.0:
        return 0
    rel = (evals / nu).clamp(min=1e-300)  # (d,) in units of the rounding level
    d = int(rel.numel())
    upper = rel[:-1]  # eigenvalue above a cut at r = 1..d-1
    lower = rel[1:]  # eigenvalue below it
    ok = (upper >= SIGNAL_FLOOR) & (lower <= NOISE_CEILING)
    count = int((rel > NOISE_CUT).sum())
    if not bool(ok.any()):
        return min(count, d)
    gaps = torch.where(ok, upper.log() - lower.log(), torch.full_like(upper, -math.inf))
    # A weak true direction just above the bulk (a small model in bf16: 6 nu) makes a
    # smaller gap than the one above it: every eigenvalue above NOISE_CUT nu is kept.
    return max(int(gaps.argmax()) + 1, min(count, d))


def clear_cut(span: Span) -> bool:
    """Whether a half-precision span's cut is a clear edge (see :data:`CLEAR_CUT`).

    When it is not, a true input may lie partly outside the span, so a sentence that
    passes every check may still be cut short: DAGER then certifies no sentence.
    """
    return span.rank == 0 or span.gap >= CLEAR_CUT


def half_precision_span(matrix: torch.Tensor, *, tolerance: float) -> Span:
    """:func:`dager.span.span_of` for a bf16/fp16 gradient: the rank from :func:`half_precision_rank`.

    The spectrum is computed in float64 from the half-precision values (they are exact in
    float64), so the only round-off left is the client's.

    Args:
        matrix: ``(d, k)`` input-side matrix of the gradient, in the update's dtype.
        tolerance: recorded on the span (the fp32 cut it replaces).

    Raises:
        ValueError: when ``matrix`` is not bf16 or fp16.
    """
    if not is_half(matrix.dtype):
        raise ValueError(f"half_precision_span needs a bf16 or fp16 matrix, got {matrix.dtype}")
    evals, evecs = gram_spectrum(matrix)  # float64
    r = half_precision_rank(evals, matrix.dtype) if evals.numel() and float(evals[0]) > 0 else 0
    return span_from_spectrum(evals, evecs, r, tolerance=tolerance)


__all__ = [
    "CLEAR_CUT",
    "DELTA_TOLERANCE",
    "HALF_DTYPES",
    "clear_cut",
    "NOISE_CEILING",
    "NOISE_CUT",
    "SIGNAL_FLOOR",
    "half_precision_rank",
    "half_precision_span",
    "is_half",
    "noise_level",
    "round_off",
    "span_tolerance",
]
