"""Gradient inversion for images: DLG, iDLG and Geiping-style gradient matching.

* **DLG** (Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019): optimise a dummy
  image and a dummy soft label with L-BFGS (lr 1) so that the gradient they produce
  matches the shared one in squared L2 distance.
* **iDLG** (Zhao et al., "iDLG: Improved Deep Leakage from Gradients", 2020): read the
  label from the last layer's gradient first (:func:`infer_labels`), then optimise the
  image only, as DLG does.
* **ig** (Geiping et al., "Inverting Gradients -- How easy is it to break privacy in
  federated learning?", NeurIPS 2020): cosine distance between gradients plus a total
  variation prior, several random restarts; labels inferred as in iDLG. Geiping et al.
  optimise with Adam (step decay, signed gradients, pixels boxed to [0, 1]) for
  thousands of steps; that remains ``optimizer="adam"``. The default here is L-BFGS:
  on LeNet, Adam reached 9-13 dB in 2000 steps at B=1 (any of lr 0.003-0.1, signed
  or not), while L-BFGS on the same objective reaches 34 dB at B=1 and 27.6 dB at B=4
  within 300 steps (``benchmarks/dlg_bench.py``).

The attacker receives the model and the :class:`~fedclient.update.SharedUpdate` only.
It computes the gradient its dummy batch would produce with the client's own training
loss (:func:`fedclient.batch_loss`), which the server knows, never with the client's data.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedclient.batch import ImageBatch
from fedclient.client import batch_loss
from fedclient.errors import InvalidConfigError, LabInputError
from fedclient.threads import on_threads
from fedclient.update import SharedUpdate
from dlg.lbfgs import CompactLBFGS
from dlg.events import DlgEvent, DlgFinished, DlgResult, DlgStarted, DlgStep, LabelsInferred

log = logging.getLogger(__name__)

METHODS = ("dlg", "idlg", "ig")
"""Attack methods: plain DLG, iDLG (analytic labels), Geiping-style gradient matching."""

MAX_BATCH = 8
"""Largest batch the lab attacks (the optimisation grows hard quickly with B)."""


class UnattackableUpdateError(LabInputError):
    """The shared update lacks what the attack needs (e.g. the classification head)."""


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
        if self.init is not None and self.init not in ("grey", "normal", "uniform"):
            raise InvalidConfigError(
                f"Unknown init {self.init!r}; choose grey, normal or uniform (or leave it unset)."
            )
        if self.method not in METHODS:
            raise InvalidConfigError(
                f"Unknown method {self.method!r}; choose one of: {', '.join(METHODS)}."
            )
        if not 1 <= self.iterations <= 100_000:
            raise InvalidConfigError(f"iterations must be between 1 and 100000, got {self.iterations}.")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidConfigError(f"lr must be a positive number, got {self.lr}.")
        if not 1 <= self.restarts <= 32:
            raise InvalidConfigError(f"restarts must be between 1 and 32, got {self.restarts}.")
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
        if self.line_search not in (None, "armijo", "strong_wolfe"):
            raise InvalidConfigError(
                f"line_search must be 'armijo', 'strong_wolfe' or unset, got {self.line_search!r}."
            )
        if self.optimizer not in (None, "adam", "lbfgs"):
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
        return 0.1 if self.effective_optimizer == "adam" else 1.0

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
        return 1e-8 if self.method == "ig" else 1e-7

    @property
    def distance(self) -> str:
        """The gradient distance of the method: ``"l2"`` or ``"cosine"``."""
        return "cosine" if self.method == "ig" else "l2"


# ---------------------------------------------------------------------------
# Pure maths


def gradient_distance(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], kind: str = "l2"
) -> torch.Tensor:
    """Distance between two gradients given as ``name -> tensor`` mappings.

    ``"l2_layer"`` and ``"cosine_layer"`` are the per-layer variants (each parameter
    tensor weighted equally). ``"l2"`` is DLG's objective (Zhu et al. 2019, eq. 4): the squared Euclidean
    distance summed over all parameters. ``"cosine"`` is Geiping et al.'s (2020, eq. 4):
    one minus the cosine similarity of the two gradients flattened into one vector, which
    ignores the gradient's magnitude and so is robust to the learning-rate-like scale of
    an update. Both are zero when ``a`` equals ``b``.

    Args:
        a: the dummy gradient; must hold every name in ``b``.
        b: the target (shared) gradient.
        kind: ``"l2"`` or ``"cosine"``.

    Returns:
        A scalar tensor (differentiable in ``a``).

    Raises:
        ValueError: for an unknown ``kind`` or mismatched shapes.
    """
    names = list(b)
    for n in names:
        if a[n].shape != b[n].shape:
            raise ValueError(f"gradient {n!r} has shape {tuple(a[n].shape)} vs {tuple(b[n].shape)}")
    if kind == "l2":
        # sum_l ||a_l - b_l||^2 over every parameter tensor l
        return sum(((a[n] - b[n]) ** 2).sum() for n in names)  # type: ignore[return-value]
    if kind == "l2_layer":
        # sum_l ||a_l - b_l||^2 / ||b_l||^2: every parameter tensor counts equally
        return sum(  # type: ignore[return-value]
            ((a[n] - b[n]) ** 2).sum() / (b[n] ** 2).sum().clamp_min(1e-30) for n in names
        )
    if kind == "cosine_layer":
        # mean over parameter tensors of 1 - cos(a_l, b_l): every layer counts equally
        terms = [
            1.0 - (a[n] * b[n]).sum() / (a[n].norm() * b[n].norm()).clamp_min(1e-20)
            for n in names
        ]
        return sum(terms) / len(terms)  # type: ignore[return-value]
    if kind == "cosine":
        dot = sum((a[n] * b[n]).sum() for n in names)  # <a, b> over all parameters
        norm_a = sum((a[n] ** 2).sum() for n in names).sqrt()  # ||a||
        norm_b = sum((b[n] ** 2).sum() for n in names).sqrt()  # ||b||
        return 1.0 - dot / (norm_a * norm_b).clamp_min(1e-20)  # type: ignore[union-attr]
    raise ValueError(
        f"unknown gradient distance {kind!r}; use 'l2', 'cosine', 'l2_layer' or 'cosine_layer'"
    )


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation (mean absolute neighbour difference) of ``(B, C, H, W)``."""
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()  # horizontal neighbours
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()  # vertical neighbours
    return dx + dy


