"""CPU thread policy for the faces (app and CLIs), set before torch starts its pool.

OpenMP's default wait policy lets idle worker threads spin. On a machine that runs
anything else at the same time (a shared Space, a classroom laptop, two visitors), the
spinning threads fight the other work and a DAGER batch ran 16x slower (issue 13).
The policy lives in environment variables that libgomp reads once, when torch is first
imported, so :func:`configure_cpu_threads` must run before ``import torch``. This module
imports nothing heavy, and it never overrides a variable the user has set.
"""

from __future__ import annotations

import os

POLICY: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Environment defaults applied by :func:`configure_cpu_threads` (user settings win)."""


def configure_cpu_threads() -> dict[str, str]:
    """Apply :data:`POLICY` to the environment where the user has not set it.

    Returns:
        The variables this call set (empty when the user had set them all).
    """
    applied: dict[str, str] = {}
    for key, value in POLICY.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied
