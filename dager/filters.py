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


def _bound_directions(span: Span, device: torch.device) -> tuple[int, torch.Tensor] | None:
    """``(c, S)``: ``m`` float32 random orthonormal complement directions ``S`` ``(c, m)``
    supported on the first ``c`` coordinates, or ``None`` when the whole basis or
    complement is as cheap (a small rank or a large one).

    A direction supported on the first ``c`` coordinates is orthogonal to the span
    when it is orthogonal to the basis's first ``c`` rows: with ``c = r + 2m`` there
    are ``c - r`` such directions (the complete QR of those rows), and the
    vocabulary-sized product reads ``c`` of each embedding's ``d`` coordinates (GPT-2
    at B=8: 180 of 768) instead of all of them. The bound holds for any such
    directions; their randomness only makes it tight.
    """
    d, r = span.dim, span.rank
    m = BOUND_DIRECTIONS if d <= 1024 else 2 * BOUND_DIRECTIONS
    if min(r, d - r) <= m:
        return None
    gen = torch.Generator().manual_seed(0)
    c = r + 2 * m
    if c >= d:
        return d, span.complement_directions(m, gen).to(device, torch.float32)
    head = span.basis[:c]  # (c, r)
    null = torch.linalg.qr(head, mode="complete").Q[:, r:]  # (c, c - r): orthogonal to every basis column
    mix = torch.linalg.qr(torch.randn((c - r, m), generator=gen, dtype=torch.float64).to(null.device)).Q
    return c, (null @ mix).to(device, torch.float32)  # (c, m) orthonormal


