"""DAGER on half-precision clients (issue 11): the dtype-aware rank cut and trustworthy exact flags."""

from __future__ import annotations

import pytest
import torch

from dager.attack import required_parameters, run_dager
from dager.precision import half_precision_rank, half_precision_span, is_half, noise_level, round_off
from dager.span import gram_spectrum, rank_rule
from fedclient import compute_update
from fedclient.training import ClientTraining

SENTS = ["The cat sat on the mat.", "A dog ran home fast today."]
WIDTH = 256  # d: at d = 64 bf16 rounding buries block 1's weak true directions (below 3 nu)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _rounded_gradient(dtype: torch.dtype, *, d: int = 768, k: int = 768, r: int = 24) -> torch.Tensor:
    """``(d, k)`` input side of ``sum_i x_i delta_i^T`` for r inputs, rounded to ``dtype``:
    one dominant direction and r - 1 weak ones (~1e-7 of the largest eigenvalue), the
    shape of a block-1 GPT-2 gradient that the fp32 rule cut short."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(r, d, generator=gen)  # (r, d) inputs
    scales = torch.cat([torch.ones(1), torch.logspace(-3.0, -3.3, r - 1)])  # (r,)
    delta = torch.randn(r, k, generator=gen) * scales[:, None]  # (r, k)
    return (x.T @ delta).to(dtype)  # (d, k)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_rank_finds_the_weak_directions_the_fp32_rule_misses(precision):
    dtype = DTYPES[precision]
    matrix = _rounded_gradient(dtype)
    evals, _ = gram_spectrum(matrix)
    assert half_precision_rank(evals, dtype) == 24
    assert rank_rule(evals, 1e-6) < 24  # the fp32 rule stops at the dominant direction
    span = half_precision_span(matrix, tolerance=1e-6)
    assert span.rank == 24 and span.basis.dtype == torch.float64
    # Rounding lifted the null space to a bulk at about nu; the 25th eigenvalue is in it.
    nu = noise_level(evals, dtype)
    assert float(evals[24]) < 5 * nu < float(evals[23])


def test_round_off_and_half_dtypes():
    assert round_off(torch.bfloat16) == 2**-8 and round_off(torch.float16) == 2**-11
    assert is_half(torch.bfloat16) and is_half(torch.float16) and not is_half(torch.float32)
    with pytest.raises(ValueError, match="half_precision_span needs a bf16 or fp16 matrix"):
        half_precision_span(torch.ones(4, 4), tolerance=1e-6)
    with pytest.raises(ValueError, match="no round-off"):
        round_off(torch.int64)


def test_a_zero_half_precision_gradient_has_rank_zero():
    span = half_precision_span(torch.zeros(16, 32, dtype=torch.bfloat16), tolerance=1e-6)
    assert span.rank == 0


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_client_is_recovered_exactly_and_every_exact_flag_is_true(tiny, model_type, precision):
    """Every sentence comes back, and the attack flags as exact only sentences of the batch."""
    bundle = tiny(model_type, d=WIDTH)
    batch = bundle.encode(SENTS, seed=0)
    update = compute_update(bundle.model, batch, parameters=required_parameters(bundle),
                            training=ClientTraining(precision=precision))
    assert all(g.dtype == DTYPES[precision] for g in update.values())
    result = run_dager(bundle, update)
    got = [s.strip() for s in result.sentences]
    assert sorted(got) == sorted(SENTS)
    assert all(e for e in result.exact)
    assert [s for s, e in zip(got, result.exact) if e and s not in SENTS] == []


def test_half_precision_span_is_what_the_attack_reads(tiny, monkeypatch):
    """A bf16 update goes through the precision-aware cut (not the fp32 rule)."""
    import dager.attack as attack

    seen: list[torch.dtype] = []
    real = attack.half_precision_span

    def spy(matrix, *, tolerance):
        seen.append(matrix.dtype)
        return real(matrix, tolerance=tolerance)

    monkeypatch.setattr(attack, "half_precision_span", spy)
    bundle = tiny("gpt2")
    update = compute_update(bundle.model, bundle.encode(SENTS[:2], seed=0), parameters=required_parameters(bundle),
                            training=ClientTraining(precision="bf16"))
    run_dager(bundle, update)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    run_dager(bundle, compute_update(bundle.model, bundle.encode(SENTS[:2], seed=0),
                                     parameters=required_parameters(bundle)))
    assert seen == []  # fp32: the default rule


def test_a_fedavg_delta_keeps_its_weak_drift_directions():
    """FedAvg's drift spreads the true inputs over weak directions: the delta's cut is lower."""
    from dager.precision import DELTA_TOLERANCE, span_tolerance

    assert span_tolerance("fedavg-delta", 1e-6) == DELTA_TOLERANCE < 1e-6
    assert span_tolerance("fedsgd-gradient", 1e-6) == 1e-6
    assert span_tolerance("fedavg-delta", 1e-12) == 1e-12  # a lower configured cut is kept


def _six_block_llama(tiny, *, bos_drawn: bool):
    """A tiny seeded Llama of 6 blocks (as deep as llama-small-random) whose BOS shares the
    pad id, so transformers zeroed its embedding; ``bos_drawn``: the zoo's remedy applied."""
    import copy
    import dataclasses

    from dager.zoo_models import draw_bos_embedding

    bundle = tiny("llama", d=64, layers=6)
    model = copy.deepcopy(bundle.model)  # the fixture is cached: never edit its model
    if bos_drawn:
        draw_bos_embedding(model, bundle.bos_token_id, std=0.02)
    return dataclasses.replace(bundle, model=model)


