"""Defense specs and settings: bad parameters, parsing and descriptions, the utility cost and sweeps.

Split from ``test_defenses.py`` (which checks what each defense does to an update).
"""

from __future__ import annotations

import pytest

from fedclient import (
    DPSGD,
    Compose,
    FedAvg,
    GaussianNoise,
    InvalidConfigError,
    Prune,
    Quantize,
    RandomMask,
    SecureAggregation,
    compose,
    compute_update,
    describe,
    parse_defense,
    parse_defenses,
    utility_cost,
)
from fedclient.defenses import SPEC_FORMS
from fedclient.sweep import SweepPoint, dp_grid, grid, noise_grid, prune_grid, run_sweep
from labcli.sweepfiles import plot_sweep, save_plot, write_csv


# ------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    "make",
    [
        lambda: GaussianNoise(-1.0),
        lambda: GaussianNoise(float("nan")),
        lambda: Prune(1.0),
        lambda: Prune(-0.1),
        lambda: Prune(0.3, scope="row"),
        lambda: RandomMask(1.5),
        lambda: Quantize("int4"),
        lambda: DPSGD(clip_norm=0.0),
        lambda: DPSGD(clip_norm=-1.0),
        lambda: DPSGD(noise_multiplier=-0.5),
        lambda: DPSGD(delta=0.0),
        lambda: DPSGD(sample_rate=1.5),
        lambda: DPSGD(steps=0),
        lambda: DPSGD(accountant="gdp"),
        lambda: FedAvg(local_steps=0),
        lambda: FedAvg(lr=-0.1),
        lambda: FedAvg(minibatch_size=0),
        lambda: SecureAggregation(clients=0),
        lambda: SecureAggregation(clients=2, others="twins"),
    ],
)
def test_bad_parameters_raise_a_clear_error(make):
    with pytest.raises(InvalidConfigError) as info:
        make()
    message = str(info.value)
    assert message.endswith(".") and len(message.split()) >= 6  # a sentence saying what to change


# ------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("noise:sigma=1e-3", GaussianNoise(1e-3)),
        ("noise:1e-3", GaussianNoise(1e-3)),
        ("dp:clip=1.0,noise=1.0,delta=1e-5", DPSGD(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)),
        ("dp:clip=2,noise=0.5,rate=0.01,steps=100", DPSGD(clip_norm=2.0, noise_multiplier=0.5, sample_rate=0.01, steps=100)),
        ("prune:0.3", Prune(0.3)),
        ("prune:0.3,scope=global", Prune(0.3, scope="global")),
        ("mask:0.3", RandomMask(0.3)),
        ("fp16", Quantize("fp16")),
        ("INT8", Quantize("int8")),
        ("fedavg:steps=4,lr=0.01,minibatch=2", FedAvg(local_steps=4, lr=0.01, minibatch_size=2)),
        ("secagg:clients=4", SecureAggregation(clients=4)),
        ("secagg:4,others=copies", SecureAggregation(clients=4, others="copies")),
    ],
)
def test_parse_defense_forms_round_trip(spec, expected):
    parsed = parse_defense(spec)
    assert parsed == expected
    assert parse_defense(parsed.name) == parsed  # the name is a canonical spec
    assert describe(parsed)


def test_each_defense_describes_itself():
    """describe() is the defense's own line; None and a custom callable get a generic one."""
    cases = {
        GaussianNoise(0.5): "standard deviation 0.5",
        Prune(0.3, scope="global"): "30% smallest-magnitude entries across all shared tensors",
        RandomMask(0.25): "random 25%",
        Quantize("fp16"): "fp16",
        Quantize("int8"): "8-bit integers",
        DPSGD(clip_norm=2.0, noise_multiplier=0.0): "no formal privacy",
        FedAvg(local_steps=3, lr=0.1, minibatch_size=2): "3 local SGD step(s) with learning rate 0.1 over minibatches of 2",
        SecureAggregation(clients=4, others="copies"): "sum over 4 clients (the attacked one and 3 clients holding copies",
    }
    for defense, words in cases.items():
        assert defense.describe() == describe(defense)
        assert words in describe(defense)
    both = compose(GaussianNoise(0.5), SecureAggregation(clients=2))
    assert describe(both) == f"{GaussianNoise(0.5).describe()} Then: {SecureAggregation(clients=2).describe()}"
    assert describe(None).startswith("No defense")

    class Custom:  # a defense with a name and no describe()
        name = "shuffle"

        def __call__(self, model, batch, *, parameters, generator):
            raise AssertionError("not called")

    assert describe(Custom()) == "Custom defense shuffle."


