"""BERT layer hooks: learned positions, post-LayerNorm encoder, one-row forward."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedclient.errors import UnsupportedModelError
from dager.filters import AdditiveLayerNormFilter
from dager.hooks_base import FamilyHooks, register_hooks
from dager.span import Span


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
        tokens, positions, weight, bias = self.embedding_parts()
        return AdditiveLayerNormFilter(
            tokens, weight, bias, self.emb.LayerNorm.eps, span, lambda r: positions[r.start : r.stop],
            lower_bounds=lower_bounds,
        )

    def embedding_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The additive embedding's parts (:func:`dager.placement.place_tokens`): the token
        table, the position table with token type 0 added, the LayerNorm's weight and bias."""
        e = self.emb
        positions = e.position_embeddings.weight + e.token_type_embeddings.weight[0]
        return e.word_embeddings.weight, positions, e.LayerNorm.weight, e.LayerNorm.bias

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
