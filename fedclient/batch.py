"""What a client trains on: tokenised text batches and image batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_TASKS = ("classification", "next-token")
"""Text tasks: sequence classification and next-token prediction (causal LM)."""


@dataclass(frozen=True)
class TextBatch:
    """A padded batch of token ids, as the client feeds it to its model.

    Attributes:
        input_ids: ``(B, T)`` token ids, padded on ``padding_side``.
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding.
        labels: ``(B,)`` class ids for classification; ``(B, T)`` next-token targets
            with -100 on padding for next-token prediction.
        task: one of :data:`TEXT_TASKS`.
        padding_side: ``"right"`` or ``"left"``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    task: str
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.task not in TEXT_TASKS:
            raise ValueError(f"task must be one of {TEXT_TASKS}, got {self.task!r}")
        if self.input_ids.shape != self.attention_mask.shape:
            raise ValueError("input_ids and attention_mask must have the same shape")

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> list[int]:
        """Number of real (unpadded) tokens in each example."""
        return [int(n) for n in self.attention_mask.sum(dim=1)]

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            task=self.task,
            padding_side=self.padding_side,
        )


@dataclass(frozen=True)
class ImageBatch:
    """A batch of images for image classification.

    Attributes:
        images: ``(B, C, H, W)`` float pixels in ``[0, 1]``.
        labels: ``(B,)`` class ids, or ``(B, K)`` soft labels (probabilities).
    """

    images: torch.Tensor
    labels: torch.Tensor
    task: str = "image-classification"

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError("images and labels must have the same batch size")

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(images=self.images.to(device), labels=self.labels.to(device))


Batch = TextBatch | ImageBatch
