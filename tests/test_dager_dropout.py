"""DAGER on a client that trained with dropout (issue 11): masks solved for, sentences exact."""

from __future__ import annotations

import pytest
import torch

from dager.attack import iter_dager, required_parameters, run_dager
from dager.dropout_masks import LayerNormTerms, masked_inputs
from dager.events import AttackWarning, SentenceRecovered, WarningCode
from fedclient import compute_update
from fedclient.training import ClientTraining
from conftest import dropout_bundle

SENTS = ["The cat sat on the mat by the door.", "The dog ran home fast today, again.", "A bird sang."]


def _truth(bundle, batch) -> list[str]:
    return [bundle.decode(row[m.bool()].tolist()) for row, m in zip(batch.input_ids, batch.attention_mask)]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_a_dropout_client_is_recovered_exactly_and_every_exact_flag_is_true(model_type):
    """Both families: every sentence back, flagged exact, no dropout warning (the masks
    were solved for); the two sentences share their first token at position 0."""
    bundle = dropout_bundle(model_type, d=96)
    batch = bundle.encode(SENTS, seed=0)
    update = compute_update(bundle.model, batch, parameters=required_parameters(bundle, dropout=True),
                            training=ClientTraining(dropout=True), seed=3)
    assert update.info["dropout_rate"] == pytest.approx(0.1)
    events = list(iter_dager(bundle, update))
    recovered = [e for e in events if isinstance(e, SentenceRecovered)]
    assert sorted(r.text for r in recovered) == sorted(_truth(bundle, batch))
    assert all(r.exact for r in recovered)
    assert not any(isinstance(e, AttackWarning) and e.code == WarningCode.DROPOUT for e in events)


def test_without_the_attention_output_gradient_dropout_is_reported_inexact():
    """The fallback: an update lacking block 0's output projection cannot be certified."""
    bundle = dropout_bundle("gpt2", d=96)
    batch = bundle.encode(SENTS[:2], seed=0)
    names = required_parameters(bundle)  # without dropout=True: no output projection
    assert not any("c_proj" in n for n in names)
    update = compute_update(bundle.model, batch, parameters=names, training=ClientTraining(dropout=True))
    events = list(iter_dager(bundle, update))
    assert any(isinstance(e, AttackWarning) and e.code == WarningCode.DROPOUT for e in events)
    assert not any(e.exact for e in events if isinstance(e, SentenceRecovered))
    assert not any(run_dager(bundle, update).exact)


def _masked_case(d: int = 96, rate: float = 0.1):
    """Random embeddings, masked and normed as GPT-2's ln_1(drop(x)); candidate 0 occurs twice."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, d, generator=g, dtype=torch.float64)
    norm = LayerNormTerms(1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64),
                          0.1 * torch.randn(d, generator=g, dtype=torch.float64), 1e-5)
    occurrences = [0, 0, 1, 2, 3, 4, 5, 6]  # candidates 7..11 are not in the batch
    masks = torch.rand(len(occurrences), d, generator=g) < rate
    z = torch.stack([norm.apply(x[i].masked_fill(m, 0.0) / (1 - rate)) for i, m in zip(occurrences, masks)])
    basis = torch.linalg.qr(z.T).Q
    return x, norm, basis, z, occurrences


def test_masked_inputs_are_recovered_with_their_masks_including_two_of_one_candidate():
    x, norm, basis, z, occurrences = _masked_case()
    cands = [(i, 0) for i in range(x.shape[0])]
    found = masked_inputs(cands, x, basis, norm, 0.1, rank=basis.shape[1])
    assert sorted(f.token for f in found) == sorted(occurrences)
    for f in found:  # each is one of the true inputs, to round-off
        assert float((z - f.z).norm(dim=1).min() / f.z.norm()) < 1e-9


def test_a_clean_candidate_is_not_certified_as_a_masked_input():
    """The clean input of a true token misses the span; only its masked one passes."""
    x, norm, basis, z, occurrences = _masked_case()
    clean = norm.apply(x[3])
    assert float((clean - basis @ (basis.T @ clean)).norm() / clean.norm()) > 0.1
    found = masked_inputs([(7, 0), (8, 0)], x[7:9], basis, norm, 0.1, rank=basis.shape[1])
    assert found == []


def test_a_dropout_run_stops_at_its_time_budget_and_certifies_nothing():
    """The masked-input fit and the search answer to the attack's time budget."""
    from dager.config import DagerConfig
    from dager.events import AttackFinished, StopReason

    bundle = dropout_bundle("gpt2", d=96)
    update = compute_update(bundle.model, bundle.encode(SENTS, seed=0), parameters=required_parameters(bundle, dropout=True),
                            training=ClientTraining(dropout=True), seed=3)
    events = list(iter_dager(bundle, update, config=DagerConfig(time_budget_s=1e-6)))
    assert any(isinstance(e, AttackWarning) and e.code == WarningCode.TIME_BUDGET for e in events)
    result = events[-1].result
    assert isinstance(events[-1], AttackFinished) and result.stop_reason is StopReason.TIME_BUDGET
    assert not any(result.exact)
