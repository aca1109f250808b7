"""The text tab's words: the vocabulary explained once, and the engine's warnings as sentences.

Kept apart from the view so the wording can be reviewed (and translated) in one place.
"""

from __future__ import annotations

VOCABULARY = (
    "**Reading the labels.** *span check passed*: every prefix of the sentence lies in the "
    "gradient's span (what the attacker knows, without seeing your text). *matches original*: "
    "the app compared it with what you typed (evaluation only; green means this and nothing "
    "else). *as the tokenizer sees it*: the model cannot represent your text exactly (e.g. "
    "MiniLM lowercases, strips accents and maps emoji to [UNK]), so the comparison uses the "
    "tokenizer's version."
)
"""The one place the text tab's vocabulary is explained (shown under the results)."""

SPAN_FULL = "**The span is full: this defense stopped the exact attack.**"
SPAN_FULL_LORA = ("**The span is full: the LoRA adapters' rank caps what the update can hold, "
                  "which stopped the exact attack.**")

LORA_WARNINGS = {
    "span_full": SPAN_FULL_LORA + " The adapters' gradient reached its rank cap (rank {value:.0f}), so "
    "every token passes the span check and none can be rejected; the attack stopped at the rank step.",
    "over_capacity": "The batch has about as many distinct inputs as the LoRA adapters' rank can hold "
    "(rank {value:.0f}): exact recovery is no longer guaranteed; this is a best effort.",
}
"""The capacity warnings for a LoRA update, whose cap is the adapters' k r, not the model width."""

WARNINGS = {
    "span_full": SPAN_FULL + " The gradient's rank reached the model width (rank {value:.0f}), so "
    "every token passes the span check and none can be rejected; the attack stopped at the rank step.",
    "time_budget": "⏱ The attack reached its time budget ({value:.0f} s) and shows what it found by then.",
    "over_capacity": "The batch has about as many distinct tokens as the model is wide "
    "(rank {value:.0f}): exact recovery is no longer guaranteed; this is a best effort.",
    "budget_exhausted": "The search stopped at its budget ({value:.0f} candidates) before "
    "finishing; some sentences may be missing or incomplete.",
    "combinations_capped": "The encoder search hit its cap on combinations ({value:.0f}).",
    "incomplete": "Some sentences could not be completed exactly ({value:.0f}).",
    "left_padding": "The update was computed on left-padded batches; positions are shifted.",
    "dropout": "The client trained with dropout (rate {value:g}): every layer input carries a random mask, "
    "and not every mask could be solved for here (an input was not found, or the update lacks block 0's "
    "output projection, as a LoRA update does), so no sentence is certified exact; what is shown is a best effort.",
    "unclear_cut": "The half-precision update's spectrum has no clear edge above its rounding noise "
    "(ratio {value:.2g} at the cut): weak true directions may be lost in the rounding, so a sentence "
    "may be cut short; none is certified exact and what is shown is a best effort.",
}
