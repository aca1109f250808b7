"""DAGER's decoder search: the screened search against the per-pair reference.

The fast search (:func:`dager.search.decoder_search`) screens every (prefix, token)
pair with a bound on its MLP-input span distance and runs block 0 exactly only on the
pairs the bound cannot reject; these tests check it returns what the per-pair
reference returns, that the screen never drops a pair the exact check accepts, and
that a full span (every pair passes) keeps the search within its prefix budget.
"""

from __future__ import annotations

import pytest
import torch

from dager.attack import required_parameters
from dager.decoder_tables import _by_weights, _head_norms
from dager.hooks_decoder import _attention_weights
from dager.layers import _softmax_attend, hooks_for
from dager.search import (
    Found,
    SearchStats,
    Step,
    Thresholds,
    Tick,
    Warn,
    _reference_decoder_search,
    _Screen,
    decoder_search,
)
from dager.span import span_of
from fedclient import compute_update

SENTENCES = [
    "I think we should leave early tomorrow.",
    "I think that the library is closed.",
    "The cat sat on the mat.",
    "We met at noon by the river.",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny chunks: torch's thread pool only adds overhead on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(bundle, sentences, *, noise: float = 0.0):
    """Spans, hooks and the every-batch-token candidate bag for one update."""
    update = compute_update(bundle.model, bundle.encode(sentences, seed=0), parameters=required_parameters(bundle))
    hooks = hooks_for(bundle.model)
    grads = dict(update.items())
    if noise:
        gen = torch.Generator().manual_seed(1)
        grads = {k: v + noise * torch.randn(v.shape, generator=gen) for k, v in grads.items()}

    def span(names):
        return span_of(torch.cat([hooks._input_columns(n, grads[n]) for n in names], dim=1))

    span_mlp = span(hooks.mlp_parameters(0))
    span2 = span(hooks.attention_parameters(1))
    start = (bundle.bos_token_id,) if bundle.family.prepend_bos else ()
    ids = sorted({t for s in sentences for t in bundle.tokenize(s)} - set(start))
    # Every batch token at every position: the layer-1 filter cannot locate tokens.
    bag = torch.tensor(ids)
    longest = max(len(bundle.tokenize(s)) for s in sentences)
    return hooks, span_mlp, span2, start, bag, longest


def _drain(stream):
    items = list(stream)
    found = sorted((f.token_ids, f.exact) for f in items if isinstance(f, Found))
    return items, found


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_screened_search_matches_the_per_pair_reference(tiny, model_type):
    bundle = tiny(model_type, "classification", d=64, layers=3)
    hooks, span_mlp, span2, start, bag, longest = _setup(bundle, SENTENCES)
    kwargs = dict(start=start, max_prefixes=256, max_length=longest + 2)
    with torch.no_grad():
        ref_items, ref = _drain(
            _reference_decoder_search(hooks, lambda p: bag, span_mlp, span2, thresholds=Thresholds(None, None), **kwargs)
        )
        stats = SearchStats()
        fast_items, fast = _drain(
            decoder_search(
                hooks, lambda p: bag, span_mlp, span2, thresholds=Thresholds(None, None), stats=stats, **kwargs
            )
        )
    assert fast == ref
    expected = sorted(tuple(bundle.tokenize(s)) for s in SENTENCES)
    assert sorted(ids for ids, _ in fast) == expected and all(exact for _, exact in fast)
    ref_steps = [(s.position, s.num_prefixes, set(s.prefixes)) for s in ref_items if isinstance(s, Step)]
    fast_steps = [(s.position, s.num_prefixes, set(s.prefixes)) for s in fast_items if isinstance(s, Step)]
    assert fast_steps == ref_steps
    # The screen did the work: far fewer pairs reached the exact check than were tried.
    assert stats.screened < 0.2 * stats.checked


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_pooled_exact_checks_match_the_reference_whatever_the_chunking(tiny, model_type):
    # Tiny chunks: the pairs the screen keeps are pooled across many chunks (and
    # exact blocks of a few pairs) before their exact checks; the result is the same.
    bundle = tiny(model_type, "classification", d=64, layers=3)
    hooks, span_mlp, span2, start, bag, longest = _setup(bundle, SENTENCES[:3])
    kwargs = dict(start=start, max_prefixes=256, max_length=longest + 2)
    with torch.no_grad():
        _, ref = _drain(
            _reference_decoder_search(hooks, lambda p: bag, span_mlp, span2, thresholds=Thresholds(None, None),
                                      **kwargs)
        )
        for chunk_macs in (2e3, 3e4):
            items, fast = _drain(
                decoder_search(
                    hooks, lambda p: bag, span_mlp, span2, thresholds=Thresholds(None, None), chunk_macs=chunk_macs,
                    **kwargs,
                )
            )
            assert fast == ref
            steps = sum(isinstance(i, Step) for i in items)
            assert sum(isinstance(i, Tick) for i in items) > 3 * steps  # several chunks per position
    assert sorted(ids for ids, _ in ref) == sorted(tuple(bundle.tokenize(s)) for s in SENTENCES[:3])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_screen_never_discards_a_pair_the_exact_check_accepts(tiny, model_type):
    bundle = tiny(model_type, "classification", d=64, layers=3)
    hooks, span_mlp, span2, start, bag, longest = _setup(bundle, SENTENCES)
    gen = torch.Generator().manual_seed(0)
    screen = _Screen(hooks, span_mlp, gen)
    assert screen.active
    accepted_total = kept_total = weights_checked = 0
    with torch.no_grad():
        for sentence in SENTENCES:
            ids = bundle.tokenize(sentence)
            for pos in range(len(start), len(ids)):
                # Prefixes: the true one and random ones; tokens: the bag plus random ones.
                prefixes = [ids[:pos]] + [
                    [*start, *torch.randint(0, hooks.vocab_size, (pos - len(start),), generator=gen).tolist()]
                    for _ in range(3)
                ]
                tokens = torch.cat([bag, torch.randint(0, hooks.vocab_size, (40,), generator=gen)])
                for prefix in prefixes:
                    kc, vc = _cache(hooks, prefix)
                    x, q, k, v = hooks.token_states(tokens, pos)
                    mix = _softmax_attend(q, kc, vc, k, v, hooks.attention_scale)  # (1, t, d)
                    h = x + hooks.attention_output(mix[0])
                    exact = span_mlp.distance(hooks.mlp_input(h))
                    by_weights = _weights_screen(screen, hooks, q, k, v, kc, vc, x)
                    for threshold in (1e-4, 1e-3, 1e-2, 0.1):
                        kept = screen.keep(mix, screen.token_side(x), threshold)[0]
                        accepted = exact < threshold
                        assert bool(kept[accepted].all()), (pos, threshold)
                        if by_weights is not None:
                            # The screen from the weights alone keeps every pair the mix screen keeps.
                            kept_w = by_weights(threshold)
                            assert bool(kept_w[kept].all()), (pos, threshold)
                            weights_checked += 1
                        accepted_total += int(accepted.sum())
                        kept_total += int(kept.sum())
    # True pairs were among those tested, and the screen is selective at tight thresholds.
    assert accepted_total > 0 and weights_checked > 0
    assert kept_total < 4 * 64 * len(SENTENCES) * 20


def _weights_screen(screen, hooks, q, k, v, kc, vc, x):
    """``threshold -> (t,)`` kept mask of :meth:`_Screen.keep_weights` for one prefix,
    or ``None`` where the search screens from the mixes (no prefix, or a long one)."""
    l = kc.shape[2]
    if not _by_weights(hooks, screen.active, l):
        return None
    attn = _attention_weights(q, kc, k, hooks.attention_scale)  # (1, t, H, l+1)
    values = vc[0].transpose(0, 1)  # (l, H, dh): table rows of this prefix
    prefix_side = (screen.value_side(values).transpose(0, 1).unsqueeze(0), vc @ vc.transpose(-1, -2))
    own = (screen.value_side(v), v.norm(dim=-1))
    side = screen.token_side(x)
    return lambda threshold: screen.keep_weights(attn, prefix_side, own, side, threshold)[0]


def _cache(hooks, prefix):
    H, dh = hooks.num_heads, hooks.head_dim
    ks, vs = [], []
    for pos, tok in enumerate(prefix):
        _, _, k, v = hooks.token_states(torch.tensor([tok]), pos)
        ks.append(k)
        vs.append(v)
    if not ks:
        return torch.zeros((1, H, 0, dh)), torch.zeros((1, H, 0, dh))
    return torch.stack(ks, dim=2), torch.stack(vs, dim=2)  # (1, H, l, dh)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_full_span_keeps_at_most_max_prefixes(tiny, model_type, one_thread):
    # Heavy noise fills every span: every pair passes every check, so the search
    # can only keep the nearest prefixes. It must never hold more than the budget.
    bundle = tiny(model_type, "classification", d=64, layers=3)
    hooks, span_mlp, span2, start, bag, longest = _setup(bundle, SENTENCES, noise=1.0)
    assert span_mlp.rank == span_mlp.dim and span2.rank == span2.dim
    tokens = torch.arange(120)  # a large candidate set at every position
    stats = SearchStats()
    with torch.no_grad():
        items = list(
            decoder_search(
                hooks, lambda p: tokens, span_mlp, span2, start=start, thresholds=Thresholds(0.5, 0.5),
                max_prefixes=8, max_length=len(start) + 4, stats=stats, chunk_macs=3e5,
            )
        )
    steps = [s for s in items if isinstance(s, Step)]
    assert len(steps) == 4 and all(s.num_prefixes == 8 for s in steps)
    assert any(isinstance(w, Warn) and w.code == "budget_exhausted" for w in items)
    # Survivors are merged chunk by chunk: never more than the budget plus one chunk.
    assert stats.checked == 4 * 8 * 120 - 7 * 120
    assert stats.max_selected <= 8 + stats.max_chunk_pairs < 8 * 120
    found = [f for f in items if isinstance(f, Found)]
    assert found and not any(f.exact for f in found)


def test_key_value_tables_stay_within_the_byte_budget(tiny, one_thread):
    bundle = tiny("gpt2", "classification", d=64, layers=3)
    hooks, span_mlp, span2, start, bag, longest = _setup(bundle, SENTENCES, noise=1.0)
    tokens = torch.arange(40)
    row = 2 * hooks.hidden_size * 4  # one (position, token) key and value in float32
    budget = 2 * 30 * row  # tables may hold 30 rows: fewer than 64 prefixes need
    stats = SearchStats()
    with torch.no_grad():
        items = list(
            decoder_search(
                hooks, lambda p: tokens, span_mlp, span2, start=start, thresholds=Thresholds(0.5, 0.5),
                max_prefixes=64, max_length=3, stats=stats, byte_budget=budget,
            )
        )
    assert 0 < stats.max_table_bytes <= budget // 2
    assert any(isinstance(w, Warn) and w.code == "budget_exhausted" for w in items)
    assert all(s.num_prefixes <= 64 for s in items if isinstance(s, Step))


def test_head_norms_bound_each_heads_spectral_norm_tightly():
    # Float32 Gram matrices with rigorous slack: never below the float64 spectral norm.
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn((512, 8 * 32), generator=gen, dtype=torch.float64) * 0.02
    weight[:, :32] *= 100.0  # one head far larger than the others
    bound = _head_norms(weight, 8).to(torch.float64)
    exact = torch.linalg.matrix_norm(weight.reshape(512, 8, 32).permute(1, 0, 2), ord=2)  # (8,)
    assert bool((bound >= exact).all())
    assert bool((bound <= exact * 1.02).all())


def test_a_fedavg_delta_calibrates_at_the_gap_next_to_the_off_span_level():
    """Measured first-position MLP distances of a one-epoch FedAvg delta (lr 1e-4): two
    true tokens seen at the initial weights at round-off, five seen after local steps at
    the drift level, probes from 0.6. The largest gap splits the true ones; with drift the
    cut lies between the drift level and the probes."""
    import torch

    from dager.decoder_steps import _split_at_gap

    dc = torch.tensor([4.6e-7, 4.8e-7, 2.4e-3, 7.7e-3, 8.8e-3, 1.2e-2, 1.6e-2], dtype=torch.float64)
    dp = torch.tensor([0.60, 0.71, 0.93], dtype=torch.float64)
    assert _split_at_gap(dc, dp) < 2.4e-3  # a gradient's rule: only the round-off pair
    drift = _split_at_gap(dc, dp, drift=True)
    assert 1.6e-2 < drift < 0.60  # every true token, no probe
    # No gap of 10x below the probes: the largest-gap rule stands.
    flat = torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64)
    assert _split_at_gap(flat, dp, drift=True) == _split_at_gap(flat, dp)
