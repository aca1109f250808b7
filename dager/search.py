"""Sequence search of DAGER: grow prefixes (decoders) or assemble sequences (encoders).

Decoders (Petrov et al. 2024, Sec. 4.2): a prefix is extended by every layer-1
candidate token; block 0 is run on the new token only (a key/value cache holds the
prefix), and an extension survives when its block-1 attention input lies in the
layer-2 span. Beyond the paper, extensions are first checked against the span of
block 0's MLP input weight gradient, which needs no MLP forward, so most wrong
extensions cost one attention step. A prefix with no surviving extension is a whole
sentence.

Encoders (Sec. 4.3): layer-2 inputs depend on the whole sequence, so sequences of a
given length are assembled from per-position candidates; see :func:`encoder_search`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dager.layers import BertHooks, DecoderHooks
from dager.span import Span, gap_threshold

log = logging.getLogger(__name__)

CANDIDATE_CHUNK = 8192
"""(prefix, token) pairs evaluated at once (bounds peak memory)."""

NUM_PROBES = 64
"""Random vocabulary tokens checked at the first step to measure the off-span level."""


@dataclass(frozen=True)
class Found:
    """A finished sequence (internal; the attack turns it into an event)."""

    token_ids: tuple[int, ...]
    exact: bool
    distance: float


@dataclass(frozen=True)
class Step:
    """Progress of the search (internal; the attack turns it into an event)."""

    position: int
    prefixes: tuple[tuple[int, ...], ...]
    num_prefixes: int
    num_checked: int


@dataclass(frozen=True)
class Warn:
    code: str
    value: float = 0.0


@dataclass
class Thresholds:
    """Layer-2 acceptance thresholds (MLP-input span and block-1 attention span)."""

    mlp: float | None
    layer2: float | None


def split_threshold(accepted: torch.Tensor, rejected: torch.Tensor, ceiling: float = 0.1) -> float:
    """Geometric mean of the accepted cluster's top and the rejected level's bottom."""
    lo = float(accepted.max()) if accepted.numel() else 1e-7
    hi = float(rejected.min()) if rejected.numel() else 1.0
    lo = max(lo, 1e-12)
    hi = max(hi, lo * 1.0001)
    return float(min(math.sqrt(lo * hi), ceiling))


# ---------------------------------------------------------------------------
# Decoder search


@dataclass
class _Beam:
    prefixes: list[tuple[int, ...]]
    k: torch.Tensor  # (n, H, l, dh)
    v: torch.Tensor  # (n, H, l, dh)
    dist: torch.Tensor  # (n,) worst distance along each prefix
    last_h: list[torch.Tensor | None] = field(default_factory=list)


def decoder_search(
    hooks: DecoderHooks,
    candidates: Callable[[int], torch.Tensor | None],
    span_mlp: Span,
    span2: Span,
    *,
    start: tuple[int, ...],
    thresholds: Thresholds,
    max_prefixes: int,
    max_length: int,
    noise_tolerant: bool = False,
    probe_generator: torch.Generator | None = None,
    final_keep: int | None = None,
) -> Iterator[Found | Step | Warn]:
    """Grow prefixes position by position; yield finished sentences as they end.

    Args:
        hooks: the family's decoder hooks.
        candidates: position -> ``(t,)`` layer-1 candidate ids, or ``None`` past the end.
        span_mlp: span of block 0's MLP input weight gradient (early rejection).
        span2: span of block 1's attention input weight gradient.
        start: the given prefix (Llama: ``(bos,)``; GPT-2: empty).
        thresholds: acceptance thresholds; ``None`` entries are set automatically at
            the first step (from the gap between the candidates' distances and those
            of random off-span probe tokens) and then kept.
        max_prefixes: the most prefixes kept alive; the best are kept beyond it.
        max_length: the last position to try is ``max_length - 1``.
        noise_tolerant: reserved (the thresholds are already set from the measured
            gap between candidates and probes, which adapts to the noise level).
        probe_generator: seeds the probe tokens.
        final_keep: after an exhausted budget, yield at most this many survivors.

    Yields:
        :class:`Step` after every position, :class:`Found` per sentence,
        :class:`Warn` when the budget is exhausted.
    """
    dev = hooks.device
    H, dh = hooks.num_heads, hooks.head_dim
    beam = _Beam(
        prefixes=[()],
        k=torch.zeros((1, H, 0, dh), device=dev),
        v=torch.zeros((1, H, 0, dh), device=dev),
        dist=torch.zeros(1, dtype=torch.float64, device=dev),
    )
    # Feed the given start tokens (they are known, not searched).
    for pos, tok in enumerate(start):
        h, k, v = hooks.extend(torch.tensor([tok], device=dev), pos, beam.k, beam.v)
        beam.k = torch.cat([beam.k, k.unsqueeze(2)], dim=2)  # k: (1, H, dh)
        beam.v = torch.cat([beam.v, v.unsqueeze(2)], dim=2)
        beam.prefixes = [(*beam.prefixes[0], tok)]
    exhausted = False
    first = True
    for pos in range(len(start), max_length):
        cand = candidates(pos)
        if cand is None or cand.numel() == 0 or not beam.prefixes:
            break
        cand = cand.to(dev)
        if start:
            # The given start tokens (BOS) never recur: a run of identical tokens
            # reproduces its first position's inputs exactly under RoPE.
            cand = cand[~torch.isin(cand, torch.tensor(start, device=dev))]
            if cand.numel() == 0:
                break
        n, t = len(beam.prefixes), int(cand.numel())
        if first and (thresholds.mlp is None or thresholds.layer2 is None):
            _calibrate(hooks, cand, pos, beam, span_mlp, span2, thresholds, probe_generator)
        first = False
        keep_pref: list[torch.Tensor] = []
        keep_tok: list[torch.Tensor] = []
        keep_dist: list[torch.Tensor] = []
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        has_ext = torch.zeros(n, dtype=torch.bool, device=dev)
        chunk = max(1, CANDIDATE_CHUNK // t)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h, k, v = hooks.extend(cand, pos, beam.k[s:e], beam.v[s:e])  # h: (m, t, d)
            m = e - s
            h = h.reshape(m * t, -1)
            d_mlp = span_mlp.distance(hooks.mlp_input(h))  # (m*t,)
            ok = d_mlp < thresholds.mlp
            idx = ok.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            h2 = hooks.mlp_residual(h[idx])
            d2 = span2.distance(hooks.layer2_input(h2))
            ok2 = d2 < thresholds.layer2
            idx2 = idx[ok2]
            if idx2.numel() == 0:
                continue
            pi = idx2 // t + s  # prefix index
            ti = idx2 % t  # token index
            dist = torch.maximum(torch.maximum(d_mlp[idx2], d2[ok2]), beam.dist[pi])
            has_ext[pi] = True
            keep_pref.append(pi)
            keep_tok.append(ti)
            keep_dist.append(dist)
            new_k.append(torch.cat([beam.k[pi], k[ti].unsqueeze(2)], dim=2))
            new_v.append(torch.cat([beam.v[pi], v[ti].unsqueeze(2)], dim=2))
        # Prefixes with no valid extension are whole sentences.
        for i in (~has_ext).nonzero().squeeze(1).tolist():
            if len(beam.prefixes[i]) > len(start):
                yield Found(beam.prefixes[i], not exhausted, float(beam.dist[i]))
        if not keep_pref:
            beam.prefixes = []
            yield Step(pos, (), 0, n * t)
            break
        pi = torch.cat(keep_pref)
        ti = torch.cat(keep_tok)
        dist = torch.cat(keep_dist)
        ks = torch.cat(new_k)
        vs = torch.cat(new_v)
        if pi.numel() > max_prefixes:
            exhausted = True
            yield Warn("budget_exhausted", float(max_prefixes))
            order = dist.argsort()[:max_prefixes]
            pi, ti, dist, ks, vs = pi[order], ti[order], dist[order], ks[order], vs[order]
        cand_list = cand.tolist()
        beam = _Beam(
            prefixes=[(*beam.prefixes[p], cand_list[q]) for p, q in zip(pi.tolist(), ti.tolist())],
            k=ks,
            v=vs,
            dist=dist,
        )
        yield Step(pos, tuple(beam.prefixes[:256]), len(beam.prefixes), n * t)
    order = beam.dist.argsort().tolist() if beam.prefixes else []
    if exhausted and final_keep is not None:
        order = order[:final_keep]  # a saturated search: only the nearest survivors
    for i in order:
        prefix = beam.prefixes[i]
        if len(prefix) > len(start):
            yield Found(prefix, not exhausted, float(beam.dist[i]))


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
                cand = candidates(pos)
                if cand is None or cand.numel() == 0:
                    break
                cand = cand.to(dev)
                if start:
                    cand = cand[~torch.isin(cand, torch.tensor(start, device=dev))]
                if cand.numel() == 0:
                    break
            h, k, v = hooks.extend(cand, pos, kc, vc)
            d2 = span2.distance(hooks.layer2_input(hooks.mlp_residual(h[0])))
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


def _calibrate(
    hooks: DecoderHooks,
    cand: torch.Tensor,
    pos: int,
    beam: _Beam,
    span_mlp: Span,
    span2: Span,
    thresholds: Thresholds,
    generator: torch.Generator | None,
) -> None:
    """Set missing thresholds from the first step: candidates vs random probes.

    True extensions sit at round-off level; random tokens are off-span by orders of
    magnitude. The threshold is the geometric mean of the low cluster's top and the
    lowest off-span distance (probes and the candidates above the largest gap).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    probes = torch.randint(0, hooks.vocab_size, (NUM_PROBES,), generator=gen).to(cand.device)
    probes = probes[~torch.isin(probes, cand)]
    tokens = torch.cat([cand, probes])
    h, _, _ = hooks.extend(tokens, pos, beam.k[:1], beam.v[:1])
    h = h[0]
    d_mlp = span_mlp.distance(hooks.mlp_input(h))
    d2 = span2.distance(hooks.layer2_input(hooks.mlp_residual(h)))
    nc = cand.numel()
    for attr, d in (("mlp", d_mlp), ("layer2", d2)):
        if getattr(thresholds, attr) is not None:
            continue
        dc, dp = d[:nc], d[nc:]
        cut = gap_threshold(torch.cat([dc, dp]), min_keep=1)
        low = dc[dc < cut]
        high = torch.cat([dc[dc >= cut], dp])
        setattr(thresholds, attr, split_threshold(low, high))
    log.debug("decoder thresholds: mlp %.3g, layer2 %.3g", thresholds.mlp, thresholds.layer2)


