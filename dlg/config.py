"""Settings of the image attacks (:class:`DlgConfig`) and their named constants.

Paper defaults per method; the app's lesson-sized settings are in :mod:`dlg.presets`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedclient.errors import InvalidConfigError

METHODS = ("dlg", "idlg", "ig")
"""Attack methods: plain DLG, iDLG (analytic labels), Geiping-style gradient matching."""

MAX_BATCH = 8
"""Largest batch the lab attacks (the optimisation grows hard quickly with B)."""

INITS = ("grey", "normal", "uniform")
"""Dummy-image initialisations: mid-grey plus small noise, N(0, 1) (the DLG code), U(0, 1)."""

LINE_SEARCHES = (None, "armijo", "strong_wolfe")
"""L-BFGS step rules: the unit step regardless, backtracking, torch's line search."""

OPTIMIZERS = (None, "adam", "lbfgs")
"""Optimizers (``None``: L-BFGS for every method)."""

LBFGS_LR = 1.0
"""L-BFGS step length: the DLG paper's (and torch's) unit step."""

ADAM_LR = 0.1
"""Adam step size of Geiping et al.'s gradient matching."""

L2_TOLERANCE = 1e-7
"""dlg/idlg stop below this loss relative to the shared gradient's squared norm (about
MSE 1e-3 on LeNet)."""

COSINE_TOLERANCE = 1e-8
"""ig stops below this cosine distance plus prior (in practice it stops on a plateau)."""

MAX_ITERATIONS = 100_000
"""Upper bound of ``iterations`` (a typo guard, not a budget)."""

MAX_RESTARTS = 32
"""Upper bound of ``restarts``."""


