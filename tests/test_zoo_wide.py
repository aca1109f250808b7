"""The Llama-2-7B-width model's recipe, built at a tiny width (the full one is 2.5 GB).

``llama2-7b-width-random`` is :func:`dager.zoo.build_llama_width_random` with
:data:`dager.zoo.LLAMA2_7B_WIDTH`; these tests build the same recipe with a small
:class:`dager.zoo.LlamaShape` and attack it. The full-width run lives in
``benchmarks/dager_bench.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch

import dager
from dager.families import family_for
from dager.zoo import EMBEDDED, LLAMA2_7B_WIDTH, LlamaShape, ModelBundle, build_llama_width_random
from fedclient import compute_update

TINY = LlamaShape(hidden_size=128, num_heads=4, intermediate_size=344, max_positions=256)
"""The same recipe (two blocks, RoPE, RMSNorm, SwiGLU, BOS) at d=128."""

SENTENCES = [
    "The dog chased the ball across the yard.",
    "The dog slept under the kitchen table.",
    "Mary gave the book to her brother.",
    "It rained all afternoon in Leeds, 3 days in a row.",
]


@functools.cache
def _tiny_wide(task: str) -> ModelBundle:
    model, tok = build_llama_width_random(task, TINY)
    return ModelBundle(
        name="tiny-llama2-width", task=task, model=model.eval(), tokenizer=tok,
        family=family_for("llama"), pretrained=False, description="tiny build of the wide recipe",
    )


def test_registered_lazily_with_an_honest_description():
    spec = EMBEDDED["llama2-7b-width-random"]
    assert not spec.pretrained
    text = spec.description.lower()
    assert "random" in text and "two decoder blocks" in text and "span" in text
    assert "llama2-7b-width-random" in dager.embedded_models()
    # Llama-2-7B's width; only the two blocks DAGER reads.
    assert (LLAMA2_7B_WIDTH.hidden_size, LLAMA2_7B_WIDTH.num_heads, LLAMA2_7B_WIDTH.intermediate_size) == (
        4096, 32, 11008,
    )
    assert LLAMA2_7B_WIDTH.num_layers == 2


def test_tiny_build_follows_the_recipe():
    bundle = _tiny_wide("classification")
    config = bundle.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (128, 4, 344)
    assert config.num_hidden_layers == 2 and len(bundle.model.model.layers) == 2
    assert config.num_key_value_heads == config.num_attention_heads
    assert bundle.tokenize("Hello private world") == [50256, 15496, 2839, 995]  # BOS first
    # transformers' Llama init: RMSNorm scales one, the padding (= BOS) row zero, matrices ~ N(0, 0.02^2).
    assert torch.equal(bundle.model.model.norm.weight, torch.ones(128))
    emb = bundle.model.model.embed_tokens.weight
    assert torch.count_nonzero(emb[bundle.pad_token_id]) == 0
    assert abs(float(emb.detach().std()) - 0.02) < 0.001


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = build_llama_width_random("classification", TINY, seed=0)
    b, _ = build_llama_width_random("classification", TINY, seed=0)
    c, _ = build_llama_width_random("classification", TINY, seed=1)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["model.layers.0.self_attn.q_proj.weight"], pc["model.layers.0.self_attn.q_proj.weight"])


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_llama_width_random("classification", TINY)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("task", ["classification", "next-token"])
def test_dager_recovers_a_batch_exactly(task):
    bundle = _tiny_wide(task)
    batch = bundle.encode(SENTENCES, seed=0)
    update = compute_update(bundle.model, batch, parameters=dager.required_parameters(bundle))
    result = dager.run_dager(bundle, update)
    assert sorted(result.sentences) == sorted(SENTENCES)
    assert all(result.exact)


def test_shape_is_validated():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        LlamaShape(hidden_size=100, num_heads=8)
    with pytest.raises(ValueError, match="two decoder blocks"):
        LlamaShape(num_layers=1)


def test_model_cache_is_bounded_by_bytes(monkeypatch, tiny):
    """Least recently used models leave once the weights pass the byte bound (issue 14)."""
    from dager import zoo

    tiny_bundle = tiny

    built = []

    def fake(name, task, device):  # noqa: ANN001
        built.append((name, task))
        return tiny_bundle("gpt2", task)

    monkeypatch.setattr(zoo, "_load_uncached", fake)
    monkeypatch.setattr(zoo, "_CACHE", type(zoo._CACHE)())
    one = zoo._weight_bytes(tiny_bundle("gpt2").model)
    monkeypatch.setattr(zoo, "MODEL_CACHE_BYTES", int(2.5 * one))  # room for two
    a = zoo.load_model("a")
    assert zoo.load_model("a") is a and built == [("a", "classification")]  # cached
    zoo.load_model("b")
    zoo.load_model("a")  # a is now the most recently used
    zoo.load_model("c")  # evicts b, the least recently used
    assert list(zoo._CACHE) == [("a", "classification", "cpu"), ("c", "classification", "cpu")]
    zoo.load_model("b")
    assert built.count(("b", "classification")) == 2  # b was loaded again
