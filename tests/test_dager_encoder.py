"""DAGER encoder search: recovery, budget, heartbeats, parity with the pre-refactor search.

Tiny seeded BERT models built in-process (tests/conftest.py); no timing assertions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import pytest
import torch

import dager.attack_search as attack_module  # where the attack calls the encoder search
from dager.attack import iter_dager, required_parameters
from dager.encoder import PAIR_POOL, SCORE_CHUNK, _by_family, _Prefix, _RowModel, encoder_search
from dager.events import AttackWarning
from dager.layers import BertHooks
from dager.search import Found, Step, Tick, Warn
from dager.span import Span
from fedclient import compute_update

SENTENCES = [
    "The cat sat on the mat.",
    "Gradients leak private data.",
    "We met at noon.",
    "A red kite flew high.",
]


def _problem(bundle, sentences):
    """The encoder search's inputs for a batch, captured from the real attack."""
    update = compute_update(bundle.model, bundle.encode(sentences, seed=0), parameters=required_parameters(bundle))
    captured: dict = {}

    def capture(hooks, accepted, span2, **kwargs):
        captured.update(hooks=hooks, accepted=accepted, span2=span2, **kwargs)
        return iter(())

    original = attack_module.encoder_search
    attack_module.encoder_search = capture
    try:
        list(iter_dager(bundle, update))
    finally:
        attack_module.encoder_search = original
    return captured


def _run(search, problem, **overrides):
    kwargs = {k: v for k, v in problem.items() if k not in ("hooks", "accepted", "span2")}
    kwargs.update(overrides)
    with torch.no_grad():
        return list(search(problem["hooks"], problem["accepted"], problem["span2"], **kwargs))


@pytest.fixture(scope="module")
def tiny_bert():
    from tests.conftest import tiny_bundle

    return tiny_bundle("bert", "classification", d=64, layers=3)


def test_recovers_a_tiny_batch_exactly(tiny_bert):
    problem = _problem(tiny_bert, SENTENCES[:2])
    items = _run(encoder_search, problem)
    found = [i for i in items if isinstance(i, Found)]
    expected = sorted(tuple(tiny_bert.tokenize(s)) for s in SENTENCES[:2])
    assert sorted(f.token_ids for f in found) == expected
    assert all(f.exact for f in found)
    assert not any(isinstance(i, Warn) for i in items)


def test_exact_means_every_row_in_the_span(tiny_bert):
    problem = _problem(tiny_bert, SENTENCES)  # B=4 on the tiny model: some guesses stay inexact
    items = _run(encoder_search, problem)
    hooks, span2 = problem["hooks"], problem["span2"]
    for f in (i for i in items if isinstance(i, Found)):
        with torch.no_grad():
            worst = float(span2.distance(hooks.layer2_inputs(torch.tensor([f.token_ids]))).max())
        assert worst == pytest.approx(f.distance, rel=1e-3, abs=1e-9)
        if f.exact:
            assert worst < 1e-3


