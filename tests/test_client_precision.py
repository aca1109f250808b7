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
