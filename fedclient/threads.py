"""CPU thread policy for the faces (app and CLIs), set before torch starts its pool.

OpenMP's default wait policy lets idle worker threads spin. On a machine that runs
anything else at the same time (a shared Space, a classroom laptop, two visitors), the
spinning threads fight the other work and a DAGER batch ran 16x slower (issue 13).
The policy lives in environment variables that libgomp reads once, when torch is first
imported, so :func:`configure_cpu_threads` must run before ``import torch``. This module
imports nothing heavy at import time, and it never overrides a variable the user has set.

The policy: ``OMP_WAIT_POLICY=PASSIVE`` and torch's own thread count. Measured with
``benchmarks/cpu_contention.py`` (DAGER, gpt2-small-random, B=8 sentences of
``assets/sentences/tweets.txt``, a fresh process per policy; attack wall time and the
process's CPU time, all threads, spinning included):

* issue 13 (2 cores, one spinning process beside it): torch's default 33-34 s,
  passive 2.4-2.6 s, one thread 1.8-2.1 s.
* the engine branch, on the same 2 cores shared with five other jobs (load 4 to 20,
  so even "quiet" was busy and wall times are several times a quiet machine's):

  ==========  ====  ===============  ===========
  policy      hogs  attack s (wall)  CPU s
  ==========  ====  ===============  ===========
  default     0     98.4            24.4
  passive     0     6.6             1.66
  threads1    0     8.9             1.61
  both        0     8.9             1.47
  default     1     56.3            10.4
  passive     1     12.5            1.95
  threads1    1     13.6            1.78
  both        1     10.4            1.58
  passive     2     13.1            1.52
  threads1    2     17.8            1.49
  both        2     14.2            1.68
  ==========  ====  ===============  ===========

Spinning is the whole pathology: torch's default burns 6-15x the CPU of any other
policy for the same work. Passive waiting removes it for every operation in the
process at once (the app's and the CLIs' included), and among passive, one thread and
both the differences are within this machine's noise, in wall and in CPU time. One
thread would give up the cores a wider machine offers (a 16-core Space) for the heavy
cases (B=32, wide models, the encoder search), so the thread count stays torch's. To
revisit on a quiet machine: ``python benchmarks/cpu_contention.py --hogs 0 1 2``; if
``both`` beats ``passive`` beside a hog by more than it loses when quiet, add
``"OMP_NUM_THREADS": "1"`` to :data:`POLICY`.

The tiny image models of DLG are the exception: their steps are so short that thread
synchronisation dominates, so DLG runs on one thread (``DlgConfig.cpu_threads``), set
around each resume of its generator by :func:`on_threads`, which leaves the process
setting untouched between events.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TypeVar

POLICY: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Environment defaults applied by :func:`configure_cpu_threads` (user settings win)."""

T = TypeVar("T")


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


def on_threads(events: Iterator[T], threads: int | None) -> Iterator[T]:
    """Run a generator with ``threads`` torch threads, only while it runs.

    Torch's thread count is process-wide. A ``with`` block around ``yield from`` would
    keep it changed while the generator is suspended (the app renders, other requests
    run); instead the count is set before every resume and the caller's count restored
    at every yield, the way ``torch.no_grad()`` as a decorator handles grad mode.

    Args:
        events: the generator to drive.
        threads: torch threads while it runs; ``None`` leaves the setting alone.

    Yields:
        The items of ``events``. Closing this generator closes ``events``.
    """
    if threads is None:
        yield from events
        return
    import torch  # here, not at import: this module must stay torch-free

    try:
        while True:
            previous = torch.get_num_threads()
            if previous != threads:
                torch.set_num_threads(threads)
            try:
                item = next(events)
            except StopIteration:
                return
            finally:
                if previous != threads:
                    torch.set_num_threads(previous)
            yield item
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
