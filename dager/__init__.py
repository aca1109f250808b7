"""DAGER: exact recovery of text batches from transformer gradients.

Petrov et al., "DAGER: Exact Gradient Inversion for Large Language Models",
NeurIPS 2024 (arXiv 2405.15586).
"""

# Exports load lazily (PEP 562): importing the package pulls in no torch, so a
# command line can check its arguments, and set the CPU thread policy, before torch loads.
from __future__ import annotations

from typing import TYPE_CHECKING

from fedclient.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "EMBEDDED": "dager.zoo",
    "DagerConfig": "dager.config",
    "IncompleteUpdateError": "dager.attack",
    "iter_dager": "dager.attack",
    "required_parameters": "dager.attack",
    "run_dager": "dager.attack",
    "FAMILIES": "dager.families",
    "FamilyAdapter": "dager.families",
    "ModelBundle": "dager.zoo",
    "embedded_models": "dager.zoo",
    "family_for": "dager.families",
    "load_model": "dager.zoo",
    "register_family": "dager.families",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from dager.zoo import EMBEDDED, ModelBundle, embedded_models, load_model
    from dager.config import DagerConfig
    from dager.attack import IncompleteUpdateError, iter_dager, required_parameters, run_dager
    from dager.families import FAMILIES, FamilyAdapter, family_for, register_family

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
