"""Model-family adapters, keyed by ``config.model_type``.

Everything that differs between GPT-2, Llama and BERT lives here, in one small object
per family, so that every checkpoint of a family works and no code branches on a
checkpoint name (the pattern of huggingface/peft). The DAGER engine asks an adapter
for the parameters it needs and for the inputs of the first transformer layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedclient.errors import UnsupportedModelError

FAMILIES: dict[str, FamilyAdapter] = {}


@dataclass(frozen=True)
class FamilyAdapter:
    """How one model family tokenises, pads and exposes its attention layers.

    Attributes:
        model_type: the ``config.model_type`` this adapter serves.
        is_decoder: causal (GPT-2, Llama) or bidirectional encoder (BERT).
        positions: ``"learned"`` absolute position embeddings added to the input
            (GPT-2, BERT) or ``"rope"`` rotary embeddings inside attention (Llama).
        prepend_bos: put the BOS token before every sentence (Llama).
        wrap_cls_sep: the tokenizer adds ``[CLS] ... [SEP]`` itself (BERT).
        eos_for_next_token: append EOS for next-token prediction, so the last real
            token also receives a gradient.
        tasks: the tasks this family supports.
        context_attr: the config attribute holding the context length.
    """

    model_type: str
    is_decoder: bool
    positions: str
    prepend_bos: bool = False
    wrap_cls_sep: bool = False
    eos_for_next_token: bool = True
    tasks: tuple[str, ...] = ("classification", "next-token")
    context_attr: str = "max_position_embeddings"

    def context_length(self, config: object) -> int:
        return int(getattr(config, self.context_attr))


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Register an adapter under its ``model_type`` (later registrations win)."""
    FAMILIES[adapter.model_type] = adapter
    return adapter


def family_for(model_type: str) -> FamilyAdapter:
    """The adapter for a ``config.model_type``.

    Raises:
        UnsupportedModelError: when no adapter serves this family.
    """
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"Models of type {model_type!r} are not supported yet; the supported families "
            f"are {supported}. Pick a checkpoint of one of these families."
        ) from None


register_family(
    FamilyAdapter(
        model_type="gpt2",
        is_decoder=True,
        positions="learned",
        context_attr="n_positions",
    )
)
register_family(
    FamilyAdapter(
        model_type="llama",
        is_decoder=True,
        positions="rope",
        prepend_bos=True,
    )
)
register_family(
    FamilyAdapter(
        model_type="bert",
        is_decoder=False,
        positions="learned",
        wrap_cls_sep=True,
        eos_for_next_token=False,
        tasks=("classification",),
    )
)

