"""Typed events of the DAGER attack stream (the contract every face consumes).

``iter_dager`` yields exactly one :class:`AttackStarted`, then any number of the step
events below, then exactly one :class:`AttackFinished`. Events carry data (numbers,
token ids, detached CPU tensors), never formatted text for display or UI objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class WarningCode(str, Enum):
    """Stable codes of :class:`AttackWarning` (strings on the wire: JSON, the CLI).

    A ``str`` enum compares equal to its value, so ``code == "incomplete"`` holds, and
    it prints as its value (``f"{code}"`` gives ``"incomplete"``, as ``enum.StrEnum``
    does), so faces that format codes show the stable string.
    """

    __str__ = str.__str__
    __format__ = str.__format__

    OVER_CAPACITY = "over_capacity"
    """The layer-1 rank approaches d: exact recovery is not guaranteed."""
    SPAN_FULL = "span_full"
    """The span is full (rank at capacity): no token can be rejected, so the exact
    attack cannot run; a defense (noise) or too large a batch stopped it."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    """The decoder search kept only its best prefixes (prefix or memory budget)."""
    COMBINATIONS_CAPPED = "combinations_capped"
    """The encoder search evaluated its budget of sequences."""
    TIME_BUDGET = "time_budget"
    """The attack reached its time budget and returned what it had."""
    INCOMPLETE = "incomplete"
    """Some recovered sentences did not pass the exact check."""
    LEFT_PADDING = "left_padding"
    """The client padded on the left (positions shift)."""
    DROPOUT = "dropout"
    """The client trained with dropout on (rate > 0) and the dropout search could not solve
    for every mask (a layer-1 input not found, no attention-output gradient, a LoRA
    update): no sentence is certified exact; every one is reported inexact."""
    UNCLEAR_CUT = "unclear_cut"
    """A half-precision update's spectrum has no clear edge at its rounding level (the
    value: the eigenvalue ratio at the cut): weak true directions may be lost in the
    rounding, so no sentence can be certified exact; every one is reported inexact."""


class StopReason(str, Enum):
    """Why a DAGER run ended (:attr:`DagerResult.stop_reason`); prints as its value."""

    __str__ = str.__str__
    __format__ = str.__format__

    COMPLETE = "complete"
    """The search ran to its end."""
    SPAN_FULL = "span_full"
    """Stopped at the rank step: the span is full (see :attr:`WarningCode.SPAN_FULL`)."""
    TIME_BUDGET = "time_budget"
    """Stopped at the configured time budget; the result holds what was found."""


@dataclass(frozen=True)
class AttackStarted:
    """The attack has read the update and estimated what it can recover.

    Attributes:
        model: the model name.
        task: ``"classification"`` or ``"next-token"``.
        batch_size: examples in the client's batch (the server knows it).
        hidden_size: model width d; the layer-1 span can hold at most d vectors.
        rank: estimated rank of the layer-1 attention-input gradient (about the
            number of distinct (token, position) inputs in the batch).
        over_capacity: True when the rank approaches d, so exact recovery cannot be
            guaranteed; the attack still returns a best effort, flagged.
        parameters: the names of the shared parameters the attack reads.
        capacity: the most distinct inputs the layer-1 span can hold when that is
            below d (a LoRA update: its adapters' k r); ``None``: d.
    """

    model: str
    task: str
    batch_size: int
    hidden_size: int
    rank: int
    over_capacity: bool
    parameters: tuple[str, ...]
    capacity: int | None = None


@dataclass(frozen=True)
class SpectrumComputed:
    """Singular values of one layer's gradient and the rank cut chosen from them.

    Attributes:
        layer: 1 for the first attention layer, 2 for the second.
        singular_values: ``(k,)`` float64, descending.
        rank: how many singular values are kept.
        tolerance: the relative cut used (kept values exceed ``tolerance * max``).
    """

    layer: int
    singular_values: torch.Tensor
    rank: int
    tolerance: float


@dataclass(frozen=True)
class TokensFiltered:
    """Layer-1 filter: vocabulary tokens whose inputs lie in the gradient's span.

    Attributes:
        position: the position checked, or ``None`` for a position-free check
            (RoPE models: one bag of tokens for every position).
        token_ids: ``(n,)`` accepted token ids.
        distances: ``(n,)`` their relative distances to the span.
        threshold: the acceptance threshold on the distance.
        vocab_distances: ``(m,)`` the m smallest distances over the whole vocabulary,
            ascending, for plotting the gap between accepted and rejected tokens.
        vocab_token_ids: ``(m,)`` the token ids of ``vocab_distances``.
        exact_below: distances at or above it are lower bounds (the fast filter reads a
            few random directions off the span; every distance below it, and every
            accepted token's, is exact); ``None``: every distance is exact.
    """

    position: int | None
    token_ids: torch.Tensor
    distances: torch.Tensor
    threshold: float
    vocab_distances: torch.Tensor
    vocab_token_ids: torch.Tensor
    exact_below: float | None = None


@dataclass(frozen=True)
class PrefixesExtended:
    """The search extended its prefixes by one position.

    Attributes:
        position: the position just filled (0-based).
        prefixes: the surviving prefixes (token ids), at most a few hundred.
        num_prefixes: how many prefixes survive in total.
        num_checked: how many candidate extensions were checked.
    """

    position: int
    prefixes: tuple[tuple[int, ...], ...]
    num_prefixes: int
    num_checked: int


@dataclass(frozen=True)
class SearchProgress:
    """Heartbeat of the sequence search, at least every chunk of work.

    It carries no new result; faces use it to show that the search is alive (elapsed
    time against the budget) and to stop a run promptly between events.

    Attributes:
        position: the position being extended (decoders) or the length being
            assembled (encoders, last position); ``None`` when not applicable.
        checked: candidate extensions or sequences evaluated so far at that step.
        seconds: attack time so far.
    """

    position: int | None
    checked: int
    seconds: float


@dataclass(frozen=True)
class SentenceRecovered:
    """One whole sentence recovered.

    Attributes:
        index: order of recovery (not the client's order, which the attacker never sees).
        token_ids: the recovered token ids (with the family's special tokens).
        text: the decoded text.
        exact: True when every prefix passed the exact span check.
        distance: the largest span distance along the sentence.
    """

    index: int
    token_ids: tuple[int, ...]
    text: str
    exact: bool
    distance: float


@dataclass(frozen=True)
class AttackWarning:
    """Something the user should know, e.g. the search budget ran out.

    Attributes:
        code: a stable identifier, one of :class:`WarningCode`.
        value: a number that goes with it (the budget, the rank, ...).
    """

    code: str
    value: float = 0.0


@dataclass(frozen=True)
class DagerResult:
    """What the attacker recovered, with no knowledge of the ground truth.

    Attributes:
        sentences: recovered texts, one per recovered sequence.
        token_ids: their token ids.
        exact: per sentence, whether it passed the exact check.
        rank: the layer-1 rank estimate.
        hidden_size: model width d.
        over_capacity: see :class:`AttackStarted`.
        budget_exhausted: the search stopped at its budget before finishing.
        seconds: wall-clock attack time (not counting the client).
        stop_reason: why the run ended (:class:`StopReason`).
    """

    sentences: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    exact: tuple[bool, ...]
    rank: int
    hidden_size: int
    over_capacity: bool
    budget_exhausted: bool
    seconds: float
    stop_reason: StopReason = StopReason.COMPLETE


@dataclass(frozen=True)
class AttackFinished:
    """The last event: the result."""

    result: DagerResult


DagerEvent = (
    AttackStarted
    | SpectrumComputed
    | TokensFiltered
    | PrefixesExtended
    | SearchProgress
    | SentenceRecovered
    | AttackWarning
    | AttackFinished
)
