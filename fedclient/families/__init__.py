"""Model families, keyed by ``config.model_type``: one module per family.

Everything that differs between GPT-2, Llama and BERT for the client (tokenisation,
padding, special tokens, tasks, the attention mask) is declared once, in
``fedclient/families/<family>.py`` as ``FAMILY = FamilyAdapter(...)``; this package finds
every such module, so adding a family means adding one file here (and, for DAGER, its
layer hooks in :mod:`dager.layers`). The families live in the client, below the attacks,
because the client's DP-SGD needs their attention masks and fedclient imports no attack.
"""

from __future__ import annotations

import importlib
import pkgutil

from fedclient.errors import UnsupportedModelError
from fedclient.families.base import MASK_KINDS, FamilyAdapter

FAMILIES: dict[str, FamilyAdapter] = {}
"""``model_type`` -> its family (the declared modules, then :func:`register_family`)."""


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Register a family under its ``model_type`` (later registrations win)."""
    FAMILIES[adapter.model_type] = adapter
    return adapter


def family_for(model_type: str) -> FamilyAdapter:
    """The family of a ``config.model_type``.

    Raises:
        UnsupportedModelError: when no family serves this ``model_type``.
    """
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"Models of type {model_type!r} are not supported yet; the supported families "
            f"are {supported}. Pick a checkpoint of one of these families."
        ) from None


def _declared() -> list[FamilyAdapter]:
    """The ``FAMILY`` of every module in this package (tiny modules: no torch)."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        found.append(importlib.import_module(f"{__name__}.{info.name}").FAMILY)
    return found


for _family in _declared():
    register_family(_family)

__all__ = ["FAMILIES", "MASK_KINDS", "FamilyAdapter", "family_for", "register_family"]
