"""Decoder hooks: a causal block 0 run position by position for many prefixes.

:class:`DecoderHooks` holds what GPT-2 and Llama share (the key/value-cache step,
the MLP-norm terms, the candidate projections memo); the families fill in their
projections in :mod:`dager.hooks_gpt2` and :mod:`dager.hooks_llama`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dager.dropout_masks import LayerNormTerms
from dager.hooks_base import FamilyHooks

QKV_MEMO_BYTES = 128 * 2**20
"""Most bytes of position-free candidate projections a decoder search keeps (Llama)."""


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
    if k_cache.shape[2] == 0:
        out = v_self.unsqueeze(0).expand(n, t, H, dh)
        return out.reshape(n, t, H * dh)
    attn = _attention_weights(q, k_cache, k_self, scale)  # (n, t, H, l+1)
    mix = torch.einsum("nthl,nhld->nthd", attn[..., :-1], v_cache)  # (n, t, H, dh)
    mix = mix + attn[..., -1:] * v_self.unsqueeze(0)
    return mix.reshape(n, t, H * dh)


def _attention_weights(q: torch.Tensor, k_cache: torch.Tensor, k_self: torch.Tensor, scale: float) -> torch.Tensor:
    """``(n, t, H, l + 1)`` softmax weights of :func:`_softmax_attend` (the token's own last).

    Args:
        q, k_self: ``(t, H, dh)`` the candidates' queries and keys.
        k_cache: ``(n, H, l, dh)`` the prefixes' keys.
    """
    n = k_cache.shape[0]
    t, H, _ = q.shape
    self_score = (q * k_self).sum(-1) * scale  # (t, H)
    scores = torch.einsum("thd,nhld->nthl", q, k_cache) * scale  # (n, t, H, l)
    scores = torch.cat([scores, self_score.unsqueeze(0).expand(n, t, H).unsqueeze(-1)], dim=-1)
    return scores.softmax(-1)


def _mix_pairs(
    attn: torch.Tensor, v_cache: torch.Tensor, v_self: torch.Tensor
) -> torch.Tensor:
    """``(p, H * dh)`` attention outputs of ``p`` chosen pairs, as :func:`_softmax_attend`.

    Args:
        attn: ``(p, H, l + 1)`` their weights (:func:`_attention_weights` rows).
        v_cache: ``(p, H, l, dh)`` their prefixes' values.
        v_self: ``(p, H, dh)`` their tokens' values.
    """
    p, H, _ = attn.shape
    mix = torch.einsum("phl,phld->phd", attn[..., :-1], v_cache) + attn[..., -1:] * v_self  # (p, H, dh)
    return mix.reshape(p, -1)


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

    # -- dropout (dager.dropout_search) ---------------------------------------------------
    embedding_dropout: bool = False
    """True when the client's dropout masks block 0's input before its norm (GPT-2's
    embedding dropout): the layer-1 inputs are then recovered by sparse fitting."""

    def optional_parameters(self) -> list[str]:
        # Block 0's attention output: read when the client trained with dropout (a family
        # without the dropout hooks reads none, and a dropout update falls back to inexact).
        try:
            return self.attention_output_parameters(0)
        except NotImplementedError:
            return []

    def attention_output_parameters(self, layer: int) -> list[str]:
        """Names of the weights whose gradients span block ``layer``'s attention output
        (the heads' mix before the output projection, after attention dropout)."""
        raise NotImplementedError

    def input_norm(self) -> LayerNormTerms:
        """Block 0's input norm (for the sparse fit of masked inputs)."""
        raise NotImplementedError

    def normed_inputs(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """``(t, d)`` float64 block-0 attention inputs (after the norm) of unmasked tokens."""
        raise NotImplementedError

    def projections_of(self, z: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float64 queries, keys and values ``(t, H, dh)`` of normed inputs ``z`` ``(t, d)`` at
        ``position`` (RoPE applied, key/value heads repeated)."""
        raise NotImplementedError

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
