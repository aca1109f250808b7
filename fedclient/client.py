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

import copy
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from fedclient.batch import Batch, ImageBatch, TextBatch
from fedclient.update import SharedUpdate

if TYPE_CHECKING:  # pragma: no cover
    from fedclient.training import ClientTraining

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
    training: ClientTraining | None = None,
) -> SharedUpdate:
    """Compute the update a federated client would share for ``batch``.

    Args:
        model: the global model the server sent (it is put in eval mode: no dropout,
            so the update is deterministic; a ``training`` setup works on a copy).
        batch: the client's private batch (text or images).
        parameters: restrict the update to these parameter names (default: all).
        defense: an optional client-side defense; ``None`` shares the raw gradient.
        seed: seeds every random choice a defense makes.
        report: when given, receives the client-side diagnostics of the defenses
            (e.g. DP-SGD's ``clipped_fraction``), which the shared update never holds.
        training: how the client trains (:class:`fedclient.training.ClientTraining`:
            LoRA adapters, precision, dropout); ``None``: every weight, fp32, eval mode.
            With LoRA the update holds the adapters' gradients (or deltas) under
            :func:`fedclient.lora.adapter_key` names, and ``parameters`` names base
            weights whose adapters to share; the update's tensors are in the
            training precision; ``info`` records what the server knows of the setup.

    Returns:
        The shared update, keyed by parameter name.

    Raises:
        EmptyBatchError: for an empty batch.
        KeyError: for a requested parameter the model does not have.
    """
    from fedclient.errors import EmptyBatchError

    if batch.batch_size == 0:
        raise EmptyBatchError("The batch is empty: give the client at least one example.")
    if training is not None and not training.plain:
        return _trained_update(model, batch, parameters, defense, seed, report, training)
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


# ------------------------------------------------------------------ training setups (issue 11)

_PREPARED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[object, torch.nn.Module]] = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def client_model(model: torch.nn.Module, training: ClientTraining) -> torch.nn.Module:
    """The model the client trains under ``training``: a copy, never the caller's model.

    LoRA adapters (peft, seeded), the precision's dtype and the mode (train mode for
    dropout, else eval). One copy per base model is kept (for the last setup asked), so
    a run over many batches prepares it once.
    """
    from fedclient.training import torch_dtype

    with _PREPARED_LOCK:
        hit = _PREPARED.get(model)
        if hit is not None and hit[0] == training:
            return hit[1]
    if training.lora is not None:
        from fedclient.lora import lora_model

        work = lora_model(model, training.lora)
    else:
        work = copy.deepcopy(model)
    work = work.to(torch_dtype(training.precision))
    if training.dropout_rate is not None:
        # The embedded random models are built with dropout 0: a rate makes train mode bite.
        for module, attr in _dropout_sites(work):
            setattr(module, attr, training.dropout_rate)
    work.train(training.dropout)
    with _PREPARED_LOCK:
        _PREPARED[model] = (training, work)
    log.debug("prepared a client model (%s)", training.name)
    return work


@contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Dropout masks drawn from ``seed``, without disturbing the caller's random state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _cast_batch(batch: Batch, dtype: torch.dtype) -> Batch:
    if isinstance(batch, ImageBatch) and batch.images.dtype != dtype:
        labels = batch.labels.to(dtype) if batch.labels.is_floating_point() else batch.labels
        return dataclasses.replace(batch, images=batch.images.to(dtype), labels=labels)
    return batch


def _trained_update(
    model: torch.nn.Module,
    batch: Batch,
    parameters: Iterable[str] | None,
    defense: Defense | None,
    seed: int,
    report: ClientReport | None,
    training: ClientTraining,
) -> SharedUpdate:
    """:func:`compute_update` for a non-plain training setup (LoRA, half precision, dropout)."""
    from fedclient.training import info_of, torch_dtype

    requested = None if parameters is None else resolve_parameters(model, parameters)
    work = client_model(model, training)
    if training.lora is not None:
        from fedclient.lora import shared_key, shared_parameters

        names = shared_parameters(work, requested)
    else:
        names = resolve_parameters(work, requested)
    batch = _cast_batch(batch, torch_dtype(training.precision))
    generator = torch.Generator().manual_seed(seed)
    device = next(work.parameters()).device
    with _seeded_rng(seed, device), _collecting(report):
        if defense is not None:
            update = defense(work, batch, parameters=names, generator=generator)
        else:
            update = SharedUpdate(
                gradients=fedsgd_gradient(work, batch, parameters=names),
                batch_size=batch.batch_size,
                task=batch.task,
                padding_side=getattr(batch, "padding_side", "right"),
            )
    gradients = dict(update.gradients)
    if training.precision != "fp32" and not all(bool(torch.isfinite(g).all()) for g in gradients.values()):
        from fedclient.errors import InvalidConfigError

        # A real half-precision client's loss scaler skips such a step; it shares nothing.
        raise InvalidConfigError(
            f"The {training.precision} client's update overflowed (values not finite) on this batch, as a real "
            f"{training.precision} client without loss scaling would: use --precision bf16 or fp32."
        )
    if training.lora is not None:
        gradients = {shared_key(n): g for n, g in gradients.items()}
    info = {**update.info, **info_of(training)}
    if training.dropout:
        info["dropout_rate"] = dropout_rate(work)  # the server set the rates: it knows them
    return update.replace(gradients=gradients, info=info)


def _dropout_sites(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str]]:
    """Every dropout rate in ``model``: ``(module, attribute)`` of ``nn.Dropout`` modules
    (``p``) and of Llama's functional attention dropout (``attention_dropout``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            yield module, "p"
        elif isinstance(getattr(module, "attention_dropout", None), float):
            yield module, "attention_dropout"


def dropout_rate(model: torch.nn.Module) -> float:
    """The highest dropout rate in ``model`` (0 when it has none)."""
    return max((float(getattr(m, attr)) for m, attr in _dropout_sites(model)), default=0.0)
