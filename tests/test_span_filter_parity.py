"""The span and layer-1 filter paths of issue 10's second speed-up against the previous
ones (``tests/span_reference.py``, verbatim), on tiny seeded models: the same ranks,
the same spans (one projector), the same filter verdicts and the same recovered text."""

from __future__ import annotations

import pytest
import torch

import span_reference as ref
from dager.attack import iter_dager, required_parameters
from dager.events import AttackFinished, TokensFiltered
from dager.fastspan import fast_span
from dager.filters import SCREEN, _bound_directions
from dager.layers import hooks_for
from dager.span import exact_relative_distance, span_of
from fedclient import compute_update

SENTENCES = [
    "The cat sat on the mat.",
    "Gradients leak private data.",
    "We met at noon.",
    "A red kite flew high over the quiet harbour this morning.",
    "Please send the quarterly report to the finance team by Friday.",
    "The museum will be closed for renovations until next spring.",
    "My grandmother baked fresh bread every Sunday morning.",
    "Nobody expected the final chapter to end with a wedding.",
]


def _update(bundle, sentences=SENTENCES):
    batch = bundle.encode(sentences, seed=0)
    return compute_update(bundle.model, batch, parameters=required_parameters(bundle))


def _projector_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spectral norm of the difference of the two bases' projectors."""
    return float(torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_fast_span_matches_the_previous_range_finder(tiny, model_type):
    bundle = tiny(model_type, "classification", d=256, layers=3)
    update = _update(bundle)
    hooks = hooks_for(bundle.model)
    for names in (hooks.attention_parameters(0), hooks.attention_parameters(1), hooks.mlp_parameters(0)):
        matrix = hooks.input_matrix(update, names)
        old, new = ref.fast_span(matrix), fast_span(matrix)
        full = span_of(matrix, method="full")
        assert old is not None and new is not None and new.method == "fast"
        assert new.rank == old.rank == full.rank
        # One span: the projectors agree far below the distances the attack reads (1e-7).
        assert _projector_gap(new.basis, old.basis) < 1e-8
        assert _projector_gap(new.basis, full.basis) < 1e-8
        r = new.rank
        assert torch.allclose(new.singular_values[:r], full.singular_values[:r], rtol=1e-7)
        eye = torch.eye(r, dtype=torch.float64)
        assert float((new.basis.T @ new.basis - eye).abs().max()) < 1e-12


def test_fast_span_retries_densely_when_its_column_sample_misses_a_direction():
    # Only 12 of 1536 columns carry signal: a sample of 2s columns misses most of them,
    # the residual certificate notices, and the dense sketch finds the exact span.
    gen = torch.Generator().manual_seed(3)
    d, r, k = 256, 12, 1536
    basis = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
    matrix = torch.zeros(d, k, dtype=torch.float64)
    cols = torch.randperm(k, generator=gen)[:r]
    matrix[:, cols] = basis @ torch.randn(r, r, generator=gen, dtype=torch.float64)
    matrix = matrix.float()
    new, full = fast_span(matrix, rank_hint=r), span_of(matrix, method="full")
    assert new is not None and new.rank == full.rank == r
    assert _projector_gap(new.basis, full.basis) < 1e-8


def test_bound_directions_are_orthonormal_and_off_the_span(tiny):
    bundle = tiny("gpt2", "classification", d=256, layers=3)
    hooks = hooks_for(bundle.model)
    span = span_of(hooks.input_matrix(_update(bundle), hooks.attention_parameters(0)))
    cols, sketch = _bound_directions(span, torch.device("cpu"))
    assert span.rank + 32 <= cols < span.dim  # reads fewer coordinates than the embedding has
    full = torch.zeros(span.dim, sketch.shape[1], dtype=torch.float64)
    full[:cols] = sketch.double()
    eye = torch.eye(sketch.shape[1], dtype=torch.float64)
    assert float((full.T @ full - eye).abs().max()) < 1e-5
    assert float((span.basis.T @ full).abs().max()) < 1e-5  # float32 round-off of exact zeros


def _perturb_layernorm(bundle) -> None:
    """Trained-looking LayerNorm weights (gamma != 1, beta != 0): the general filter path."""
    gen = torch.Generator().manual_seed(5)
    ln = hooks_for(bundle.model).blocks[0].ln_1
    with torch.no_grad():
        ln.weight.copy_(1.0 + 0.3 * torch.randn(ln.weight.shape, generator=gen))
        ln.bias.copy_(0.1 * torch.randn(ln.bias.shape, generator=gen))


@pytest.mark.parametrize("lower_bounds", [False, True])
@pytest.mark.parametrize("case", ["gpt2", "gpt2-ln", "llama"])
def test_layer1_filter_verdicts_match_the_previous_filter(tiny, case, lower_bounds):
    bundle = tiny(case.split("-")[0], "classification", d=256, layers=3)
    if case == "gpt2-ln":
        _perturb_layernorm(bundle)
    update = _update(bundle)
    hooks = hooks_for(bundle.model)
    span = span_of(hooks.input_matrix(update, hooks.attention_parameters(0)))
    positions = range(0, 12) if hooks.positional else range(0, 1)
    new_filter = hooks.layer1_filter(span, lower_bounds=lower_bounds)
    if hooks.positional:
        ln = hooks.blocks[0].ln_1
        wpe = hooks.tf.wpe.weight
        old_filter = ref.AdditiveLayerNormFilter(
            hooks.tf.wte.weight, ln.weight, ln.bias, ln.eps, span, lambda r: wpe[r.start : r.stop],
            lower_bounds=lower_bounds,
        )
    else:
        norm = hooks.blocks[0].input_layernorm
        old_filter = ref.ScaleFreeFilter(hooks.base.embed_tokens.weight, norm.weight, span, lower_bounds=lower_bounds)
    assert new_filter.lower_bounds == old_filter.lower_bounds == lower_bounds
    new, old = new_filter.distances(positions), old_filter.distances(positions)
    again = new_filter.distances(positions)  # served from the per-model position terms
    assert torch.equal(new, again)
    assert new.shape == old.shape
    for thr in (1e-5, 1e-4, 1e-3, 1e-2):
        assert torch.equal(new < thr, old < thr)
    # Below the screen both report the same float64 distance, bit for bit (the encoder's
    # search orders candidates by it: a round-off change can change what it recovers).
    near = (new < SCREEN / 2) & (old < SCREEN / 2)
    assert bool(near.any())
    assert torch.equal(new[near], old[near])
    if not lower_bounds:  # both are float32 estimates of the same distance above the screen
        assert torch.allclose(new, old, rtol=1e-2, atol=1e-3)


def test_position_terms_follow_a_changed_position_row(tiny):
    bundle = tiny("gpt2", "classification", d=128, layers=3)
    hooks = hooks_for(bundle.model)
    span = span_of(hooks.input_matrix(_update(bundle, SENTENCES[:3]), hooks.attention_parameters(0)))
    positions = range(0, 6)
    hooks.layer1_filter(span).distances(positions)  # fills the per-model terms
    wpe = hooks.tf.wpe.weight
    before = wpe[2].detach().clone()
    try:
        with torch.no_grad():
            wpe[2] += 0.05  # the model changed: position 2's terms are stale
        changed = wpe[2].detach().clone()
        got = hooks.layer1_filter(span).distances(positions)
    finally:
        with torch.no_grad():
            wpe[2].copy_(before)  # a later tiny model may reuse this memory
    ln = hooks.blocks[0].ln_1
    d = hooks.hidden_size
    vocab = torch.arange(hooks.vocab_size)
    for row, pos in enumerate(positions):
        if pos == 2:
            x = hooks.tf.wte.weight.detach().double() + changed.double()
        else:
            x = hooks.token_inputs(vocab, pos).double()
        y = torch.nn.functional.layer_norm(x, (d,), ln.weight.double(), ln.bias.double(), ln.eps)
        exact = exact_relative_distance(y, span)
        assert torch.allclose(got[row], exact, rtol=1e-2, atol=1e-3)


def _attack_record(bundle, update):
    events = list(iter_dager(bundle, update))
    accepted = {e.position: sorted(e.token_ids.tolist()) for e in events if isinstance(e, TokensFiltered)}
    result = events[-1]
    assert isinstance(result, AttackFinished)
    return accepted, result.result.sentences, result.result.rank


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_attack_filters_and_recovers_as_with_the_previous_paths(tiny, model_type, monkeypatch):
    bundle = tiny(model_type, "classification", d=256, layers=3)
    update = _update(bundle)
    new = _attack_record(bundle, update)
    import dager.fastspan
    import dager.hooks_bert
    import dager.hooks_gpt2
    import dager.hooks_llama

    monkeypatch.setattr(dager.fastspan, "fast_span", ref.fast_span)
    monkeypatch.setattr(dager.hooks_gpt2, "AdditiveLayerNormFilter", ref.AdditiveLayerNormFilter)
    monkeypatch.setattr(dager.hooks_bert, "AdditiveLayerNormFilter", ref.AdditiveLayerNormFilter)
    monkeypatch.setattr(dager.hooks_llama, "ScaleFreeFilter", ref.ScaleFreeFilter)
    old = _attack_record(bundle, update)
    assert new == old  # the same accepted tokens, text and rank
    if model_type != "bert":  # the decoders' exact search recovers the whole batch
        assert sorted(new[1]) == sorted(SENTENCES)
