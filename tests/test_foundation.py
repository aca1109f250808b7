"""Foundation: offline zoo, tokenizer parity, the simulated client, input errors."""

from __future__ import annotations

import pytest
import torch

import dager
from dager.zoo import gpt2_tokenizer
from fedclient import (
    EmptyBatchError,
    EmptySentenceError,
    HubUnreachableError,
    SequenceTooLongError,
    UnknownModelError,
    UnsupportedTaskError,
    compute_update,
)


def test_gpt2_tokenizer_parity():
    assert gpt2_tokenizer()("Hello private world")["input_ids"] == [15496, 2839, 995]
    assert len(gpt2_tokenizer()) == 50257


@pytest.mark.parametrize(
    ("name", "task", "width"),
    [
        ("gpt2-small-random", "classification", 768),
        ("gpt2-small-random", "next-token", 768),
        ("llama-small-random", "classification", 768),
        ("minilm-l6", "classification", 384),
    ],
)
def test_embedded_models_load_offline_and_run(name, task, width):
    bundle = dager.load_model(name, task)
    assert bundle.hidden_size == width
    batch = bundle.encode(["Hello private world", "Gradients leak data."])
    with torch.no_grad():
        out = bundle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    expected_last = 2 if task == "classification" else len(bundle.tokenizer)
    assert out.logits.shape[-1] == expected_last
    assert torch.isfinite(out.logits).all()
    assert dager.load_model(name, task) is bundle  # cached, loaded once


def test_minilm_is_pretrained_and_its_tokenizer_wraps_cls_sep():
    bundle = dager.load_model("minilm-l6")
    assert bundle.pretrained
    ids = bundle.tokenize("hello world")
    assert ids[0] == bundle.tokenizer.cls_token_id and ids[-1] == bundle.tokenizer.sep_token_id


def test_next_token_appends_eos_and_llama_prepends_bos(tiny):
    gpt = tiny("gpt2", "next-token")
    assert gpt.tokenize("Hello private world") == [15496, 2839, 995, 50256]
    llama = tiny("llama", "classification")
    assert llama.tokenize("Hello private world") == [50256, 15496, 2839, 995]


def test_right_padding_and_labels(tiny):
    bundle = tiny("gpt2", "next-token")
    batch = bundle.encode(["Hello private world", "Hi"])
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.labels[1].tolist()[2:] == [-100, -100]


def test_gradients_keyed_by_name_and_deterministic(tiny):
    bundle = tiny("gpt2")
    batch = bundle.encode(["Hello private world", "Gradients leak data."], seed=3)
    a = compute_update(bundle.model, batch, seed=3)
    b = compute_update(bundle.model, batch, seed=3)
    names = {n for n, _ in bundle.model.named_parameters()}
    assert set(a) == names
    for n in a:
        assert torch.equal(a[n], b[n])
    assert a.batch_size == 2 and a.task == "classification"


def test_restricted_update_holds_only_requested_names(tiny):
    bundle = tiny("gpt2")
    batch = bundle.encode(["Hello private world"])
    full = compute_update(bundle.model, batch)
    name = "transformer.h.0.attn.c_attn.weight"
    part = compute_update(bundle.model, batch, parameters=[name])
    assert list(part) == [name]
    assert torch.allclose(part[name], full[name])
    with pytest.raises(KeyError):
        compute_update(bundle.model, batch, parameters=["no.such.weight"])


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_dager_premise_rank_equals_distinct_layer1_inputs(tiny, model_type):
    """The layer-1 attention-weight gradient has rank = number of distinct inputs."""
    bundle = tiny(model_type, d=64)
    sentences = ["the cat sat on the mat", "a dog ran", "the cat sat"]
    batch = bundle.encode(sentences, labels=[0, 1, 1])
    if model_type == "gpt2":
        name = "transformer.h.0.attn.c_attn.weight"  # (d, 3d): rows indexed by the input
        grad = compute_update(bundle.model, batch, parameters=[name])[name]
        matrix = grad.T  # (3d, d)
    else:
        name = "bert.encoder.layer.0.attention.self.query.weight"  # (d, d): columns = input
        grad = compute_update(bundle.model, batch, parameters=[name])[name]
        matrix = grad
    sv = torch.linalg.svdvals(matrix.double())
    rank = int((sv > 1e-6 * sv[0]).sum())
    pairs = {
        (int(t), p)
        for row, m in zip(batch.input_ids, batch.attention_mask)
        for p, (t, keep) in enumerate(zip(row, m))
        if keep
    }
    assert rank == len(pairs)


def test_unknown_model_offline_fails_fast_and_lists_embedded():
    with pytest.raises(HubUnreachableError) as err:
        dager.load_model("someone/some-model")
    message = str(err.value)
    assert "unreachable" in message and "gpt2-small-random" in message
    assert isinstance(err.value, UnknownModelError) and isinstance(err.value, ValueError)


def test_empty_batch_and_blank_sentence(tiny):
    bundle = tiny("gpt2")
    with pytest.raises(EmptyBatchError):
        bundle.encode([])
    with pytest.raises(EmptySentenceError, match="Sentence 2 is empty"):
        bundle.encode(["fine", "   "])


def test_sentence_longer_than_context(tiny):
    bundle = tiny("gpt2")
    with pytest.raises(SequenceTooLongError, match="shorten it"):
        bundle.encode(["word " * 200])


def test_next_token_on_encoder_is_refused():
    with pytest.raises(UnsupportedTaskError, match="only supports classification"):
        dager.load_model("minilm-l6", "next-token")


def test_every_family_is_declared_once_and_every_table_agrees(tiny):
    """One declaration per family (fedclient.families); DAGER's hooks, the DP mask and the zoo agree."""
    from dager.layers import HOOKS, hooks_for
    from fedclient.batch import TEXT_TASKS
    from fedclient.dp import MASK_KINDS, mask_kind_for
    from fedclient.families import FAMILIES, family_for

    assert set(FAMILIES) == {"gpt2", "llama", "bert"}
    assert set(HOOKS) == set(FAMILIES), "every family needs DAGER layer hooks, and hooks need a family"
    for model_type, family in FAMILIES.items():
        assert family.model_type == model_type and family_for(model_type) is family
        assert set(family.tasks) <= set(TEXT_TASKS) and "classification" in family.tasks
        bundle = tiny(model_type)
        assert bundle.family is family
        assert bundle.context_length == 128  # the family's context_attr names the config's field
        hooks = hooks_for(bundle.model)
        assert type(hooks) is HOOKS[model_type]
        assert hooks.is_decoder == family.is_decoder
        assert mask_kind_for(bundle.model) == MASK_KINDS[model_type] == ("causal" if family.is_decoder else "bidirectional")


def test_an_undeclared_family_is_one_sentence():
    from dager.layers import hooks_for
    from fedclient.errors import UnsupportedModelError

    class Model:
        class config:  # noqa: N801 - quacks like a transformers config
            model_type = "t5"

    with pytest.raises(UnsupportedModelError, match="'t5' are not supported yet; the supported families are bert, gpt2, llama"):
        hooks_for(Model())
