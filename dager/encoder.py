"""Encoder sequence search of DAGER (Petrov et al. 2024, Sec. 4.3).

Layer-2 inputs of an encoder depend on the whole (bidirectional) sequence, so
sequences of a given length are assembled from per-position layer-1 candidates and
checked whole; see :func:`encoder_search`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch

from dager.layers import BertHooks
from dager.search import Found, Step, Tick, Warn
from dager.span import Span

log = logging.getLogger(__name__)


EXHAUSTIVE_CAP = 4096
"""Lengths whose candidate combinations number at most this are enumerated exactly."""

PAIR_SUSPECTS = 4
"""Encoder descent: positions (farthest rows) tried in pairs at a local minimum."""

ENCODER_CEILING = 1e-3
"""Encoder layer-2 threshold never exceeds this: in-span sequences sit at float32
round-off (1e-7..1e-5), and a failed assembly can sit far below random probes."""


def encoder_search(
    hooks: BertHooks,
    accepted: dict[int | None, torch.Tensor],
    span2: Span,
    *,
    special_ids: tuple[int, ...],
    batch_size: int,
    threshold: float | None,
    max_combinations: int,
    generator: torch.Generator | None = None,
) -> Iterator[Found | Step | Warn | Tick]:
    """Assemble encoder sequences from per-position candidates (Sec. 4.3, heuristic).

    Sentence ends come first: ``[SEP]`` among a position's layer-1 candidates means a
    sequence of that length may exist. For each length, a sequence is assembled from
    the per-position candidates by coordinate descent on the WHOLE sequence: each
    position in turn tries every candidate there (the others held) and keeps the one
    whose full sequence has the smallest mean log distance of all its block-1 inputs
    to the layer-2 span (attention is bidirectional: a wrong token anywhere perturbs
    every row, so the whole sequence is the score, not the varied row). A sequence
    whose every row lies in the span (worst distance below the threshold) is a
    sentence.

    Restarts break the collapse onto one dominant sentence: the B sentences together
    use every layer-1 candidate, so each restart starts from candidates that the
    sentences found so far do not use at that position (a set-cover preference),
    randomised by ``generator``. Lengths are tried longest first (their last
    positions hold only their own tokens), then round-robin until ``batch_size``
    sentences are found or every length stops yielding new ones. Lengths whose
    candidate product is small are enumerated exactly. Every evaluated sequence
    counts against ``max_combinations``.

    Args:
        hooks: BERT-family hooks.
        accepted: position -> layer-1 candidate ids (nearest first).
        span2: span of block 1's attention-input gradient.
        special_ids: ``(cls_id, sep_id)`` and optionally a neutral fill id (unused).
        batch_size: sequences in the client's batch (the most to look for).
        threshold: layer-2 acceptance threshold; ``None``: automatic (a fixed
            fraction of the off-span level measured with random probe sequences,
            capped at :data:`ENCODER_CEILING`).
        max_combinations: budget of evaluated sequences.
        generator: seeds the probes and the restarts.

    Yields:
        :class:`Step` per assembled sequence, :class:`Found` per sentence,
        :class:`Warn` when the budget is hit.
    """
    cls_id, sep_id = special_ids[:2]
    dev = hooks.device
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    positions = sorted(p for p in accepted if p is not None)
    lengths = [p + 1 for p in positions if p >= 2 and bool((accepted[p] == sep_id).any())]
    if not lengths:
        return
    budget = [max_combinations]
    specials = torch.tensor([cls_id, sep_id], device=dev)
    cand_cache: dict[int, torch.Tensor] = {}

    def cands(p: int) -> torch.Tensor:
        if p not in cand_cache:
            c = accepted[p].to(dev)
            cand_cache[p] = c[~torch.isin(c, specials)]
        return cand_cache[p]

    def score(seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        budget[0] -= int(seqs.shape[0])
        d = span2.distance(hooks.layer2_inputs(seqs))  # (n, L)
        return d.clamp(min=1e-12).log().mean(-1), d.max(-1).values

    # The off-span level: random tokens at every position of the longest length.
    L0 = max(lengths)
    probe = torch.randint(1000, hooks.vocab_size, (8, L0), generator=gen).to(dev)
    probe[:, 0] = cls_id
    probe[:, L0 - 1] = sep_id
    probes_worst = span2.distance(hooks.layer2_inputs(probe)).max(-1).values
    thr = threshold
    if thr is None:
        thr = min(ENCODER_CEILING, 1e-3 * float(probes_worst.min()))
    log.debug("encoder layer-2 threshold %.3g (probes from %.3g)", thr, float(probes_worst.min()))

    def descend(seq: torch.Tensor, fixed: int | None) -> tuple[torch.Tensor, float]:
        L = int(seq.shape[0])
        cur_s, cur_w = score(seq.unsqueeze(0))
        cur, worst = float(cur_s[0]), float(cur_w[0])

        def pair_move() -> bool:
            """Change two positions at once (a local minimum of single changes, e.g.
            two swapped tokens): the rows farthest from the span are the suspects."""
            nonlocal seq, cur, worst
            rows = span2.distance(hooks.layer2_inputs(seq.unsqueeze(0)))[0]
            movable = [p for p in range(1, L - 1) if p != fixed and cands(p).numel() > 1]
            suspects = sorted(movable, key=lambda p: -float(rows[p]))[:PAIR_SUSPECTS]
            best: tuple[float, torch.Tensor, float] | None = None
            for a in range(len(suspects)):
                for b in range(a + 1, len(suspects)):
                    pa, pb = suspects[a], suspects[b]
                    grid = torch.cartesian_prod(cands(pa), cands(pb))
                    seqs = seq.unsqueeze(0).repeat(int(grid.shape[0]), 1)
                    seqs[:, pa] = grid[:, 0]
                    seqs[:, pb] = grid[:, 1]
                    s, w = score(seqs)
                    i = int(s.argmin())
                    if float(s[i]) < cur - 1e-9 and (best is None or float(s[i]) < best[0]):
                        best = (float(s[i]), seqs[i].clone(), float(w[i]))
            if best is None:
                return False
            cur, seq, worst = best
            return True
        for _sweep in range(8):
            changed = False
            for p in range(1, L - 1):
                if worst < thr or budget[0] <= 0:
                    return seq, worst
                c = cands(p)
                if p == fixed or c.numel() <= 1:
                    continue
                seqs = seq.unsqueeze(0).repeat(int(c.numel()), 1)
                seqs[:, p] = c
                s, w = score(seqs)
                i = int(s.argmin())
                if float(s[i]) < cur - 1e-9:
                    seq, cur, worst = seqs[i].clone(), float(s[i]), float(w[i])
                    changed = True
            if not changed:
                if worst < thr or budget[0] <= 0 or not pair_move():
                    break
        return seq, worst

    found: list[torch.Tensor] = []
    keys: set[tuple[int, ...]] = set()
    results: list[tuple[torch.Tensor, float]] = []

    def initial(L: int, greedy: bool) -> torch.Tensor | None:
        """Per position a candidate no found sentence uses there (nearest or random)."""
        seq = torch.empty(L, dtype=torch.long, device=dev)
        seq[0] = cls_id
        seq[L - 1] = sep_id
        for p in range(1, L - 1):
            c = cands(p)
            if c.numel() == 0:
                return None
            used = [int(s[p]) for s in found if s.shape[0] > p + 1]
            free = c[~torch.isin(c, torch.tensor(used, dtype=c.dtype, device=dev))] if used else c
            pool = free if free.numel() else c
            j = 0 if greedy else int(torch.randint(int(pool.numel()), (1,), generator=gen))
            seq[p] = pool[j]
        return seq

    def record(seq: torch.Tensor, worst: float) -> Found | None:
        results.append((seq, worst))
        key = tuple(seq.tolist())
        if worst < thr and key not in keys:
            keys.add(key)
            found.append(seq)
            return Found(key, True, worst)
        return None

    exhaustive_cap = min(EXHAUSTIVE_CAP, max_combinations)
    order = sorted(lengths, reverse=True)
    misses = {L: 0 for L in order}
    patience = 4  # restarts of a length without a new sentence before it is dropped
    first_round = True
    while len(found) < batch_size and budget[0] > 0 and order:
        for L in list(order):
            if len(found) >= batch_size or budget[0] <= 0:
                break
            pools = [cands(p) for p in range(1, L - 1)]
            if any(c.numel() == 0 for c in pools):
                order.remove(L)
                continue
            if math.prod(int(c.numel()) for c in pools) <= exhaustive_cap:
                # Few combinations: enumerate them all (the paper's exhaustive search).
                for seq, worst in _enumerate(hooks, span2, pools, cls_id, sep_id, batch_size):
                    budget[0] -= 1
                    item = record(seq, worst)
                    if item is not None:
                        yield item
                yield Step(L - 1, (tuple(results[-1][0].tolist()),), len(found), max_combinations - budget[0])
                order.remove(L)
                continue
            seq = initial(L, greedy=first_round)
            if seq is None:
                order.remove(L)
                continue
            seq, worst = descend(seq, None)
            yield Tick(L - 1, max_combinations - budget[0])
            item = record(seq, worst)
            yield Step(L - 1, (tuple(seq.tolist()),), len(found), max_combinations - budget[0])
            if item is not None:
                misses[L] = 0
                yield item
            else:
                misses[L] += 1
                if misses[L] >= patience:
                    order.remove(L)
        first_round = False
    if budget[0] <= 0:
        yield Warn("combinations_capped", float(max_combinations))
    # Best effort: fill up to the batch size with the nearest failed assemblies.
    for seq, worst in sorted(results, key=lambda r: r[1]):
        if len(found) >= batch_size:
            break
        key = tuple(seq.tolist())
        if key in keys:
            continue
        keys.add(key)
        found.append(seq)
        yield Found(key, False, worst)


def _enumerate(
    hooks: BertHooks,
    span2: Span,
    pools: list[torch.Tensor],
    cls_id: int,
    sep_id: int,
    keep: int,
) -> list[tuple[torch.Tensor, float]]:
    """All ``[CLS] pools... [SEP]`` sequences, verified; the ``keep`` nearest."""
    combos = torch.cartesian_prod(*pools) if len(pools) > 1 else pools[0].reshape(-1, 1)
    combos = combos.reshape(combos.shape[0], -1)
    n = combos.shape[0]
    dev = combos.device
    seqs = torch.cat(
        [torch.full((n, 1), cls_id, device=dev), combos, torch.full((n, 1), sep_id, device=dev)], dim=1
    )
    worst = torch.cat(
        [
            span2.distance(hooks.layer2_inputs(seqs[s : s + 512])).max(-1).values
            for s in range(0, n, 512)
        ]
    )
    order = worst.argsort()[:keep]
    return [(seqs[i].clone(), float(worst[i])) for i in order.tolist()]
