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
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from fedclient.errors import UnsupportedModelError
from dager.span import Span, relative_distance

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
    model_type = model.config.model_type
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

    def layer1_distances(self, span: Span, positions: range) -> torch.Tensor:
        """``(len(positions), V)`` float64 relative distances of every token's layer-1
        input to ``span`` (position-free families return ``(1, V)``)."""
        raise NotImplementedError

    def num_positions(self) -> int:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Shared maths


def additive_layernorm_distances(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    span: Span,
) -> torch.Tensor:
    """Relative distances of ``LayerNorm(tokens[t] + positions[p])`` to a span, for all t, p.

    LayerNorm is not linear, but everything it does factorises over the token and
    position parts: with ``c = centre(w_t) + centre(q_p)``, ``sigma^2 = |c|^2/d + eps``
    and ``y = gamma*c/sigma + beta``, every term of ``|y|^2`` and ``|Q^T y|^2`` is a sum
    of a token term, a position term and one token x position cross product. So the
    vocabulary-sized product (V x d x k) is computed once, not once per position; per
    position only ``V x P`` cross products remain. ``Q`` is the smaller of the basis
    and its complement; float64 keeps the cancellation exact to ~1e-7.

    Args:
        tokens: ``(V, d)`` token embeddings.
        positions: ``(P, d)`` position-dependent part (position + token-type embeddings).
        gamma, beta: ``(d,)`` LayerNorm affine parameters.
        eps: LayerNorm epsilon.
        span: the layer-1 span.

    Returns:
        ``(P, V)`` float64 relative distances.
    """
    f64 = torch.float64
    dev = tokens.device
    d = tokens.shape[1]
    use_basis = span.rank <= span.dim - span.rank
    q = (span.basis if use_basis else span.complement).to(dev, f64)  # (d, k)
    g = gamma.to(dev, f64)
    b = beta.to(dev, f64)
    cp = positions.to(f64)
    cp = cp - cp.mean(-1, keepdim=True)  # (P, d)
    bp = (cp * g) @ q  # (P, k)
    beta_q = b @ q  # (k,)
    gb = g * b  # (d,)
    p_sq = (cp * cp).sum(-1)  # (P,)
    p_gsq = (cp * cp * g * g).sum(-1)  # (P,)
    p_gb = cp @ gb  # (P,)
    bp_sq = (bp * bp).sum(-1)  # (P,)
    bp_beta = bp @ beta_q  # (P,)
    b_sq = float((b * b).sum())
    beta_q_sq = float((beta_q * beta_q).sum())
    rhs = torch.cat([cp, cp * g * g], dim=0).T  # (d, 2P)
    out = torch.empty((cp.shape[0], tokens.shape[0]), dtype=f64, device=dev)
    P = cp.shape[0]
    for start in range(0, tokens.shape[0], VOCAB_CHUNK):
        cw = tokens[start : start + VOCAB_CHUNK].to(f64)
        cw = cw - cw.mean(-1, keepdim=True)  # (n, d)
        a = (cw * g) @ q  # (n, k)
        cross = cw @ rhs  # (n, 2P): c_w . c_p and (g^2 c_w) . c_p
        cross_a = a @ bp.T  # (n, P)
        w_sq = (cw * cw).sum(-1, keepdim=True)  # (n, 1)
        w_gsq = (cw * cw * g * g).sum(-1, keepdim=True)
        w_gb = (cw @ gb).unsqueeze(-1)
        a_sq = (a * a).sum(-1, keepdim=True)
        a_beta = (a @ beta_q).unsqueeze(-1)
        var = (w_sq + 2 * cross[:, :P] + p_sq) / d + eps  # (n, P) sigma^2
        sigma = var.sqrt()
        y_sq = (w_gsq + 2 * cross[:, P:] + p_gsq) / var + 2 * (w_gb + p_gb) / sigma + b_sq
        proj_sq = (a_sq + 2 * cross_a + bp_sq) / var + 2 * (a_beta + bp_beta) / sigma + beta_q_sq
        perp_sq = y_sq - proj_sq if use_basis else proj_sq
        out[:, start : start + cw.shape[0]] = (perp_sq.clamp(min=0.0) / y_sq.clamp(min=1e-300)).sqrt().T
    return out


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
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False):
            self._extra_scale = 1.0  # layer 0: divided by (0 + 1)
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

    def layer1_distances(self, span: Span, positions: range) -> torch.Tensor:
        ln = self.blocks[0].ln_1
        wpe = self.tf.wpe.weight[positions.start : positions.stop]
        return additive_layernorm_distances(
            self.tf.wte.weight.detach(), wpe.detach(), ln.weight.detach(), ln.bias.detach(), ln.eps, span
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

    def layer1_distances(self, span: Span, positions: range) -> torch.Tensor:
        gamma = self.blocks[0].input_layernorm.weight.detach()
        wte = self.base.embed_tokens.weight.detach()
        out = torch.empty((1, wte.shape[0]), dtype=torch.float64, device=wte.device)
        for start in range(0, wte.shape[0], VOCAB_CHUNK):
            rows = wte[start : start + VOCAB_CHUNK].to(torch.float64) * gamma.to(torch.float64)
            out[0, start : start + rows.shape[0]] = relative_distance(rows, span)
        return out

    def token_inputs(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        return self.base.embed_tokens.weight[tokens]

    def _rope(self, position: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.tensor([[position]], device=like.device)
        cos, sin = self.base.rotary_emb(like.unsqueeze(0), pos)  # (1, 1, dh)
        return cos[0, 0], sin[0, 0]

    def qkv(self, x: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blk = self.blocks[0]
        a = blk.self_attn
        hx = blk.input_layernorm(x)
        t = x.shape[0]
        q = a.q_proj(hx).reshape(t, -1, self.head_dim)
        k = a.k_proj(hx).reshape(t, -1, self.head_dim)
        v = a.v_proj(hx).reshape(t, -1, self.head_dim)
        cos, sin = self._rope(position, x)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return q, k, v

    def attention_output(self, mix: torch.Tensor) -> torch.Tensor:
        return self.blocks[0].self_attn.o_proj(mix)

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

    def layer1_distances(self, span: Span, positions: range) -> torch.Tensor:
        pos = self.emb.position_embeddings.weight[positions.start : positions.stop]
        pos = pos + self.emb.token_type_embeddings.weight[0]
        ln = self.emb.LayerNorm
        return additive_layernorm_distances(
            self.emb.word_embeddings.weight.detach(), pos.detach(), ln.weight.detach(), ln.bias.detach(), ln.eps, span
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


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in chunks of ``size``."""
    for start in range(0, n, max(1, size)):
        yield slice(start, min(n, start + size))
