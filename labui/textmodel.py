"""What the app needs to know about a text model: which one, which tasks, how its
tokenizer sees text, and an honest line about its weights."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import gradio as gr

from fedclient.errors import LabInputError
from labui import engines, inputs


def model_name(model: str, hub_id: str | None) -> str:
    """The model to load: a checked hub id when one is typed, else the dropdown's.

    Raises:
        HubIdError: the box holds something other than ``owner/name``.
        HubUnreachableError: a hub id while the hub cannot be reached (checked here so
            that no hub id ever reaches the library's local-folder lookup offline).
    """
    hub = inputs.parse_hub_id(hub_id)
    if hub is None:
        return model
    from dager import zoo
    from fedclient.errors import HubUnreachableError

    if not zoo._hub_reachable():
        raise HubUnreachableError(f"Cannot load {hub!r}: the Hugging Face Hub is unreachable from here. "
                                  f"Embedded models that work offline: {', '.join(zoo.EMBEDDED)}.")
    return hub


def task_choices(model: str, task: str) -> object:
    """The task radio for a model: only the tasks its family supports (MiniLM, an
    encoder, has no next-token head), so a run never fails on the task."""
    try:
        tasks = tuple(engines.load_bundle(model, "classification").family.tasks)
    except LabInputError:
        return gr.skip()
    value = task if task in tasks else tasks[0]
    info = ("" if "next-token" in tasks else
            "This model is an encoder: it has no next-token head, so only classification is offered.")
    return gr.Radio(choices=list(tasks), value=value, info=info or None)


def text_scorer(bundle) -> Callable[[Sequence[str], Sequence[str]], object]:  # noqa: ANN001
    """ROUGE / exact match, judged on what the tokenizer can represent."""
    from dager.metrics import evaluate_text, normalizer_for

    return functools.partial(evaluate_text, normalize=normalizer_for(bundle))


def normalize(bundle, text: str) -> str:  # noqa: ANN001
    """``text`` as the tokenizer sees it (e.g. lowercased, accents stripped for BERT).

    The scores' normalisation (:func:`dager.textio.canonical_text`), so what a view
    shows as "as the tokenizer sees it" is what the scores compared.
    """
    from dager.textio import canonical_text

    return canonical_text(bundle, text.strip())


def check_lengths(bundle, sentences: Sequence[str]) -> None:  # noqa: ANN001
    """Refuse sentences the tokenizer cannot represent or longer than the demo's limit.

    The representability rule is the CLI's (:func:`dager.textio.check_text`), so the app
    and the CLI accept the same text (e.g. an emoji on minilm is refused by both).

    Raises:
        UntokenizableTextError: a sentence holds characters the tokenizer cannot represent.
        FormInputError: a sentence is too long, named by its line number.
    """
    from dager.textio import check_text

    for i, s in enumerate(sentences, 1):
        check_text(bundle, s, where=f"sentence {i}")
        n = len(bundle.tokenize(s))
        if n > inputs.MAX_SENTENCE_TOKENS:
            raise inputs.FormInputError(f"Sentence {i} is {n} tokens long; the demo attacks sentences of at most "
                                        f"{inputs.MAX_SENTENCE_TOKENS} tokens. Shorten or split it.")


def model_note(bundle) -> str:  # noqa: ANN001
    """An honest line about the model's weights."""
    if bundle.pretrained:
        return f"ℹ️ {bundle.description}"
    return (f"ℹ️ **Random weights.** {bundle.description} DAGER does not need trained weights: "
            "the leak comes from the gradient's low rank, so the recovery shown here is the same "
            "mechanism as on a trained model.")


def token_text(bundle, token_id: int) -> str:  # noqa: ANN001
    """A token as text. A byte-level BPE piece that is not valid UTF-8 on its own (part
    of an emoji or accented letter) is shown as its bytes, e.g. ``⟨F0 9F⟩``, instead of
    the replacement character the tokenizer's decode gives."""
    text = bundle.tokenizer.decode([int(token_id)])
    if "\ufffd" not in text:
        return text
    piece = bundle.tokenizer.convert_ids_to_tokens(int(token_id))
    raw = _byte_decoder()
    if isinstance(piece, str) and piece and all(c in raw for c in piece):
        return "⟨" + " ".join(f"{raw[c]:02X}" for c in piece) + "⟩"
    return text


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table (Radford et al.'s encoder.py), inverted: the
    printable stand-in character -> the byte it encodes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in table.items()}

