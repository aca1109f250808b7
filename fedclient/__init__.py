"""The simulated federated client, shared by every attack.

It turns a private batch into the update a client would share (FedSGD gradient, or a
defended variant: the :mod:`fedclient.defenses` package, with DP-SGD internals in :mod:`fedclient.dp`
and attack-agnostic defense sweeps in :mod:`fedclient.sweep`). The model families every
layer shares are declared in :mod:`fedclient.families`, one module each. It imports no
attack and no UI.
"""

# Exports load lazily (PEP 562): importing the package pulls in no torch, so a
# command line can check its arguments, and set the CPU thread policy, before torch loads.
from __future__ import annotations

from typing import TYPE_CHECKING

from fedclient.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "DPSGD": "fedclient.defenses",
    "TEXT_TASKS": "fedclient.batch",
    "Compose": "fedclient.defenses",
    "Defense": "fedclient.client",
    "FedAvg": "fedclient.defenses",
    "GaussianNoise": "fedclient.defenses",
    "Prune": "fedclient.defenses",
    "Quantize": "fedclient.defenses",
    "RandomMask": "fedclient.defenses",
    "SecureAggregation": "fedclient.defenses",
    "EmptyBatchError": "fedclient.errors",
    "EmptySentenceError": "fedclient.errors",
    "HubUnreachableError": "fedclient.errors",
    "ImageBatch": "fedclient.batch",
    "InvalidConfigError": "fedclient.errors",
    "LabInputError": "fedclient.errors",
    "SequenceTooLongError": "fedclient.errors",
    "SharedUpdate": "fedclient.update",
    "SweepPoint": "fedclient.sweep",
    "TextBatch": "fedclient.batch",
    "UnknownModelError": "fedclient.errors",
    "UnsupportedModelError": "fedclient.errors",
    "UnsupportedTaskError": "fedclient.errors",
    "batch_loss": "fedclient.client",
    "compose": "fedclient.defenses",
    "compute_update": "fedclient.client",
    "describe": "fedclient.defenses",
    "dp_grid": "fedclient.sweep",
    "epsilon_of": "fedclient.defenses",
    "fedsgd_gradient": "fedclient.client",
    "iter_sweep": "fedclient.sweep",
    "noise_grid": "fedclient.sweep",
    "parse_defense": "fedclient.defenses",
    "parse_defenses": "fedclient.defenses",
    "plot_sweep": "fedclient.sweep",
    "prune_grid": "fedclient.sweep",
    "run_sweep": "fedclient.sweep",
    "save_plot": "fedclient.sweep",
    "utility_cost": "fedclient.defenses",
    "write_csv": "fedclient.sweep",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from fedclient.defenses import DPSGD, Compose, FedAvg, GaussianNoise, Prune, Quantize, RandomMask, SecureAggregation, compose, describe, epsilon_of, parse_defense, parse_defenses, utility_cost
    from fedclient.batch import TEXT_TASKS, ImageBatch, TextBatch
    from fedclient.client import Defense, batch_loss, compute_update, fedsgd_gradient
    from fedclient.errors import EmptyBatchError, EmptySentenceError, HubUnreachableError, InvalidConfigError, LabInputError, SequenceTooLongError, UnknownModelError, UnsupportedModelError, UnsupportedTaskError
    from fedclient.update import SharedUpdate
    from fedclient.sweep import SweepPoint, dp_grid, iter_sweep, noise_grid, prune_grid, run_sweep
    # plot_sweep, save_plot and write_csv moved to labcli.sweepfiles; fedclient.sweep aliases them.

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
