"""Model-family adapters, keyed by ``config.model_type`` (declared in :mod:`fedclient.families`).

Each family is declared once, one module per family under ``fedclient/families/``, so
that the client (DP-SGD's attention masks) and both attacks read the same record; this
module keeps the names DAGER has always exported. DAGER's per-family layer hooks live in
:mod:`dager.layers`, registered under the same ``model_type``.
"""

from __future__ import annotations

from fedclient.families import FAMILIES, FamilyAdapter, family_for, register_family

__all__ = ["FAMILIES", "FamilyAdapter", "family_for", "register_family"]
