"""Budgets and cuts of the encoder search shared by its stages (see :mod:`dager.encoder`).

The beam stage's own constants live in :mod:`dager.encoder_beam`.
"""

ENCODER_THREADS = 1
"""Torch threads while the encoder search runs (the caller's count is restored at every
event): its steps are small (one row per candidate, chunks of a few hundred rows), so
threads mostly synchronise. minilm-l6, medium set, B=8, batch 0 in process on the
2-core CPU: 9.5 s with torch's two threads, 14.8 s with passive OpenMP waits (the
faces' policy, :mod:`fedclient.threads`), 6.1 s on one thread."""

FALLBACK = False
"""Run the assembly search after the beam when sentences are still missing."""

EXHAUSTIVE_CAP = 4096
"""Lengths whose candidate combinations number at most this are enumerated exactly."""

PAIR_SUSPECTS = 4
"""Encoder descent: positions (farthest rows) tried in pairs at a local minimum."""

PAIR_POOL = 12
"""Candidates per suspect position in a pair move: the best single moves of the last
sweep there. Bounds a pair grid at 144 sequences: at B=8 a position holds ~100
layer-1 candidates (the batch's whole bag of tokens), and a full 100x100 grid per
pair spent a 40k budget on one pair move."""

ENCODER_CEILING = 1e-3
"""Encoder layer-2 threshold never exceeds this: in-span sequences sit at float32
round-off (1e-7..1e-5), and a failed assembly can sit far below random probes."""

THRESHOLD_FRACTION = 1e-3
"""Automatic threshold: this fraction of the nearest random probe's worst row."""

NUM_PROBES = 8
"""Random sequences that measure the off-span level."""

PROBE_LOW_ID = 1000
"""Probe tokens are drawn from ids at or above this (BERT vocabularies keep special
and unused tokens below it)."""

MAX_SWEEPS = 8
"""Coordinate-descent sweeps per assembled sequence."""

RESTART_PATIENCE = 4
"""Restarts of a length without a new sentence before the length is dropped."""

IMPROVEMENT = 1e-9
"""A move is kept when it lowers the score by more than this (float noise)."""

SCORE_CHUNK = 128
"""Sequences scored at once; a :class:`Tick` follows each chunk. 128 sequences of ~20
tokens take ~0.25 s on one minilm-l6 CPU thread, so heartbeats stay under ~0.3 s."""

DISTANCE_FLOOR = 1e-12
"""Row distances are clamped here before the log (an exact 0 is round-off)."""
