"""The span and layer-1 filter paths before issue 10's second speed-up, verbatim.

The slow references of ``test_span_filter_parity.py`` (as minGPT's parity test keeps
a trusted implementation): a Gaussian range finder with one power step and three
passes over the gradient, and layer-1 filters that recompute every (token, position)
term per call and read whole embeddings. Not used by the library.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator

import torch

from dager.span import Span, exact_relative_distance, rank_rule, relative_distance

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


VOCAB_CHUNK = 8192
"""Vocabulary rows processed at once by the layer-1 filter (bounds peak memory)."""

SCREEN = 0.05
"""Float32 screening cut: distances estimated below it are recomputed in float64."""

BOUND_DIRECTIONS = 32
"""Random complement directions a layer-1 filter with ``lower_bounds`` reads (64 past
d = 1024): ``|S^T y| <= |P_perp y|``, so a token estimated above :data:`SCREEN` is
off the span, whatever the rank; the vocabulary-sized product costs ``d * 32``
per token instead of ``d * r``. Off-span tokens read about ``sqrt(32 / (d - r))``
of their distance (0.1..0.2), far above the cut: the chance that one is recomputed
needlessly is below 1e-6."""


def _bound_directions(span: Span, device: torch.device) -> torch.Tensor | None:
    """``(d, m)`` float32 random orthonormal complement directions, or ``None`` when
    the whole basis or complement is as cheap (a small rank or a large one)."""
    d, r = span.dim, span.rank
    m = BOUND_DIRECTIONS if d <= 1024 else 2 * BOUND_DIRECTIONS
    if min(r, d - r) <= m:
        return None
    gen = torch.Generator().manual_seed(0)
    return span.complement_directions(m, gen).to(device, torch.float32)


class AdditiveLayerNormFilter:
    """Relative distances of ``LayerNorm(tokens[t] + positions[p])`` to a span, all t, p.

    LayerNorm is not linear, but everything it does factorises over the token and
    position parts: with ``c = centre(w_t) + centre(q_p)``, ``sigma^2 = |c|^2/d + eps``
    and ``y = gamma*c/sigma + beta``, every term of ``|y|^2`` and ``|Q^T y|^2`` is a sum
    of a token term, a position term and one token x position cross product. So the
    vocabulary-sized product (V x d x k) is computed once, not once per position; per
    block of positions only ``V x P`` cross products remain. ``Q`` is the smaller of the
    basis and its complement. Centring is linear, ``centre(w) . x = w . x - mean(w) sum(x)``,
    so the centred vocabulary is never materialised: every product reads the raw
    embedding matrix once.

    The expansion cancels to ~1e-3 in float32, so it only screens: every pair estimated
    below :data:`SCREEN` is recomputed exactly in float64 from its LayerNorm output.

    With ``lower_bounds``, ``Q`` is a few random directions of the complement
    (:data:`BOUND_DIRECTIONS`) instead: the estimate is then a lower bound of the
    distance, so the pairs it leaves above the cut are off the span (and reported at
    their lower bound), and the product costs ``V x d x 32`` instead of ``V x d x r``.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        eps: float,
        span: Span,
        position_rows: Callable[[range], torch.Tensor],
        *,
        lower_bounds: bool = False,
    ) -> None:
        f32 = torch.float32
        side = _token_side(tokens, gamma, beta)  # keyed on the model's own tensor
        self.tokens = tokens.detach()
        self.gamma = gamma.detach()
        self.beta = beta.detach()
        self.eps = float(eps)
        self.span = span
        self.position_rows = position_rows
        sketch = _bound_directions(span, tokens.device) if lower_bounds else None
        self.lower_bounds = sketch is not None
        self.use_basis = sketch is None and span.rank <= span.dim - span.rank
        if sketch is not None:
            q = sketch  # (d, m): |Q^T y| <= |P_perp y|
        else:
            q = (span.basis if self.use_basis else span.complement).to(tokens.device, f32)  # (d, k)
        self.q = q
        self.w = side["w"]
        self.g, self.b, self.gb = side["g"], side["b"], side["gb"]
        self.unit_gamma = side["unit_gamma"]
        self.mean, self.w_sq, self.w_gsq, self.w_gb = side["mean"], side["w_sq"], side["w_gsq"], side["w_gb"]
        self.beta_q = self.b @ q  # (k,)
        self.b_sq = float((self.b * self.b).sum())
        self.beta_q_sq = float((self.beta_q * self.beta_q).sum())
        # The only vocabulary-sized product that depends on the span: (V, d) x (d, k).
        gq = q if self.unit_gamma else self.g.unsqueeze(1) * q
        self.a = self._centred_product(gq)  # (V, k) = centre(w) (g * q)
        self.a_sq = (self.a * self.a).sum(-1, keepdim=True)
        self.a_beta = (self.a @ self.beta_q).unsqueeze(-1)

    def _centred_product(self, rhs: torch.Tensor) -> torch.Tensor:
        """``centre(tokens) @ rhs`` without forming the centred matrix."""
        out = self.w @ rhs
        out.sub_(self.mean * rhs.sum(0, keepdim=True))
        return out

    def distances(self, positions: range) -> torch.Tensor:
        """``(P, V)`` float64 relative distances; exact (float64) below the screen."""
        d = self.w.shape[1]
        rows = self.position_rows(positions).detach()  # (P, d)
        cp = rows.to(torch.float32)
        cp = cp - cp.mean(-1, keepdim=True)
        g = self.g
        bp = (cp * g) @ self.q  # (P, k)
        P = cp.shape[0]
        if self.unit_gamma:
            cross_c = self.w @ cp.T  # (V, P); cp sums to 0, so centring the tokens is a no-op
            cross_g = cross_c
        else:
            cross = self._centred_product(torch.cat([cp, cp * g * g], dim=0).T)  # (V, 2P)
            cross_c, cross_g = cross[:, :P], cross[:, P:]
        cross_a = self.a @ bp.T  # (V, P)
        var = (self.w_sq + 2 * cross_c + (cp * cp).sum(-1)) / d + self.eps  # (V, P)
        sigma = var.sqrt()
        y_sq = (self.w_gsq + 2 * cross_g + ((cp * g) ** 2).sum(-1)) / var
        y_sq = y_sq + 2 * (self.w_gb + cp @ self.gb) / sigma + self.b_sq
        proj = (self.a_sq + 2 * cross_a + (bp * bp).sum(-1)) / var
        proj = proj + 2 * (self.a_beta + bp @ self.beta_q) / sigma + self.beta_q_sq
        perp = y_sq - proj if self.use_basis else proj
        approx = (perp.clamp(min=0.0) / y_sq.clamp(min=1e-30)).sqrt().T.to(torch.float64)  # (P, V)
        near = (approx < SCREEN).nonzero()  # (m, 2): (position row, token)
        if near.numel():
            x = self.tokens[near[:, 1]].to(torch.float64) + rows[near[:, 0]].to(torch.float64)
            y = torch.nn.functional.layer_norm(
                x, (d,), self.gamma.to(torch.float64), self.beta.to(torch.float64), self.eps
            )
            approx[near[:, 0], near[:, 1]] = exact_relative_distance(y, self.span)
        return approx


