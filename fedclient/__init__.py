"""The simulated federated client, shared by every attack.

It turns a private batch into the update a client would share (FedSGD gradient, or a
defended variant). It imports no attack and no UI.
"""

from fedclient.batch import TEXT_TASKS, ImageBatch, TextBatch
from fedclient.client import Defense, batch_loss, compute_update, fedsgd_gradient
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
from fedclient.update import SharedUpdate

__all__ = [
    "TEXT_TASKS",
    "Defense",
    "EmptyBatchError",
    "EmptySentenceError",
    "HubUnreachableError",
    "ImageBatch",
    "InvalidConfigError",
    "LabInputError",
    "SequenceTooLongError",
    "SharedUpdate",
    "TextBatch",
    "UnknownModelError",
    "UnsupportedModelError",
    "UnsupportedTaskError",
    "batch_loss",
    "compute_update",
    "fedsgd_gradient",
]