def test_row_model_matches_whole_sequences(tiny_bert):
    """The beam's fast rows equal the rows of the whole varied sequences (the reference)."""
    hooks = BertHooks(tiny_bert.model)
    rm = _RowModel(hooks)
    ctx = torch.tensor([tiny_bert.tokenize(SENTENCES[0]), tiny_bert.tokenize(SENTENCES[0])[::-1]])
    ctx = ctx[:, : min(int(ctx.shape[1]), 8)]
    cand = torch.tensor([1010, 2000, 2154, 3000])
    position, rows = 3, [2, 3, 4]
    with torch.no_grad():
        fast = rm.rows(ctx, position, cand, rows)  # (m, c, R, d)
        for m in range(ctx.shape[0]):
            seqs = ctx[m].unsqueeze(0).repeat(cand.shape[0], 1)
            seqs[:, position] = cand
            ref = hooks.layer2_inputs(seqs)[:, rows]  # (c, R, d)
            torch.testing.assert_close(fast[m], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_beam_recovers_a_medium_minilm_batch():
    """minilm-l6 (pretrained), the first four medium-set sentences: every one recovered
    exactly by the beam (layer 1 places no token here: 39 candidates at every position)."""
    from dager.zoo import load_model

    bundle = load_model("minilm-l6")
    lines = [ln.strip() for ln in open("assets/sentences/medium.txt", encoding="utf-8") if ln.strip()]
    batch = lines[0:4]
    problem = _problem(bundle, batch)
    found = [i for i in _run(encoder_search, problem) if isinstance(i, Found)]
    assert sorted(f.token_ids for f in found if f.exact) == sorted(tuple(bundle.tokenize(s)) for s in batch)


@pytest.mark.slow
def test_attack_recovers_a_medium_minilm_batch_of_eight():
    """minilm-l6 (pretrained), eight medium-set sentences (batch 8 of the bench's B=8
    batches): layer 1 places nothing, the placement from block 0's gradient and the later
    passes' open anchors recover at least seven exactly, and nothing wrong is flagged exact."""
    from dager.attack import run_dager
    from dager.zoo import load_model

    bundle = load_model("minilm-l6")
    lines = [ln.strip() for ln in open("assets/sentences/medium.txt", encoding="utf-8") if ln.strip()]
    batch = lines[64:72]
    update = compute_update(bundle.model, bundle.encode(batch, seed=0), parameters=required_parameters(bundle), seed=0)
    result = run_dager(bundle, update)
    truth = {tuple(bundle.tokenize(s)) for s in batch}
    exact = [tuple(ids) for ids, ok in zip(result.token_ids, result.exact) if ok]
    assert set(exact) <= truth
    assert len(set(exact)) >= 7


def test_budget_exhaustion_is_reported_and_respected(tiny_bert):
    problem = _problem(tiny_bert, SENTENCES)
    budget = 60
    items = _run(encoder_search, problem, max_combinations=budget)
    warns = [i for i in items if isinstance(i, Warn)]
    assert [w.code for w in warns] == ["combinations_capped"]
    assert warns[0].value == budget
    checked = max(i.checked if isinstance(i, Tick) else i.num_checked for i in items if isinstance(i, (Tick, Step)))
    # The budget is checked between scored batches: one batch (a position's candidates,
    # a pair grid or an enumeration chunk) may overrun it, never more.
    biggest = max(PAIR_POOL**2, SCORE_CHUNK, *(int(c.numel()) for c in problem["accepted"].values()))
    assert budget <= checked <= budget + biggest
    assert [i for i in items if isinstance(i, Found)]  # best effort: the nearest assemblies


def test_budget_warning_reaches_the_attack_events(tiny_bert):
    from dager.config import DagerConfig

    update = compute_update(
        tiny_bert.model, tiny_bert.encode(SENTENCES, seed=0), parameters=required_parameters(tiny_bert)
    )
    events = list(iter_dager(tiny_bert, update, config=DagerConfig(max_combinations=60)))
    assert "combinations_capped" in [e.code for e in events if isinstance(e, AttackWarning)]


def test_ticks_come_between_every_scored_batch(tiny_bert):
    problem = _problem(tiny_bert, SENTENCES)
    items = _run(encoder_search, problem)
    ticks = [i for i in items if isinstance(i, Tick)]
    steps = [i for i in items if isinstance(i, Step)]
    assert len(ticks) > len(steps) >= 1
    # Heartbeats are frequent: between two consecutive ticks the search evaluates at
    # most one scored chunk and the current sequence (no descent runs silently).
    marks = [0] + [i.checked if isinstance(i, Tick) else i.num_checked for i in items if isinstance(i, (Tick, Step))]
    assert all(b >= a for a, b in zip(marks, marks[1:]))
    assert max(b - a for a, b in zip(marks, marks[1:])) <= SCORE_CHUNK + 2


def test_enumeration_charges_every_combination(tiny_bert):
    problem = _problem(tiny_bert, SENTENCES[:2])
    truth = [tuple(tiny_bert.tokenize(s)) for s in SENTENCES[:2]]
    sep = problem["special_ids"][1]
    # Keep only the true tokens (and [SEP] where a sentence ends): few combinations.
    small = {}
    for p, c in problem["accepted"].items():
        keep = {t[p] for t in truth if len(t) > p}
        small[p] = torch.tensor([int(x) for x in c.tolist() if int(x) in keep or int(x) == sep])
    problem = {**problem, "accepted": small}
    items = _run(encoder_search, problem, beam=False)  # the assembly stage's enumeration
    steps = [i for i in items if isinstance(i, Step)]
    lengths = sorted({len(t) for t in truth}, reverse=True)
    cls_id, sep_id = problem["special_ids"][:2]
    combos = 0
    for L in lengths:
        sizes = [int((~torch.isin(small[p], torch.tensor([cls_id, sep_id]))).sum()) for p in range(1, L - 1)]
        combos += math.prod(sizes)
        assert any(s.position == L - 1 for s in steps)
    assert steps[-1].num_checked == combos
    assert sorted(i.token_ids for i in items if isinstance(i, Found) and i.exact) == sorted(truth)



def test_later_passes_drop_the_variants_of_found_sentences():
    """A beam pass after a sentence was found keeps no near copy of it (they crowded the
    first pass), but keeps a prefix that shares the found sentence's beginning and
    leaves it at its newest token, and every unrelated prefix."""
    found = (101, 11, 12, 13, 14, 15, 102)
    variant = _Prefix((101, 11, 99, 13, 14), -9.0, 0.0)  # one early token changed
    sharing = _Prefix((101, 11, 12, 13, 77), -8.0, 0.0)  # same beginning, then its own way
    other = _Prefix((101, 21, 22, 23, 24), -7.0, 0.0)
    kept = _by_family([variant, sharing, other], 4, 32, found=[found])
    assert [k.ids for k in kept] == [sharing.ids, other.ids]
    assert [k.ids for k in _by_family([variant, sharing, other], 4, 32)] == [variant.ids, sharing.ids, other.ids]


def test_a_pass_that_finds_every_sentence_is_the_only_one(tiny_bert, monkeypatch):
    """Further passes (when more are allowed) run only while sentences are missing (one
    pass recovers this batch)."""
    import dager.encoder_beam

    monkeypatch.setattr(dager.encoder_beam, "MAX_PASSES", 3)
    problem = _problem(tiny_bert, SENTENCES[:2])
    items = _run(encoder_search, problem)
    assert sorted(i.token_ids for i in items if isinstance(i, Found) and i.exact) == sorted(
        tuple(tiny_bert.tokenize(s)) for s in SENTENCES[:2]
    )
    assert sum(1 for i in items if isinstance(i, Step) and i.position == 1) == 1


def _stage(problem, truth):
    """A beam stage on the captured problem, its threshold calibrated as the search does."""
    from dager.encoder_assembly import _EncoderSearch
    from dager.encoder_beam import _BeamStage

    kwargs = {k: v for k, v in problem.items() if k not in ("hooks", "accepted", "span2")}
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    search = _EncoderSearch(problem["hooks"], problem["accepted"], problem["span2"], **kwargs)
    search.thr = search.calibrate([len(t) for t in truth])
    return _BeamStage(search)


def _one_token_wrong(stage, sentence):
    """``sentence`` with its middle token replaced by another candidate there."""
    q = len(sentence) // 2
    other = next(int(c) for c in stage.s.cands(q).tolist() if int(c) != sentence[q])
    return (*sentence[:q], other, *sentence[q + 1 :])


@pytest.mark.slow
def test_late_repairs_turn_a_near_ending_into_its_sentence():
    """minilm-l6 (pretrained: block-0 rows are local, so a repair can find the wrong
    token; a random-init model's rows all move together): a near ending a pass left (one
    token wrong) is repaired after the passes into the true sentence, reported exact."""
    from dager.zoo import load_model

    bundle = load_model("minilm-l6")
    lines = [ln.strip() for ln in open("assets/sentences/medium.txt", encoding="utf-8") if ln.strip()]
    problem = _problem(bundle, lines[:2])
    truth = [tuple(bundle.tokenize(s)) for s in lines[:2]]
    with torch.no_grad():
        stage = _stage(problem, truth)
        stage.near = {_one_token_wrong(stage, truth[0]): 0.05}
        items = list(stage.late_repairs())
    found = [i for i in items if isinstance(i, Found)]
    assert [(f.token_ids, f.exact) for f in found] == [(truth[0], True)]


def test_late_repairs_skip_the_near_copies_of_found_sentences(tiny_bert):
    """A near ending one token away from a found sentence is not repaired (the repair
    would lead back to that sentence): nothing is evaluated or charged."""
    problem = _problem(tiny_bert, SENTENCES[:2])
    truth = [tuple(tiny_bert.tokenize(s)) for s in SENTENCES[:2]]
    with torch.no_grad():
        stage = _stage(problem, truth)
        copy = _one_token_wrong(stage, truth[0])
        stage.s.found.append(torch.tensor(truth[0]))
        stage.near = {copy: 0.05}
        before = stage.s.checked
        assert list(stage.late_repairs()) == []
    assert stage.s.checked == before and copy not in stage.tried


def test_later_passes_search_per_missing_sentence(tiny_bert, monkeypatch):
    """A later pass keeps LATER_WIDTH_PER_MISSING prefixes per missing sentence and
    shrinks its first positions by the same share: two sentences looked for as a batch
    of four, the first pass finds both, the second looks for two at 2 x 1 wide."""
    import dager.encoder_beam as beam_module

    monkeypatch.setattr(beam_module, "LATER_WIDTH_PER_MISSING", 1)
    problem = _problem(tiny_bert, SENTENCES[:2])
    items = _run(encoder_search, problem, batch_size=4)
    steps = [i for i in items if isinstance(i, Step)]
    starts = [n for n, st in enumerate(steps) if st.position == 1]
    assert len(starts) == 2  # the second pass finds nothing new: no third
    share = 2 / beam_module.BEAM_WIDTH
    first, second = steps[: starts[1]], steps[starts[1] :]
    assert max(st.num_prefixes for st in first if st.position > 1) > 2
    assert all(st.num_prefixes <= round(beam_module.BEAM_WIDTH * share) for st in second if st.position > 1)
    assert second[0].num_prefixes <= round(beam_module.EARLY_WIDTH * share)
    truth = sorted(tuple(tiny_bert.tokenize(s)) for s in SENTENCES[:2])
    assert sorted(i.token_ids for i in items if isinstance(i, Found) and i.exact) == truth


@pytest.mark.parametrize("batch_size", [2, 4])
def test_same_results_as_the_search_before_the_refactor(tiny_bert, batch_size):
    # The assembly stage alone (beam=False) is the pre-refactor search, unchanged.
    problem = _problem(tiny_bert, SENTENCES[:batch_size])
    assert all(int(c.numel()) <= PAIR_POOL for c in problem["accepted"].values())  # pair pools not cut
    new = _run(encoder_search, problem, generator=torch.Generator().manual_seed(3), beam=False)
    before = {k: v for k, v in problem.items() if k != "placement"}  # the placement came later (beam only)
    old = _run(_reference_search, before, generator=torch.Generator().manual_seed(3))

    def outcome(items):
        return (
            [(i.token_ids, i.exact, round(i.distance, 9)) for i in items if isinstance(i, Found)],
            [i.prefixes for i in items if isinstance(i, Step)],
            [i.code for i in items if isinstance(i, Warn)],
        )

    assert outcome(new) == outcome(old)


# ---------------------------------------------------------------------------
# Reference: the encoder search as it was before the refactor (commit 40541b2),
# kept verbatim apart from its name, to pin the refactor's results.

log = logging.getLogger(__name__)
EXHAUSTIVE_CAP = 4096
PAIR_SUSPECTS = 4
ENCODER_CEILING = 1e-3


def _reference_search(
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
                for seq, worst in _reference_enumerate(hooks, span2, pools, cls_id, sep_id, batch_size):
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


def _reference_enumerate(
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