def test_a_zero_bos_embedding_blows_up_position_0s_gradient_and_overflows_fp16(tiny):
    """RMSNorm's backward at a zero input is w / sqrt(eps): the zero BOS row multiplies
    position 0's activation gradient by ~1000 per block, far past fp16's 65504, while the
    other positions stay small; the fp16 update is then NaN and refused."""
    from fedclient.client import batch_loss
    from fedclient.errors import InvalidConfigError

    bundle = _six_block_llama(tiny, bos_drawn=False)
    embeds = bundle.model.get_input_embeddings()
    assert float(embeds.weight.detach()[bundle.bos_token_id].abs().max()) == 0.0
    batch = bundle.encode(SENTS, seed=0)
    seen: list[torch.Tensor] = []

    def keep(module, inputs, out):  # (B, T, d) embeddings: keep their gradient
        out.retain_grad()
        seen.append(out)

    handle = embeds.register_forward_hook(keep)
    batch_loss(bundle.model, batch).backward()
    handle.remove()
    per_position = seen[0].grad.abs().amax(dim=(0, 2))  # (T,) largest gradient at each position
    assert float(per_position[0]) > torch.finfo(torch.float16).max
    assert float(per_position[1:].max()) < 1.0
    with pytest.raises(InvalidConfigError, match="fp16 client's update overflowed"):
        compute_update(bundle.model, batch, parameters=required_parameters(bundle),
                       training=ClientTraining(precision="fp16"))


def test_with_a_real_bos_embedding_a_deep_llama_fp16_client_is_recovered_exactly(tiny):
    bundle = _six_block_llama(tiny, bos_drawn=True)
    update = compute_update(bundle.model, bundle.encode(SENTS, seed=0), parameters=required_parameters(bundle),
                            training=ClientTraining(precision="fp16"))
    assert all(g.dtype == torch.float16 and bool(torch.isfinite(g).all()) for g in update.values())
    result = run_dager(bundle, update)
    assert sorted(s.strip() for s in result.sentences) == sorted(SENTS)
    assert all(result.exact)


def test_llama_small_random_has_a_nonzero_bos_embedding():
    """Its BOS shares GPT-2's one special id with padding; the zoo draws the row like any token's."""
    import dager

    bundle = dager.load_model("llama-small-random")
    row = bundle.model.get_input_embeddings().weight.detach()[bundle.bos_token_id]  # (d,)
    assert bundle.bos_token_id == bundle.pad_token_id
    assert 0.01 < float(row.std()) < 0.03


