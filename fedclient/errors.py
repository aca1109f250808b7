"""Errors raised for bad user input, shared by every part of the lab.

Every class subclasses :class:`ValueError`, so callers that only know the standard
library can still catch them; the message always says what to change.
"""

from __future__ import annotations


class LabInputError(ValueError):
    """Base class: the input cannot be used; the message says what to change."""


class EmptyBatchError(LabInputError):
    """The batch holds no examples."""


class EmptySentenceError(LabInputError):
    """A sentence is empty or only whitespace."""


class SequenceTooLongError(LabInputError):
    """A sentence does not fit the model's context window."""


class UnknownModelError(LabInputError):
    """A model name is neither embedded nor loadable from the hub or disk."""


class HubUnreachableError(UnknownModelError):
    """A hub id was given but the Hugging Face Hub cannot be reached."""


class UnsupportedModelError(LabInputError):
    """The model loads, but its family (``config.model_type``) has no adapter."""


class UnsupportedTaskError(LabInputError):
    """The task does not apply to this model (e.g. next-token prediction on an encoder)."""


class InvalidConfigError(LabInputError):
    """A configuration value is out of range."""