class AdditiveLayerNormFilter:
    """Relative distances of ``LayerNorm(tokens[t] + positions[p])`` to a span, all t, p.

    LayerNorm is not linear, but everything it does factorises over the token and
    position parts: with ``c = centre(w_t) + centre(q_p)``, ``sigma^2 = |c|^2/d + eps``
    and ``y = gamma*c/sigma + beta``, every term of ``|y|^2`` and ``|Q^T y|^2`` is a sum
    of a token term, a position term and one token x position cross product. ``Q`` is
    the smaller of the basis and its complement. Centring is linear,
    ``centre(w) . x = w . x - mean(w) sum(x)``, so the centred vocabulary is never
    materialised.

    Everything but ``Q`` belongs to the model: ``sigma`` and ``|y|^2`` of every (token,
    position) pair, the ``V x d`` product per position, are kept per model and
    position (:func:`_position_terms`, bounded by :data:`POSITION_CACHE_BYTES`). Per
    span only the vocabulary-sized product ``centre(w) (gamma * Q)`` (``V x d x k``)
    and ``V x k`` cross products per position remain. Without a LayerNorm bias the
    distance is scale-free and ``sigma`` cancels.

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
        self.side = side
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
            c, q = sketch  # (c, m): |Q^T y| <= |P_perp y|, Q zero past coordinate c
        else:
            c, q = span.dim, (span.basis if self.use_basis else span.complement).to(tokens.device, f32)  # (d, k)
        self.cols = c
        self.q = q
        self.w = side["w"]
        self.g, self.b = side["g"][:c], side["b"][:c]
        self.unit_gamma = side["unit_gamma"]
        self.zero_beta = side["zero_beta"]
        self.mean = side["mean"]
        self.beta_q = self.b @ q  # (k,)
        self.beta_q_sq = float((self.beta_q * self.beta_q).sum())
        # The only vocabulary-sized product that depends on the span: (V, d) x (d, k).
        gq = q if self.unit_gamma else self.g.unsqueeze(1) * q
        self.a = self._centred_product(gq)  # (V, k) = centre(w) (g * q)
        self.a_sq = (self.a * self.a).sum(-1)  # (V,)
        self.a_beta = self.a @ self.beta_q  # (V,)

    def _centred_product(self, rhs: torch.Tensor) -> torch.Tensor:
        """``centre(tokens) @ rhs`` without forming the centred matrix (``rhs`` ``(c, k)``:
        zero past the first ``c`` coordinates)."""
        out = self.w[:, : self.cols] @ rhs
        out.sub_(self.mean * rhs.sum(0, keepdim=True))
        return out

    def distances(self, positions: range) -> torch.Tensor:
        """``(P, V)`` float64 relative distances; exact (float64) below the screen."""
        rows = self.position_rows(positions).detach()  # (P, d)
        cp = rows.to(torch.float32)
        cp = cp - cp.mean(-1, keepdim=True)
        bp = (cp[:, : self.cols] * self.g) @ self.q  # (P, k)
        terms = _position_terms(self.side, positions, rows, self.eps)
        # |Q^T gamma c|^2 for every pair: (P, V), one (P, k) x (k, V) product.
        num = torch.addmm((bp * bp).sum(-1, keepdim=True) + self.a_sq, bp, self.a.T, alpha=2.0)
        if self.zero_beta:
            ratio = num / terms["den"]  # sigma cancels: |Q^T y|^2 / |y|^2
        else:
            proj = num * terms["inv_var"]
            proj += 2 * ((bp @ self.beta_q).unsqueeze(1) + self.a_beta) * terms["inv_sigma"]
            proj += self.beta_q_sq
            ratio = proj / terms["y_sq"]
        if self.use_basis:
            ratio = 1.0 - ratio
        approx = ratio.clamp_(min=0.0).sqrt_().to(torch.float64)  # (P, V)
        near = (approx < SCREEN).nonzero()  # (m, 2): (position row, token)
        if near.numel():
            d = rows.shape[1]
            x = self.tokens[near[:, 1]].to(torch.float64) + rows[near[:, 0]].to(torch.float64)
            y = torch.nn.functional.layer_norm(
                x, (d,), self.gamma.to(torch.float64), self.beta.to(torch.float64), self.eps
            )
            approx[near[:, 0], near[:, 1]] = exact_relative_distance(y, self.span)
        return approx


POSITION_CACHE_BYTES = 64 * 2**20
"""Bytes of per-position vocabulary terms kept per model by :func:`_position_terms`
(GPT-2: about 320 positions; beyond them the terms are computed per call)."""


def _position_terms(side: dict, positions: range, rows: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """The span-independent ``(P, V)`` terms of :class:`AdditiveLayerNormFilter`.

    ``|y|^2`` and ``sigma`` of every (token, position) pair depend only on the model,
    but cost ``V x d`` per position (the token x position cross product): they are
    kept in the model's token-side entry, per position, with the position's row (a
    changed row is recomputed), up to :data:`POSITION_CACHE_BYTES`.

    Returns:
        Without a LayerNorm bias ``{"den"}`` (``|gamma c|^2``, the scale-free
        ``|y|^2 sigma^2``), else ``{"inv_var", "inv_sigma", "y_sq"}``; each ``(P, V)``.
    """
    if not len(positions):
        return _compute_position_terms(side, rows, eps)
    cache: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = side["positions"]
    found: dict[int, dict[str, torch.Tensor]] = {}
    missing: list[int] = []
    for i, p in enumerate(positions):
        entry = cache.get(p)
        if entry is not None and torch.equal(entry[0], rows[i]):
            found[i] = entry[1]
        else:
            missing.append(i)
    if missing:
        fresh = _compute_position_terms(side, rows[missing], eps)
        per_position = sum(t.shape[1] * t.element_size() for t in fresh.values())
        for j, i in enumerate(missing):
            found[i] = {name: t[j] for name, t in fresh.items()}
            if side["position_bytes"] + per_position <= POSITION_CACHE_BYTES:
                found[i] = {name: t.clone() for name, t in found[i].items()}  # not a view of the block
                cache[positions[i]] = (rows[i].clone(), found[i])
                side["position_bytes"] += per_position
    names = found[0].keys()
    return {name: torch.stack([found[i][name] for i in range(len(positions))]) for name in names}


def _compute_position_terms(side: dict, rows: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """``(P, V)`` float32 terms of :func:`_position_terms` for the position ``rows`` ``(P, d)``."""
    w, g = side["w"], side["g"]
    d = w.shape[1]
    cp = rows.detach().to(torch.float32)
    cp = cp - cp.mean(-1, keepdim=True)
    P = cp.shape[0]
    if side["unit_gamma"]:
        cross_c = cp @ w.T  # (P, V); cp sums to 0, so centring the tokens is a no-op
        cross_g = cross_c
    else:
        cross = torch.cat([cp, cp * g * g], dim=0) @ w.T  # (2P, V); the second half needs centring
        cross_c = cross[:P]
        cross_g = cross[P:] - (cp * g * g).sum(-1, keepdim=True) * side["mean"].T
    gsq = side["w_gsq"].T + ((cp * g) ** 2).sum(-1, keepdim=True) + 2 * cross_g  # (P, V) |gamma c|^2
    if side["zero_beta"]:
        return {"den": gsq.clamp_(min=1e-30)}
    var = (side["w_sq"].T + 2 * cross_c + (cp * cp).sum(-1, keepdim=True)) / d + eps  # (P, V)
    inv_var = var.reciprocal()
    inv_sigma = inv_var.sqrt()
    y_sq = gsq * inv_var + 2 * (side["w_gb"].T + (cp @ side["gb"]).unsqueeze(1)) * inv_sigma + side["b_sq"]
    y_sq.clamp_(min=1e-30)
    return {"inv_var": inv_var, "inv_sigma": inv_sigma, "y_sq": y_sq}


_TOKEN_SIDE: dict[tuple[str, int], tuple[weakref.ref, dict]] = {}
"""Token-side terms by kind and ``id`` of the embedding tensor (with a weak reference to check
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
    entry = _TOKEN_SIDE.get(("layernorm", id(tokens)))
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
        "zero_beta": bool((b == 0).all()),
        "b_sq": float((b * b).sum()),
        "positions": {},  # filled by _position_terms
        "position_bytes": 0,
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
    _remember(("layernorm", id(tokens)), tokens, side)
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
        sketch = _bound_directions(span, tokens.device) if lower_bounds else None
        self.lower_bounds = sketch is not None
        if sketch is not None:
            self.cols, self.sketch = sketch
            self.norms = _scale_free_norms(tokens, gamma)  # (V,) |gamma * w_t|, kept per model

    def distances(self, positions: range) -> torch.Tensor:
        V = self.tokens.shape[0]
        out = torch.empty((1, V), dtype=torch.float64, device=self.tokens.device)
        g = self.gamma.to(torch.float32)
        for start in range(0, V, VOCAB_CHUNK):
            chunk = self.tokens[start : start + VOCAB_CHUNK]
            if self.lower_bounds:
                c = self.cols
                inside = (chunk[:, :c].to(torch.float32) * g[:c]) @ self.sketch  # (n, m)
                norm = self.norms[start : start + chunk.shape[0]]
                approx = (inside.norm(dim=-1) / norm).to(torch.float64)
            else:
                approx = relative_distance(chunk.to(torch.float32) * g, self.span, fast=True)
            near = (approx < SCREEN).nonzero().squeeze(1)
            if near.numel():
                rows = chunk[near].to(torch.float32) * g
                approx[near] = exact_relative_distance(rows.to(torch.float64), self.span)
            out[0, start : start + chunk.shape[0]] = approx
        return out


def _scale_free_norms(tokens: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``(V,)`` float32 ``|gamma * tokens[t]|`` (clamped above 0), kept per model like
    :func:`_token_side`."""
    key = ("rms", id(tokens))
    version = (tokens._version, gamma._version, gamma.data_ptr())
    entry = _TOKEN_SIDE.get(key)
    if entry is not None and entry[0]() is tokens and entry[1]["version"] == version:
        return entry[1]["norms"]
    with torch.no_grad():
        g = gamma.detach().to(torch.float32)
        norms = torch.empty(tokens.shape[0], dtype=torch.float32, device=tokens.device)
        for start in range(0, tokens.shape[0], VOCAB_CHUNK):
            rows = tokens[start : start + VOCAB_CHUNK].detach().to(torch.float32) * g
            norms[start : start + rows.shape[0]] = rows.norm(dim=-1)
        norms.clamp_(min=1e-30)
    _remember(key, tokens, {"version": version, "norms": norms})
    return norms


def _remember(key: tuple[str, int], tokens: torch.Tensor, entry: dict) -> None:
    """Keep ``entry`` for the embedding tensor ``tokens`` (dropping dead models' entries)."""
    for old in [k for k, (ref, _) in _TOKEN_SIDE.items() if ref() is None]:
        del _TOKEN_SIDE[old]
    _TOKEN_SIDE[key] = (weakref.ref(tokens), entry)
