"""What every defense shares: value checks, the FedSGD update, noise, and descriptions.

A defense is a callable that fits :class:`fedclient.client.Defense`; it may also describe
itself in one line (:class:`Describing`), which :func:`describe` uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from fedclient.batch import Batch
from fedclient.client import Defense, fedsgd_gradient
from fedclient.errors import InvalidConfigError
from fedclient.update import SharedUpdate
from fedclient.specvalues import format_number

# Sane ranges of the numbers in defense specs (issue 14): beyond them a value is a typo
# or would only exhaust the machine (a million PRV-accounted DP steps asked Opacus for
# 2.59 TiB). Each bound is far past what the lab's demonstrations or the papers use.
MAX_SCALE = 1e6
"""Largest noise sigma, DP clipping norm and DP noise multiplier."""
MAX_DP_STEPS = 100_000
"""Most DP-SGD steps accounted for (a long real training run; RDP accounts it at once)."""
MAX_LOCAL_STEPS = 10_000
"""Most FedAvg local steps (each is a forward and backward pass of the model)."""
MAX_CLIENTS = 1_000
"""Most clients in a secure aggregation (each simulated client computes an update)."""
MAX_MINIBATCH = 100_000
"""Largest FedAvg minibatch size."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidConfigError(message)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_fmt = format_number  # the one formatter of spec numbers (fedclient.specvalues)


def fedsgd_update(model: torch.nn.Module, batch: Batch, *, parameters: list[str]) -> SharedUpdate:
    """The undefended FedSGD update (what ``compute_update`` shares without a defense)."""
    return SharedUpdate(
        gradients=fedsgd_gradient(model, batch, parameters=parameters),
        batch_size=batch.batch_size,
        task=batch.task,
        padding_side=getattr(batch, "padding_side", "right"),
    )


def _randn_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``t``, drawn on the generator's (CPU) device."""
    noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
    return noise.to(device=t.device, dtype=t.dtype if t.is_floating_point() else torch.float32)


def _with(update: SharedUpdate, gradients: Mapping[str, torch.Tensor], name: str, **info: float | int | str) -> SharedUpdate:
    return update.replace(
        gradients=dict(gradients), defenses=(*update.defenses, name), info={**update.info, **info}
    )


@runtime_checkable
class UpdateTransform(Protocol):
    """A defense that transforms a finished update (noise, pruning, masking, precision)."""

    name: str

    def transform(self, update: SharedUpdate, *, generator: torch.Generator) -> SharedUpdate: ...


@runtime_checkable
class Describing(Protocol):
    """A defense that explains itself in one line (every defense of this package does)."""

    def describe(self) -> str: ...


def describe(defense: Defense | None) -> str:
    """A one-line, human-readable description of a defense (or of none).

    Each defense writes its own line (its ``describe()`` method); a custom defense
    without one is named.
    """
    if defense is None:
        return "No defense: the client shares its plain FedSGD gradient."
    if isinstance(defense, Describing):
        return defense.describe()
    return f"Custom defense {getattr(defense, 'name', type(defense).__name__)}."
