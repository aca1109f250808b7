"""The encoder search's first stage: a left-to-right beam over block-0 rows.

See :mod:`dager.encoder` for what the measurements showed; :class:`_RowModel` scores
one row per candidate, :class:`_BeamStage` grows, ends and repairs the prefixes.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dager.encoder_tuning import DISTANCE_FLOOR, IMPROVEMENT, SCORE_CHUNK
from dager.hooks_bert import BertHooks
from dager.search_items import Found, Step, Tick

if TYPE_CHECKING:
    from dager.encoder_assembly import _EncoderSearch

BEAM_WIDTH = 32
"""Prefixes kept per position by the beam (after the family rule). With the open anchors
of the later passes (:data:`ANCHOR_FILLERS`) a wider first pass no longer pays:
minilm-l6, medium, B=8, held-out batches 8-15, in process: 64 wide 56/64 exact at 9.1 s
per batch, 32 wide 56/64 at 6.0 s (without anchors: 51/64 at 6.4 s and 47/64 at 5.9 s)."""

ANCHOR_FILLERS = 4
"""Later passes also score each candidate with the tokens located one position to its
right that no found sentence holds there (:meth:`_BeamStage.open_anchors`, at most this
many) as its right neighbour, keeping its best row: a row depends on its right
neighbour ("it ' s": the apostrophe ranks 28-40 of 44 behind a random filler, first
behind "s"), and the missing sentences' located tokens are the likely neighbours.
Given its true prefix among the batch's true prefixes, a located token ranks its own
prefix first 261 times in 265 (medium set, B=8, batches 0-3). minilm-l6, medium, B=8, in
process: development batches 26/32 -> 29/32 exact, held-out 51/64 -> 56/64, at 7.1 ->
9.1 s per batch (64 wide; see :data:`BEAM_WIDTH`)."""

ANCHOR_PARENTS = 2
"""In later passes each open anchor at a position (a missing sentence's located token)
keeps the children of its best parents (this many) beyond the width, whatever their rank
across the beam: sentences sharing a frequent first token ("the ...") lost all but one
child of it at position 2. minilm-l6, medium, B=8, in process: batches 4-7 (not used while
tuning anything before) 26/32 exact with none, 28/32 with one, 30/32 with two; with two,
batches 0-3 29/32 and 8-15 56/64 -> 61/64 (all 16 batches: 120/128, 93.8%), 6-8 s per batch."""

BEAM_CHILDREN = 8
"""The most children a prefix may keep at one position."""

BEAM_Z = 2.5
"""A child is kept when its row distance lies this many robust deviations (MAD) below
the median of its siblings' (the best child is always kept)."""

EARLY_POSITIONS = 1
"""Positions 1..this are scored with the least left context (the true token ranks up
to ~10 of 96 at positions 1-2 at B=8): the beam is :data:`EARLY_WIDTH` wide there, so
the root keeps every plausible first token. Widening positions 2-3 as well (96
prefixes, 8 children each) cost 1.6x the time and found fewer sentences (6/16 against
7/16 on two B=8 batches): the early scores are too noisy for a wider beam to help."""

EARLY_WIDTH = 96
"""Beam width at the first :data:`EARLY_POSITIONS` positions."""

FAMILY_FRACTION = 0.34
"""Two prefixes that differ in at most this fraction of their positions are one family
(a sentence and its variants with an early token wrong): they score alike because rows
mostly see their neighbours."""

FAMILY_SIZE = 3
"""Members of one family the beam keeps (the best first), so variants of a few
sentences cannot crowd out the others."""

SEP_NEAR = 0.1
"""An ending whose [SEP] row lies below this relative distance has the right length
(a wrong length puts the [SEP] row at ~0.2 on minilm-l6) and is repaired when inexact."""

REPAIR_ROUNDS = 4
"""Coordinate-repair rounds of one near sentence."""

REPAIR_POSITIONS = 3
"""Positions (the worst rows' tokens) re-chosen per repair round."""

PAIR_SHORTLIST = 6
"""Candidates per position in a repair's pair move (its best single moves): 36 whole
sequences per pair."""

MAX_REPAIRS_PER_STEP = 0
"""Near endings repaired inside a pass, at one beam step (best [SEP] rows first). None by
default: repairs inside the pass took half of a B=8 batch's time; the nearest endings of
all passes are repaired after them instead (:data:`LATE_REPAIRS`)."""

LATE_REPAIRS = 8
"""Near endings (the [SEP] row below :data:`SEP_NEAR`, not exact) repaired after the
passes, nearest [SEP] row first, none a near copy of a found sentence."""

MAX_PASSES = 3
"""Beam passes; each later pass drops the variants of the sentences found before it
(their near copies crowd the beam: one easy sentence fills it with variants), and a pass
that finds nothing new ends them. With repairs moved after the passes, three passes
cost about what one pass with repairs did (minilm-l6, medium set; see
:mod:`dager.encoder`)."""

LATER_WIDTH_PER_MISSING = 12
"""A later pass looks for the missing sentences only: it keeps this many prefixes per
missing sentence, at most :data:`BEAM_WIDTH`, and its first positions shrink by the
same share of :data:`EARLY_WIDTH` (a B=4 batch with one sentence missing after the
first pass searches 12 wide, 36 at position 1; a B=8 batch with three missing, as wide as
the first pass). Full-width later passes found one more of 64 held-out B=8 sentences but
took B=4 batches from 2.5 to 3.0 CPU s (fourth round, 8 per missing sentence). With the
open anchors (:data:`ANCHOR_FILLERS`) 12 per missing sentence against 8: held-out B=8
batches 8-15 56/64 -> 58/64 exact at 6.0 -> 5.6 s per batch (later passes that find
more end sooner), development batches 0-3 29/32 both, B=4 31/32 at 1.7 s."""

BAN_FRACTION = 0.2
"""A prefix that differs from a found sentence's prefix in at most this fraction of its
positions (at least one) is that sentence's variant."""


@dataclass
class _Prefix:
    """A beam entry: its tokens, the sum of its settled rows' log distances and the log
    distance of its newest row (measured with its right neighbour still unknown)."""

    ids: tuple[int, ...]
    settled: float
    last: float

    @property
    def score(self) -> float:
        return self.settled + self.last


class _RowModel:
    """Block 0's output at chosen rows of many sequences that differ at one position.

    In block 0 a row depends on the whole sequence only through attention; the keys and
    values of a sequence are computed once, a candidate token contributes its own
    key/value at the varied position, and only the asked rows go through the
    feed-forward block (the expensive part). So scoring ``c`` candidates at one position
    costs ``c`` rows per asked row, not ``c`` sequences of ``L`` rows.
    """

    def __init__(self, hooks: BertHooks) -> None:
        self.hooks = hooks
        self.blk = hooks.blocks[0]
        self.att = self.blk.attention.self
        self.heads = int(self.att.num_attention_heads)
        self.head_dim = int(self.att.attention_head_size)

    def embed(self, ids: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Embeddings of ``(n, L)`` sequences, or of ``(c,)`` tokens all at ``position``."""
        if position is None:
            return self.hooks.emb(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        pos = torch.full((1, ids.shape[0]), position, dtype=torch.long, device=ids.device)
        return self.hooks.emb(input_ids=ids.unsqueeze(0), token_type_ids=torch.zeros_like(pos), position_ids=pos)[0]

    def row(self, seqs: torch.Tensor, r: int) -> torch.Tensor:
        """``(n, d)``: block 0's output at row ``r`` of each of ``(n, L)`` whole sequences."""
        n, L = seqs.shape
        H, dh = self.heads, self.head_dim
        att = self.att
        e = self.embed(seqs)  # (n, L, d)
        k = att.key(e).reshape(n, L, H, dh)
        v = att.value(e).reshape(n, L, H, dh)
        q = att.query(e[:, r]).reshape(n, H, dh)
        a = (torch.einsum("nhd,nlhd->nhl", q, k) / math.sqrt(dh)).softmax(-1)
        mix = torch.einsum("nhl,nlhd->nhd", a, v).reshape(n, H * dh)
        hidden = self.blk.attention.output(mix, e[:, r])  # dense + residual + LayerNorm
        return self.blk.output(self.blk.intermediate(hidden), hidden)

    def rows(self, ctx: torch.Tensor, position: int, cand: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``(m, c, len(rows), d)``: rows of each context with each candidate at ``position``.

        Args:
            ctx: ``(m, L)`` sequences (the token at ``position`` is ignored).
            position: the varied position.
            cand: ``(c,)`` candidate tokens there.
            rows: row indices to compute (any, including ``position``).
        """
        m, L = ctx.shape
        c = int(cand.shape[0])
        H, dh = self.heads, self.head_dim
        att = self.att
        e_ctx = self.embed(ctx)  # (m, L, d)
        e_c = self.embed(cand, position)  # (c, d)
        k_ctx = att.key(e_ctx).reshape(m, L, H, dh)
        v_ctx = att.value(e_ctx).reshape(m, L, H, dh)
        k_c = att.key(e_c).reshape(c, H, dh)
        v_c = att.value(e_c).reshape(c, H, dh)
        scale = 1.0 / math.sqrt(dh)
        others = torch.arange(L, device=ctx.device) != position
        k_o, v_o = k_ctx[:, others], v_ctx[:, others]  # (m, L-1, H, dh)
        outs = []
        for r in rows:
            if r == position:
                q = att.query(e_c).reshape(c, H, dh)
                s_o = torch.einsum("chd,mlhd->mchl", q, k_o) * scale  # (m, c, H, L-1)
                s_c = ((q * k_c).sum(-1) * scale).expand(m, c, H).unsqueeze(-1)  # (m, c, H, 1)
                resid = e_c.expand(m, c, -1)
            else:
                q = att.query(e_ctx[:, r]).reshape(m, H, dh)
                s_o = torch.einsum("mhd,mlhd->mhl", q, k_o).unsqueeze(1).expand(m, c, H, L - 1) * scale
                s_c = torch.einsum("mhd,chd->mch", q, k_c).unsqueeze(-1) * scale
                resid = e_ctx[:, r].unsqueeze(1).expand(m, c, -1)
            a = torch.cat([s_o, s_c], dim=-1).softmax(-1)
            mix = torch.einsum("mchl,mlhd->mchd", a[..., :-1], v_o) + a[..., -1:] * v_c  # (m, c, H, dh)
            outs.append((mix.reshape(m * c, H * dh), resid.reshape(m * c, -1)))
        mix = torch.cat([o[0] for o in outs])
        resid = torch.cat([o[1] for o in outs])
        hidden = self.blk.attention.output(mix, resid)  # dense + residual + LayerNorm
        out = self.blk.output(self.blk.intermediate(hidden), hidden)  # (R*m*c, d)
        return out.reshape(len(rows), m, c, -1).permute(1, 2, 0, 3)


class _BeamStage:
    """The beam and its repairs, run on an :class:`_EncoderSearch`'s shared state."""

    def __init__(self, search: "_EncoderSearch") -> None:
        self.s = search
        self.rm = _RowModel(search.hooks)
        self.tried: set[tuple[int, ...]] = set()
        self.near: dict[tuple[int, ...], float] = {}  # near endings -> their [SEP] row
        self.width, self.early_width = BEAM_WIDTH, EARLY_WIDTH
        self.anchor_fillers = False

    def log_dist(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """Log relative distances of ``(..., d)`` rows; charges them as ``1/length``
        sequence each (the budget counts sequences of block-0 work)."""
        self.s.charge_rows(int(rows.shape[:-1].numel()), length)
        return self.s.span2.distance(rows).clamp(min=DISTANCE_FLOOR).log()

    def run(self) -> Iterator[Found | Step | Tick]:
        """Beam passes until the batch is found, a pass finds nothing new, or
        :data:`MAX_PASSES` (each pass bans the variants of the sentences found so far
        and is :data:`LATER_WIDTH_PER_MISSING` wide per missing sentence); then the
        nearest endings of all passes are repaired (:data:`LATE_REPAIRS`)."""
        s = self.s
        s.narrow = s.narrowed is not None  # the passes read the placement's candidates
        for n in range(MAX_PASSES):
            before = len(s.found)
            missing = s.batch_size - before
            share = 1.0 if n == 0 else min(1.0, LATER_WIDTH_PER_MISSING * missing / BEAM_WIDTH)
            self.width = max(1, round(BEAM_WIDTH * share))
            self.early_width = max(1, round(EARLY_WIDTH * share))
            self.anchor_fillers = n > 0 and ANCHOR_FILLERS > 0
            yield from self.one_pass()
            if s.done or len(s.found) == before:
                break
        s.narrow = False  # repairs may use any layer-1 candidate
        yield from self.late_repairs()

    def late_repairs(self) -> Iterator[Found | Tick]:
        """Repair the nearest endings the passes left (best [SEP] rows first), skipping
        those already repaired and the near copies of found sentences."""
        s = self.s
        done = 0
        for key, _sep in sorted(self.near.items(), key=lambda kv: kv[1]):
            if s.done or done >= LATE_REPAIRS:
                return
            found = [tuple(f.tolist()) for f in s.found]
            if key in self.tried or any(_near_copy(key, f) for f in found):
                continue
            self.tried.add(key)
            done += 1
            seq, w = yield from self.repair(torch.tensor(key, device=s.device))
            item = s.record(seq, w)
            if item is not None:
                yield item

    def open_anchors(self, p: int) -> list[int]:
        """Tokens located at ``p`` (dager.placement) that no found sentence holds there:
        the missing sentences' tokens, likely."""
        here = self.s.located.get(p)
        if here is None:
            return []
        taken = {int(f[p]) for f in self.s.found if f.numel() > p}
        return [t for t in here.tolist() if t not in taken]

    def one_pass(self) -> Iterator[Found | Step | Tick]:
        """Grow prefixes from ``[CLS]`` to the last occupied position; at each
        position first close every prefix with ``[SEP]`` (exact check), then extend."""
        s = self.s
        positions = sorted(p for p in s.accepted if p is not None)
        if not positions:
            return
        last = max(positions)
        beam = [_Prefix((s.cls_id,), 0.0, 0.0)]
        for p in range(1, last + 1):
            if s.done or not beam:
                return
            if p >= 2:
                yield from self.endings(beam, p)
                if s.done:
                    return
            cand = s.cands(p)
            if p >= last or cand.numel() == 0:
                return
            beam = yield from self.extend(beam, p, cand)
            yield Step(p, tuple(b.ids for b in beam), len(beam), s.checked)

    def extend(self, beam: list[_Prefix], p: int, cand: torch.Tensor) -> Generator[Tick, None, list[_Prefix]]:
        """Children of every prefix at position ``p``, scored by row ``p`` (its left
        neighbours known, a random filler and ``[SEP]`` to its right)."""
        s = self.s
        c = int(cand.numel())
        fills = [int(cand[int(torch.randint(c, (1,), generator=s.gen))])]
        if self.anchor_fillers:
            fills += self.open_anchors(p + 1)[:ANCHOR_FILLERS]
        L = p + 3
        r: torch.Tensor | None = None
        first: torch.Tensor | None = None  # the random filler's contexts (the settled rows use them)
        for fill in fills:
            # [CLS] prefix <candidate> <filler> [SEP]; the token written at p is ignored.
            ctx = torch.tensor([[*b.ids, s.sep_id, fill, s.sep_id] for b in beam], device=s.device)  # (m, L)
            first = ctx if first is None else first
            per_chunk = max(1, (SCORE_CHUNK * L) // c)
            parts = []
            for start in range(0, len(beam), per_chunk):
                out = self.rm.rows(ctx[start : start + per_chunk], p, cand, [p])[:, :, 0]  # (m', c, d)
                parts.append(self.log_dist(out, L))
                yield s.tick(L)
                if s.left <= 0:
                    return []  # out of budget: the beam ends here
            part = torch.cat(parts)  # (m, c)
            r = part if r is None else torch.minimum(r, part)
        assert r is not None
        med = r.median(dim=1, keepdim=True).values
        mad = (r - med).abs().median(dim=1, keepdim=True).values.clamp(min=1e-6)
        z = (r - med) / mad
        # Every parent keeps its best children while the beam has room (the root keeps
        # a beam's worth: first tokens have the least context and rank worst), then the
        # outliers among its best BEAM_CHILDREN; with few candidates all go on.
        width = self.early_width if p <= EARLY_POSITIONS else self.width
        sure = max(1, width // len(beam))
        order = z.argsort(dim=1)[:, : max(sure, BEAM_CHILDREN)]
        pairs = [
            (i, j)
            for i in range(len(beam))
            for n, j in enumerate(order[i].tolist())
            if n < sure or (n < BEAM_CHILDREN and (c <= BEAM_CHILDREN or float(z[i, j]) < -BEAM_Z))
        ]
        linked: set[tuple[int, int]] = set()
        if self.anchor_fillers and ANCHOR_PARENTS > 0 and len(beam) > 1:
            # Each open anchor here keeps its best parents whatever their rank: given the
            # batch's prefixes, a located token ranks its own first (see ANCHOR_FILLERS).
            cols = torch.isin(cand, torch.tensor(self.open_anchors(p), dtype=cand.dtype, device=cand.device))
            for j in cols.nonzero().squeeze(1).tolist():
                linked.update((i, j) for i in r[:, j].argsort()[:ANCHOR_PARENTS].tolist())
            pairs += sorted(linked - set(pairs))
        settled = [0.0] * len(pairs)
        if p >= 2:
            # Each parent's newest row, now with its right neighbour (the child) known:
            # every kept pair in one batch.
            assert first is not None
            seqs = first[[i for i, _ in pairs]].clone()
            seqs[:, p] = cand[[j for _, j in pairs]]
            settled = self.log_dist(self.rm.row(seqs, p - 1), L).tolist()
        children = [
            _Prefix((*beam[i].ids, int(cand[j])), beam[i].settled + settled[n], float(r[i, j]))
            for n, (i, j) in enumerate(pairs)
        ]
        yield s.tick(L)
        found = [tuple(f.tolist()) for f in s.found]
        kept = _by_family(children, p, width, found=found)
        if linked:
            have = {ch.ids for ch in kept}
            links = {(*beam[i].ids, int(cand[j])) for i, j in linked}
            anchored = _by_family([ch for ch in children if ch.ids in links], p, len(links), found=found)
            kept += [ch for ch in anchored if ch.ids not in have]
        return kept

    def endings(self, beam: list[_Prefix], p: int) -> Iterator[Found | Tick]:
        """Every prefix closed by ``[SEP]`` at ``p``, checked whole; near ones kept for
        the late repairs (and repaired here, up to :data:`MAX_REPAIRS_PER_STEP`)."""
        s = self.s
        seqs = torch.tensor([[*b.ids, s.sep_id] for b in beam], device=s.device)  # (m, p+1)
        dist = []
        for start in range(0, int(seqs.shape[0]), SCORE_CHUNK):
            dist.append(s.rows(seqs[start : start + SCORE_CHUNK]))
            yield s.tick(p + 1)
        d = torch.cat(dist)  # (m', p+1)
        seqs = seqs[: int(d.shape[0])]
        worst = d.max(-1).values
        near = []
        for i in range(int(seqs.shape[0])):
            item = s.record(seqs[i], float(worst[i]))
            if item is not None:
                yield item
            elif float(worst[i]) >= s.thr and float(d[i, -1]) < SEP_NEAR:
                near.append((float(d[i, -1]), i))
                key = tuple(seqs[i].tolist())
                self.near[key] = min(self.near.get(key, SEP_NEAR), float(d[i, -1]))
        for _, i in sorted(near)[:MAX_REPAIRS_PER_STEP]:
            if s.done:
                return
            key = tuple(seqs[i].tolist())
            if key in self.tried:
                continue
            self.tried.add(key)
            seq, w = yield from self.repair(seqs[i].clone())
            item = s.record(seq, w)
            if item is not None:
                yield item

    def repair(self, seq: torch.Tensor) -> Generator[Tick, None, tuple[torch.Tensor, float]]:
        """Re-choose the tokens at the worst rows, each with its whole context known
        (rows ``q-1..q+1`` scored for every candidate at ``q``)."""
        s = self.s
        L = int(seq.shape[0])
        d = s.rows(seq.unsqueeze(0))[0]
        for _round in range(REPAIR_ROUNDS):
            if float(d.max()) < s.thr or s.left <= 0:
                break
            suspects = [int(q) for q in d[1 : L - 1].argsort(descending=True)[:REPAIR_POSITIONS] + 1]
            changed = False
            shortlist: dict[int, torch.Tensor] = {}
            for q in suspects:
                cand = s.cands(q)
                if cand.numel() <= 1:
                    continue
                rows = [r for r in (q - 1, q, q + 1) if 1 <= r <= L - 1]
                out = self.rm.rows(seq.unsqueeze(0), q, cand, rows)[0]  # (c, R, d)
                score = self.log_dist(out, L).sum(-1)
                shortlist[q] = cand[score.argsort()[:PAIR_SHORTLIST]]
                best = int(cand[int(score.argmin())])
                if best != int(seq[q]):
                    seq[q] = best
                    changed = True
                yield s.tick(L)
            if not changed:
                # A local minimum of single moves (two neighbouring tokens wrong): the
                # worst row's token and a neighbour change together, scored whole.
                seq, changed = yield from self.pair_repair(seq, d, shortlist)
                if not changed:
                    break
            d = s.rows(seq.unsqueeze(0))[0]
        return seq, float(d.max())

    def pair_repair(
        self, seq: torch.Tensor, d: torch.Tensor, shortlist: dict[int, torch.Tensor]
    ) -> Generator[Tick, None, tuple[torch.Tensor, bool]]:
        """Two neighbouring positions at the worst row, each from its best single
        moves; returns the best pair's sequence if it lowers the mean log distance."""
        s = self.s
        L = int(seq.shape[0])
        j = int(d[1 : L - 1].argmax()) + 1
        base = float(d.clamp(min=DISTANCE_FLOOR).log().mean())
        best: tuple[float, torch.Tensor] | None = None
        for a, b in ((j - 1, j), (j, j + 1)):
            if a < 1 or b > L - 2:
                continue
            pa = shortlist.get(a, s.cands(a)[:PAIR_SHORTLIST])
            pb = shortlist.get(b, s.cands(b)[:PAIR_SHORTLIST])
            if pa.numel() == 0 or pb.numel() == 0:
                continue
            grid = torch.cartesian_prod(pa, pb).reshape(-1, 2)
            seqs = seq.unsqueeze(0).repeat(int(grid.shape[0]), 1)
            seqs[:, a], seqs[:, b] = grid[:, 0], grid[:, 1]
            score, _ = yield from s.score_chunks(seqs)
            i = int(score.argmin())
            if float(score[i]) < base - IMPROVEMENT and (best is None or float(score[i]) < best[0]):
                best = (float(score[i]), seqs[i].clone())
        if best is None:
            return seq, False
        return best[1], True


def _by_family(
    children: list[_Prefix], p: int, width: int, found: list[tuple[int, ...]] | None = None
) -> list[_Prefix]:
    """The best ``width`` children, at most :data:`FAMILY_SIZE` per family, none a
    variant of a found sentence (:func:`_variant`)."""
    children.sort(key=lambda c: c.score)
    if found:
        heads = [f[: p + 1] for f in found if len(f) > p + 1]
        children = [c for c in children if not any(_variant(c.ids, h, p) for h in heads)]
    radius = int(FAMILY_FRACTION * p)
    leaders: list[torch.Tensor] = []
    counts: list[int] = []
    kept: list[_Prefix] = []
    for c in children:
        x = torch.tensor(c.ids)
        family = None
        if leaders and radius > 0:  # radius 0: distinct prefixes are distinct families
            close = ((torch.stack(leaders) != x).sum(-1) <= radius).nonzero()
            if close.numel():
                family = int(close[0])
        if family is None:
            leaders.append(x)
            counts.append(1)
            kept.append(c)
        elif counts[family] < FAMILY_SIZE:
            counts[family] += 1
            kept.append(c)
        if len(kept) >= width:
            break
    return kept


def _variant(ids: tuple[int, ...], head: tuple[int, ...], p: int) -> bool:
    """Whether prefix ``ids`` is a near copy of a found sentence's prefix ``head``: it
    differs from it in at most :data:`BAN_FRACTION` of its positions, and already
    before its newest token (a prefix that follows a found sentence and leaves it only
    at its newest token may be another sentence sharing that beginning)."""
    if ids[:-1] == head[:-1]:
        return False
    differ = sum(a != b for a, b in zip(ids, head))
    return differ <= max(1, int(BAN_FRACTION * p))


def _near_copy(seq: tuple[int, ...], found: tuple[int, ...]) -> bool:
    """Whether ``seq`` is a found sentence with at most :data:`BAN_FRACTION` of its
    tokens changed (at least one): repairing it would lead back to that sentence."""
    if len(seq) != len(found):
        return False
    return sum(a != b for a, b in zip(seq, found)) <= max(1, int(BAN_FRACTION * len(seq)))