def test_parse_defenses_composes_in_role_order():
    d = parse_defenses(["secagg:clients=4", "noise:1e-3", "dp:clip=1,noise=1", "int8"])
    assert isinstance(d, Compose)
    assert [type(x) for x in d.defenses] == [DPSGD, GaussianNoise, Quantize, SecureAggregation]
    assert parse_defense(d.name) == d
    assert parse_defenses([]) is None and parse_defenses(None) is None
    assert parse_defenses(["prune:0.2"]) == Prune(0.2)
    assert parse_defenses("noise:1e-3; fp16") == Compose((GaussianNoise(1e-3), Quantize("fp16")))


@pytest.mark.parametrize(
    "spec", ["", "blur:3", "noise", "noise:abc", "noise:sigma=-1", "prune:2", "dp:clip=1", "fedavg:steps=1.5", "noise:foo=1", "fp8"]
)
def test_bad_specs_raise_with_the_accepted_forms(spec):
    with pytest.raises(InvalidConfigError) as info:
        parse_defense(spec)
    message = str(info.value)
    assert message.endswith(".")
    if spec in ("", "blur:3", "fp8", "noise"):
        assert SPEC_FORMS[0] in message  # the accepted forms are listed


# ------------------------------------------------------------------- utility / sweep


def test_utility_cost_falls_with_noise(cnn_case):
    model, batch = cnn_case
    clean = utility_cost(model, batch, compute_update(model, batch))
    light = utility_cost(model, batch, compute_update(model, batch, defense=GaussianNoise(1e-4)))
    heavy = utility_cost(model, batch, compute_update(model, batch, defense=GaussianNoise(1.0)))
    assert clean["utility_cosine"] == pytest.approx(1.0)
    assert clean["utility_cosine"] >= light["utility_cosine"] > heavy["utility_cosine"]
    assert heavy["utility_norm_ratio"] > 1
    fedavg = utility_cost(model, batch, compute_update(model, batch, defense=FedAvg(lr=0.1)))
    assert fedavg["utility_cosine"] == pytest.approx(1.0, abs=1e-5)  # scale-free


def test_sweep_runs_any_attack_and_writes_csv_and_plot(cnn_case, tmp_path):
    model, batch = cnn_case

    def attack(defense):
        return utility_cost(model, batch, compute_update(model, batch, defense=defense))

    points = noise_grid((0.0, 1e-3, 1.0)) + [SweepPoint("int8", 8.0, Quantize("int8"), axis="bits")]
    rows = run_sweep(points, attack)
    assert [r["label"] for r in rows] == ["none", "sigma=0.001", "sigma=1", "int8"]
    assert rows[0]["defense"] == "none" and rows[1]["defense"] == "noise:sigma=0.001"
    assert rows[0]["utility_cosine"] > rows[2]["utility_cosine"]
    csv_path = write_csv(rows, tmp_path / "sweep.csv")
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:4] == ["label", "axis", "strength", "defense"] and "utility_cosine" in header
    fig = plot_sweep(rows, y=["utility_cosine"], title="noise")
    assert list(fig.data[0].y) == [r["utility_cosine"] for r in rows]
    written = save_plot(fig, tmp_path / "sweep.png")
    assert written[0] == tmp_path / "sweep.html" and written[0].stat().st_size > 1000


def test_standard_grids():
    assert [p.strength for p in noise_grid()] == [0.0, 1e-4, 1e-3, 1e-2, 1e-1]
    assert noise_grid()[0].defense is None
    assert [p.strength for p in prune_grid()] == [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    assert prune_grid()[3].defense == Prune(0.3)
    dp = dp_grid((0.5, 1.0, 2.0))
    assert dp[0].defense is None
    eps = [p.defense.epsilon for p in dp[1:]]
    assert eps == sorted(eps, reverse=True)  # more noise, less epsilon
    rows = run_sweep(dp[1:2], lambda d: {"x": 1.0})
    assert rows[0]["epsilon"] == pytest.approx(eps[0])
    assert len(grid("mask")) == 7
    with pytest.raises(InvalidConfigError):
        grid("blur")
