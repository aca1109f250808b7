"""Per-family layer hooks: which gradients span which layer inputs, and the inputs.

DAGER needs, for each family, three things (Petrov et al. 2024, Sec. 4):

* the parameters whose gradients span the inputs of the first two attention layers
  (and, beyond the paper, of block 0's MLP, used to reject prefixes early);
* the layer-1 inputs of every vocabulary token (the token filter);
* a forward of block 0 that can be run one position at a time for many prefixes
  (decoders: a key/value cache) or on whole sequences (encoders).

Hooks are registered by ``config.model_type`` with :func:`register_hooks`; the engine
never branches on a family name.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from collections.abc import Callable, Mapping

import torch
from torch import nn

from fedclient.errors import UnsupportedModelError
from fedclient.families import family_for
from dager.span import Span, exact_relative_distance, relative_distance

HOOKS: dict[str, type[FamilyHooks]] = {}

VOCAB_CHUNK = 8192
"""Vocabulary rows processed at once by the layer-1 filter (bounds peak memory)."""


def register_hooks(model_type: str) -> Callable[[type[FamilyHooks]], type[FamilyHooks]]:
    """Class decorator: serve ``model_type`` with these hooks (later registrations win)."""

    def deco(cls: type[FamilyHooks]) -> type[FamilyHooks]:
        HOOKS[model_type] = cls
        return cls

    return deco


def hooks_for(model: nn.Module) -> FamilyHooks:
    """The hooks for a model, chosen by ``model.config.model_type``.

    Raises:
        UnsupportedModelError: no hooks serve this family.
    """
    model_type = family_for(model.config.model_type).model_type  # the declared families decide
    try:
        cls = HOOKS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"DAGER has no layer hooks for models of type {model_type!r}; supported: "
            f"{', '.join(sorted(HOOKS))}. Pick a checkpoint of one of these families."
        ) from None
    return cls(model)


class FamilyHooks:
    """Base class: parameter naming and helpers shared by every family."""

    is_decoder: bool = True
    positional: bool = True
    """True when the layer-1 input depends on the position (learned absolute positions)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self._names = {id(p): n for n, p in model.named_parameters()}

    # -- naming -----------------------------------------------------------------
    def name_of(self, param: torch.Tensor) -> str:
        return self._names[id(param)]

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.token_embedding_matrix().shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def attention_parameters(self, layer: int) -> list[str]:
        """Names of the weights whose gradients span block ``layer``'s attention input."""
        raise NotImplementedError

    def mlp_parameters(self, layer: int) -> list[str]:
        """Names of the weights whose gradients span block ``layer``'s MLP input."""
        raise NotImplementedError

    def required_parameters(self) -> list[str]:
        names = self.attention_parameters(0) + self.attention_parameters(1)
        if self.is_decoder:
            names += self.mlp_parameters(0)
        return names

    def input_matrix(self, update: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        """``(d, k)``: columns spanning the input space of the named weights' layer."""
        parts = []
        for name in names:
            grad = update[name].detach()
            parts.append(self._input_columns(name, grad))
        return torch.cat(parts, dim=1)

    def _input_columns(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        # nn.Linear stores (out, in): the input space is the row space.
        return grad.T

    # -- layer 1 ------------------------------------------------------------------
    def token_embedding_matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def layer1_filter(self, span: Span, *, lower_bounds: bool = False) -> AdditiveLayerNormFilter | ScaleFreeFilter:
        """An object whose ``distances(positions)`` gives ``(P, V)`` float64 relative
        distances of every token's layer-1 input to ``span`` (``(1, V)`` when the
        inputs do not depend on the position). With ``lower_bounds``, distances above
        :data:`SCREEN` may be lower bounds (cheaper; exact below the cut)."""
        raise NotImplementedError

    def num_positions(self) -> int:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Shared maths


QKV_MEMO_BYTES = 128 * 2**20
"""Most bytes of position-free candidate projections a decoder search keeps (Llama)."""

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


@dataclass(frozen=True)
class MlpNormTerms:
    """Block 0 from the attention mix to the MLP input, as plain tensors.

    ``h = x + mix @ out_weight.T + out_bias`` and the MLP input is
    ``gamma * c(h) / sqrt(|c(h)|^2 / d + eps) + beta``, where ``c`` subtracts the mean
    (LayerNorm, ``centred``) or is the identity (RMSNorm).

    Attributes:
        out_weight: ``(d, H * dh)`` attention output projection.
        out_bias: ``(d,)`` or ``None``.
        gamma: ``(d,)`` norm weight.
        beta: ``(d,)`` norm bias, or ``None``.
        eps: the norm's epsilon.
        centred: True for LayerNorm, False for RMSNorm.
    """

    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    gamma: torch.Tensor
    beta: torch.Tensor | None
    eps: float
    centred: bool


def _softmax_attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_self: torch.Tensor, v_self: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of new tokens over each prefix's cache plus themselves.

    Args:
        q: ``(t, H, dh)`` queries of the candidate tokens (same position for all).
        k_cache, v_cache: ``(n, H, l, dh)`` the prefixes' keys/values (l may be 0).
        k_self, v_self: ``(t, H, dh)`` the candidates' own keys/values.
        scale: score scale.

    Returns:
        ``(n, t, H * dh)`` attention outputs before the output projection.
    """
    n = k_cache.shape[0]
    t, H, dh = q.shape
    self_score = (q * k_self).sum(-1) * scale  # (t, H)
    if k_cache.shape[2] == 0:
        out = v_self.unsqueeze(0).expand(n, t, H, dh)
        return out.reshape(n, t, H * dh)
    scores = torch.einsum("thd,nhld->nthl", q, k_cache) * scale  # (n, t, H, l)
    scores = torch.cat([scores, self_score.unsqueeze(0).expand(n, t, H).unsqueeze(-1)], dim=-1)
    attn = scores.softmax(-1)  # (n, t, H, l+1)
    mix = torch.einsum("nthl,nhld->nthd", attn[..., :-1], v_cache)  # (n, t, H, dh)
    mix = mix + attn[..., -1:] * v_self.unsqueeze(0)
    return mix.reshape(n, t, H * dh)


def _memo_rows(
    memo: dict, tokens: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> torch.Tensor | None:
    """``fn(tokens)`` row by row, each token's row computed once per search.

    ``memo`` holds the sorted ids seen so far and their rows, up to
    :data:`QKV_MEMO_BYTES`; past that, rows are computed afresh.
    """
    ids = memo.get("ids")
    if ids is None:
        need = tokens.unique()
    else:
        at = torch.searchsorted(ids, tokens).clamp(max=ids.numel() - 1)
        need = tokens[ids[at] != tokens].unique()
    if need.numel():
        new = fn(need)
        if new is None:
            return None
        size = new.numel() * new.element_size()
        if memo.get("bytes", 0) + size > QKV_MEMO_BYTES:
            return fn(tokens)
        memo["bytes"] = memo.get("bytes", 0) + size
        if ids is None:
            ids, rows = need, new
        else:
            ids = torch.cat([ids, need])
            rows = torch.cat([memo["rows"], new])
            order = ids.argsort()
            ids, rows = ids[order], rows[order]
        memo["ids"], memo["rows"] = ids, rows
    return memo["rows"][torch.searchsorted(memo["ids"], tokens)]


class DecoderHooks(FamilyHooks):
    """A causal block 0 run position by position for many prefixes at once."""

    is_decoder = True

    @property
    def num_heads(self) -> int:
        raise NotImplementedError

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def token_inputs(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """``(t, d)`` residual-stream inputs of block 0 for ``tokens`` at ``position``."""
        raise NotImplementedError

    def qkv(self, x: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``(t, H, dh)`` and keys/values ``(t, H, dh)`` (KV heads repeated)."""
        raise NotImplementedError

    def attention_output(self, mix: torch.Tensor) -> torch.Tensor:
        """The output projection of block 0's attention."""
        raise NotImplementedError

    @property
    def mlp_width(self) -> int:
        """Hidden width of block 0's MLP (sizes the search's chunks)."""
        raise NotImplementedError

    def mlp_norm_terms(self) -> MlpNormTerms:
        """Block 0's attention output projection and MLP-input norm as plain tensors.

        The decoder search's screen bounds the MLP-input span distance from these
        without running the projection for every (prefix, token) pair.
        """
        raise NotImplementedError

    def token_states(
        self, tokens: torch.Tensor, position: int, memo: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block-0 inputs and projections of candidate tokens at ``position``.

        Block 0's queries, keys and values depend on a token and its position only,
        never on the prefix, so the search computes them once per position.

        Args:
            tokens: ``(t,)`` ids.
            position: the position they fill.
            memo: a dict the caller keeps for one search; families whose projections
                have a position-free part (RoPE) keep it there across positions.

        Returns:
            ``x`` ``(t, d)`` and ``q``, ``k``, ``v`` ``(t, H, dh)``, exactly as
            :meth:`token_inputs` and :meth:`qkv` give them.
        """
        if memo is None:
            proj = self.token_projections(tokens)
        else:
            proj = _memo_rows(memo, tokens, self.token_projections)
        if proj is None:
            x = self.token_inputs(tokens, position)
            q, k, v = self.qkv(x, position)
            return x, q, k, v
        return self.place_tokens(tokens, proj, position)

    def token_projections(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """``(t, p)`` position-free per-token terms of block 0's projections, or ``None``.

        A family whose queries/keys/values split into a per-token part (computed once
        per token and kept across positions) and a cheap positional part returns the
        per-token part here and combines them in :meth:`place_tokens`.
        """
        return None

    def place_tokens(
        self, tokens: torch.Tensor, proj: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x, q, k, v`` at ``position`` from :meth:`token_projections` rows."""
        raise NotImplementedError

    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        """Block 0's MLP input (its norm applied to the residual stream)."""
        raise NotImplementedError

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        """The residual stream after block 0's MLP (block 1's input)."""
        raise NotImplementedError

    def layer2_input(self, h: torch.Tensor) -> torch.Tensor:
        """Block 1's attention input (its norm applied to block 1's input)."""
        raise NotImplementedError

    def extend(
        self,
        tokens: torch.Tensor,
        position: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual stream after block 0's attention for every (prefix, token) pair.

        Args:
            tokens: ``(t,)`` candidate ids for ``position``.
            position: the position they fill.
            k_cache, v_cache: ``(n, H, l, dh)`` the prefixes' block-0 keys/values.

        Returns:
            ``h`` ``(n, t, d)``, and the candidates' own keys and values ``(t, H, dh)``.
        """
        x = self.token_inputs(tokens, position)  # (t, d)
        q, k, v = self.qkv(x, position)
        mix = _softmax_attend(q, k_cache, v_cache, k, v, self.attention_scale)  # (n, t, d)
        h = x.unsqueeze(0) + self.attention_output(mix)
        return h, k, v

    def forward_sequence(self, ids: torch.Tensor) -> torch.Tensor:
        """Block 1's input (``hidden_states[1]``) for one sequence, position by position.

        Args:
            ids: ``(L,)`` token ids.

        Returns:
            ``(L, d)`` the residual stream after block 0.
        """
        H, dh = self.num_heads, self.head_dim
        kc = torch.zeros((1, H, 0, dh), device=self.device)
        vc = torch.zeros((1, H, 0, dh), device=self.device)
        rows = []
        for pos, tok in enumerate(ids.tolist()):
            t = torch.tensor([tok], device=self.device)
            h, k, v = self.extend(t, pos, kc, vc)
            rows.append(self.mlp_residual(h[0]))
            kc = torch.cat([kc, k.unsqueeze(2)], dim=2)
            vc = torch.cat([vc, v.unsqueeze(2)], dim=2)
        return torch.cat(rows, dim=0)


# ---------------------------------------------------------------------------
# GPT-2


@register_hooks("gpt2")
class GPT2Hooks(DecoderHooks):
    """GPT-2: learned absolute positions, pre-LayerNorm, fused Conv1D ``c_attn``.

    Conv1D stores ``(in, out)``, so a weight gradient's column space is the input space.
    The whole fused Q|K|V gradient is used: position 0 attends only to itself, so its
    query gradient is exactly zero (it would drop out of a query-only span).
    """

    positional = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.tf = model.transformer if hasattr(model, "transformer") else model.base_model
        self.blocks = self.tf.h
        if getattr(self.config, "n_layer", 2) < 2:
            raise UnsupportedModelError("DAGER needs at least two transformer layers.")

    def _input_columns(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if grad.ndim == 2 and grad.shape[0] == self.hidden_size:
            return grad  # Conv1D (in, out)
        return grad.T

    @property
    def num_heads(self) -> int:
        return int(self.config.n_head)

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim) if getattr(self.config, "scale_attn_weights", True) else 1.0

    def attention_parameters(self, layer: int) -> list[str]:
        return [self.name_of(self.blocks[layer].attn.c_attn.weight)]

    def mlp_parameters(self, layer: int) -> list[str]:
        return [self.name_of(self.blocks[layer].mlp.c_fc.weight)]

    def token_embedding_matrix(self) -> torch.Tensor:
        return self.tf.wte.weight

    def num_positions(self) -> int:
        return int(self.tf.wpe.weight.shape[0])

    def layer1_filter(self, span: Span, *, lower_bounds: bool = False) -> AdditiveLayerNormFilter:
        ln = self.blocks[0].ln_1
        wpe = self.tf.wpe.weight
        return AdditiveLayerNormFilter(
            self.tf.wte.weight, ln.weight, ln.bias, ln.eps, span, lambda r: wpe[r.start : r.stop],
            lower_bounds=lower_bounds,
        )

    def token_inputs(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        return self.tf.wte.weight[tokens] + self.tf.wpe.weight[position]

    def qkv(self, x: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blk = self.blocks[0]
        qkv = blk.attn.c_attn(blk.ln_1(x))  # (t, 3d)
        q, k, v = qkv.split(self.hidden_size, dim=-1)
        shape = (x.shape[0], self.num_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def attention_output(self, mix: torch.Tensor) -> torch.Tensor:
        return self.blocks[0].attn.c_proj(mix)

    def token_projections(self, tokens: torch.Tensor) -> torch.Tensor:
        # LayerNorm(w + p) = gamma * (c(w) + c(p)) / sigma + beta with c centring, so
        # c_attn of it is (A(w) + A(p)) / sigma + const with A = c(.) @ (gamma * W):
        # A(w) (3 d^2) once per token; per position only sigma (an inner product).
        blk = self.blocks[0]
        w = self.tf.wte.weight[tokens]
        cw = w - w.mean(-1, keepdim=True)
        a = cw @ (blk.ln_1.weight.unsqueeze(1) * blk.attn.c_attn.weight)  # (t, 3d)
        return torch.cat([a, (cw * cw).sum(-1, keepdim=True)], dim=1)

    def place_tokens(
        self, tokens: torch.Tensor, proj: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        blk = self.blocks[0]
        ln, attn = blk.ln_1, blk.attn.c_attn
        d = self.hidden_size
        w = self.tf.wte.weight[tokens]
        p = self.tf.wpe.weight[position]
        cp = p - p.mean()
        a_p = cp @ (ln.weight.unsqueeze(1) * attn.weight)  # (3d,)
        const = ln.bias @ attn.weight + attn.bias  # (3d,)
        var = (proj[:, -1] + 2 * (w @ cp) + (cp * cp).sum()) / d + ln.eps  # (t,)
        qkv = (proj[:, :-1] + a_p) * torch.rsqrt(var).unsqueeze(1) + const
        q, k, v = qkv.split(d, dim=-1)
        shape = (tokens.shape[0], self.num_heads, self.head_dim)
        return w + p, q.reshape(shape), k.reshape(shape), v.reshape(shape)

    @property
    def mlp_width(self) -> int:
        return int(getattr(self.config, "n_inner", None) or 4 * self.hidden_size)

    def mlp_norm_terms(self) -> MlpNormTerms:
        blk = self.blocks[0]
        proj = blk.attn.c_proj  # Conv1D: weight (in, out)
        return MlpNormTerms(
            out_weight=proj.weight.detach().T,
            out_bias=proj.bias.detach(),
            gamma=blk.ln_2.weight.detach(),
            beta=blk.ln_2.bias.detach(),
            eps=float(blk.ln_2.eps),
            centred=True,
        )

    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[0].ln_2(h)

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[0]
        return h + blk.mlp(blk.ln_2(h))

    def layer2_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[1].ln_1(h)


# ---------------------------------------------------------------------------
# Llama


@register_hooks("llama")
class LlamaHooks(DecoderHooks):
    """Llama: RoPE (position-free layer-1 inputs), RMSNorm, SwiGLU, BOS at position 0.

    RMSNorm has no bias, so the span test of ``w * x / rms(x)`` is scale-free: the
    layer-1 filter is one bag of tokens, ``gamma * wte[t]``, for every position.
    """

    positional = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.base = model.model if hasattr(model, "model") else model.base_model
        self.blocks = self.base.layers
        if len(self.blocks) < 2:
            raise UnsupportedModelError("DAGER needs at least two transformer layers.")

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def attention_scale(self) -> float:
        return float(getattr(self.blocks[0].self_attn, "scaling", 1.0 / math.sqrt(self.head_dim)))

    def attention_parameters(self, layer: int) -> list[str]:
        a = self.blocks[layer].self_attn
        return [self.name_of(a.q_proj.weight), self.name_of(a.k_proj.weight), self.name_of(a.v_proj.weight)]

    def mlp_parameters(self, layer: int) -> list[str]:
        m = self.blocks[layer].mlp
        return [self.name_of(m.gate_proj.weight), self.name_of(m.up_proj.weight)]

    def token_embedding_matrix(self) -> torch.Tensor:
        return self.base.embed_tokens.weight

    def num_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    def layer1_filter(self, span: Span, *, lower_bounds: bool = False) -> ScaleFreeFilter:
        return ScaleFreeFilter(
            self.base.embed_tokens.weight, self.blocks[0].input_layernorm.weight, span, lower_bounds=lower_bounds
        )

    def token_inputs(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        return self.base.embed_tokens.weight[tokens]

    def _rope(self, position: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.tensor([[position]], device=like.device)
        cos, sin = self.base.rotary_emb(like.unsqueeze(0), pos)  # (1, 1, dh)
        return cos[0, 0], sin[0, 0]

    def _raw_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values before RoPE (they depend on the token only)."""
        blk = self.blocks[0]
        a = blk.self_attn
        hx = blk.input_layernorm(x)
        t = x.shape[0]
        q = a.q_proj(hx).reshape(t, -1, self.head_dim)
        k = a.k_proj(hx).reshape(t, -1, self.head_dim)
        v = a.v_proj(hx).reshape(t, -1, self.head_dim)
        return q, k, v

    def _place(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE at ``position``, and the key/value heads repeated for grouped queries."""
        cos, sin = self._rope(position, q)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return q, k, v

    def qkv(self, x: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._place(*self._raw_qkv(x), position)

    def token_projections(self, tokens: torch.Tensor) -> torch.Tensor:
        # Before RoPE the projections depend on the token only (3 d^2 per token, the
        # bulk of the per-position work at d = 4096): computed once per search.
        q, k, v = self._raw_qkv(self.token_inputs(tokens, 0))
        return torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)

    def place_tokens(
        self, tokens: torch.Tensor, proj: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.blocks[0].self_attn
        dq = a.q_proj.out_features
        dk = a.k_proj.out_features
        t = proj.shape[0]
        q = proj[:, :dq].reshape(t, -1, self.head_dim)
        k = proj[:, dq : dq + dk].reshape(t, -1, self.head_dim)
        v = proj[:, dq + dk :].reshape(t, -1, self.head_dim)
        q, k, v = self._place(q, k, v, position)
        return self.token_inputs(tokens, position), q, k, v

    def attention_output(self, mix: torch.Tensor) -> torch.Tensor:
        return self.blocks[0].self_attn.o_proj(mix)

    @property
    def mlp_width(self) -> int:
        return int(self.config.intermediate_size)

    def mlp_norm_terms(self) -> MlpNormTerms:
        blk = self.blocks[0]
        proj = blk.self_attn.o_proj
        norm = blk.post_attention_layernorm
        eps = getattr(norm, "variance_epsilon", None)
        if eps is None:
            eps = getattr(norm, "eps", 1e-6)
        return MlpNormTerms(
            out_weight=proj.weight.detach(),
            out_bias=proj.bias.detach() if proj.bias is not None else None,
            gamma=norm.weight.detach(),
            beta=None,
            eps=float(eps),
            centred=False,
        )

    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[0].post_attention_layernorm(h)

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[0]
        return h + blk.mlp(blk.post_attention_layernorm(h))

    def layer2_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[1].input_layernorm(h)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


# ---------------------------------------------------------------------------
# BERT


@register_hooks("bert")
class BertHooks(FamilyHooks):
    """BERT family: learned positions with token type 0, post-LayerNorm encoder.

    Block 1's attention input is block 0's output (no pre-norm), i.e.
    ``hidden_states[1]``; it depends on the whole (bidirectional) sequence.
    """

    is_decoder = False
    positional = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.base = model.bert if hasattr(model, "bert") else model.base_model
        self.emb = self.base.embeddings
        self.blocks = self.base.encoder.layer
        if len(self.blocks) < 2:
            raise UnsupportedModelError("DAGER needs at least two transformer layers.")

    def attention_parameters(self, layer: int) -> list[str]:
        s = self.blocks[layer].attention.self
        return [self.name_of(s.query.weight), self.name_of(s.key.weight), self.name_of(s.value.weight)]

    def mlp_parameters(self, layer: int) -> list[str]:
        return [self.name_of(self.blocks[layer].intermediate.dense.weight)]

    def token_embedding_matrix(self) -> torch.Tensor:
        return self.emb.word_embeddings.weight

    def num_positions(self) -> int:
        return int(self.emb.position_embeddings.weight.shape[0])

    def layer1_filter(self, span: Span, *, lower_bounds: bool = False) -> AdditiveLayerNormFilter:
        pos = self.emb.position_embeddings.weight
        typ = self.emb.token_type_embeddings.weight[0]
        ln = self.emb.LayerNorm
        return AdditiveLayerNormFilter(
            self.emb.word_embeddings.weight, ln.weight, ln.bias, ln.eps, span, lambda r: pos[r.start : r.stop] + typ,
            lower_bounds=lower_bounds,
        )

    def layer2_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """``(n, L, d)`` block 1's attention input (= ``hidden_states[1]``) of full sequences.

        Args:
            ids: ``(n, L)`` unpadded sequences of one length.
        """
        types = torch.zeros_like(ids)
        x = self.emb(input_ids=ids, token_type_ids=types)
        out = self.blocks[0](x)
        if isinstance(out, tuple):  # transformers < 5 returns a tuple
            out = out[0]
        return out

    def row_layer2_inputs(self, context: torch.Tensor, position: int, tokens: torch.Tensor) -> torch.Tensor:
        """``(c, d)``: block 1's input at ``position`` for each candidate, context fixed."""
        return _bert_row_outputs(self, context, position, tokens)


def _bert_row_outputs(hooks: "BertHooks", context: torch.Tensor, position: int, tokens: torch.Tensor) -> torch.Tensor:
    """Block 0's output at ``position`` for each candidate token there (others fixed).

    Only the candidate's own row is computed: its query attends to the context's
    keys/values (from the fixed tokens) and to its own; then the output projection,
    the feed-forward block and both post-LayerNorms. A sequence of length L costs L
    rows; one row per candidate is L times cheaper.

    Args:
        context: ``(L,)`` the current sequence.
        position: the row to vary.
        tokens: ``(c,)`` candidate ids for that row.

    Returns:
        ``(c, d)`` block 1's attention input at ``position``.
    """
    blk = hooks.blocks[0]
    att = blk.attention.self
    L = context.shape[0]
    types = torch.zeros((1, L), dtype=torch.long, device=context.device)
    e_ctx = hooks.emb(input_ids=context.unsqueeze(0), token_type_ids=types)[0]  # (L, d)
    pos_ids = torch.full((1, tokens.shape[0]), position, dtype=torch.long, device=context.device)
    e_c = hooks.emb(
        input_ids=tokens.unsqueeze(0), token_type_ids=torch.zeros_like(pos_ids), position_ids=pos_ids
    )[0]  # (c, d)
    H = att.num_attention_heads
    dh = att.attention_head_size
    keep = torch.arange(L, device=context.device) != position
    k_ctx = att.key(e_ctx[keep]).reshape(-1, H, dh)  # (L-1, H, dh)
    v_ctx = att.value(e_ctx[keep]).reshape(-1, H, dh)
    q = att.query(e_c).reshape(-1, H, dh)  # (c, H, dh)
    k = att.key(e_c).reshape(-1, H, dh)
    v = att.value(e_c).reshape(-1, H, dh)
    scale = 1.0 / math.sqrt(dh)
    s_ctx = torch.einsum("chd,lhd->chl", q, k_ctx) * scale  # (c, H, L-1)
    s_self = (q * k).sum(-1, keepdim=True) * scale  # (c, H, 1)
    a = torch.cat([s_ctx, s_self], dim=-1).softmax(-1)
    mix = torch.einsum("chl,lhd->chd", a[..., :-1], v_ctx) + a[..., -1:] * v  # (c, H, dh)
    attn = blk.attention.output(mix.reshape(-1, H * dh), e_c)  # dense + residual + LayerNorm
    return blk.output(blk.intermediate(attn), attn)