_OLD_TOKEN_SIDE: dict[int, tuple[weakref.ref, dict]] = {}
"""Token-side terms by ``id`` of the embedding tensor (with a weak reference to check
it is still that tensor: tensors compare element-wise, so they cannot key a
``WeakKeyDictionary``)."""


def _token_side(tokens: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Span-independent vocabulary terms of :class:`AdditiveLayerNormFilter`.

    They depend only on the model's weights, so they are computed once per model and
    kept while the embedding tensor lives (recomputed if it is modified in place).
    The cache is keyed on the tensor object itself: pass the model's parameter, not a
    fresh ``detach()`` of it.
    """
    key_version = (tokens._version, gamma._version, beta._version, gamma.data_ptr(), beta.data_ptr())
    entry = _OLD_TOKEN_SIDE.get(id(tokens))
    if entry is not None and entry[0]() is tokens and entry[1]["version"] == key_version:
        return entry[1]
    f32 = torch.float32
    with torch.no_grad():
        w = tokens.detach()
        if w.dtype != f32:
            w = w.to(f32)
        g = gamma.detach().to(f32)
        b = beta.detach().to(f32)
        d = w.shape[1]
        unit_gamma = bool((g == 1).all())
        mean = w.mean(-1, keepdim=True)  # (V, 1)
        # |centre(w)|^2 = |w|^2 - d mean^2 (float32 is plenty for a screen).
        w_norm2 = torch.linalg.vector_norm(w, dim=-1, keepdim=True).square()
        w_sq = w_norm2 - d * mean * mean
        gb = g * b
        w_gb = w @ gb - mean.squeeze(1) * gb.sum()
        if unit_gamma:
            w_gsq = w_sq
        else:
            # |g * centre(w)|^2 = (w^2) g^2 - 2 mean (w g^2) + mean^2 |g|^2, in chunks.
            g2 = g * g
            w_gsq = torch.empty_like(mean)
            for start in range(0, w.shape[0], VOCAB_CHUNK):
                rows = w[start : start + VOCAB_CHUNK]
                w_gsq[start : start + rows.shape[0]] = (rows * rows) @ g2.unsqueeze(1)
            w_gsq = w_gsq - 2 * mean * (w @ g2).unsqueeze(1) + mean * mean * g2.sum()
    side = {
        "version": key_version,
        "w": w,
        "g": g,
        "b": b,
        "gb": gb,
        "unit_gamma": unit_gamma,
        "mean": mean,
        "w_sq": w_sq,  # (V, 1)
        "w_gsq": w_gsq,
        "w_gb": w_gb.unsqueeze(-1),
    }
    for key in [k for k, (ref, _) in _OLD_TOKEN_SIDE.items() if ref() is None]:
        del _OLD_TOKEN_SIDE[key]
    _OLD_TOKEN_SIDE[id(tokens)] = (weakref.ref(tokens), side)
    return side


class ScaleFreeFilter:
    """Relative distances of ``gamma * tokens[t]`` to a span (RMSNorm: scale-free).

    Float32 estimates below :data:`SCREEN` are recomputed in float64. With
    ``lower_bounds`` the estimate reads only a few complement directions (see
    :data:`BOUND_DIRECTIONS`): a lower bound, so what it leaves above the cut is off the
    span, at ``d x 64`` per token instead of ``d x r``.
    """

    def __init__(self, tokens: torch.Tensor, gamma: torch.Tensor, span: Span, *, lower_bounds: bool = False) -> None:
        self.tokens = tokens.detach()
        self.gamma = gamma.detach()
        self.span = span
        self.sketch = _bound_directions(span, tokens.device) if lower_bounds else None
        self.lower_bounds = self.sketch is not None

    def distances(self, positions: range) -> torch.Tensor:
        V = self.tokens.shape[0]
        out = torch.empty((1, V), dtype=torch.float64, device=self.tokens.device)
        for start in range(0, V, VOCAB_CHUNK):
            rows = self.tokens[start : start + VOCAB_CHUNK].to(torch.float32) * self.gamma.to(torch.float32)
            if self.sketch is not None:
                norm = rows.norm(dim=-1).clamp(min=1e-30)
                approx = ((rows @ self.sketch).norm(dim=-1) / norm).to(torch.float64)
            else:
                approx = relative_distance(rows, self.span, fast=True)
            near = (approx < SCREEN).nonzero().squeeze(1)
            if near.numel():
                approx[near] = exact_relative_distance(rows[near].to(torch.float64), self.span)
            out[0, start : start + rows.shape[0]] = approx
        return out
