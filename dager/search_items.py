"""What the DAGER searches yield, their thresholds and their work budgets.

:class:`Found`, :class:`Step`, :class:`Tick` and :class:`Warn` are the items both the
decoder search (:mod:`dager.search`) and the encoder search (:mod:`dager.encoder`)
yield; the attack turns them into events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CANDIDATE_CHUNK = 8192
"""(prefix, token) pairs evaluated at once (bounds peak memory)."""

NUM_PROBES = 64
"""Random vocabulary tokens checked at the first step to measure the off-span level."""


@dataclass(frozen=True)
class Found:
    """A finished sequence (internal; the attack turns it into an event)."""

    token_ids: tuple[int, ...]
    exact: bool
    distance: float


@dataclass(frozen=True)
class Step:
    """Progress of the search (internal; the attack turns it into an event)."""

    position: int
    prefixes: tuple[tuple[int, ...], ...]
    num_prefixes: int
    num_checked: int


@dataclass(frozen=True)
class Tick:
    """Heartbeat (internal): the search is working. Searches yield one at least every
    chunk of work (well under a second on a CPU), so the attack can enforce its time
    budget and a face can stop the run promptly between items."""

    position: int | None
    checked: int


@dataclass(frozen=True)
class Warn:
    code: str
    value: float = 0.0


@dataclass
class Thresholds:
    """Layer-2 acceptance thresholds (MLP-input span and block-1 attention span)."""

    mlp: float | None
    layer2: float | None
    drift: bool = False
    """A FedAvg delta: true inputs spread from round-off (examples seen at the initial
    weights) to the drift level (seen after local steps), so calibration cuts at the gap
    next to the off-span level, not at the largest gap (which can split the true ones)."""


def split_threshold(accepted: torch.Tensor, rejected: torch.Tensor, ceiling: float = 0.1) -> float:
    """Geometric mean of the accepted cluster's top and the rejected level's bottom."""
    lo = float(accepted.max()) if accepted.numel() else 1e-7
    hi = float(rejected.min()) if rejected.numel() else 1.0
    lo = max(lo, 1e-12)
    hi = max(hi, lo * 1.0001)
    return float(min(math.sqrt(lo * hi), ceiling))


SEARCH_BYTES = 512 * 2**20
"""Byte budget of the decoder search's working set (issue 13).

Half of it bounds the block-0 key/value tables of the live prefixes: when the kept
prefixes would need more, the farthest are dropped (``budget_exhausted``). The other
half bounds one chunk's intermediates (candidate projections, gathered caches,
attention scores and mixes, MLP activations of the pairs checked exactly). Survivors
of a position are merged into a running best-``max_prefixes`` selection after every
chunk, so nothing grows with the number of (prefix, token) pairs: a noisy update whose
span admits every token costs time (stopped by the attack's time budget), not memory.
"""

CHUNK_MACS = 2.5e8
"""Multiply-adds per chunk of work (~0.1 s of one CPU core); a :class:`Tick` follows each."""
