"""Client-side defenses against gradient leakage, written once for every attack.

Each defense is a frozen dataclass validated in ``__post_init__`` (bad values raise
:class:`~fedclient.errors.InvalidConfigError` with a sentence saying what to change) and
a callable that fits :class:`fedclient.client.Defense`::

    defense(model, batch, parameters=names, generator=g) -> SharedUpdate

so it plugs into ``compute_update(model, batch, defense=..., seed=...)``. All randomness
comes from ``generator`` (seeded by ``compute_update``'s ``seed``).

Three roles, which :class:`Compose` orders, one module each:

* **computing** defenses change how the update is computed (:mod:`.computing`):
  :class:`DPSGD`, :class:`FedAvg` (at most one, first; without one the update is the
  FedSGD gradient);
* **transforming** defenses change a finished update (:meth:`transform`,
  :mod:`.transforms`): :class:`GaussianNoise`, :class:`Prune`, :class:`RandomMask`,
  :class:`Quantize`, applied in the order given; called alone they transform the FedSGD
  gradient;
* **aggregating** (:mod:`.aggregation`): :class:`SecureAggregation` (at most one, last):
  every simulated client runs everything before it, and the server sees only the sum.

:mod:`.compose` orders them, :mod:`.spec` parses spec strings (every defense's ``name``
is its canonical spec, and ``parse_defense(d.name) == d``), :mod:`.utility` measures the
utility cost, and :mod:`.base` holds what they share. Each defense describes itself
(``d.describe()``); :func:`describe` also covers ``None`` and custom defenses.
"""

from __future__ import annotations

from fedclient.defenses.aggregation import OTHER_CLIENTS, SecureAggregation, random_batch_like
from fedclient.defenses.base import (
    MAX_CLIENTS,
    MAX_DP_STEPS,
    MAX_LOCAL_STEPS,
    MAX_MINIBATCH,
    MAX_SCALE,
    Describing,
    UpdateTransform,
    describe,
    fedsgd_update,
)
from fedclient.defenses.compose import Compose, compose
from fedclient.defenses.computing import CLIP_SCOPES, DPSGD, FedAvg
from fedclient.defenses.spec import SPEC_FORMS, epsilon_of, parse_defense, parse_defenses
from fedclient.defenses.transforms import (
    PRECISIONS,
    PRUNE_SCOPES,
    GaussianNoise,
    Prune,
    Quantize,
    RandomMask,
    int8_round_trip,
)
from fedclient.defenses.utility import utility_cost

__all__ = [
    "CLIP_SCOPES",
    "MAX_CLIENTS",
    "MAX_DP_STEPS",
    "MAX_LOCAL_STEPS",
    "MAX_MINIBATCH",
    "MAX_SCALE",
    "OTHER_CLIENTS",
    "PRECISIONS",
    "PRUNE_SCOPES",
    "SPEC_FORMS",
    "DPSGD",
    "Compose",
    "Describing",
    "FedAvg",
    "GaussianNoise",
    "Prune",
    "Quantize",
    "RandomMask",
    "SecureAggregation",
    "UpdateTransform",
    "compose",
    "describe",
    "epsilon_of",
    "fedsgd_update",
    "int8_round_trip",
    "parse_defense",
    "parse_defenses",
    "random_batch_like",
    "utility_cost",
]
