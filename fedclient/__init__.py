"""The simulated federated client, shared by every attack.

It turns a private batch into the update a client would share (FedSGD gradient, or a
defended variant: :mod:`fedclient.defenses`, with DP-SGD internals in :mod:`fedclient.dp`
and attack-agnostic defense sweeps in :mod:`fedclient.sweep`). It imports no attack and
no UI.
"""

from fedclient.batch import TEXT_TASKS, ImageBatch, TextBatch
from fedclient.client import Defense, batch_loss, compute_update, fedsgd_gradient
from fedclient.defenses import (
    DPSGD,
    Compose,
    FedAvg,
    GaussianNoise,
    Prune,
    Quantize,
    RandomMask,
    SecureAggregation,
    compose,
    describe,
    epsilon_of,
    parse_defense,
    parse_defenses,
    utility_cost,
)
from fedclient.errors import (
    EmptyBatchError,
    EmptySentenceError,
    HubUnreachableError,
    InvalidConfigError,
    LabInputError,
    SequenceTooLongError,
    UnknownModelError,
    UnsupportedModelError,
    UnsupportedTaskError,
)
from fedclient.sweep import (
    SweepPoint,
    dp_grid,
    iter_sweep,
    noise_grid,
    plot_sweep,
    prune_grid,
    run_sweep,
    save_plot,
    write_csv,
)
from fedclient.update import SharedUpdate

__all__ = [
    "DPSGD",
    "TEXT_TASKS",
    "Compose",
    "Defense",
    "FedAvg",
    "GaussianNoise",
    "Prune",
    "Quantize",
    "RandomMask",
    "SecureAggregation",
    "EmptyBatchError",
    "EmptySentenceError",
    "HubUnreachableError",
    "ImageBatch",
    "InvalidConfigError",
    "LabInputError",
    "SequenceTooLongError",
    "SharedUpdate",
    "SweepPoint",
    "TextBatch",
    "UnknownModelError",
    "UnsupportedModelError",
    "UnsupportedTaskError",
    "batch_loss",
    "compose",
    "compute_update",
    "describe",
    "dp_grid",
    "epsilon_of",
    "fedsgd_gradient",
    "iter_sweep",
    "noise_grid",
    "parse_defense",
    "parse_defenses",
    "plot_sweep",
    "prune_grid",
    "run_sweep",
    "save_plot",
    "utility_cost",
    "write_csv",
]
