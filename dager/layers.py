"""Per-family layer hooks: which gradients span which layer inputs, and the inputs.

DAGER needs, for each family, three things (Petrov et al. 2024, Sec. 4):

* the parameters whose gradients span the inputs of the first two attention layers
  (and, beyond the paper, of block 0's MLP, used to reject prefixes early);
* the layer-1 inputs of every vocabulary token (the token filter);
* a forward of block 0 that can be run one position at a time for many prefixes
  (decoders: a key/value cache) or on whole sequences (encoders).

Hooks are registered by ``config.model_type`` with :func:`register_hooks`; the engine
never branches on a family name.

The pieces live in their own modules and are re-exported here, so every name keeps
its old import path: the base class and registry in :mod:`dager.hooks_base`, the
layer-1 token filters in :mod:`dager.filters`, the shared decoder step in
:mod:`dager.hooks_decoder`, and one module a family (:mod:`dager.hooks_gpt2`,
:mod:`dager.hooks_llama`, :mod:`dager.hooks_bert`). Importing this module registers
every family.
"""

from __future__ import annotations

from torch import nn

from fedclient.errors import UnsupportedModelError
from fedclient.families import family_for
from dager.filters import (
    BOUND_DIRECTIONS,
    SCREEN,
    VOCAB_CHUNK,
    AdditiveLayerNormFilter,
    ScaleFreeFilter,
    _bound_directions,
    _token_side,
)
from dager.hooks_base import HOOKS, FamilyHooks, register_hooks
from dager.hooks_bert import BertHooks, _bert_row_outputs
from dager.hooks_decoder import QKV_MEMO_BYTES, DecoderHooks, MlpNormTerms, _memo_rows, _softmax_attend
from dager.hooks_gpt2 import GPT2Hooks
from dager.hooks_llama import LlamaHooks, _rotate_half

__all__ = [
    "BOUND_DIRECTIONS",
    "HOOKS",
    "QKV_MEMO_BYTES",
    "SCREEN",
    "VOCAB_CHUNK",
    "AdditiveLayerNormFilter",
    "BertHooks",
    "DecoderHooks",
    "FamilyHooks",
    "GPT2Hooks",
    "LlamaHooks",
    "MlpNormTerms",
    "ScaleFreeFilter",
    "_bert_row_outputs",
    "_bound_directions",
    "_memo_rows",
    "_rotate_half",
    "_softmax_attend",
    "_token_side",
    "hooks_for",
    "register_hooks",
]


def hooks_for(model: nn.Module) -> FamilyHooks:
    """The hooks for a model, chosen by ``model.config.model_type``.

    Raises:
        UnsupportedModelError: no hooks serve this family.
    """
    model_type = family_for(model.config.model_type).model_type  # the declared families decide
    try:
        cls = HOOKS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"DAGER has no layer hooks for models of type {model_type!r}; supported: "
            f"{', '.join(sorted(HOOKS))}. Pick a checkpoint of one of these families."
        ) from None
    return cls(model)