def smooth_total_variation(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Differentiable total variation: mean of ``sqrt(d^2 + eps)`` over neighbour differences.

    Smooth (unlike :func:`total_variation`), so L-BFGS's line search handles it.
    """
    dx = x[:, :, :, 1:] - x[:, :, :, :-1]
    dy = x[:, :, 1:, :] - x[:, :, :-1, :]
    return (dx * dx + eps).sqrt().mean() + (dy * dy + eps).sqrt().mean()


def head_parameter_names(model: nn.Module) -> tuple[str, str | None]:
    """Names of the weight and bias of the model's last linear layer (the classifier).

    Raises:
        UnattackableUpdateError: when the model has no linear layer.
    """
    last: tuple[str, str | None] | None = None
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear):
            prefix = f"{mname}." if mname else ""
            last = (f"{prefix}weight", f"{prefix}bias" if module.bias is not None else None)
    if last is None:
        raise UnattackableUpdateError(
            "The model has no linear classification layer, so labels cannot be read from its "
            "gradient; use the 'dlg' method instead."
        )
    return last


def infer_labels(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the batch's labels from the gradient of the last linear layer (iDLG).

    With softmax cross-entropy averaged over the batch, the gradient of the head's bias
    is ``g = (1/B) sum_b (p_b - y_b)`` where ``p_b`` is example b's softmax output and
    ``y_b`` its one-hot label. Hence:

    * **B = 1** (Zhao et al. 2020): ``g_c = p_c - 1 < 0`` only for the true class; every
      other entry is ``p_c > 0``. The label is the one negative entry (exact). Without a
      bias the same holds for the row sums of the weight gradient when the head's
      inputs are non-negative (sigmoid features), as in the paper.
    * **Batches** (label counts, in the spirit of Wainakh et al.'s LLG, 2022):
      ``n_c = sum_b y_bc = sum_b p_bc - B g_c``. Classes with ``g_c < 0`` are present.
      The unknown ``sum_b p_bc`` is estimated as ``B`` times the model's mean softmax on
      a few random images (the attacker knows the model; an untrained network's output
      depends weakly on its input). Every present class gets one example, the rest of
      the batch goes to the largest remaining estimates ``B (pbar_c - g_c)``.

    Args:
        model: the shared model.
        update: the shared gradient (must hold the head's parameters).
        batch_size: B, which the server knows.
        image_shape: the model's input shape, for the softmax estimate.
        seed: seeds the random images of the estimate.

    Returns:
        ``(labels, counts)``: ``(B,)`` class ids sorted ascending (the order of a batch is
        not recoverable from the head) and ``(num_classes,)`` counts summing to B.

    Raises:
        UnattackableUpdateError: when the update lacks the head's gradient.
    """
    weight_name, bias_name = head_parameter_names(model)
    if bias_name is not None and bias_name in update:
        g = update[bias_name].detach().double().cpu()  # (K,)
    elif weight_name in update:
        g = update[weight_name].detach().double().cpu().sum(dim=1)  # (K, D) -> (K,)
    else:
        raise UnattackableUpdateError(
            f"The shared update has no gradient for the classification head ({weight_name}); "
            "labels cannot be inferred: share the head or use the 'dlg' method."
        )
    num_classes = g.shape[0]
    counts = torch.zeros(num_classes, dtype=torch.long)
    if batch_size == 1:
        counts[int(torch.argmin(g))] = 1
        return torch.nonzero(counts).flatten(), counts
    # Mean softmax of the model on a few random inputs: an estimate of E[p].
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    probe = torch.rand((16, *image_shape), generator=gen).to(device=device, dtype=dtype)  # (16, C, H, W)
    with torch.no_grad():
        pbar = torch.softmax(model(probe).double(), dim=-1).mean(dim=0).cpu()  # (K,)
    estimate = batch_size * (pbar - g)  # (K,) estimated n_c
    present = torch.nonzero(g < 0).flatten()
    order = present[torch.argsort(g[present])]  # most negative first
    for c in order[:batch_size]:
        counts[c] = 1
    remaining = batch_size - int(counts.sum())
    while remaining > 0:
        residual = estimate - counts.double()
        if len(present) > 0:  # extra copies only of classes seen to be present
            residual[counts == 0] = -math.inf
        c = int(torch.argmax(residual))
        counts[c] += 1
        remaining -= 1
    labels = torch.repeat_interleave(torch.arange(num_classes), counts)
    return labels, counts


# ---------------------------------------------------------------------------
# The attack


def _dummy_gradient(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The gradient the dummy batch produces under the client's loss, with a graph."""
    loss = batch_loss(model, ImageBatch(images=images, labels=labels))
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    return dict(zip(params, grads))


INITS = ("grey", "normal", "uniform")
"""Dummy-image initialisations: mid-grey plus small noise, N(0, 1) (the DLG code), U(0, 1)."""


def _initial_images(
    config: DlgConfig, batch_size: int, image_shape: tuple[int, int, int], gen: torch.Generator
) -> torch.Tensor:
    """The dummy images a restart starts from, ``(B, C, H, W)``."""
    kind = config.init
    if kind is None:
        # The DLG code starts from N(0, 1). Starting near mid-grey keeps
        # LeNet's sigmoids out of saturation and converges about 3x faster (measured: 56
        # vs 166 L-BFGS steps to MSE < 1e-3 on a sample image); the box-constrained "ig"
        # starts uniform in the box.
        # For batches N(0, 1) was worse still (5-6 dB vs 11-14 dB at B=4 after 300 steps).
        kind = "uniform" if config.method == "ig" else "grey"
    shape = (batch_size, *image_shape)
    if kind == "grey":
        return 0.5 + 0.1 * torch.randn(shape, generator=gen)
    if kind == "normal":
        return torch.randn(shape, generator=gen)
    if kind == "uniform":
        return torch.rand(shape, generator=gen)
    raise ValueError(f"unknown init {kind!r}")


class _Run:
    """The state of one restart (kept out of the generator for readability)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.frames: list[tuple[int, torch.Tensor]] = []
        self.best_loss = math.inf
        self.best_images: torch.Tensor | None = None
        self.best_soft: torch.Tensor | None = None
        self.stop_reason = "budget"
        self.converged_iteration: int | None = None


@functools.cache
def warm_up_optimizers() -> None:
    """Pay torch's one-off optimizer start-up cost now, once per process.

    The first ``step`` of any ``torch.optim`` optimizer imports torch's compiler stack
    (about 800 modules; measured 2.7 s on the 2-core CPU), whatever the model. The
    attacks that use one call this before their clock starts, so ``seconds`` measures
    the attack itself; the app calls it at start-up, so a visitor's first run does not
    pay it. :class:`~dlg.lbfgs.CompactLBFGS` is not a ``torch.optim`` optimizer and
    needs none of it.
    """
    x = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([x], max_iter=1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (x - 1.0).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)


def iter_dlg(
    model: nn.Module,
    update: SharedUpdate,
    *,
    config: DlgConfig = DlgConfig(),
) -> Iterator[DlgEvent]:
    """Reconstruct the client's images; see :func:`_iter_dlg`.

    When a ``torch.optim`` optimizer runs, torch's one-off start-up
    (:func:`warm_up_optimizers`) is paid before the clock starts. On the CPU the
    optimisation runs on ``config.cpu_threads`` threads (one by default):
    the attacked models are tiny, and thread synchronisation dominated their steps
    (measured 8 ms vs 143 ms per LeNet matching step on a busy 2-core machine). The
    count is set only while the generator runs (:func:`fedclient.threads.on_threads`):
    the caller's setting holds between events.
    """
    if config.uses_torch_optimizer:
        warm_up_optimizers()
    threads = config.cpu_threads if torch.device(config.device).type == "cpu" else None
    yield from on_threads(
        _iter_dlg(model, update, config=config),
        threads,
    )


def model_label(model: nn.Module) -> str:
    """The name events carry: the registry name :func:`dlg.models.build_model` sets, or
    the class name (what the server knows of the model it sent)."""
    return str(getattr(model, "registry_name", None) or type(model).__name__.lower())


def _now() -> float:
    """The attack's clock (a module function, so tests can inject a fake one)."""
    return time.perf_counter()


@dataclass(frozen=True)
class _Setup:
    """What every restart shares (internal)."""

    model: nn.Module
    params: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    batch_size: int
    num_classes: int
    device: torch.device
    dtype: torch.dtype
    dist_kind: str
    scale: float
    """The shared gradient's squared norm (L2; 1 for the cosine distance)."""
    tolerance: float
    deadline: float
    """``_now()`` at which the time budget ends (``inf`` without one)."""


@torch.enable_grad()  # gradient matching differentiates gradients, whatever the caller's mode
def _iter_dlg(
    model: nn.Module,
    update: SharedUpdate,
    *,
    config: DlgConfig = DlgConfig(),
) -> Iterator[DlgEvent]:
    """Reconstruct the client's images from its shared gradient, as an event stream.

    Args:
        model: the global model the server sent (the attacker's copy; not modified).
        update: the shared update (a FedSGD gradient keyed by parameter name).
        config: the attack settings (``config.image_shape``: the model's input shape).

    Yields:
        One :class:`DlgStarted`, a :class:`LabelsInferred` for ``idlg``/``ig``, one
        :class:`DlgStep` per iteration (a preview frame on some, throttled in time),
        and one :class:`DlgFinished`. Closing the generator stops the attack at once;
        ``config.time_budget_s`` stops it with the best reconstruction so far (stop
        reason ``"time_budget"``), across restarts.

    Raises:
        UnattackableUpdateError: the update holds none of the model's parameters, or
            lacks the head when labels must be inferred.
        InvalidConfigError: the batch is larger than :data:`MAX_BATCH`.
    """
    t0 = _now()
    setup = _setup(model, update, config, t0)
    yield DlgStarted(
        method=config.method,
        model=model_label(model),
        batch_size=setup.batch_size,
        iterations=config.iterations,
        restarts=config.restarts,
    )
    labels: torch.Tensor | None = None
    if config.method in ("idlg", "ig"):
        labels, counts = infer_labels(
            setup.model, setup.target, batch_size=setup.batch_size, image_shape=config.image_shape, seed=config.seed
        )
        yield LabelsInferred(labels=labels.clone(), counts=counts.clone())
        labels = labels.to(setup.device)
    gen = torch.Generator().manual_seed(config.seed)
    previews = _Previews(config.preview_seconds)
    best: _Run | None = None
    timed_out = False
    for restart in range(config.restarts):
        if restart > 0 and _now() >= setup.deadline:
            timed_out = True  # no time left for another restart
            break
        init = _initial_images(config, setup.batch_size, config.image_shape, gen)
        run = yield from _restart(setup, config, labels, init, gen, restart, previews)
        if best is None or run.best_loss < best.best_loss:
            best = run
        timed_out = run.stop_reason == "time_budget"
        if run.stop_reason in ("tolerance", "time_budget"):
            break
    assert best is not None and best.best_images is not None
    if config.method == "dlg":
        assert best.best_soft is not None
        rec_labels = best.best_soft.argmax(dim=-1).cpu()
    else:
        assert labels is not None
        rec_labels = labels.cpu()
    stop_reason = "time_budget" if timed_out else best.stop_reason
    result = DlgResult(
        images=best.best_images.clamp(0, 1).cpu(),
        labels=rec_labels,
        losses=tuple(best.losses),
        converged_iteration=best.converged_iteration,
        stop_reason=stop_reason,
        frames=tuple(best.frames),
        seconds=_now() - t0,
    )
    yield DlgFinished(result=result)


def _setup(
    model: nn.Module, update: SharedUpdate, config: DlgConfig, t0: float
) -> _Setup:
    """Check the update, copy the model to the attack's device and set the scales."""
    batch_size = int(update.batch_size)
    if not 1 <= batch_size <= MAX_BATCH:
        raise InvalidConfigError(
            f"The update comes from {batch_size} images; this attack handles 1 to {MAX_BATCH}."
        )
    device = torch.device(config.device)
    dtype = torch.float64 if config.float64 else torch.float32
    p0 = next(model.parameters())
    if p0.device != device or p0.dtype != dtype:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    model.eval()
    named = dict(model.named_parameters())
    names = [n for n in update if n in named]
    if not names:
        raise UnattackableUpdateError(
            "The shared update holds none of this model's parameters; was it computed on "
            "another model?"
        )
    target = {n: update[n].detach().to(device=device, dtype=dtype) for n in names}  # the shared gradient
    weight_name, _ = head_parameter_names(model)
    num_classes = int(named[weight_name].shape[0])  # the head the server sent
    dist_kind = f"{config.distance}_layer" if config.per_layer else config.distance
    # The L2 tolerance is relative to the shared gradient's squared norm, so one value
    # fits every model and batch size; the cosine distance is scale-free already.
    scale = 1.0
    if config.distance == "l2":
        zeros = {n: torch.zeros_like(t) for n, t in target.items()}
        scale = float(gradient_distance(zeros, target, dist_kind))
    budget = config.time_budget_s
    return _Setup(
        model=model,
        params={n: named[n] for n in names},
        target=target,
        batch_size=batch_size,
        num_classes=num_classes,
        device=device,
        dtype=dtype,
        dist_kind=dist_kind,
        scale=scale,
        tolerance=config.effective_tolerance * max(scale, 1e-30),
        deadline=math.inf if budget is None else t0 + budget,
    )


class _Previews:
    """Throttles preview frames in the events to one per ``seconds`` (all restarts)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = -math.inf

    def take(self, frame: torch.Tensor | None) -> torch.Tensor | None:
        now = time.perf_counter()
        if frame is None or now - self.last < self.seconds:
            return None
        self.last = now
        return frame


def _optimizer(
    config: DlgConfig, variables: list[torch.Tensor]
) -> tuple[torch.optim.Optimizer | CompactLBFGS, torch.optim.lr_scheduler.LRScheduler | None]:
    """The restart's optimizer (and Adam's learning-rate schedule)."""
    if config.effective_optimizer == "adam":
        opt = torch.optim.Adam(variables, lr=config.effective_lr)
        milestones = [int(config.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    if config.line_search != "strong_wolfe":
        # torch's fixed-step L-BFGS (as in the DLG code) with less per-iteration
        # overhead, and a backtracking safeguard unless the plain unit step is asked for.
        return CompactLBFGS(variables, lr=config.effective_lr, max_iter=config.lbfgs_max_iter,
                            history_size=100, backtrack=config.line_search == "armijo"), None
    return torch.optim.LBFGS(
        variables, lr=config.effective_lr, max_iter=config.lbfgs_max_iter, history_size=100,
        line_search_fn=config.line_search,
    ), None


def _restart(
    setup: _Setup,
    config: DlgConfig,
    labels: torch.Tensor | None,
    init: torch.Tensor,
    gen: torch.Generator,
    restart: int,
    previews: _Previews,
) -> Generator[DlgEvent, None, _Run]:
    """One random restart: optimise from ``init`` until a stop rule fires."""
    run = _Run()
    x = init.to(device=setup.device, dtype=setup.dtype).requires_grad_(True)  # (B, C, H, W) dummy images
    soft = None
    variables = [x]
    if config.method == "dlg":
        soft = torch.randn((setup.batch_size, setup.num_classes), generator=gen).to(
            device=setup.device, dtype=setup.dtype).requires_grad_(True)
        variables.append(soft)  # (B, K) dummy label logits
    use_adam = config.effective_optimizer == "adam"

    def objective() -> torch.Tensor:
        y = torch.softmax(soft, dim=-1) if soft is not None else labels
        dummy = _dummy_gradient(setup.model, setup.params, x, y)
        loss = gradient_distance(dummy, setup.target, setup.dist_kind)
        if config.method == "ig" and config.tv_weight > 0:
            tv = total_variation(x) if use_adam else smooth_total_variation(x)  # L-BFGS needs it smooth
            loss = loss + config.tv_weight * tv
        elif config.method != "ig" and setup.batch_size > 1 and config.batch_tv > 0:
            loss = loss + config.batch_tv * setup.scale * smooth_total_variation(x)
        return loss

    opt, sched = _optimizer(config, variables)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    def step() -> torch.Tensor:
        if not use_adam:
            return opt.step(closure)  # the loss at the iterate before the step
        opt.zero_grad()
        loss_t = objective()
        loss_t.backward()
        if config.signed:
            x.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)  # pixels live in [0, 1]
        return loss_t

    run.frames.append((0, x.detach().clamp(0, 1).cpu().clone()))
    yield from _iterate(setup, config, run, x, soft, step, restart, previews)
    _score_last_iterate(run, x, soft, objective, init.to(setup.device))
    log.debug(
        "restart %d: %s after %d iterations, best loss %.3g",
        restart, run.stop_reason, len(run.losses), run.best_loss,
    )
    return run


def _iterate(
    setup: _Setup,
    config: DlgConfig,
    run: _Run,
    x: torch.Tensor,
    soft: torch.Tensor | None,
    step: Callable[[], torch.Tensor],
    restart: int,
    previews: _Previews,
) -> Iterator[DlgEvent]:
    """The optimisation loop of one restart: one :class:`DlgStep` per iteration."""
    since_best = frozen = 0
    plateau_ref = math.inf
    for it in range(1, config.iterations + 1):
        if _now() >= setup.deadline:
            run.stop_reason, run.converged_iteration = "time_budget", it - 1
            break
        snapshot = x.detach().clone()
        soft_snapshot = soft.detach().clone() if soft is not None else None
        loss = float(step().detach())
        run.losses.append(loss)
        if not math.isfinite(loss):
            run.stop_reason, run.converged_iteration = "diverged", it
            break
        if loss < run.best_loss:
            run.best_loss, run.best_images, run.best_soft = loss, snapshot, soft_snapshot
        if loss < plateau_ref * (1 - config.min_improvement):
            plateau_ref, since_best = loss, 0
        else:
            since_best += 1
        # L-BFGS returns at once, loss unchanged, when its line search stalls (e.g.
        # a saturated soft label): five such steps end the restart early.
        frozen = frozen + 1 if run.losses[-2:-1] == [loss] else 0
        frame = None
        if it % config.preview_every == 0:
            frame = x.detach().clamp(0, 1).cpu().clone()
            run.frames.append((it, frame))
        yield DlgStep(iteration=it, restart=restart, loss=loss, preview=previews.take(frame))
        if loss <= setup.tolerance:
            run.stop_reason, run.converged_iteration = "tolerance", it
            break
        if (config.patience and since_best >= config.patience) or frozen >= 5:
            run.stop_reason, run.converged_iteration = "plateau", it
            break


def _score_last_iterate(
    run: _Run,
    x: torch.Tensor,
    soft: torch.Tensor | None,
    objective: Callable[[], torch.Tensor],
    init: torch.Tensor,
) -> None:
    """Score the iterate after the last step (often the best) and keep the best frame."""
    if run.stop_reason != "diverged":
        final_loss = float(objective().detach())
        if math.isfinite(final_loss) and final_loss < run.best_loss:
            run.best_loss = final_loss
            run.best_images = x.detach().clone()
            run.best_soft = soft.detach().clone() if soft is not None else None
    if run.best_images is None:  # diverged at the first step
        run.best_images = init
        run.best_soft = soft.detach().clone() if soft is not None else None
    run.best_images = run.best_images.float()
    final = run.best_images.clamp(0, 1).cpu()
    if not run.frames or run.frames[-1][0] != len(run.losses):
        run.frames.append((len(run.losses), final.clone()))


def run_dlg(
    model: nn.Module,
    update: SharedUpdate,
    *,
    config: DlgConfig = DlgConfig(),
) -> DlgResult:
    """Run :func:`iter_dlg` to the end and return its result."""
    result: DlgResult | None = None
    for event in iter_dlg(model, update, config=config):
        if isinstance(event, DlgFinished):
            result = event.result
    assert result is not None
    return result
