"""Client-side defenses: each property the defense promises, checked on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from fedclient import (
    DPSGD,
    Compose,
    FedAvg,
    GaussianNoise,
    ImageBatch,
    InvalidConfigError,
    Prune,
    Quantize,
    RandomMask,
    SecureAggregation,
    SharedUpdate,
    compose,
    compute_update,
    fedsgd_gradient,
    parse_defense,
)
from fedclient.client import ClientReport
from fedclient.defenses import int8_round_trip
from fedclient.dp import clip_per_example, dp_epsilon, per_example_gradients, per_example_norms, trainable_names

SENTENCES = ["Hello private world", "Hi", "Gradients leak data quite a lot"]


def _flat(update) -> torch.Tensor:
    return torch.cat([update[n].flatten() for n in update])


def _update(values: dict[str, torch.Tensor]) -> SharedUpdate:
    return SharedUpdate(gradients=values, batch_size=2, task="classification")


# ------------------------------------------------------------- per-example gradients


@pytest.mark.parametrize(("family", "task"), [("gpt2", "classification"), ("llama", "next-token"), ("bert", "classification")])
def test_vmap_per_example_gradients_equal_the_loop_on_text_models(tiny, family, task):
    bundle = tiny(family, task)
    batch = bundle.encode(SENTENCES, seed=1)  # padded: the lengths differ
    names = trainable_names(bundle.model)
    fast, used = per_example_gradients(bundle.model, batch, parameters=names, method="vmap")
    slow, _ = per_example_gradients(bundle.model, batch, parameters=names, method="loop")
    assert used == "vmap"
    scale = max(float(slow[n].abs().max()) for n in names)
    for n in names:
        assert fast[n].shape == (3, *dict(bundle.model.named_parameters())[n].shape)
        torch.testing.assert_close(fast[n], slow[n], atol=1e-5 * scale, rtol=1e-4)


def test_vmap_per_example_gradients_equal_the_loop_on_a_cnn(cnn_case):
    model, batch = cnn_case
    names = trainable_names(model)
    fast, used = per_example_gradients(model, batch, parameters=names, method="vmap")
    slow, _ = per_example_gradients(model, batch, parameters=names, method="loop")
    assert used == "vmap"
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], atol=1e-6, rtol=1e-5)
    # Their mean is the FedSGD gradient of the mean loss.
    plain = fedsgd_gradient(model, batch, parameters=names)
    for n in names:
        torch.testing.assert_close(fast[n].mean(0), plain[n], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- DP-SGD


def test_clipped_per_example_norms_equal_the_bound(cnn_case):
    model, batch = cnn_case
    names = trainable_names(model)
    grads, _ = per_example_gradients(model, batch, parameters=names)
    norms = per_example_norms(grads)
    bound = float(norms.median())  # some examples above, some below
    clipped, before = clip_per_example(grads, bound)
    after = per_example_norms(clipped)
    above = before > bound
    assert above.any() and (~above).any()
    torch.testing.assert_close(after[above], torch.full_like(after[above], bound), rtol=1e-5, atol=0)
    torch.testing.assert_close(after[~above], before[~above])


def test_dpsgd_without_noise_is_the_mean_of_clipped_gradients_over_all_parameters(cnn_case):
    model, batch = cnn_case
    names = trainable_names(model)
    grads, _ = per_example_gradients(model, batch, parameters=names, method="loop")
    bound = float(per_example_norms(grads).median())
    clipped, _ = clip_per_example(grads, bound)
    # Only the fc weight is shared, but the norm is measured over all parameters.
    report = ClientReport()
    update = compute_update(
        model, batch, parameters=["fc.weight"], defense=DPSGD(clip_norm=bound, noise_multiplier=0.0), report=report
    )
    assert list(update) == ["fc.weight"]
    torch.testing.assert_close(update["fc.weight"], clipped["fc.weight"].mean(0), atol=1e-7, rtol=1e-5)
    assert math.isinf(update.info["epsilon"])
    # How many examples were clipped is a statistic of the private batch: it goes to the
    # client's report, never into what the server sees.
    assert 0 < report.diagnostics["clipped_fraction"] < 1
    assert "clipped_fraction" not in update.info


def test_dpsgd_noise_is_seeded_and_has_the_right_scale(cnn_case):
    model, batch = cnn_case
    d = DPSGD(clip_norm=0.5, noise_multiplier=2.0)
    a = compute_update(model, batch, defense=d, seed=7)
    b = compute_update(model, batch, defense=d, seed=7)
    c = compute_update(model, batch, defense=d, seed=8)
    clean = compute_update(model, batch, defense=DPSGD(clip_norm=0.5, noise_multiplier=0.0))
    assert torch.equal(_flat(a), _flat(b))
    assert not torch.allclose(_flat(a), _flat(c))
    noise = (_flat(a) - _flat(clean)) * batch.batch_size  # the noise added to the clipped sum
    assert abs(float(noise.std()) / (2.0 * 0.5) - 1) < 0.15  # std z * C (~300 entries)
    assert a.defenses == (d.name,)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_is_the_opacus_accountants(cnn_case, accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    z, q, steps, delta = 1.1, 0.01, 50, 1e-5
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    expected = acc.get_epsilon(delta=delta)
    d = DPSGD(clip_norm=1.0, noise_multiplier=z, delta=delta, sample_rate=q, steps=steps, accountant=accountant)
    assert d.epsilon == pytest.approx(expected, rel=1e-9)
    model, batch = cnn_case
    assert compute_update(model, batch, defense=d).info["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert dp_epsilon(noise_multiplier=2 * z, sample_rate=q, steps=steps, delta=delta, accountant=accountant) < expected


def test_dpsgd_on_a_text_model_clips_over_all_parameters(tiny):
    bundle = tiny("gpt2")
    batch = bundle.encode(SENTENCES, seed=1)
    shared = ["transformer.h.0.attn.c_attn.weight"]
    names = trainable_names(bundle.model)
    grads, _ = per_example_gradients(bundle.model, batch, parameters=names)
    bound = float(per_example_norms(grads).min()) / 2  # every example is clipped
    report = ClientReport()
    update = compute_update(
        bundle.model, batch, parameters=shared, defense=DPSGD(clip_norm=bound, noise_multiplier=0.0), report=report
    )
    clipped, _ = clip_per_example(grads, bound)
    torch.testing.assert_close(update[shared[0]], clipped[shared[0]].mean(0), atol=1e-7, rtol=1e-4)
    assert report.diagnostics["clipped_fraction"] == 1.0 and "clipped_fraction" not in update.info
    # Clipping over the shared subset only gives a different (larger) update.
    subset = compute_update(
        bundle.model, batch, parameters=shared, defense=DPSGD(clip_norm=bound, noise_multiplier=0.0, clip_over="shared")
    )
    assert float(subset[shared[0]].norm()) > float(update[shared[0]].norm())


# -------------------------------------------------------------------------- noise


def test_gaussian_noise_same_seed_same_noise_different_seed_different(tiny):
    bundle = tiny("gpt2")
    batch = bundle.encode(SENTENCES[:2])
    names = ["transformer.h.0.attn.c_attn.weight", "score.weight"]
    d = GaussianNoise(1e-2)
    clean = compute_update(bundle.model, batch, parameters=names)
    a = compute_update(bundle.model, batch, parameters=names, defense=d, seed=1)
    b = compute_update(bundle.model, batch, parameters=names, defense=d, seed=1)
    c = compute_update(bundle.model, batch, parameters=names, defense=d, seed=2)
    assert torch.equal(_flat(a), _flat(b))
    assert not torch.allclose(_flat(a), _flat(c))
    noise = _flat(a) - _flat(clean)
    assert abs(float(noise.std()) / 1e-2 - 1) < 0.02  # ~25k entries
    assert abs(float(noise.mean())) < 1e-3
    assert a.defenses == ("noise:sigma=0.01",) and a.info["noise_sigma"] == 1e-2


def test_noise_from_variance_uses_the_square_root():
    assert GaussianNoise.from_variance(1e-4) == GaussianNoise(1e-2)
    assert parse_defense("noise:var=1e-4") == GaussianNoise(1e-2)


# ---------------------------------------------------------------- pruning / masking


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_pruning_zeroes_exactly_the_requested_fraction_of_each_tensor(fraction):
    g = torch.Generator().manual_seed(0)
    values = {"a": torch.randn(40, 10, generator=g), "b": torch.randn(20, generator=g)}
    out = Prune(fraction).transform(_update(values), generator=g)
    for n, v in values.items():
        k = round(fraction * v.numel())
        zeroed = out[n] == 0
        assert int(zeroed.sum()) == k
        if 0 < k < v.numel():  # the zeroed entries are the smallest ones
            assert float(v[zeroed].abs().max()) <= float(v[~zeroed].abs().min())
        torch.testing.assert_close(out[n][~zeroed], v[~zeroed])


def test_global_pruning_zeroes_exactly_the_fraction_across_tensors():
    g = torch.Generator().manual_seed(0)
    values = {"big": torch.randn(300, generator=g), "small": 1e-3 * torch.randn(100, generator=g)}
    out = Prune(0.3, scope="global").transform(_update(values), generator=g)
    assert sum(int((out[n] == 0).sum()) for n in out) == 120
    assert int((out["small"] == 0).sum()) == 100  # the small-scale tensor goes first


def test_pruning_keeps_the_fraction_on_a_real_update(tiny):
    bundle = tiny("gpt2")
    batch = bundle.encode(SENTENCES[:2])
    name = "transformer.h.0.attn.c_attn.weight"
    update = compute_update(bundle.model, batch, parameters=[name], defense=Prune(0.3))
    n = update[name].numel()
    assert int((update[name] == 0).sum()) == round(0.3 * n)


def test_random_mask_is_exact_and_seeded():
    g1 = torch.Generator().manual_seed(3)
    values = {"a": torch.randn(1000, generator=torch.Generator().manual_seed(0)) + 5}
    a = RandomMask(0.3).transform(_update(values), generator=torch.Generator().manual_seed(3))
    b = RandomMask(0.3).transform(_update(values), generator=g1)
    c = RandomMask(0.3).transform(_update(values), generator=torch.Generator().manual_seed(4))
    assert int((a["a"] == 0).sum()) == 300
    assert torch.equal(a["a"], b["a"]) and not torch.equal(a["a"], c["a"])
    # Not the smallest: random positions (the values are all ~5, so any 300 are random).
    assert not torch.equal(a["a"] == 0, Prune(0.3).transform(_update(values), generator=g1)["a"] == 0)


# ----------------------------------------------------------------------- precision


def test_int8_error_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    values = {"a": torch.randn(64, 32, generator=g) * 1e-3, "zero": torch.zeros(5)}
    out = Quantize("int8").transform(_update(values), generator=g)
    scale = float(values["a"].abs().max()) / 127
    err = (out["a"] - values["a"]).abs()
    assert float(err.max()) <= scale / 2 * (1 + 1e-5)
    assert float(err.max()) > 0  # it is lossy
    assert len(torch.unique(out["a"])) <= 255
    assert torch.equal(out["zero"], values["zero"])
    deq, s = int8_round_trip(values["a"])
    assert s == pytest.approx(scale)


def test_fp16_error_within_half_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 1e-2
    out = Quantize("fp16").transform(_update({"a": x}), generator=g)["a"]
    assert out.dtype == x.dtype
    assert not torch.equal(out, x)
    # Half an fp16 step: relative 2^-11 in the normal range, absolute 2^-25 for subnormals.
    bound = torch.maximum(x.abs() * 2.0**-11, torch.full_like(x, 2.0**-25))
    assert bool(((out - x).abs() <= bound * (1 + 1e-6)).all())


# -------------------------------------------------------------------------- FedAvg


def test_fedavg_one_step_one_minibatch_is_lr_times_the_gradient(tiny):
    bundle = tiny("gpt2")
    batch = bundle.encode(SENTENCES, seed=2)
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    update = compute_update(bundle.model, batch, defense=FedAvg(local_steps=1, lr=0.1))
    grad = compute_update(bundle.model, batch)
    assert update.kind == "fedavg-delta" and grad.kind == "fedsgd-gradient"
    for n in grad:
        torch.testing.assert_close(update[n], 0.1 * grad[n], atol=2e-6, rtol=1e-3)
    for n, p in bundle.model.named_parameters():  # the caller's model is untouched
        assert torch.equal(p.detach(), before[n])


def test_fedavg_several_steps_follow_local_sgd(cnn_case):
    model, batch = cnn_case
    names = trainable_names(model)
    update = compute_update(model, batch, defense=FedAvg(local_steps=3, lr=0.5, minibatch_size=2))
    # Reference: SGD on a deep copy, minibatches [0,1], [2,3], [4].
    import copy

    from fedclient.dp import select_examples

    ref = copy.deepcopy(model)
    for idx in ([0, 1], [2, 3], [4]):
        grads = fedsgd_gradient(ref, select_examples(batch, idx), parameters=names)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p -= 0.5 * grads[n]
    for n, p in model.named_parameters():
        torch.testing.assert_close(update[n], p.detach() - dict(ref.named_parameters())[n].detach(), atol=1e-6, rtol=1e-5)
    assert update.info["local_steps"] == 3 and update.info["minibatch_size"] == 2


# ------------------------------------------------------------- secure aggregation


def test_k_identical_clients_aggregate_to_k_times_one(tiny):
    bundle = tiny("llama")
    batch = bundle.encode(SENTENCES[:2])
    one = compute_update(bundle.model, batch)
    agg = compute_update(bundle.model, batch, defense=SecureAggregation(clients=4, others="copies"))
    for n in one:
        torch.testing.assert_close(agg[n], 4 * one[n], atol=1e-6, rtol=1e-5)
    assert agg.batch_size == 8 and agg.info["clients"] == 4


def test_secure_aggregation_with_random_or_given_other_clients(cnn_case):
    model, batch = cnn_case
    one = compute_update(model, batch)
    agg = compute_update(model, batch, defense=SecureAggregation(clients=3), seed=5)
    again = compute_update(model, batch, defense=SecureAggregation(clients=3), seed=5)
    assert torch.equal(_flat(agg), _flat(again))
    assert not torch.allclose(_flat(agg), 3 * _flat(one))
    # Given batches: the aggregate is exactly the sum of the clients' gradients.
    others = {1: ImageBatch(images=batch.images.flip(0), labels=batch.labels), 2: ImageBatch(images=batch.images * 0.5, labels=batch.labels)}
    given = compute_update(model, batch, defense=SecureAggregation(clients=3, make_other_batch=others.__getitem__))
    expected = _flat(one) + _flat(compute_update(model, others[1])) + _flat(compute_update(model, others[2]))
    torch.testing.assert_close(_flat(given), expected, atol=1e-6, rtol=1e-5)


def test_secure_aggregation_on_text_random_clients(tiny):
    bundle = tiny("gpt2", "next-token")
    batch = bundle.encode(SENTENCES[:2])
    agg = compute_update(bundle.model, batch, defense=SecureAggregation(clients=2), seed=0)
    one = compute_update(bundle.model, batch)
    assert agg.batch_size == 4
    assert not torch.allclose(_flat(agg), 2 * _flat(one))


# -------------------------------------------------------------------------- compose


def test_compose_applies_transforms_after_the_computing_defense(cnn_case):
    model, batch = cnn_case
    d = Compose((FedAvg(local_steps=1, lr=0.1), Prune(0.5), Quantize("int8")))
    update = compute_update(model, batch, defense=d)
    assert update.kind == "fedavg-delta"
    assert update.defenses == ("fedavg:steps=1,lr=0.1", "prune:0.5", "int8")
    manual = Quantize("int8").transform(
        Prune(0.5).transform(compute_update(model, batch, defense=FedAvg(lr=0.1)), generator=torch.Generator()),
        generator=torch.Generator(),
    )
    assert torch.equal(_flat(update), _flat(manual))
    assert compose(None, GaussianNoise(0.1)) == GaussianNoise(0.1) and compose() is None


def test_compose_with_secure_aggregation_defends_every_client(cnn_case):
    model, batch = cnn_case
    d = Compose((GaussianNoise(1.0), SecureAggregation(clients=3, others="copies")))
    update = compute_update(model, batch, defense=d, seed=0)
    clean = compute_update(model, batch)
    noise = _flat(update) - 3 * _flat(clean)
    assert abs(float(noise.std()) / math.sqrt(3) - 1) < 0.15  # three independent draws
    assert update.defenses[-1] == "secagg:clients=3,others=copies"


def test_compose_rejects_impossible_orders():
    with pytest.raises(InvalidConfigError, match="first"):
        Compose((GaussianNoise(0.1), DPSGD()))
    with pytest.raises(InvalidConfigError, match="one of"):
        Compose((DPSGD(), FedAvg()))
    with pytest.raises(InvalidConfigError, match="last"):
        Compose((SecureAggregation(clients=2), GaussianNoise(0.1)))