EXHAUSTIVE_CAP = 4096
"""Lengths whose candidate combinations number at most this are enumerated exactly."""

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
) -> Iterator[Found | Step | Warn]:
    """Assemble encoder sequences from per-position candidates (Sec. 4.3, heuristic).

    Sentence ends come first: ``[SEP]`` among a position's layer-1 candidates means a
    sequence of that length may exist. For each length, a sequence is assembled from
    the per-position candidates by coordinate descent (Gauss-Seidel sweeps): each
    position in turn takes the candidate whose block-1 input at that position is
    nearest the layer-2 span, given the current tokens elsewhere (one row of block 0
    per candidate, not a whole sequence). The right token at a position fits a mostly
    right context far better than any other, so a few sweeps settle on a sentence
    without enumerating the product of the candidate counts. The whole assembled
    sequence is then verified: every position must lie in the layer-2 span. Further
    sequences of a length restart from a different first token until ``batch_size``
    sequences are found. Each candidate row and each verified sequence counts
    against ``max_combinations``.

    Args:
        hooks: BERT-family hooks.
        accepted: position -> layer-1 candidate ids (nearest first).
        span2: span of block 1's attention-input gradient.
        special_ids: ``(cls_id, sep_id)`` and optionally a neutral fill id (``[MASK]``).
        batch_size: sequences in the client's batch (the most to look for).
        threshold: layer-2 acceptance threshold; ``None``: automatic (the largest
            gap between the assembled sequences' worst distances and random probes).
        max_combinations: budget of evaluated candidates.
        generator: seeds the probes.

    Yields:
        :class:`Step` per assembled sequence, :class:`Found` per sentence,
        :class:`Warn` when the budget is hit.
    """
    cls_id, sep_id = special_ids[:2]
    fill_id = special_ids[2] if len(special_ids) > 2 else cls_id
    dev = hooks.device
    positions = sorted(p for p in accepted if p is not None)
    lengths = [p + 1 for p in positions if p >= 2 and bool((accepted[p] == sep_id).any())]
    budget = [max_combinations]
    capped = [False]
    specials = torch.tensor([cls_id, sep_id], device=dev)
    cand_cache: dict[int, torch.Tensor] = {}

    def cands(p: int) -> torch.Tensor:
        if p not in cand_cache:
            c = accepted[p].to(dev)
            cand_cache[p] = c[~torch.isin(c, specials)]
        return cand_cache[p]

    def verify(seq: torch.Tensor) -> float:
        budget[0] -= 1
        return float(span2.distance(hooks.layer2_inputs(seq.unsqueeze(0))[0]).max())

    def descend(seq: torch.Tensor, fixed: int | None) -> tuple[torch.Tensor, float]:
        L = seq.shape[0]
        for sweep in range(5):
            changed = False
            # The first sweep runs right to left from a neutral fill: the last
            # positions hold only the tokens of the longest sequences, so the
            # sentence of this length grows from its own end.
            order = range(L - 2, 0, -1) if sweep == 0 else range(1, L - 1)
            for p in order:
                c = cands(p)
                if p == fixed or (c.numel() <= 1 and seq[p] == c[0]):
                    continue
                if budget[0] <= 0:
                    capped[0] = True
                    return seq, verify(seq)
                budget[0] -= int(c.numel())
                d = span2.distance(hooks.row_layer2_inputs(seq, p, c))  # (c,)
                best = c[int(d.argmin())]
                if best != seq[p]:
                    seq = seq.clone()
                    seq[p] = best
                    changed = True
            if not changed:
                break
        return seq, verify(seq)

    def initial(L: int, first: int | None) -> torch.Tensor | None:
        """Nearest candidates, avoiding at each position the tokens that sentences
        found so far put there (they belong to those sentences)."""
        seq = torch.full((L,), fill_id, dtype=torch.long, device=dev)
        seq[0] = cls_id
        seq[L - 1] = sep_id
        for p in range(1, L - 1):
            if cands(p).numel() == 0:
                return None
        if first is not None:
            seq[1] = first
        return seq

    thr = threshold
    probes_worst = torch.empty(0, dtype=torch.float64)
    if thr is None and lengths:
        # The off-span level: random tokens at every position.
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        L = lengths[0]
        probe = torch.randint(1000, hooks.vocab_size, (8, L), generator=gen).to(dev)
        probe[:, 0] = cls_id
        probe[:, L - 1] = sep_id
        probes_worst = span2.distance(hooks.layer2_inputs(probe)).max(-1).values.cpu()

    found: list[torch.Tensor] = []
    tried: set[tuple[int, ...]] = set()
    results: list[tuple[torch.Tensor, float]] = []
    provisional: list[torch.Tensor] = []

    def accept(seq: torch.Tensor, worst: float) -> bool:
        key = tuple(seq.tolist())
        if worst < thr and key not in tried:
            tried.add(key)
            found.append(seq)
            return True
        tried.add(key)
        return False

    # Phase 1: one assembly per candidate length, longest first: the last positions
    # of the longest sequence hold only its own tokens, which anchors the descent;
    # each sentence found is then avoided when shorter ones are started.
    exhaustive_cap = min(EXHAUSTIVE_CAP, max_combinations)
    for L in sorted(lengths, reverse=True):
        seq = initial(L, None)
        if seq is None:
            continue
        pools = [cands(p) for p in range(1, L - 1)]
        if math.prod(int(c.numel()) for c in pools) <= exhaustive_cap:
            # Few combinations: enumerate them all (the paper's exhaustive search).
            for seq, worst in _enumerate(hooks, span2, pools, cls_id, sep_id, batch_size):
                budget[0] -= 1
                results.append((seq, worst))
            yield Step(L - 1, (tuple(results[-1][0].tolist()),) if results else (), len(results), max_combinations - budget[0])
            continue
        seq, worst = descend(seq, None)
        results.append((seq, worst))
        if worst < (thr if thr is not None else ENCODER_CEILING):
            found.append(seq)  # provisional: only steers the next initialisations
            provisional.append(seq)
        yield Step(L - 1, (tuple(seq.tolist()),), len(results), max_combinations - budget[0])
    found.clear()  # the provisional picks were only hints; accept() decides below
    if not results:
        return
    if thr is None:
        worsts = torch.tensor([w for _, w in results], dtype=torch.float64)
        cut = gap_threshold(torch.cat([worsts, probes_worst]), min_keep=1, ceiling=ENCODER_CEILING)
        thr = split_threshold(worsts[worsts < cut], torch.cat([worsts[worsts >= cut], probes_worst]))
        thr = min(thr, ENCODER_CEILING)
    log.debug("encoder layer-2 threshold %.3g", thr)
    for seq, worst in results:
        if accept(seq, worst):
            yield Found(tuple(seq.tolist()), True, worst)
    # Phase 2: restart from other first tokens (more sentences of one length, or a
    # length whose first assembly mixed two sentences), nearest lengths first,
    # until the batch is complete.
    order = [int(seq.shape[0]) for seq, _ in sorted(results, key=lambda r: r[1])]
    for L in order:
        if len(found) >= batch_size or budget[0] <= 0:
            break
        for first in cands(1).tolist():
            if len(found) >= batch_size or budget[0] <= 0:
                break
            if any(s.shape[0] == L and int(s[1]) == first for s in found):
                continue
            seq = initial(L, first)
            if seq is None:
                break
            if tuple(seq.tolist()) in tried:
                continue
            seq, worst = descend(seq, 1)
            yield Step(L - 1, (tuple(seq.tolist()),), len(found), max_combinations - budget[0])
            results.append((seq, worst))
            if accept(seq, worst):
                yield Found(tuple(seq.tolist()), True, worst)
    if capped[0] or budget[0] <= 0:
        yield Warn("combinations_capped", float(max_combinations))
    # Best effort: fill up to the batch size with the nearest failed assemblies.
    if len(found) < batch_size:
        for seq, worst in sorted(results, key=lambda r: r[1]):
            if len(found) >= batch_size:
                break
            if tuple(seq.tolist()) in {tuple(s.tolist()) for s in found}:
                continue
            found.append(seq)
            yield Found(tuple(seq.tolist()), False, worst)


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
