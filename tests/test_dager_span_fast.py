"""The fast span path (randomized range finder) against the full eigen-decomposition,
and the float32 layer-1 screens against a float64 reference (issue 10)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dager.attack import iter_dager, required_parameters
from dager.events import AttackFinished, StopReason
from dager.layers import hooks_for
from dager.fastspan import fast_span
from dager.span import Span, exact_relative_distance, span_of
from fedclient import compute_update
from fedclient.update import SharedUpdate

SENTENCES = [
    "The cat sat on the mat.",
    "Gradients leak private data.",
    "We met at noon.",
]


def _update(bundle, sentences):
    batch = bundle.encode(sentences, seed=0)
    return compute_update(bundle.model, batch, parameters=required_parameters(bundle))


def _sines(a: Span, b: Span) -> torch.Tensor:
    """Sines of the principal angles between two spans of equal rank."""
    cos = torch.linalg.svdvals(a.basis.T @ b.basis).clamp(max=1.0)
    return (1.0 - cos * cos).clamp(min=0.0).sqrt()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_fast_basis_matches_the_full_eigh_on_an_undefended_update(tiny, model_type):
    bundle = tiny(model_type, "classification", d=128, layers=3)
    update = _update(bundle, SENTENCES)
    hooks = hooks_for(bundle.model)
    groups = [hooks.attention_parameters(0), hooks.attention_parameters(1), hooks.mlp_parameters(0)]
    for names in groups:
        matrix = hooks.input_matrix(update, names)
        full = span_of(matrix, method="full")
        fast = span_of(matrix)  # auto: the fast path certifies this clean cut
        assert fast.method == "fast" and full.method == "full"
        assert fast.rank == full.rank and 0 < fast.rank < 0.5 * matrix.shape[0]
        assert float(_sines(full, fast).max()) < 1e-6
        # Orthonormal to round-off: the float64 distances of ~1e-7 depend on it.
        eye = torch.eye(fast.rank, dtype=torch.float64)
        assert float((fast.basis.T @ fast.basis - eye).abs().max()) < 1e-12
        # The leading singular values agree.
        top = full.singular_values[: fast.rank]
        assert torch.allclose(fast.singular_values[: fast.rank], top, rtol=1e-8, atol=1e-12 * float(top[0]))
        # In-span rows (the span's own directions) are as close to either span.
        rows = full.basis.T[:5]
        assert float(exact_relative_distance(rows, fast).max()) < 1e-6
    # The complement built on demand is orthogonal to the basis and completes it.
    comp = fast.complement
    assert comp.shape == (fast.dim, fast.dim - fast.rank)
    assert float((fast.basis.T @ comp).abs().max()) < 1e-12


def test_fast_path_declines_noise_and_the_attack_says_span_full(tiny):
    bundle = tiny("gpt2", "classification", d=128, layers=3)
    update = _update(bundle, SENTENCES)
    gen = torch.Generator().manual_seed(0)
    noisy = {
        n: g + 1e-2 * float(g.abs().max()) * torch.randn(g.shape, generator=gen) for n, g in update.gradients.items()
    }
    hooks = hooks_for(bundle.model)
    matrix = hooks.input_matrix(noisy, hooks.attention_parameters(0))
    assert fast_span(matrix) is None  # noise lifts the tail: no certified cut
    assert span_of(matrix).method == "full"
    events = list(iter_dager(bundle, dataclasses.replace(update, gradients=noisy)))
    result = events[-1]
    assert isinstance(result, AttackFinished)
    assert result.result.stop_reason == StopReason.SPAN_FULL and result.result.over_capacity
    assert result.result.sentences == ()


def test_fast_path_declines_a_rank_near_d():
    gen = torch.Generator().manual_seed(1)
    d, r = 128, 100  # r > FAST_MAX_FRACTION * d
    matrix = (torch.randn(d, r, generator=gen, dtype=torch.float64) @ torch.randn(r, 3 * d, generator=gen, dtype=torch.float64)).float()
    assert fast_span(matrix) is None
    span = span_of(matrix)
    assert span.method == "full" and span.rank == r


def test_fast_span_keeps_weak_directions():
    # Weak but real directions (eigenvalues down to 1e-9 of the largest) stay in the span.
    gen = torch.Generator().manual_seed(2)
    d, r = 256, 40
    basis = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
    weights = torch.logspace(0, -4.5, r, dtype=torch.float64)
    matrix = ((basis * weights) @ torch.randn(r, 3 * d, generator=gen, dtype=torch.float64)).float()
    full, fast = span_of(matrix, method="full"), span_of(matrix)
    assert fast.method == "fast" and fast.rank == full.rank == r
    assert float(_sines(full, fast).max()) < 1e-6


MORE = SENTENCES + [
    "A red kite flew high over the quiet harbour this morning.",
    "Please send the quarterly report to the finance team by Friday.",
    "The museum will be closed for renovations until next spring.",
    "My grandmother baked fresh bread every Sunday morning.",
    "Nobody expected the final chapter to end with a wedding.",
]


@pytest.mark.parametrize("lower_bounds", [False, True])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_layer1_screen_never_drops_a_token_the_float64_check_keeps(tiny, model_type, lower_bounds):
    # Lower bounds need a rank above 32 (the sketch must be cheaper than the basis).
    bundle = tiny(model_type, "classification", d=256 if lower_bounds else 128, layers=3)
    update = _update(bundle, MORE if lower_bounds else SENTENCES)
    hooks = hooks_for(bundle.model)
    span = span_of(hooks.input_matrix(update, hooks.attention_parameters(0)))
    positions = range(0, 8) if hooks.positional else range(0, 1)
    filt = hooks.layer1_filter(span, lower_bounds=lower_bounds)
    assert filt.lower_bounds == lower_bounds
    screened = filt.distances(positions)  # (P, V)
    # The reference: every (position, token) layer-1 input in float64, exactly.
    vocab = torch.arange(hooks.vocab_size)
    blk = hooks.blocks[0]
    norm = blk.ln_1 if model_type == "gpt2" else blk.input_layernorm
    for row, pos in enumerate(positions):
        x = hooks.token_inputs(vocab, pos).to(torch.float64)
        w = norm.weight.detach().double()
        if model_type == "gpt2":
            y = torch.nn.functional.layer_norm(x, (x.shape[1],), w, norm.bias.detach().double(), norm.eps)
        else:
            y = w * x  # RMSNorm: the span test is scale-free
        exact = exact_relative_distance(y, span)
        for thr in (1e-4, 1e-3, 1e-2):
            kept = set((exact < thr).nonzero().squeeze(1).tolist())
            got = set((screened[row] < thr * 1.01).nonzero().squeeze(1).tolist())
            assert kept <= got
        if lower_bounds:
            assert bool((screened[row] <= exact * (1 + 1e-3) + 1e-6).all())  # never above the distance
        near = exact < 0.04  # below the screen: the reported distance is the float64 one
        # (up to the float32 sum of token and position rows this reference starts from)
        assert torch.allclose(screened[row][near], exact[near], rtol=1e-3, atol=1e-8)
