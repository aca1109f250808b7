"""DAGER: exact recovery of text batches from transformer gradients.

Petrov et al., "DAGER: Exact Gradient Inversion for Large Language Models",
NeurIPS 2024 (arXiv 2405.15586).
"""

from dager.attack import IncompleteUpdateError, iter_dager, required_parameters, run_dager
from dager.config import DagerConfig
from dager.families import FAMILIES, FamilyAdapter, family_for, register_family
from dager.zoo import EMBEDDED, ModelBundle, embedded_models, load_model

__all__ = [
    "EMBEDDED",
    "DagerConfig",
    "IncompleteUpdateError",
    "iter_dager",
    "required_parameters",
    "run_dager",
    "FAMILIES",
    "FamilyAdapter",
    "ModelBundle",
    "embedded_models",
    "family_for",
    "load_model",
    "register_family",
]
