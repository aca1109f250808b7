"""GPT-2 layer hooks: learned absolute positions, pre-LayerNorm, fused ``c_attn``."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedclient.errors import UnsupportedModelError
from dager.dropout_masks import LayerNormTerms
from dager.filters import AdditiveLayerNormFilter
from dager.hooks_base import register_hooks
from dager.hooks_decoder import DecoderHooks, MlpNormTerms
from dager.span import Span


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

    embedding_dropout = True  # drop(wte + wpe) feeds ln_1

    def attention_output_parameters(self, layer: int) -> list[str]:
        return [self.name_of(self.blocks[layer].attn.c_proj.weight)]

    def input_norm(self) -> LayerNormTerms:
        ln = self.blocks[0].ln_1
        return LayerNormTerms(ln.weight.detach().double(), ln.bias.detach().double(), float(ln.eps))

    def normed_inputs(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        return self.input_norm().apply(self.token_inputs(tokens, position).detach().double())

    def projections_of(self, z: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.blocks[0].attn.c_attn  # Conv1D: weight (in, out)
        q, k, v = (z @ attn.weight.detach().double() + attn.bias.detach().double()).split(self.hidden_size, dim=-1)
        shape = (z.shape[0], self.num_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

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
        a = (cw * blk.ln_1.weight) @ blk.attn.c_attn.weight  # (t, 3d); no (d, 3d) temporary
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
        # Both vectors in one pass over the (d, 3d) weight (at a few dozen tokens, reading
        # it is the cost); no (d, 3d) temporary.
        a_p, const = torch.stack([cp * ln.weight, ln.bias]) @ attn.weight  # (3d,) each
        const = const + attn.bias
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
