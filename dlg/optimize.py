"""What one attack optimises: the checked setup, the dummy variables, the objective and the step.

:func:`prepare` checks the shared update once per attack; :func:`make_problem` builds
one restart's dummy batch and its optimizer. The event stream around them is
:mod:`dlg.attack`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
from torch import nn

from dlg.config import MAX_BATCH, DlgConfig
from dlg.labels import UnattackableUpdateError, head_parameter_names
from dlg.lbfgs import CompactLBFGS
from dlg.objective import dummy_gradient, gradient_distance, smooth_total_variation, total_variation
from fedclient.errors import InvalidConfigError
from fedclient.update import SharedUpdate

LBFGS_HISTORY = 100
"""Stored (s, y) pairs of L-BFGS, as in the DLG code."""

ADAM_MILESTONES = (3 / 8, 5 / 8, 7 / 8)
"""Fractions of the iterations at which Adam's step size decays (Geiping et al.)."""

ADAM_DECAY = 0.1
"""Factor of each of Adam's step-size decays."""

GREY_MEAN, GREY_STD = 0.5, 0.1
"""The ``"grey"`` initialisation: ``GREY_MEAN + GREY_STD * N(0, 1)`` per pixel."""

SMALLEST_SCALE = 1e-30
"""Floor of the shared gradient's squared norm when it scales the L2 tolerance."""

Step = Callable[[], Generator[None, None, torch.Tensor]]
"""One iteration of the optimizer, yielding between function evaluations; it returns
the loss at the iterate it started from."""


@dataclass(frozen=True)
class Setup:
    """What every restart of one attack shares."""

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
    """The clock's time at which the time budget ends (``inf`` without one)."""


def prepare(model: nn.Module, update: SharedUpdate, config: DlgConfig, t0: float) -> Setup:
    """Check the update, copy the model to the attack's device and set the scales.

    Raises:
        InvalidConfigError: the batch is larger than :data:`~dlg.config.MAX_BATCH`.
        UnattackableUpdateError: the update holds none of the model's parameters.
    """
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
    return Setup(
        model=model,
        params={n: named[n] for n in names},
        target=target,
        batch_size=batch_size,
        num_classes=num_classes,
        device=device,
        dtype=dtype,
        dist_kind=dist_kind,
        scale=scale,
        tolerance=config.effective_tolerance * max(scale, SMALLEST_SCALE),
        deadline=math.inf if budget is None else t0 + budget,
    )


def initial_images(
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
        return GREY_MEAN + GREY_STD * torch.randn(shape, generator=gen)
    if kind == "normal":
        return torch.randn(shape, generator=gen)
    if kind == "uniform":
        return torch.rand(shape, generator=gen)
    raise ValueError(f"unknown init {kind!r}")


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


@dataclass(frozen=True)
class Problem:
    """One restart: its dummy variables, objective and optimizer step.

    Attributes:
        x: ``(B, C, H, W)`` the dummy images (a leaf the optimizer moves).
        soft: ``(B, K)`` dummy label logits (plain DLG), else ``None``.
        objective: the loss at the current variables, with a graph.
        step: one iteration (:data:`Step`).
    """

    x: torch.Tensor
    soft: torch.Tensor | None
    objective: Callable[[], torch.Tensor]
    step: Step


def make_problem(
    setup: Setup, config: DlgConfig, labels: torch.Tensor | None, init: torch.Tensor, gen: torch.Generator
) -> Problem:
    """The dummy batch of one restart, its objective and its optimizer."""
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
        dummy = dummy_gradient(setup.model, setup.params, x, y)
        loss = gradient_distance(dummy, setup.target, setup.dist_kind)
        if config.method == "ig" and config.tv_weight > 0:
            tv = total_variation(x) if use_adam else smooth_total_variation(x)  # L-BFGS needs it smooth
            loss = loss + config.tv_weight * tv
        elif config.method != "ig" and setup.batch_size > 1 and config.batch_tv > 0:
            loss = loss + config.batch_tv * setup.scale * smooth_total_variation(x)
        return loss

    def closure() -> torch.Tensor:
        # The gradient of the variables only: backward() would also fill the model's
        # own .grad (the shared model, which the app caches for every visitor) and
        # pay for those weight gradients: 16-18% of an evaluation on LeNet.
        loss = objective()
        grads = torch.autograd.grad(loss, variables)
        for v, g in zip(variables, grads):
            v.grad = g
        return loss

    step = _adam_step(config, variables, closure) if use_adam else _lbfgs_step(config, variables, closure)
    return Problem(x=x, soft=soft, objective=objective, step=step)


def _lbfgs_step(config: DlgConfig, variables: list[torch.Tensor], closure: Callable[[], torch.Tensor]) -> Step:
    """One L-BFGS step (up to ``config.lbfgs_max_iter`` inner iterations)."""
    if config.line_search != "strong_wolfe":
        # torch's fixed-step L-BFGS (as in the DLG code) with less per-iteration
        # overhead, and a backtracking safeguard unless the plain unit step is asked for.
        compact = CompactLBFGS(variables, lr=config.effective_lr, max_iter=config.lbfgs_max_iter,
                               history_size=LBFGS_HISTORY, backtrack=config.line_search == "armijo")
        return lambda: compact.iter_step(closure)
    wolfe = torch.optim.LBFGS(variables, lr=config.effective_lr, max_iter=config.lbfgs_max_iter,
                              history_size=LBFGS_HISTORY, line_search_fn=config.line_search)

    def step() -> Generator[None, None, torch.Tensor]:
        return wolfe.step(closure)  # type: ignore[return-value]
        yield  # a generator without pauses: torch's step cannot be interrupted

    return step


def _adam_step(config: DlgConfig, variables: list[torch.Tensor], closure: Callable[[], torch.Tensor]) -> Step:
    """One (signed) Adam step with Geiping et al.'s step decay, pixels boxed to [0, 1]."""
    adam = torch.optim.Adam(variables, lr=config.effective_lr)
    milestones = [int(config.iterations * f) for f in ADAM_MILESTONES]
    sched = torch.optim.lr_scheduler.MultiStepLR(adam, milestones=milestones, gamma=ADAM_DECAY)
    x = variables[0]

    def step() -> Generator[None, None, torch.Tensor]:
        loss = closure()
        if config.signed:
            x.grad.sign_()  # type: ignore[union-attr]
        adam.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)  # pixels live in [0, 1]
        return loss
        yield  # one evaluation: nothing to interrupt

    return step
