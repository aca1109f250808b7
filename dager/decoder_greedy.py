"""The decoder's best-effort fallback: sentences grown greedily by layer-2 distance."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from dager.decoder_steps import _candidates_at, _exact_block, _layer2_distances
from dager.hooks_decoder import DecoderHooks
from dager.search_items import CHUNK_MACS, SEARCH_BYTES, Found
from dager.span import Span


def decoder_greedy(
    hooks: DecoderHooks,
    candidates: Callable[[int], torch.Tensor | None],
    span2: Span,
    *,
    start: tuple[int, ...],
    count: int,
    max_length: int,
    exclude: set[tuple[int, ...]],
) -> Iterator[Found]:
    """Best effort: ``count`` sentences grown greedily by the smallest layer-2 distance.

    The i-th sentence starts from the i-th nearest first token; each later position
    takes the nearest candidate. A greedy sentence stops where its distance jumps
    (more than 100x its running median) or at ``max_length``. Marked inexact.
    """
    dev = hooks.device
    H, dh = hooks.num_heads, hooks.head_dim
    block = _exact_block(hooks, CHUNK_MACS, SEARCH_BYTES // 2, span2.rank)
    made = 0
    first_rank = 0
    while made < count and first_rank < 4 * count:
        kc = torch.zeros((1, H, 0, dh), device=dev)
        vc = torch.zeros((1, H, 0, dh), device=dev)
        prefix: list[int] = []
        dists: list[float] = []
        for pos in range(max_length):
            if pos < len(start):
                cand = torch.tensor([start[pos]], device=dev)
            else:
                cand = _candidates_at(candidates, pos, start, dev)
                if cand is None:
                    break
            d2, k, v = _layer2_distances(hooks, cand, pos, kc, vc, span2, block)
            order = d2.argsort()
            pick = int(order[min(first_rank, order.numel() - 1)]) if pos == len(start) else int(order[0])
            if pos > len(start) and dists and float(d2[pick]) > 100 * sorted(dists)[len(dists) // 2]:
                break
            prefix.append(int(cand[pick]))
            if pos >= len(start):
                dists.append(max(float(d2[pick]), 1e-12))
            kc = torch.cat([kc, k[pick : pick + 1].unsqueeze(2)], dim=2)
            vc = torch.cat([vc, v[pick : pick + 1].unsqueeze(2)], dim=2)
        first_rank += 1
        key = tuple(prefix)
        if len(prefix) > len(start) and key not in exclude:
            exclude.add(key)
            made += 1
            yield Found(key, False, max(dists) if dists else 1.0)
