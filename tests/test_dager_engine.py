"""DAGER engine: exact recovery on tiny models, capacity verdict, event contract."""

from __future__ import annotations

import pytest
import torch

import dager
from dager.attack import iter_dager, required_parameters, run_dager
from dager.config import DagerConfig
from dager.events import (
    AttackFinished,
    AttackStarted,
    PrefixesExtended,
    SentenceRecovered,
    SpectrumComputed,
    TokensFiltered,
)
from dager.layers import hooks_for
from dager.span import span_of
from fedclient import InvalidConfigError, compute_update

SENTENCES = [
    "The cat sat on the mat.",
    "Gradients leak private data.",
    "We met at noon.",
    "A red kite flew high.",
]
LONGER = [
    "The quick brown fox jumps over the lazy dog near the river.",
    "My grandmother baked fresh bread every Sunday morning.",
    "Please send the quarterly report to the finance team by Friday.",
    "The museum will be closed for renovations until next spring.",
    "He forgot his umbrella and got soaked on the way home.",
    "Our flight was delayed by three hours because of the storm.",
    "She plays the violin in the city orchestra on weekends.",
    "The doctor told me to drink more water and sleep earlier.",
]


def _attack(bundle, sentences, config=None):
    update = compute_update(bundle.model, bundle.encode(sentences, seed=0), parameters=required_parameters(bundle))
    return run_dager(bundle, update, config=config)


def _assert_exact(bundle, sentences, result):
    expected = sorted(tuple(bundle.tokenize(s)) for s in sentences)
    assert sorted(result.token_ids) == expected
    assert all(result.exact)
    assert sorted(result.sentences) == sorted(bundle.decode(list(e)) for e in expected)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("task", ["classification", "next-token"])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_decoder_exact_recovery(tiny, model_type, task, batch_size):
    # Three layers: the gradient of the last layer's attention reaches few directions
    # in classification (only the last token's query), so layer 2 must not be last.
    bundle = tiny(model_type, task, d=64, layers=3)
    sentences = SENTENCES[:batch_size]
    result = _attack(bundle, sentences)
    _assert_exact(bundle, sentences, result)
    if task == "next-token":
        assert all(ids[-1] == bundle.eos_token_id for ids in result.token_ids)
    if model_type == "llama":
        assert all(ids[0] == bundle.bos_token_id for ids in result.token_ids)
        assert sentences[0] in result.sentences


@pytest.mark.parametrize("batch_size", [1, 2])
def test_encoder_exact_recovery(tiny, batch_size):
    # Known gap: B=4 on the tiny BERT is not exact: its weak layer-2 directions
    # (eigenvalues 1e-11 of the largest) put true sentences at 1e-3 from the span,
    # next to one-token-wrong ones (1.4e-3). minilm-l6 B=4 is exact (slow test).
    bundle = tiny("bert", "classification", d=64, layers=3)
    sentences = SENTENCES[:batch_size]
    result = _attack(bundle, sentences)
    _assert_exact(bundle, sentences, result)


def test_over_capacity_is_flagged_with_a_best_effort(tiny):
    bundle = tiny("gpt2", "classification", d=32, layers=3)
    result = _attack(bundle, LONGER[:4])  # ~50 distinct inputs > d = 32
    assert result.over_capacity and result.stop_reason == "span_full"  # issue 13: stop at the rank step
    assert result.rank >= 0.95 * 32
    assert result.sentences == ()
    best = _attack(bundle, LONGER[:4], DagerConfig(noise_tolerant=True))  # the best effort, on request
    assert len(best.sentences) >= 1 and not all(best.exact)


def test_within_capacity_is_not_flagged(tiny):
    bundle = tiny("gpt2", "classification", d=64, layers=3)
    result = _attack(bundle, SENTENCES[:2])
    assert not result.over_capacity and not result.budget_exhausted


def test_suspended_stream_leaves_the_callers_autograd_alone(tiny):
    """The app resumes the stream between renders, possibly on another worker thread: the
    attack runs without autograd, and the caller's grad mode is untouched between events."""
    import threading

    bundle = tiny("gpt2", "classification", d=64, layers=3)
    update = compute_update(
        bundle.model, bundle.encode(SENTENCES[:3], seed=0), parameters=required_parameters(bundle)
    )
    stream = iter_dager(bundle, update)
    next(stream)
    assert torch.is_grad_enabled()  # a `with no_grad()` around `yield` would leave it off here
    events: list[object] = []
    worker = threading.Thread(target=lambda: events.extend(stream))  # resumed on another thread
    worker.start()
    worker.join()
    result = events[-1].result
    assert sorted(result.sentences) == sorted(bundle.decode(bundle.tokenize(s)) for s in SENTENCES[:3])


