"""Typed events of the DLG attack streams (images and the text baseline).

``iter_dlg`` / ``iter_dlg_text`` yield exactly one start event, then throttled step
events (for images also heartbeats inside long iterations), then exactly one finish
event. Events carry numbers and detached CPU tensors, never PIL images, formatted text
for display or UI objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DlgStarted:
    """The attack is set up.

    Attributes:
        method: ``"dlg"``, ``"idlg"`` or ``"ig"`` (gradient matching, Geiping et al.),
            or ``"dlg-text"`` for the text baseline.
        model: the model name.
        batch_size: examples in the shared update.
        iterations: the iteration budget.
        restarts: number of random restarts.
    """

    method: str
    model: str
    batch_size: int
    iterations: int
    restarts: int = 1


@dataclass(frozen=True)
class LabelsInferred:
    """Labels read analytically from the last layer's gradient (iDLG).

    Attributes:
        labels: ``(B,)`` inferred class ids (order is arbitrary for batches).
        counts: ``(num_classes,)`` inferred count of each class in the batch.
    """

    labels: torch.Tensor
    counts: torch.Tensor


@dataclass(frozen=True)
class DlgStep:
    """Progress of the optimisation (throttled).

    Attributes:
        iteration: 1-based iteration within the current restart.
        restart: 0-based restart index.
        loss: the gradient-matching loss (distance between gradients).
        preview: ``(B, C, H, W)`` current reconstruction in ``[0, 1]``, or ``None``
            when this step carries no frame.
    """

    iteration: int
    restart: int
    loss: float
    preview: torch.Tensor | None = None


@dataclass(frozen=True)
class DlgProgress:
    """A heartbeat inside a long iteration (one L-BFGS step is up to ~25 evaluations).

    Sent when an iteration has run for ``dlg.attack.HEARTBEAT_SECONDS`` without an
    event, so that a face can show progress and stop the run promptly. Nothing on
    screen needs to change.

    Attributes:
        iteration: 1-based iteration under way (within the current restart).
        restart: 0-based restart index.
        evaluations: function evaluations of the optimizer within this iteration so far.
    """

    iteration: int
    restart: int
    evaluations: int


@dataclass(frozen=True)
class DlgResult:
    """The attacker's reconstruction (no ground truth involved).

    Attributes:
        images: ``(B, C, H, W)`` in ``[0, 1]``.
        labels: ``(B,)`` recovered class ids.
        losses: the loss at each iteration of the best restart.
        converged_iteration: the iteration at which early stopping fired, or
            ``None`` when the whole budget ran.
        stop_reason: ``"tolerance"``, ``"plateau"``, ``"budget"`` (the iterations ran
            out), ``"diverged"``, ``"time_budget"`` (the configured time budget ran out;
            the result is the best reconstruction so far) or ``"cancelled"``.
        frames: reconstructions over iterations, for GIF export: ``(iteration, images)``.
        seconds: wall-clock attack time.
    """

    images: torch.Tensor
    labels: torch.Tensor
    losses: tuple[float, ...]
    converged_iteration: int | None
    stop_reason: str
    frames: tuple[tuple[int, torch.Tensor], ...]
    seconds: float


@dataclass(frozen=True)
class DlgFinished:
    """The last event of an image attack."""

    result: DlgResult


@dataclass(frozen=True)
class TextDlgStep:
    """Progress of the text baseline (throttled).

    Attributes:
        iteration: 1-based iteration.
        loss: gradient-matching loss.
        token_ids: ``(B, T)`` current nearest-token decoding.
        texts: decoded current guesses, one per example.
    """

    iteration: int
    loss: float
    token_ids: torch.Tensor
    texts: tuple[str, ...]


@dataclass(frozen=True)
class TextDlgResult:
    """The text baseline's final guesses.

    Attributes:
        sentences: one decoded guess per example.
        token_ids: their token ids.
        losses: the loss at each iteration.
        seconds: wall-clock attack time.
        seq_len: the sequence length the attack used.
        seq_len_source: where it came from: ``"given"`` (the caller's config),
            ``"inferred"`` (read off the shared update's position-embedding gradient)
            or ``"guessed"`` (the attacker's guess, e.g. on RoPE models, which have no
            position embedding).
        stop_reason: ``"budget"`` (every iteration ran), ``"diverged"`` or
            ``"time_budget"`` (the configured time budget ran out; the result is the
            best guess so far).
    """

    sentences: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    losses: tuple[float, ...]
    seconds: float
    seq_len: int | None = None
    seq_len_source: str = "given"
    stop_reason: str = "budget"


@dataclass(frozen=True)
class TextDlgFinished:
    """The last event of a text baseline run."""

    result: TextDlgResult


DlgEvent = DlgStarted | LabelsInferred | DlgStep | DlgProgress | DlgFinished
TextDlgEvent = DlgStarted | TextDlgStep | TextDlgFinished
