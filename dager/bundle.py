"""A loaded text model with its tokenizer, family adapter and task (see :mod:`dager.zoo`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dager.families import FamilyAdapter
from fedclient.batch import TextBatch
from fedclient.errors import EmptyBatchError, EmptySentenceError, SequenceTooLongError

NUM_CLASSES = 2
"""Classes of the sequence-classification head (binary, as in DAGER's experiments)."""


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
