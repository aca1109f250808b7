"""Layer-1 token filters: every vocabulary token's distance to the layer-1 span.

Two shapes serve the families: :class:`AdditiveLayerNormFilter` (learned absolute
positions added before a LayerNorm: GPT-2, BERT) and :class:`ScaleFreeFilter`
(RMSNorm without a bias: Llama, one bag of tokens for every position). Both
screen in float32 and recompute the tokens below :data:`SCREEN` in float64.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from dager.span import Span, exact_relative_distance, relative_distance

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


_TOKEN_SIDE: dict[int, tuple[weakref.ref, dict]] = {}
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
    entry = _TOKEN_SIDE.get(id(tokens))
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
    for key in [k for k, (ref, _) in _TOKEN_SIDE.items() if ref() is None]:
        del _TOKEN_SIDE[key]
    _TOKEN_SIDE[id(tokens)] = (weakref.ref(tokens), side)
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
