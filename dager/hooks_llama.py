"""Llama layer hooks: RoPE (position-free layer-1 inputs), RMSNorm, SwiGLU."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedclient.errors import UnsupportedModelError
from dager.filters import ScaleFreeFilter
from dager.hooks_base import register_hooks
from dager.hooks_decoder import DecoderHooks, MlpNormTerms
from dager.span import Span


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

    def attention_output_parameters(self, layer: int) -> list[str]:
        return [self.name_of(self.blocks[layer].self_attn.o_proj.weight)]

    def normed_inputs(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        return self.blocks[0].input_layernorm(self.token_inputs(tokens, position)).detach().double()

    def projections_of(self, z: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.blocks[0].self_attn
        t = z.shape[0]

        def proj(layer: nn.Linear) -> torch.Tensor:
            out = z @ layer.weight.detach().double().T
            if layer.bias is not None:
                out = out + layer.bias.detach().double()
            return out.reshape(t, -1, self.head_dim)

        q, k, v = self._place(proj(a.q_proj), proj(a.k_proj), proj(a.v_proj), position)
        return q, k, v

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
