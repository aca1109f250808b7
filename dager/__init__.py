"""DAGER: exact recovery of text batches from transformer gradients.

Petrov et al., "DAGER: Exact Gradient Inversion for Large Language Models",
NeurIPS 2024 (arXiv 2405.15586).
"""

from dager.families import FAMILIES, FamilyAdapter, family_for, register_family
from dager.zoo import EMBEDDED, ModelBundle, embedded_models, load_model

__all__ = [
    "EMBEDDED",
    "FAMILIES",
    "FamilyAdapter",
    "ModelBundle",
    "embedded_models",
    "family_for",
    "load_model",
    "register_family",
]
