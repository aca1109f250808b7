"""What a model family declares: one frozen record per ``config.model_type``."""

from __future__ import annotations

from dataclasses import dataclass

from fedclient.errors import InvalidConfigError

MASK_KINDS = ("causal", "bidirectional")
"""Attention patterns a family's 4D mask can encode."""


@dataclass(frozen=True)
class FamilyAdapter:
    """How one model family tokenises, pads and attends: the facts every layer shares.

    Declared once per family, one module each in :mod:`fedclient.families`; keyed by
    ``config.model_type``, never by checkpoint name. The zoo tokenises with it, the
    client's DP-SGD builds attention masks from it, and DAGER's layer hooks
    (:mod:`dager.layers`, registered under the same ``model_type``) must agree with it
    (a test checks they do).

    Attributes:
        model_type: the ``config.model_type`` this family serves.
        is_decoder: causal (GPT-2, Llama) or bidirectional encoder (BERT).
        prepend_bos: put the BOS token before every sentence (Llama).
        wrap_cls_sep: the tokenizer adds ``[CLS] ... [SEP]`` itself (BERT).
        eos_for_next_token: append EOS for next-token prediction, so the last real
            token also receives a gradient.
        tasks: the tasks this family supports.
        context_attr: the config attribute holding the context length.
    """

    model_type: str
    is_decoder: bool
    prepend_bos: bool = False
    wrap_cls_sep: bool = False
    eos_for_next_token: bool = True
    tasks: tuple[str, ...] = ("classification", "next-token")
    context_attr: str = "max_position_embeddings"

    def __post_init__(self) -> None:
        if not self.model_type or not self.tasks:
            raise InvalidConfigError("A model family needs a model_type and at least one task.")

    @property
    def mask_kind(self) -> str:
        """The attention pattern of the family's 4D mask: ``"causal"`` or ``"bidirectional"``."""
        return "causal" if self.is_decoder else "bidirectional"

    def context_length(self, config: object) -> int:
        """The longest sequence a model of this family takes (from its config)."""
        return int(getattr(config, self.context_attr))
