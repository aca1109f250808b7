"""Defense sweeps: attack success against defense strength, for any attack.

The runner knows nothing about attacks. An attack is any callable that takes a defense
(or ``None``) and returns its metrics::

    def attack(defense: Defense | None) -> Mapping[str, float]:
        update = compute_update(model, batch, defense=defense, seed=0)
        ...  # reconstruct from `update`, score against the ground truth
        return {"rouge1": 0.93, "exact": 1.0, **utility_cost(model, batch, update)}

and a sweep is a list of :class:`SweepPoint` (label, strength, defense), usually from a
standard grid::

    rows = run_sweep(noise_grid(), attack)          # or iter_sweep(...) to stream rows

(the faces write them: :mod:`labcli.sweepfiles` has ``write_csv``, ``plot_sweep`` and
``save_plot``).

Each row is a flat dict: ``label``, ``axis``, ``strength``, ``defense`` (the spec, or
``"none"``), ``epsilon`` (DP grids only), ``time_budget_s`` (with a per-point budget),
the attack's metrics, and ``seconds``. A per-point budget (``time_budget_s=``) bounds
every point's cost: the runner passes it to the attack, which puts it in its config.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from fedclient.client import Defense
from fedclient.defenses import DPSGD, GaussianNoise, Prune, Quantize, RandomMask, compose, epsilon_of
from fedclient.errors import InvalidConfigError
from fedclient.lazy import lazy_exports

log = logging.getLogger(__name__)

DEFAULT_SIGMAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
"""Noise standard deviations of :func:`noise_grid`."""

DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
"""Fractions of :func:`prune_grid` and :func:`mask_grid`."""

DEFAULT_NOISE_MULTIPLIERS = (0.0, 0.1, 0.3, 1.0, 3.0)
"""DP-SGD noise multipliers of :func:`dp_grid` (0: clipping only, epsilon = inf)."""


@dataclass(frozen=True)
class SweepPoint:
    """One setting of a sweep.

    Attributes:
        label: short text for tables and plot ticks, e.g. ``"sigma=1e-3"``.
        strength: the number plotted on the x axis (sigma, fraction, noise multiplier).
        defense: the defense to apply, ``None`` for the undefended baseline.
        axis: what ``strength`` measures, e.g. ``"noise sigma"``.
        extra: more columns for this point's row (e.g. ``{"epsilon": 4.7}``).
    """

    label: str
    strength: float
    defense: Defense | None
    axis: str = "strength"
    extra: Mapping[str, float | str] = field(default_factory=dict)


def iter_sweep(
    points: Sequence[SweepPoint],
    attack: Callable[..., Mapping[str, object]],
    *,
    time_budget_s: float | None = None,
) -> Iterator[dict[str, object]]:
    """Run ``attack`` once per point, yielding each row as soon as it is done.

    Args:
        points: the settings to attack, in order.
        attack: ``attack(defense)`` returns the point's metrics; with a budget it is
            called as ``attack(defense, time_budget_s=...)`` and puts the budget in its
            attack's config (``DagerConfig``, ``DlgConfig`` and ``TextDlgConfig`` take
            ``time_budget_s``), so every point ends in bounded time with what it found.
        time_budget_s: seconds each point's attack may take, ``None`` for no limit;
            written in each row as ``time_budget_s``.

    Yields:
        One flat dict per point, in order, as soon as the point is done (see the
        module docs for the columns), so a face can stream rows.

    Raises:
        InvalidConfigError: for a budget that is not a positive number of seconds.
    """
    if time_budget_s is not None and not (
        isinstance(time_budget_s, (int, float)) and 0 < time_budget_s < math.inf
    ):
        raise InvalidConfigError(
            f"time_budget_s must be a positive number of seconds, or None for no limit (got {time_budget_s})."
        )
    for point in points:
        start = time.perf_counter()
        if time_budget_s is None:
            metrics = dict(attack(point.defense))
        else:
            metrics = dict(attack(point.defense, time_budget_s=time_budget_s))
        row: dict[str, object] = {
            "label": point.label,
            "axis": point.axis,
            "strength": point.strength,
            "defense": "none" if point.defense is None else getattr(point.defense, "name", repr(point.defense)),
        }
        eps = epsilon_of(point.defense)
        if eps is not None:
            row["epsilon"] = eps
        row.update(point.extra)
        if time_budget_s is not None:
            row["time_budget_s"] = float(time_budget_s)
        row.update(metrics)
        row["seconds"] = time.perf_counter() - start
        log.debug("sweep point %s done in %.2fs", point.label, row["seconds"])
        yield row


def run_sweep(
    points: Sequence[SweepPoint],
    attack: Callable[..., Mapping[str, object]],
    *,
    time_budget_s: float | None = None,
) -> list[dict[str, object]]:
    """Run a whole sweep (drains :func:`iter_sweep`)."""
    return list(iter_sweep(points, attack, time_budget_s=time_budget_s))


# -------------------------------------------------------------------------- grids


def _levels(
    values: Sequence[float], *, label: Callable[[float], str], make: Callable[[float], Defense], axis: str,
    base: Defense | None,
) -> list[SweepPoint]:
    """One point per value; 0 is the baseline (``base`` alone, or no defense)."""
    return [
        SweepPoint(
            label="none" if v == 0 else label(v),
            strength=float(v),
            defense=compose(base, make(v) if v > 0 else None),
            axis=axis,
        )
        for v in values
    ]


def noise_grid(sigmas: Sequence[float] = DEFAULT_SIGMAS, *, base: Defense | None = None) -> list[SweepPoint]:
    """Gaussian noise of each standard deviation (0: no noise), after ``base`` if given.

    DLG labels its levels by variance; pass ``[v ** 0.5 for v in variances]`` to match.
    """
    return _levels(sigmas, label=lambda s: f"sigma={s:g}", make=GaussianNoise, axis="noise sigma", base=base)


def prune_grid(
    fractions: Sequence[float] = DEFAULT_FRACTIONS, *, scope: str = "tensor", base: Defense | None = None
) -> list[SweepPoint]:
    """Magnitude pruning of each fraction (0: no pruning)."""
    return _levels(
        fractions, label=lambda p: f"prune {p:.0%}", make=lambda p: Prune(p, scope=scope), axis="pruned fraction",
        base=base,
    )


def mask_grid(fractions: Sequence[float] = DEFAULT_FRACTIONS, *, base: Defense | None = None) -> list[SweepPoint]:
    """Random masking of each fraction (0: no masking)."""
    return _levels(fractions, label=lambda p: f"mask {p:.0%}", make=RandomMask, axis="masked fraction", base=base)


def precision_grid(*, base: Defense | None = None) -> list[SweepPoint]:
    """Full precision, fp16 and int8 (strength: bits dropped from 32)."""
    return [
        SweepPoint(label="fp32", strength=0.0, defense=base, axis="bits removed"),
        SweepPoint(label="fp16", strength=16.0, defense=compose(base, Quantize("fp16")), axis="bits removed"),
        SweepPoint(label="int8", strength=24.0, defense=compose(base, Quantize("int8")), axis="bits removed"),
    ]


def dp_grid(
    noise_multipliers: Sequence[float] = DEFAULT_NOISE_MULTIPLIERS,
    *,
    clip_norm: float = 1.0,
    delta: float = 1e-5,
    sample_rate: float = 1.0,
    steps: int = 1,
    include_baseline: bool = True,
) -> list[SweepPoint]:
    """DP-SGD at each noise multiplier, with its epsilon (Opacus RDP accountant).

    The first point is the undefended baseline when ``include_baseline``. Each DP
    point's row carries ``epsilon`` (``inf`` for multiplier 0, clipping only); plot
    against ``x="epsilon"`` or ``x="strength"`` (the multiplier).
    """
    points = [SweepPoint(label="none", strength=math.nan, defense=None, axis="noise multiplier")] if include_baseline else []
    for z in noise_multipliers:
        d = DPSGD(clip_norm=clip_norm, noise_multiplier=z, delta=delta, sample_rate=sample_rate, steps=steps)
        eps = d.epsilon
        eps_text = "inf" if math.isinf(eps) else f"{eps:.3g}"
        points.append(
            SweepPoint(label=f"z={z:g} (eps={eps_text})", strength=float(z), defense=d, axis="noise multiplier")
        )
    return points


GRIDS: dict[str, Callable[..., list[SweepPoint]]] = {
    "noise": noise_grid,
    "prune": prune_grid,
    "mask": mask_grid,
    "precision": precision_grid,
    "dp": dp_grid,
}
"""Standard grids by name, for CLIs (``--sweep noise``)."""


def grid(name: str, **kwargs: object) -> list[SweepPoint]:
    """A standard grid by name (:data:`GRIDS`).

    Raises:
        InvalidConfigError: for an unknown name.
    """
    try:
        make = GRIDS[name]
    except KeyError:
        raise InvalidConfigError(f"Unknown sweep {name!r}: use one of {', '.join(GRIDS)}.") from None
    return make(**kwargs)


# The CSV and plot writers moved to labcli.sweepfiles (issue 12: fedclient holds no
# plotting or file formats). Their old names here still resolve, lazily, so old imports
# keep working without fedclient importing a face.
_MOVED = {"plot_sweep": "labcli.sweepfiles", "save_plot": "labcli.sweepfiles", "write_csv": "labcli.sweepfiles"}

__getattr__, __dir__ = lazy_exports(__name__, _MOVED)


__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_NOISE_MULTIPLIERS",
    "DEFAULT_SIGMAS",
    "GRIDS",
    "SweepPoint",
    "dp_grid",
    "grid",
    "iter_sweep",
    "mask_grid",
    "noise_grid",
    "precision_grid",
    "prune_grid",
    "run_sweep",
]