@dataclass(frozen=True)
class DlgConfig:
    """Settings of an image gradient-inversion attack (paper defaults per method).

    Attributes:
        method: ``"dlg"``, ``"idlg"`` or ``"ig"``.
        iterations: optimiser steps per restart (L-BFGS steps for dlg/idlg, each up to
            ``lbfgs_max_iter`` function evaluations, as in the DLG reference code).
        lr: step size; ``None`` picks the optimizer's default (1.0 for L-BFGS as in
            the DLG paper, 0.1 for Adam as in Geiping et al.).
        restarts: independent random initialisations; the lowest final loss wins.
            A restart only runs when the previous one ended above the tolerance (a
            stalled or plateaued L-BFGS run, which plain DLG hits on some images).
        tv_weight: weight of the total-variation prior (``"ig"`` only; smooth total
            variation under L-BFGS). Measured on LeNet with L-BFGS: 1e-3 gives 34.0 /
            27.6 / 23.8 dB at B = 1 / 4 / 8; 1e-4 gives 38.3 dB at B=1 but 16.9 dB at B=4.
        tolerance: stop when the gradient distance falls below this; ``None`` picks
            the method default. For dlg/idlg it is relative to the shared gradient's
            squared norm (default 1e-7, about MSE 1e-3 on LeNet); for ig it applies
            to the cosine distance plus the prior (default 1e-8: in practice ig stops
            on a plateau, as the prior keeps its loss above zero).
        patience: stop when the best distance has not improved by ``min_improvement``
            (relative) for this many iterations; 0 disables plateau stopping.
        min_improvement: relative improvement that resets the patience counter.
        preview_every: record a frame (for the preview and GIF) every this many
            iterations.
        preview_seconds: at most one preview frame per this many seconds in the events.
        signed: use signed gradients with Adam (``"ig"``), as Geiping et al. do.
        lbfgs_max_iter: function evaluations per L-BFGS step (torch's default, 20).
        init: dummy-image initialisation, ``"grey"`` (0.5 + 0.1 N(0, 1)), ``"normal"``
            (N(0, 1), the DLG code) or ``"uniform"``; ``None`` picks grey for dlg/idlg
            and uniform for ig.
        float64: optimise in double precision (slower; tighter gradient matches).
        line_search: L-BFGS step rule. ``"armijo"`` (default): the DLG code's unit
            step, shortened by backtracking only when it fails to decrease the loss
            (:class:`~dlg.lbfgs.CompactLBFGS`). ``None``: the unit step taken
            regardless, exactly as the DLG code; on LeNet it sometimes jumps into
            saturated sigmoids and stalls, so the first restart failed on 3 of 5 sample
            images, against 15 of 15 runs succeeding with backtracking (5 images x 3
            seeds). ``"strong_wolfe"``: torch's line search (slower per step).
        per_layer: weight every parameter tensor equally in the gradient distance
            (each layer's squared error divided by its squared norm, or the mean of the
            per-layer cosine distances).
        optimizer: ``"adam"`` or ``"lbfgs"``; ``None`` picks L-BFGS for every method
            (see the module docstring for why ig does not default to Geiping's Adam).
            L-BFGS does not box the pixels.
        batch_tv: weight of a smooth total-variation prior added to the L2 matching loss
            of dlg/idlg for batches (B > 1), relative to the shared gradient's squared
            norm. On LeNet a batch of 4 gives fewer gradient equations than unknown
            pixels, so matching alone ends at a wrong image with a near-zero loss
            (measured: 12.6 dB at loss 1e-8 relative); the prior picks the smooth one
            (31.6 dB at 1e-3). 0 disables it; B = 1 never uses it.
        seed: seeds the dummy initialisation.
        device: ``"cpu"`` or ``"cuda"``.
        cpu_threads: torch threads while attacking on the CPU (restored afterwards);
            ``None`` leaves the process setting alone.
        image_shape: ``(C, H, W)`` of the model's input: part of the model the server
            defines, not of the client's data (the dummy images take this shape).
        time_budget_s: wall-clock budget of the attack in seconds; when it is reached
            the attack stops and reports the best reconstruction so far (stop reason
            ``"time_budget"``). ``None``: no limit (the CLI's default; the app passes one).
    """

    method: str = "dlg"
    iterations: int = 300
    lr: float | None = None
    restarts: int = 3
    tv_weight: float = 1e-3
    tolerance: float | None = None
    patience: int = 40
    min_improvement: float = 1e-3
    preview_every: int = 10
    preview_seconds: float = 0.25
    signed: bool = True
    lbfgs_max_iter: int = 20
    init: str | None = None
    float64: bool = False
    line_search: str | None = "armijo"
    per_layer: bool = False
    optimizer: str | None = None
    batch_tv: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    cpu_threads: int | None = 1
    time_budget_s: float | None = None
    image_shape: tuple[int, int, int] = (3, 32, 32)

    def __post_init__(self) -> None:
        if self.time_budget_s is not None and not (
            math.isfinite(self.time_budget_s) and self.time_budget_s > 0
        ):
            raise InvalidConfigError(
                f"time_budget_s must be a positive number of seconds, or None (got {self.time_budget_s})."
            )
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise InvalidConfigError(f"cpu_threads must be at least 1, got {self.cpu_threads}.")
        if self.init is not None and self.init not in INITS:
            raise InvalidConfigError(
                f"Unknown init {self.init!r}; choose grey, normal or uniform (or leave it unset)."
            )
        if self.method not in METHODS:
            raise InvalidConfigError(
                f"Unknown method {self.method!r}; choose one of: {', '.join(METHODS)}."
            )
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise InvalidConfigError(
                f"iterations must be between 1 and {MAX_ITERATIONS}, got {self.iterations}."
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidConfigError(f"lr must be a positive number, got {self.lr}.")
        if not 1 <= self.restarts <= MAX_RESTARTS:
            raise InvalidConfigError(f"restarts must be between 1 and {MAX_RESTARTS}, got {self.restarts}.")
        if not (math.isfinite(self.tv_weight) and self.tv_weight >= 0):
            raise InvalidConfigError(f"tv_weight must be zero or positive, got {self.tv_weight}.")
        if self.tolerance is not None and not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise InvalidConfigError(f"tolerance must be zero or positive, got {self.tolerance}.")
        if self.patience < 0:
            raise InvalidConfigError(f"patience must be zero or positive, got {self.patience}.")
        if not 0 <= self.min_improvement < 1:
            raise InvalidConfigError(f"min_improvement must be in [0, 1), got {self.min_improvement}.")
        if self.preview_every < 1:
            raise InvalidConfigError(f"preview_every must be at least 1, got {self.preview_every}.")
        if self.preview_seconds < 0:
            raise InvalidConfigError(f"preview_seconds must be zero or positive, got {self.preview_seconds}.")
        if self.lbfgs_max_iter < 1:
            raise InvalidConfigError(f"lbfgs_max_iter must be at least 1, got {self.lbfgs_max_iter}.")
        if self.line_search not in LINE_SEARCHES:
            raise InvalidConfigError(
                f"line_search must be 'armijo', 'strong_wolfe' or unset, got {self.line_search!r}."
            )
        if self.optimizer not in OPTIMIZERS:
            raise InvalidConfigError(f"optimizer must be 'adam' or 'lbfgs', got {self.optimizer!r}.")
        if not (math.isfinite(self.batch_tv) and self.batch_tv >= 0):
            raise InvalidConfigError(f"batch_tv must be zero or positive, got {self.batch_tv}.")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}.")

    @property
    def effective_lr(self) -> float:
        """The step size actually used."""
        if self.lr is not None:
            return self.lr
        return ADAM_LR if self.effective_optimizer == "adam" else LBFGS_LR

    @property
    def effective_optimizer(self) -> str:
        """The optimizer actually used: ``"lbfgs"`` unless Adam is asked for."""
        return self.optimizer or "lbfgs"

    @property
    def uses_torch_optimizer(self) -> bool:
        """Whether a ``torch.optim`` optimizer runs (Adam, or torch's L-BFGS for
        ``strong_wolfe``); the default :class:`~dlg.lbfgs.CompactLBFGS` is not one."""
        return self.effective_optimizer == "adam" or self.line_search == "strong_wolfe"

    @property
    def effective_tolerance(self) -> float:
        """The stopping tolerance actually used (its scale depends on the distance)."""
        if self.tolerance is not None:
            return self.tolerance
        return COSINE_TOLERANCE if self.method == "ig" else L2_TOLERANCE

    @property
    def distance(self) -> str:
        """The gradient distance of the method: ``"l2"`` or ``"cosine"``."""
        return "cosine" if self.method == "ig" else "l2"

