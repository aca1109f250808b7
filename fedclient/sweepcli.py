"""Moved to :mod:`labcli.sweep` (argument parsing belongs to the faces, issue 12).

The old names still resolve, lazily, so old imports keep working; fedclient itself
imports no argparse. New code imports :mod:`labcli.sweep`.
"""

from __future__ import annotations

import importlib

_NEW_HOME = "labcli.sweep"


def __getattr__(name: str) -> object:
    if name.startswith("__"):  # not a moved name (e.g. __path__, asked for by importers)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_NEW_HOME), name)


def __dir__() -> list[str]:
    return list(getattr(importlib.import_module(_NEW_HOME), "__all__"))
