"""The client's training setup (issue 11): LoRA, precision, dropout, FedAvg epochs; DAGER on each."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

import dager
from conftest import dropout_bundle, tiny_bundle
from dager import cli
from dager.attack import iter_dager, required_parameters, run_dager
from dager.events import AttackWarning, SentenceRecovered, TokensFiltered, WarningCode
from fedclient import compute_update
from fedclient.defenses import FedAvg, parse_defense
from fedclient.errors import InvalidConfigError
from fedclient.lora import adapter_key, server_model
from fedclient.training import ClientTraining, LoraSpec, check_training, parse_client

SENTS = ["The cat sat on the mat.", "A dog ran home fast today."]


def _batch(bundle, sentences=SENTS):
    return bundle.encode(list(sentences), seed=0)


def _attack(bundle, update, training):
    server = bundle
    if training.lora is not None:
        server = dataclasses.replace(bundle, model=server_model(bundle.model, training.lora))
    return run_dager(server, update)


# ---------------------------------------------------------------------------- spec parsing


def test_parse_client_forms_and_round_trip():
    t = parse_client(["lora:r=16"], precision="bf16", dropout=True)
    assert t == ClientTraining(lora=LoraSpec(r=16), precision="bf16", dropout=True)
    assert parse_client([t.name]) == t
    t2 = parse_client(["lora:r=8,alpha=16,targets=q_proj|v_proj", "fp16", "dropout"])
    assert t2.lora == LoraSpec(r=8, alpha=16.0, targets=("q_proj", "v_proj")) and t2.precision == "fp16"
    assert parse_client([t2.name]) == t2
    assert parse_client([]).plain and parse_client(None).name == "plain"
    assert parse_client(["lora"]).lora == LoraSpec()  # r defaults to 16


@pytest.mark.parametrize(
    ("specs", "kwargs", "needle"),
    [
        (["lora:r=0"], {}, "at least 1"),
        (["lora:r=-4"], {}, "at least 1"),
        (["lora:r=2.5"], {}, "whole number"),
        (["lora:alpha=nan"], {}, "finite"),
        (["lora:rank=4,foo=1"], {}, "Unknown LoRA setting 'foo'"),
        (["sparkle"], {}, "Unknown client setting"),
        (["fp16"], {"precision": "bf16"}, "given twice"),
        ([""], {}, "empty"),
    ],
)
def test_bad_client_specs_are_one_sentence(specs, kwargs, needle):
    with pytest.raises(InvalidConfigError) as info:
        parse_client(specs, **kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message and message.endswith(".")


def test_model_checks_r_larger_than_d_and_unknown_target(tiny):
    model = tiny("gpt2").model  # d = 64
    with pytest.raises(InvalidConfigError, match=r"r=65 is larger than .* d=64: use r from 1 to 64"):
        check_training(ClientTraining(lora=LoraSpec(r=65)), model)
    with pytest.raises(InvalidConfigError, match="LoRA target 'q_proj' names no linear module .* c_attn"):
        check_training(ClientTraining(lora=LoraSpec(r=4, targets=("q_proj",))), model)
    check_training(ClientTraining(lora=LoraSpec(r=64)), model)  # r = d is fine


def test_fp16_on_a_cpu_that_cannot_run_it_is_one_sentence(tiny, monkeypatch):
    import fedclient.training as training

    monkeypatch.setattr(training, "half_precision_works", lambda precision, device: False)
    with pytest.raises(InvalidConfigError, match=r"cannot train in fp16 .*: use --precision fp32"):
        check_training(ClientTraining(precision="fp16"), tiny("gpt2").model)


# ------------------------------------------------------------------------------------- LoRA


def test_lora_update_is_keyed_by_name_and_touches_only_the_adapters(tiny):
    bundle = tiny("gpt2")
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    training = ClientTraining(lora=LoraSpec(r=8))
    update = compute_update(bundle.model, _batch(bundle), training=training)
    # Every shared tensor is an adapter, named as peft saves it, shaped (r, in) or (out, r).
    assert update and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in update)
    layers = bundle.model.config.n_layer
    assert len(update) == 2 * layers  # one fused c_attn per block: A and B
    a = update[adapter_key("transformer.h.0.attn.c_attn.weight", "A")]
    b = update[adapter_key("transformer.h.0.attn.c_attn.weight", "B")]
    assert a.shape == (8, 64) and b.shape == (3 * 64, 8)
    assert float(a.abs().sum()) > 0 and float(b.abs().sum()) > 0  # B seeded nonzero: A's gradient is not zero
    assert update.info["lora_r"] == 8
    # The caller's (server's) model is untouched.
    after = dict(bundle.model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(before[n], after[n]) for n in before)
    # Under FedAvg the delta also holds only the adapters.
    fed = compute_update(bundle.model, _batch(bundle), training=training, defense=FedAvg(lr=0.1))
    assert set(fed) == set(update) and fed.kind == "fedavg-delta"


def test_lora_restricted_to_dager_parameters_shares_only_targeted_adapters(tiny):
    bundle = tiny("llama")
    update = compute_update(
        bundle.model, _batch(bundle), parameters=required_parameters(bundle), training=parse_client(["lora:r=4"])
    )
    # Block 0 and 1 q/k/v adapters; the MLP weights DAGER would read are frozen: not shared.
    assert len(update) == 2 * 3 * 2 and not any("mlp" in k for k in update)


@pytest.mark.parametrize("r", [2, 5, 32])
def test_rank_of_the_lora_a_gradient_is_min_r_and_distinct_inputs(tiny, r):
    from dager.span import span_of

    bundle = tiny("gpt2")
    batch = _batch(bundle)
    name = "transformer.h.0.attn.c_attn.weight"
    # The distinct layer inputs that carry gradient: the full gradient's rank (DAGER's rule).
    distinct = span_of(compute_update(bundle.model, batch)[name]).rank
    assert 10 <= distinct <= int(batch.attention_mask.sum())
    update = compute_update(bundle.model, batch, training=ClientTraining(lora=LoraSpec(r=r)))
    grad_a = update[adapter_key(name, "A")]  # (r, d)
    assert span_of(grad_a.T).rank == min(r, distinct)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_dager_recovers_a_tiny_batch_from_a_lora_update_with_large_r(tiny, model_type):
    bundle = tiny(model_type)
    training = ClientTraining(lora=LoraSpec(r=32))
    update = compute_update(bundle.model, _batch(bundle), parameters=required_parameters(bundle), training=training)
    result = _attack(bundle, update, training)
    assert sorted(result.sentences) == sorted(SENTS) and all(result.exact)
    assert not result.over_capacity


def test_lora_rank_below_the_inputs_is_the_capacity_verdict(tiny):
    # 13 distinct inputs, r = 4: the A gradient's rank is capped at 4 (k r = 12 for llama's q/k/v).
    for model_type, cap in (("gpt2", 4), ("llama", 12)):
        bundle = tiny(model_type)
        training = ClientTraining(lora=LoraSpec(r=4))
        update = compute_update(bundle.model, _batch(bundle), parameters=required_parameters(bundle), training=training)
        result = _attack(bundle, update, training)
        assert result.rank <= cap and result.over_capacity and result.sentences == ()


# ------------------------------------------------------------------------- precision, dropout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_update_is_in_that_dtype_and_layer1_still_finds_the_tokens(tiny, precision):
    """The shared update is in the client's dtype; the layer-1 filter still accepts the
    batch's tokens (their distance is at the dtype's round-off, the vocabulary's far above).
    Whole sentences are checked in tests/test_client_precision.py."""
    bundle = tiny("gpt2")
    batch = _batch(bundle)
    update = compute_update(bundle.model, batch, parameters=required_parameters(bundle),
                            training=ClientTraining(precision=precision))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert all(g.dtype == dtype for g in update.values()) and update.info["precision"] == precision
    ids = batch.input_ids[batch.attention_mask.bool()].tolist()
    accepted: set[int] = set()
    for event in iter_dager(bundle, update):
        if isinstance(event, TokensFiltered):
            accepted |= set(event.token_ids.tolist())
    assert set(ids) <= accepted


@functools.cache
def test_dropout_is_seeded_and_changes_the_update(tiny):
    bundle = dropout_bundle("gpt2")
    batch = _batch(bundle)
    names = required_parameters(bundle)
    on = ClientTraining(dropout=True)
    u1 = compute_update(bundle.model, batch, parameters=names, training=on, seed=3)
    u2 = compute_update(bundle.model, batch, parameters=names, training=on, seed=3)
    off = compute_update(bundle.model, batch, parameters=names)
    assert all(torch.equal(u1[n], u2[n]) for n in names)  # same seed, same masks
    assert not all(torch.equal(u1[n], off[n]) for n in names)  # dropout did act
    assert not bundle.model.training  # the caller's model stays in eval mode


def test_dropout_on_llama_keeps_the_layer1_token_bag(tiny):
    """Llama has no embedding dropout: block 0's inputs, and so the layer-1 filter, are
    unchanged by the client's dropout; the attention dropout inside block 0 is solved for
    through block 0's output projection (dager.dropout_search), so the sentences come
    back certified (README: dropout)."""
    bundle = dropout_bundle("llama")
    batch = _batch(bundle)
    update = compute_update(bundle.model, batch, parameters=required_parameters(bundle, dropout=True),
                            training=ClientTraining(dropout=True))
    accepted: set[int] = set()
    warnings, recovered = [], []
    for event in iter_dager(bundle, update):
        if isinstance(event, TokensFiltered):
            accepted |= set(event.token_ids.tolist())
        elif isinstance(event, AttackWarning):
            warnings.append(event)
        elif isinstance(event, SentenceRecovered):
            recovered.append(event)
    assert set(batch.input_ids[batch.attention_mask.bool()].tolist()) <= accepted
    assert update.info["dropout_rate"] == pytest.approx(0.1)  # the server knows the rate it set
    assert not [w for w in warnings if w.code == WarningCode.DROPOUT]
    truth = {bundle.decode(row[m.bool()].tolist()) for row, m in zip(batch.input_ids, batch.attention_mask)}
    assert {r.text for r in recovered if r.exact} == truth


def test_dropout_at_the_models_own_rate_of_zero_stays_certified(tiny):
    """The embedded models train with dropout 0: train mode changes nothing, and the
    exact flags stand (no dropout warning)."""
    bundle = tiny("gpt2")
    batch = _batch(bundle)
    update = compute_update(bundle.model, batch, parameters=required_parameters(bundle),
                            training=ClientTraining(dropout=True))
    assert update.info["dropout_rate"] == 0.0
    events = list(iter_dager(bundle, update))
    assert not any(isinstance(e, AttackWarning) and e.code == WarningCode.DROPOUT for e in events)
    texts = {e.text for e in events if isinstance(e, SentenceRecovered) and e.exact}
    assert texts == set(bundle.decode(row[m.bool()].tolist()) for row, m in zip(batch.input_ids, batch.attention_mask))


# -------------------------------------------------------------------------------- FedAvg


def test_fedavg_epochs_are_full_passes_over_minibatches(tiny):
    f = parse_defense("fedavg:epochs=2,minibatch=2,lr=1e-4")
    assert f == FedAvg(epochs=2, minibatch_size=2, lr=1e-4) and parse_defense(f.name) == f
    assert f.steps_for(8) == 8 and f.steps_for(5) == 6  # 2 * ceil(B / 2)
    assert parse_defense("fedavg:steps=8,lr=1e-4,minibatch=2") == FedAvg(local_steps=8, lr=1e-4, minibatch_size=2)
    bundle = tiny("gpt2")
    update = compute_update(bundle.model, bundle.encode(SENTS * 2, seed=0), defense=f)
    assert update.info["local_steps"] == 4 and update.info["epochs"] == 2  # B = 4: 2 x 2 minibatches
    # epochs=1 over one minibatch of the full batch is one step: lr * gradient.
    one = compute_update(bundle.model, _batch(bundle), defense=FedAvg(epochs=1, lr=0.1))
    grad = compute_update(bundle.model, _batch(bundle))
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.allclose(one[name], 0.1 * grad[name], atol=1e-7)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("fedavg:epochs=2,steps=4,lr=1e-4", "not both"),
        ("fedavg:epochs=0,lr=1e-4", "epochs from 1"),
        ("fedavg:epochs=2,lr=-1e-4", "finite number > 0"),
        ("fedavg:epochs=2,lr=inf", "finite number"),
    ],
)
def test_bad_fedavg_specs_are_one_sentence(spec, needle):
    with pytest.raises(InvalidConfigError, match=needle):
        parse_defense(spec)


def test_fedavg_minibatch_larger_than_the_batch_is_refused(tiny):
    bundle = tiny("gpt2")
    with pytest.raises(InvalidConfigError, match="minibatch of 4 is larger than the client's batch of 2"):
        compute_update(bundle.model, _batch(bundle), defense=FedAvg(epochs=1, minibatch_size=4, lr=1e-4))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_fedavg_over_minibatches_recovers_every_sequence_of_a_tiny_client(tiny, model_type):
    bundle = tiny(model_type)
    sentences = [*SENTS, "Hello private world.", "Gradients leak data."]
    update = compute_update(
        bundle.model, bundle.encode(sentences, seed=0), parameters=required_parameters(bundle),
        defense=parse_defense("fedavg:epochs=2,minibatch=2,lr=1e-4"),
    )
    result = run_dager(bundle, update)
    assert sorted(result.sentences) == sorted(sentences) and all(result.exact)


# ------------------------------------------------------------------------------------ CLI


@functools.cache
def _tiny(name: str, task: str):
    return tiny_bundle(name, task)


@pytest.fixture
def tiny_zoo(monkeypatch):
    monkeypatch.setattr(dager, "load_model", lambda name, task="classification", *, device="cpu":
                        _tiny(name.removeprefix("tiny-"), task))


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lora_client_is_recovered_and_recorded(tmp_path, capsys, tiny_zoo):
    path = tmp_path / "in.txt"
    path.write_text("\n".join(SENTS) + "\n", encoding="utf-8")
    out = tmp_path / "r.json"
    code, _, err = _run(["--model", "tiny-gpt2", "--input", path, "--batch-size", 2, "--output", out,
                         "--client", "lora:r=32", "--defense", "fedavg:epochs=1,minibatch=1,lr=1e-4", "-q"], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["exact_match"] == 1.0
    assert report["client"] == "lora:r=32" and report["lora"]["r"] == 32 and report["precision"] == "fp32"
    assert report["dropout"] is False and "LoRA adapters of rank 32" in report["client_description"]
    assert report["defense"] == ["fedavg:epochs=1,minibatch=1,lr=1e-4"]


def test_cli_precision_and_dropout_flags_reach_the_json(tmp_path, capsys, tiny_zoo):
    path = tmp_path / "in.txt"
    path.write_text("\n".join(SENTS) + "\n", encoding="utf-8")
    out = tmp_path / "r.json"
    code, _, err = _run(["--model", "tiny-llama", "--input", path, "--batch-size", 2, "--output", out,
                         "--precision", "bf16", "--dropout", "-q"], capsys)
    assert code in (0, 1), err
    report = json.loads(out.read_text())
    assert report["precision"] == "bf16" and report["dropout"] is True and report["client"] == "bf16 + dropout"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--client", "lora:r=0"], "at least 1"),
        (["--client", "lora:r=65"], "larger than the adapted layers' width d=64"),
        (["--client", "lora:targets=nope"], "LoRA target 'nope' names no linear module"),
        (["--defense", "fedavg:epochs=1,minibatch=3,lr=1e-4"], "minibatch of 3 is larger than a client batch of 2"),
        (["--defense", "fedavg:epochs=1,lr=nan"], "finite number"),
        (["--precision", "fp8"], "invalid choice"),
    ],
)
def test_cli_bad_client_input_is_one_line_and_nothing_runs(extra, needle, tmp_path, capsys, tiny_zoo):
    path = tmp_path / "in.txt"
    path.write_text("\n".join(SENTS) + "\n", encoding="utf-8")
    out = tmp_path / "r.json"
    code, _, err = _run(["--model", "tiny-gpt2", "--input", path, "--batch-size", 2, "--output", out, *extra], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_dlg_cli_records_the_setup_and_refuses_lora(tmp_path, capsys, tiny_zoo):
    from dlg import cli as dlg_cli

    path = tmp_path / "in.txt"
    path.write_text("\n".join(SENTS) + "\n", encoding="utf-8")
    out = tmp_path / "r.json"
    base = ["text", "--model", "tiny-gpt2", "--input", path, "--batch-size", 2, "--iterations", 2, "--output", out]
    code = dlg_cli.main([str(a) for a in [*base, "--client", "lora:r=8"]])
    err = capsys.readouterr().err
    assert code == 2 and "LoRA clients are attacked by DAGER" in err and not out.exists()
    code = dlg_cli.main([str(a) for a in [*base, "--dropout"]])
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["dropout"] is True and report["client"] == "dropout" and report["lora"] is None


def test_dropout_rate_sets_every_dropout_of_the_client_copy_only(tiny):
    t = parse_client(["dropout:p=0.1"])
    assert t.dropout and t.dropout_rate == 0.1 and parse_client([t.name]) == t
    with pytest.raises(InvalidConfigError, match=r"in \[0, 1\)"):
        parse_client(["dropout:p=1.5"])
    bundle = tiny("gpt2")  # built with dropout 0: without a rate, train mode changes nothing
    batch = _batch(bundle)
    names = required_parameters(bundle)
    plain = compute_update(bundle.model, batch, parameters=names)
    zero = compute_update(bundle.model, batch, parameters=names, training=ClientTraining(dropout=True))
    rated = compute_update(bundle.model, batch, parameters=names, training=t)
    assert all(torch.equal(plain[n], zero[n].to(plain[n].dtype)) or torch.allclose(plain[n], zero[n]) for n in names)
    assert not all(torch.allclose(plain[n], rated[n]) for n in names)
    assert all(m.p == 0.0 for m in bundle.model.modules() if isinstance(m, torch.nn.Dropout))


def test_dager_sweep_runs_under_a_lora_client(tmp_path, capsys, tiny_zoo):
    import csv

    path = tmp_path / "in.txt"
    path.write_text("\n".join(SENTS) + "\n", encoding="utf-8")
    out = tmp_path / "s.csv"
    code = cli.main(["sweep", "--model", "tiny-gpt2", "--input", str(path), "--batch-size", "2",
                     "--grid", "noise", "--values", "0,1", "--csv", str(out), "--client", "lora:r=32"])
    capsys.readouterr()
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert float(rows[0]["exact_match"]) == 1.0 and float(rows[1]["exact_match"]) < 1.0


def test_lora_verdict_also_reads_block_1_whose_inputs_are_the_distinct_prefixes(tiny):
    """Two sentences differing in one word: 9 distinct (token, position) inputs at layer 1
    but 11 distinct prefixes at block 1. With r = 10 layer 1 fits and block 1 does not:
    the verdict says over capacity (a best effort); with r = 16 both fit, exact and not flagged."""
    bundle = tiny("gpt2")
    sentences = ["The cat sat on the mat today.", "The cat sat on the rug today."]
    batch = bundle.encode(sentences, seed=0)
    for r, over in ((10, True), (16, False)):
        training = ClientTraining(lora=LoraSpec(r=r))
        update = compute_update(bundle.model, batch, parameters=required_parameters(bundle), training=training)
        result = _attack(bundle, update, training)
        assert result.rank == 9 and result.over_capacity is over
    assert sorted(result.sentences) == sorted(sentences) and all(result.exact)


def test_a_half_precision_overflow_is_refused_not_shared(tiny, monkeypatch):
    """An fp16 client whose gradient overflows (NaN) shares nothing: the update is refused."""
    import fedclient.client as client

    real = client.fedsgd_gradient
    monkeypatch.setattr(client, "fedsgd_gradient",
                        lambda *a, **k: {n: g * float("nan") for n, g in real(*a, **k).items()})
    with pytest.raises(InvalidConfigError, match="fp16 client's update overflowed .*: use --precision bf16 or fp32"):
        compute_update(tiny("gpt2").model, _batch(tiny("gpt2")), training=ClientTraining(precision="fp16"))
