"""Token placement from block 0's gradient itself, for encoders with additive embeddings.

DAGER's layer-1 check reads only the row space of block 0's attention gradients. On
BERT the embedding is ``LN(tok + pos + type)``: with the per-row scale ``1/sigma``
folded into the backward signal, every input row is ``D t' + D p' + beta``
(``D`` the norm's weight, ``'`` centring), so once a batch holds more (token,
position) pairs than distinct tokens plus positions the span contains every token
at every occupied position and layer 1 cannot place anything (:mod:`dager.encoder`).

The gradient itself still can. ``G^T = sum_i x_i e_i^T`` (``e_i`` the row's backward
signal over the query, key and value weights, scaled by ``1/sigma_i``) splits, in
the basis of the bag's ``D t'_k``, the positions' ``D p'_j`` and ``beta`` (linearly
independent while they number at most ``d``), into one vector per token,
``u_k = sum of e_i over k's occurrences``, and one per position,
``v_j = sum of e_i over the rows at j``. A token that occurs once has ``u_k = e_i``,
so ``v_j`` is, up to the occurrences of repeated tokens, a 0/1 combination of the
``u_k``: a non-negative least-squares fit of each ``v_j`` on the ``u_k`` gives a
once-occurring token weight ~1 at its position and ~0 elsewhere (B=8, medium set,
eight batches: the true weight is at least 0.65 for 95% of once-occurring tokens, a
wrong pair's is above 0.3 for 0.8% of pairs), while tokens that occur several times
share their weight and cannot be placed. So a token is *located* when one position
holds most of its weight (at least :data:`LOCATED` and :data:`SHARE` of its total),
and a located token stays a candidate only where its weight exceeds :data:`PRESENT`;
every other token stays a candidate everywhere. This is a screen, not a proof (any
connected assignment fits the gradient exactly; the sparse one is the likely one):
it only reorders and narrows what the search tries, and the exact layer-2 check
still decides every sentence.

The split is skipped (the candidates unchanged) when layer 1 already places the tokens
(no position holds more candidates than the batch has sequences), no token's weight is
determined (:data:`DISTINCT`), the basis would exceed ``d``,
or the gradient is not a sum of such rows to :data:`RESIDUAL` (noise, dropout,
rounding, several local steps).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("dager.placement")

LOCATED = 0.7
"""Weight at its best position above which a token counts as located there."""

SHARE = 0.5
"""Fraction of a token's total weight its best position must hold to locate it."""

PRESENT = 0.03
"""Weight above which a located token stays a candidate at a position."""

DISTINCT = 0.25
"""Least share of a token's vector outside the span of the others' for its weight to
count (its leave-one-out residual): on minilm-l6 (B=8, medium) every token has 0.43 or
more; a random-init BERT's backward signals are nearly alike within a sentence (its
attention is near uniform), the vectors are dependent and the weights mean nothing."""

RESIDUAL = 1e-3
"""Largest relative misfit of the gradient in the additive basis (else no split)."""


@dataclass(frozen=True)
class Placement:
    """What the split says about the batch's tokens.

    Attributes:
        narrowed: position -> the layer-1 candidates left there (their order kept).
        located: position -> the tokens located there (each likely occurs once in the
            batch, at that position).
    """

    narrowed: dict[int | None, torch.Tensor]
    located: dict[int, torch.Tensor]


def place_tokens(
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    gradient_columns: torch.Tensor,
    accepted: Mapping[int | None, torch.Tensor],
    batch_size: int,
) -> Placement | None:
    """Narrow per-position candidates by the gradient's split (see the module docstring).

    Args:
        parts: ``(tokens (V, d), positions (P, d), weight (d,), bias (d,))``: the token
            table, the position table with the token type added, and the embedding
            LayerNorm's weight and bias.
        gradient_columns: ``(d, k)`` block 0's attention gradients, input side first
            (:meth:`~dager.hooks_base.FamilyHooks.input_matrix`).
        accepted: position -> layer-1 candidates (nearest first).
        batch_size: sequences in the batch.

    Returns:
        The candidates with every located token kept only where it sits, and the
        located tokens by position; ``None`` when the split does not apply.
    """
    from scipy.optimize import nnls  # here: scipy's import takes ~1.5 s, and few runs need it

    positions = sorted(p for p in accepted if p is not None)
    if not positions or max(accepted[p].numel() for p in positions) <= batch_size:
        return None  # none, or layer 1 already places the tokens
    bag = torch.unique(torch.cat([accepted[p].cpu() for p in positions]))
    tokens, pos_table, weight, bias = (t.detach().double().cpu() for t in parts)
    d = int(weight.shape[0])
    length = max(positions) + 1
    if bag.numel() + length + 1 > d or length > pos_table.shape[0]:
        return None
    basis = torch.cat([_centred(tokens[bag]) * weight, _centred(pos_table[:length]) * weight, bias[None]])
    g = gradient_columns.detach().double().cpu()
    split = torch.linalg.lstsq(basis.T, g, driver="gelsd").solution  # (n, k); gelsd: a zero bias row (random init)
    misfit = float((basis.T @ split - g).norm() / g.norm().clamp(min=1e-300))
    if not misfit <= RESIDUAL:
        log.debug("placement skipped: misfit %.2e", misfit)
        return None
    per_token, per_position = split[: bag.numel()], split[bag.numel() : bag.numel() + length]
    gram_inv = torch.linalg.pinv(per_token @ per_token.T, hermitian=True)
    own = 1.0 / (gram_inv.diagonal() * per_token.norm(dim=1) ** 2).clamp(min=1e-300)
    distinct = own.sqrt().numpy() >= DISTINCT
    if not distinct.any():
        return None  # no weight would mean anything: skip the fits
    scale = float(per_token.norm(dim=1).mean().clamp(min=1e-300))
    u = (per_token / scale).numpy().T
    weights = np.stack([nnls(u, (per_position[j] / scale).numpy(), maxiter=50 * u.shape[1])[0] for j in range(length)])
    best = weights.max(axis=0)
    total = weights.sum(axis=0) + 1e-12
    located = (best >= LOCATED) & (best / total >= SHARE) & distinct
    if not located.any():
        return None
    allowed = (weights > PRESENT) | ~located[None, :]  # (length, bag)
    index = {int(t): i for i, t in enumerate(bag.tolist())}
    out: dict[int | None, torch.Tensor] = dict(accepted)
    for p in positions:
        cand = accepted[p]
        keep = torch.tensor([bool(allowed[p, index[int(t)]]) for t in cand.tolist()], dtype=torch.bool)
        out[p] = cand[keep.to(cand.device)]
    where = weights.argmax(axis=0)
    sites = {p: bag[torch.from_numpy(located & (where == p))] for p in positions}
    log.debug("placement: %d of %d tokens located", int(located.sum()), bag.numel())
    return Placement(out, {p: t for p, t in sites.items() if t.numel()})


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=-1, keepdim=True)