def _fading_gradient(*, d: int = 256, k: int = 768, r: int = 60) -> torch.Tensor:
    """``(d, k)`` bf16 gradient of r inputs whose strengths fade from 1e-2 to 1e-4 of the
    dominant one: the weakest true directions sink into the rounding bulk, with no edge."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(r, d, generator=gen)  # (r, d) inputs
    scales = torch.cat([torch.ones(1), torch.logspace(-2.0, -4.0, r - 1)])  # (r,)
    delta = torch.randn(r, k, generator=gen) * scales[:, None]  # (r, k)
    return (x.T @ delta).to(torch.bfloat16)  # (d, k)


def test_a_cut_with_no_edge_above_the_rounding_is_not_clear():
    from dager.precision import CLEAR_CUT, clear_cut

    clean = half_precision_span(_rounded_gradient(torch.bfloat16), tolerance=1e-6)
    fading = half_precision_span(_fading_gradient(), tolerance=1e-6)
    assert clean.rank == 24 and clear_cut(clean)
    assert fading.rank < 60 and fading.gap < CLEAR_CUT and not clear_cut(fading)


def test_an_unclear_half_precision_cut_certifies_no_sentence(tiny, monkeypatch):
    """With the bar for a clear cut out of reach, the same tiny bf16 update that is
    otherwise certified comes back with every sentence inexact and an unclear_cut warning."""
    import dager.precision as precision
    from dager.attack import iter_dager
    from dager.events import AttackWarning, SentenceRecovered, WarningCode

    bundle = tiny("llama", d=WIDTH)
    update = compute_update(bundle.model, bundle.encode(SENTS, seed=0), parameters=required_parameters(bundle),
                            training=ClientTraining(precision="bf16"))
    monkeypatch.setattr(precision, "CLEAR_CUT", 1e12)
    events = list(iter_dager(bundle, update))
    result = events[-1].result
    codes = [e.code for e in events if isinstance(e, AttackWarning)]
    found = [e for e in events if isinstance(e, SentenceRecovered)]
    assert WarningCode.UNCLEAR_CUT in codes and WarningCode.DROPOUT not in codes
    assert sorted(e.text.strip() for e in found) == sorted(SENTS)
    assert not any(e.exact for e in found) and not any(result.exact)


@pytest.mark.parametrize("mlp_clear", [True, False])
def test_an_unclear_block1_cut_is_stood_in_for_by_a_clear_mlp_cut(tiny, monkeypatch, mlp_clear):
    """Only block 1's cut unclear (llama-small-random bf16): block 0's MLP-input check,
    itself a function of the whole prefix, certifies alone when its own cut is clear;
    when it is not either, nothing is certified."""
    import dager.attack as attack
    import dager.attack_search as attack_search
    from dager.attack import iter_dager
    from dager.events import AttackWarning, SentenceRecovered, WarningCode

    calls = []

    def block1_unclear(span):
        calls.append(span)
        return len(calls) != 2  # the spans come layer 1, block 1, block 0's MLP input

    monkeypatch.setattr(attack, "clear_cut", block1_unclear)
    monkeypatch.setattr(attack_search, "clear_cut", lambda span: mlp_clear)
    bundle = tiny("llama", d=WIDTH)
    update = compute_update(bundle.model, bundle.encode(SENTS, seed=0), parameters=required_parameters(bundle),
                            training=ClientTraining(precision="bf16"))
    events = list(iter_dager(bundle, update))
    found = [e for e in events if isinstance(e, SentenceRecovered)]
    unclear = [e for e in events if isinstance(e, AttackWarning) and e.code == WarningCode.UNCLEAR_CUT]
    assert len(calls) >= 2
    assert sorted(e.text.strip() for e in found) == sorted(SENTS)
    assert all(e.exact for e in found) == mlp_clear and any(e.exact for e in found) == mlp_clear
    assert bool(unclear) != mlp_clear