def test_event_stream_contract(tiny):
    bundle = tiny("gpt2", "classification", d=64, layers=3)
    update = compute_update(
        bundle.model, bundle.encode(SENTENCES[:3], seed=0), parameters=required_parameters(bundle)
    )
    events = list(iter_dager(bundle, update))
    assert isinstance(events[0], AttackStarted)
    assert isinstance(events[-1], AttackFinished)
    assert sum(isinstance(e, AttackStarted) for e in events) == 1
    assert sum(isinstance(e, AttackFinished) for e in events) == 1
    result = events[-1].result
    recovered = [e for e in events if isinstance(e, SentenceRecovered)]
    assert len(recovered) == len(result.sentences) == 3
    assert [e.text for e in recovered] == list(result.sentences)
    spectra = [e for e in events if isinstance(e, SpectrumComputed)]
    assert [s.layer for s in spectra] == [1, 2]
    assert spectra[0].rank == events[0].rank == result.rank
    filtered = [e for e in events if isinstance(e, TokensFiltered)]
    assert filtered and all(f.vocab_distances.numel() <= 200 for f in filtered)
    first = bundle.tokenize(SENTENCES[0])[0]
    pos0 = next(f for f in filtered if f.position == 0)
    assert first in pos0.token_ids.tolist()
    assert any(isinstance(e, PrefixesExtended) for e in events)


def test_closed_stream_stops(tiny):
    bundle = tiny("gpt2", "classification", d=64, layers=3)
    update = compute_update(
        bundle.model, bundle.encode(SENTENCES[:2], seed=0), parameters=required_parameters(bundle)
    )
    stream = iter_dager(bundle, update)
    assert isinstance(next(stream), AttackStarted)
    stream.close()  # a closed generator must not raise or keep working


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_own_layer_forward_matches_hidden_states(tiny, model_type):
    bundle = tiny(model_type, "classification", d=64, layers=3)
    hooks = hooks_for(bundle.model)
    ids = torch.tensor(bundle.tokenize("The cat sat on the mat."))
    with torch.no_grad():
        ref = bundle.model(input_ids=ids[None], output_hidden_states=True).hidden_states[1][0]
        if hooks.is_decoder:
            own = hooks.forward_sequence(ids)
        else:
            own = hooks.layer2_inputs(ids[None])[0]
            rows = hooks.row_layer2_inputs(ids, 2, ids[2:3])
            assert torch.allclose(rows[0], ref[2], atol=1e-5)
    assert torch.allclose(own, ref, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_required_parameters_exist(tiny, model_type):
    bundle = tiny(model_type, "classification", d=64, layers=3)
    names = required_parameters(bundle)
    params = dict(bundle.model.named_parameters())
    assert names and all(n in params for n in names)


def test_rank_estimate_is_float64_and_gap_based():
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    weights = torch.logspace(0, -4, 10, dtype=torch.float64)  # weak but real directions
    matrix = (basis * weights) @ torch.randn(10, 192, generator=gen, dtype=torch.float64)
    span = span_of(matrix.float())
    assert span.rank == 10


def test_config_validation():
    with pytest.raises(InvalidConfigError):
        DagerConfig(rank_tolerance=0.0)
    with pytest.raises(InvalidConfigError):
        DagerConfig(max_prefixes=0)
    with pytest.raises(InvalidConfigError):
        DagerConfig(layer1_threshold=2.0)


def test_real_gpt2_small_random_batch_of_four():
    bundle = dager.load_model("gpt2-small-random")
    result = _attack(bundle, LONGER[:4])
    _assert_exact(bundle, LONGER[:4], result)


@pytest.mark.slow
def test_real_gpt2_small_random_batch_of_thirty_two():
    bundle = dager.load_model("gpt2-small-random")
    sentences = [s.replace(".", f" number {i}.") for i, s in enumerate(LONGER * 4)]
    result = _attack(bundle, sentences)
    _assert_exact(bundle, sentences, result)


@pytest.mark.slow
def test_real_llama_small_random_batch_of_eight():
    bundle = dager.load_model("llama-small-random")
    result = _attack(bundle, LONGER)
    _assert_exact(bundle, LONGER, result)


@pytest.mark.slow
def test_real_minilm_batch_of_two():
    bundle = dager.load_model("minilm-l6")
    result = _attack(bundle, LONGER[:2])
    _assert_exact(bundle, LONGER[:2], result)


@pytest.mark.slow
def test_real_minilm_batch_of_four():
    bundle = dager.load_model("minilm-l6")
    result = _attack(bundle, LONGER[:4])
    _assert_exact(bundle, LONGER[:4], result)


def test_small_gaussian_noise_still_leaks_in_noise_tolerant_mode(tiny):
    bundle = tiny("gpt2", "classification", d=64, layers=3)
    update = compute_update(
        bundle.model, bundle.encode(SENTENCES, seed=0), parameters=required_parameters(bundle)
    )
    gen = torch.Generator().manual_seed(0)
    noisy = update.replace(
        gradients={
            k: v + 1e-4 * v.abs().max() * torch.randn(v.shape, generator=gen) for k, v in update.items()
        }
    )
    result = run_dager(bundle, noisy, config=DagerConfig(noise_tolerant=True))
    assert sorted(result.token_ids) == sorted(tuple(bundle.tokenize(s)) for s in SENTENCES)
