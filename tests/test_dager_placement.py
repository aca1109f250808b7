"""Token placement from block 0's gradient (dager.placement) and the encoder's batched row.

Tiny seeded BERT built in-process (tests/conftest.py); no timing assertions.
"""

from __future__ import annotations

import pytest
import torch

from pathlib import Path

from dager.attack import required_parameters
from dager.encoder_beam import _RowModel
from dager.layers import hooks_for
from dager.placement import place_tokens
from fedclient import compute_update

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "The cat sat on the mat.",
    "Gradients leak private data.",
    "We met at noon.",
    "A red kite flew high.",
    "The storm woke the dog.",
    "Nobody saw the comet.",
]


@pytest.fixture(scope="module")
def tiny_bert():
    from tests.conftest import tiny_bundle

    return tiny_bundle("bert", "classification", d=64, layers=2)


def _setting(bundle, sentences, noise: float = 0.0):
    batch = bundle.encode(sentences, seed=0)
    update = compute_update(bundle.model, batch, parameters=required_parameters(bundle))
    hooks = hooks_for(bundle.model)
    grads = hooks.input_matrix(update, hooks.attention_parameters(0))
    if noise:
        grads = grads + noise * grads.std() * torch.randn(grads.shape, generator=torch.Generator().manual_seed(0))
    ids, mask = batch.input_ids, batch.attention_mask.bool()
    length = int(mask.sum(1).max())
    bag = torch.unique(ids[mask])
    accepted = {p: bag.clone() for p in range(length)}  # layer 1 placing nothing: every token everywhere
    return hooks, grads, accepted, ids, mask


@pytest.fixture(scope="module")
def minilm():
    from dager.zoo import load_model

    return load_model("minilm-l6")


def test_placement_narrows_a_minilm_batch_and_keeps_its_sentences(minilm):
    """minilm-l6 (pretrained), eight medium-set sentences: layer 1 places nothing there
    (every batch token passes at every position); the split narrows the candidates to
    under half, keeps every sentence's tokens, and locates only true pairs."""
    lines = [s for s in (ROOT / "assets" / "sentences" / "medium.txt").read_text().splitlines() if s.strip()]
    hooks, grads, accepted, ids, mask = _setting(minilm, lines[8:16])
    placement = place_tokens(hooks.embedding_parts(), grads, accepted, 8)
    assert placement is not None
    for s in range(ids.shape[0]):
        for p in range(int(mask[s].sum())):
            assert int(ids[s, p]) in placement.narrowed[p].tolist()
    located = [(p, int(t)) for p, ts in placement.located.items() for t in ts]
    assert len(located) >= 60
    for p, t in located:  # a located token sits at that position in some sentence
        assert bool((ids[:, p] == t)[mask[:, p]].any())
    narrowed = sum(int(placement.narrowed[p].numel()) for p in accepted)
    assert narrowed < 0.5 * sum(int(c.numel()) for c in accepted.values())


def test_placement_stands_aside_where_it_does_not_apply(tiny_bert, minilm):
    lines = [s for s in (ROOT / "assets" / "sentences" / "medium.txt").read_text().splitlines() if s.strip()]
    hooks, grads, accepted, _, _ = _setting(minilm, lines[8:16], noise=0.05)
    assert place_tokens(hooks.embedding_parts(), grads, accepted, 8) is None  # not a clean sum of rows
    few = {p: c[:8] for p, c in accepted.items()}  # layer 1 already places: at most B per position
    assert place_tokens(hooks.embedding_parts(), grads, few, 8) is None
    # A random-init BERT: near-uniform attention makes a sentence's backward signals
    # alike, so no weight is determined and nothing is located.
    hooks, grads, accepted, _, _ = _setting(tiny_bert, SENTENCES)
    assert place_tokens(hooks.embedding_parts(), grads, accepted, len(SENTENCES)) is None


def test_batched_row_equals_the_whole_block(tiny_bert):
    hooks = hooks_for(tiny_bert.model)
    seqs = torch.tensor([tiny_bert.tokenize("The cat sat on the mat.")] * 2)
    seqs[1, 3] = seqs[0, 2]
    with torch.no_grad():
        got = _RowModel(hooks).row(seqs, 2)
        want = hooks.layer2_inputs(seqs)[:, 2]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
