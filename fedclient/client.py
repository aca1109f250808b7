"""The simulated federated client: computes the update it would share.

The client sees its private batch; everything it returns is what a server would see.
Defenses (see :mod:`fedclient.defenses`) plug in at one seam, :func:`compute_update`'s
``defense`` argument, so both attacks meet defended updates through the same code path.

What a defense learns about the private batch while computing the update (e.g. the
fraction of examples DP-SGD clipped) is a client-side diagnostic, not part of the update:
it goes to a :class:`ClientReport` the caller passes to :func:`compute_update`, never
into :class:`~fedclient.update.SharedUpdate` (which holds only what a server sees).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from fedclient.batch import Batch, ImageBatch, TextBatch
from fedclient.update import SharedUpdate

log = logging.getLogger(__name__)


class Defense(Protocol):
    """A client-side defense: turns the undefended computation into the shared update.

    Implementations either transform a finished update (noise, pruning, quantisation)
    or change how it is computed (DP-SGD, FedAvg); both fit this one call.
    """

    @property
    def name(self) -> str:
        """The defense's canonical spec (e.g. ``noise:sigma=0.001``)."""
        ...

    def __call__(
        self,
        model: torch.nn.Module,
        batch: Batch,
        *,
        parameters: list[str],
        generator: torch.Generator,
    ) -> SharedUpdate: ...


@dataclass
class ClientReport:
    """Client-side diagnostics of one :func:`compute_update` call (evaluation and faces only).

    These are statistics of the private batch (e.g. ``clipped_fraction``: the share of
    examples whose gradient DP-SGD clipped), so they are kept apart from the shared
    update: a server never sees them, and an attack must not be given them.

    Attributes:
        diagnostics: name -> value, recorded by the defenses. With secure aggregation
            the attacked client (client 0) records first and its values are kept.
    """

    diagnostics: dict[str, float | int | str] = field(default_factory=dict)

    def record(self, **values: float | int | str) -> None:
        """Record values; a name already recorded keeps its first value."""
        for key, value in values.items():
            self.diagnostics.setdefault(key, value)


_REPORT: ContextVar[ClientReport | None] = ContextVar("fedclient_client_report", default=None)


def record_diagnostics(**values: float | int | str) -> None:
    """Record client-side diagnostics into the report of the running :func:`compute_update`.

    Defenses call this instead of putting private statistics into the update; without
    a report (the caller did not ask) the values are dropped.
    """
    report = _REPORT.get()
    if report is not None:
        report.record(**values)


@contextmanager
def _collecting(report: ClientReport | None) -> Iterator[None]:
    token = _REPORT.set(report)
    try:
        yield
    finally:
        _REPORT.reset(token)


def batch_loss(model: torch.nn.Module, batch: Batch, *, reduction: str = "mean") -> torch.Tensor:
    """The training loss the client minimises on ``batch``.

    Args:
        model: a Hugging Face text model with a task head, or an image classifier.
        batch: the private batch.
        reduction: ``"mean"`` (a scalar, what FedSGD differentiates) or ``"none"``
            (one loss per example, for per-example gradients).

    Returns:
        The loss: a scalar, or ``(B,)`` with ``reduction="none"``.

    Raises:
        ValueError: for an unknown reduction or batch type.
    """
    if isinstance(batch, TextBatch):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = out.logits
        if batch.task == "classification":
            return _reduce(F.cross_entropy(logits, batch.labels, reduction="none"), reduction)
        if batch.task == "next-token":
            # Predict token t+1 from tokens <= t; padding carries label -100.
            shift_logits = logits[:, :-1, :]  # (B, T-1, V)
            shift_labels = batch.labels[:, 1:]  # (B, T-1)
            per_token = F.cross_entropy(
                shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
            )  # (B, T-1)
            counts = (shift_labels != -100).sum()
            if reduction == "mean":
                return per_token.sum() / counts.clamp(min=1)
            if reduction == "none":
                per_example = (shift_labels != -100).sum(dim=1).clamp(min=1)
                return per_token.sum(dim=1) / per_example
            raise ValueError(f"unknown reduction {reduction!r}")
        raise ValueError(f"unknown text task {batch.task!r}")
    if isinstance(batch, ImageBatch):
        logits = model(batch.images)
        if batch.labels.ndim == 1:
            losses = F.cross_entropy(logits, batch.labels, reduction="none")
        else:  # soft labels
            losses = -(batch.labels * F.log_softmax(logits, dim=-1)).sum(dim=-1)
        return _reduce(losses, reduction)
    raise ValueError(f"unknown batch type {type(batch).__name__}")


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "none":
        return losses
    raise ValueError(f"unknown reduction {reduction!r}")


def resolve_parameters(model: torch.nn.Module, parameters: Iterable[str] | None) -> list[str]:
    """The trainable parameter names to share: all of them, or the requested subset.

    Raises:
        KeyError: when a requested name is not a parameter of the model.
    """
    named = dict(model.named_parameters())
    if parameters is None:
        return [n for n, p in named.items() if p.requires_grad]
    names = list(dict.fromkeys(parameters))
    missing = [n for n in names if n not in named]
    if missing:
        raise KeyError(f"the model has no parameters named {missing}")
    return names


def fedsgd_gradient(
    model: torch.nn.Module,
    batch: Batch,
    *,
    parameters: list[str],
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] = batch_loss,
) -> dict[str, torch.Tensor]:
    """The plain FedSGD gradient of the mean batch loss, keyed by parameter name.

    Only the requested parameters' gradients are materialised, which saves memory when
    an attack needs a few layers of a large model. The model is not modified.
    """
    named = dict(model.named_parameters())
    tensors = [named[n] for n in parameters]
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return {
        n: (g if g is not None else torch.zeros_like(t)).detach()
        for n, g, t in zip(parameters, grads, tensors)
    }


def compute_update(
    model: torch.nn.Module,
    batch: Batch,
    *,
    parameters: Iterable[str] | None = None,
    defense: Defense | None = None,
    seed: int = 0,
    report: ClientReport | None = None,
) -> SharedUpdate:
    """Compute the update a federated client would share for ``batch``.

    Args:
        model: the global model the server sent (it is put in eval mode: no dropout,
            so the update is deterministic).
        batch: the client's private batch (text or images).
        parameters: restrict the update to these parameter names (default: all).
        defense: an optional client-side defense; ``None`` shares the raw gradient.
        seed: seeds every random choice a defense makes.
        report: when given, receives the client-side diagnostics of the defenses
            (e.g. DP-SGD's ``clipped_fraction``), which the shared update never holds.

    Returns:
        The shared update, keyed by parameter name.

    Raises:
        EmptyBatchError: for an empty batch.
        KeyError: for a requested parameter the model does not have.
    """
    from fedclient.errors import EmptyBatchError

    if batch.batch_size == 0:
        raise EmptyBatchError("The batch is empty: give the client at least one example.")
    names = resolve_parameters(model, parameters)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    if defense is not None:
        with _collecting(report):
            update = defense(model, batch, parameters=names, generator=generator)
        log.debug("computed a defended update (%s)", ", ".join(update.defenses))
        return update
    grads = fedsgd_gradient(model, batch, parameters=names)
    return SharedUpdate(
        gradients=grads,
        batch_size=batch.batch_size,
        task=batch.task,
        padding_side=getattr(batch, "padding_side", "right"),
    )
