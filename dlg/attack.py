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

import logging
import math
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from dlg.config import INITS, MAX_BATCH, METHODS, DlgConfig
from dlg.events import DlgEvent, DlgFinished, DlgProgress, DlgResult, DlgStarted, DlgStep, LabelsInferred
from dlg.labels import UnattackableUpdateError, head_parameter_names, infer_labels
from dlg.objective import gradient_distance, smooth_total_variation, total_variation
from dlg.optimize import Problem, Setup, initial_images, make_problem, prepare, warm_up_optimizers
from fedclient.threads import on_threads
from fedclient.update import SharedUpdate

log = logging.getLogger(__name__)

__all__ = [
    "HEARTBEAT_SECONDS", "INITS", "MAX_BATCH", "METHODS", "DlgConfig", "UnattackableUpdateError",
    "gradient_distance", "head_parameter_names", "infer_labels", "iter_dlg", "model_label", "run_dlg",
    "smooth_total_variation", "total_variation", "warm_up_optimizers",
]

HEARTBEAT_SECONDS = 0.2
"""A :class:`~dlg.events.DlgProgress` comes when an iteration has run this long without
an event (checked after every function evaluation, 5-25 ms on LeNet), so the gap
between events stays near this even at B=8, where one L-BFGS step took ~0.46 s."""

STALLED_STEPS = 5
"""L-BFGS returns at once, loss unchanged, when its step stalls (e.g. a saturated soft
label): this many such iterations in a row end the restart."""


def iter_dlg(
    model: nn.Module,
    update: SharedUpdate,
    *,
    config: DlgConfig = DlgConfig(),
) -> Iterator[DlgEvent]:
    """Reconstruct the client's images from its shared gradient, as an event stream.

    When a ``torch.optim`` optimizer runs, torch's one-off start-up
    (:func:`warm_up_optimizers`) is paid before the clock starts. On the CPU the
    optimisation runs on ``config.cpu_threads`` threads (one by default): the attacked
    models are tiny, and thread synchronisation dominated their steps (measured 8 ms vs
    143 ms per LeNet matching step on a busy 2-core machine). The count is set only
    while the generator computes (:func:`fedclient.threads.on_threads`) and restored
    before every event, so the caller's setting holds between events.

    Args:
        model: the global model the server sent (the attacker's copy; not modified).
        update: the shared update (a FedSGD gradient keyed by parameter name).
        config: the attack settings (``config.image_shape``: the model's input shape).

    Yields:
        One :class:`DlgStarted`, a :class:`LabelsInferred` for ``idlg``/``ig``, one
        :class:`DlgStep` per iteration (a preview frame on some, throttled in time),
        :class:`DlgProgress` heartbeats inside long iterations (:data:`HEARTBEAT_SECONDS`),
        and one :class:`DlgFinished`. Closing the generator stops the attack at once;
        ``config.time_budget_s`` stops it with the best reconstruction so far (stop
        reason ``"time_budget"``), across restarts.

    Raises:
        UnattackableUpdateError: the update holds none of the model's parameters, or
            lacks the head when labels must be inferred.
        InvalidConfigError: the batch is larger than :data:`MAX_BATCH`.
    """
    if config.uses_torch_optimizer:
        warm_up_optimizers()
    threads = config.cpu_threads if torch.device(config.device).type == "cpu" else None
    yield from on_threads(_iter_dlg(model, update, config=config), threads)


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


def model_label(model: nn.Module) -> str:
    """The name events carry: the registry name :func:`dlg.models.build_model` sets, or
    the class name (what the server knows of the model it sent)."""
    return str(getattr(model, "registry_name", None) or type(model).__name__.lower())


def _now() -> float:
    """The attack's clock (a module function, so tests can inject a fake one)."""
    return time.perf_counter()


# ---------------------------------------------------------------------------
# The stream, in named steps


@torch.enable_grad()  # gradient matching differentiates gradients, whatever the caller's mode
def _iter_dlg(model: nn.Module, update: SharedUpdate, *, config: DlgConfig) -> Iterator[DlgEvent]:
    """The stream of :func:`iter_dlg`: set up, read labels, run the restarts, finish."""
    t0 = _now()
    setup = prepare(model, update, config, t0)
    yield DlgStarted(method=config.method, model=model_label(model), batch_size=setup.batch_size,
                     iterations=config.iterations, restarts=config.restarts)
    labels = None
    if config.method in ("idlg", "ig"):
        labels = yield from _read_labels(setup, config)
    best, timed_out = yield from _run_restarts(setup, config, labels)
    yield DlgFinished(result=_result(best, config, labels, timed_out, seconds=_now() - t0))


def _read_labels(setup: Setup, config: DlgConfig) -> Generator[DlgEvent, None, torch.Tensor]:
    """iDLG's analytic labels, announced as :class:`LabelsInferred`; on the attack's device."""
    labels, counts = infer_labels(setup.model, setup.target, batch_size=setup.batch_size,
                                  image_shape=config.image_shape, seed=config.seed)
    yield LabelsInferred(labels=labels.clone(), counts=counts.clone())
    return labels.to(setup.device)


def _run_restarts(
    setup: Setup, config: DlgConfig, labels: torch.Tensor | None
) -> Generator[DlgEvent, None, tuple[_Run, bool]]:
    """Random restarts until one reaches the tolerance or time runs out: (best run, timed out).

    A restart only follows one that ended above the tolerance (a plateau or a stall).
    """
    gen = torch.Generator().manual_seed(config.seed)
    pacer = _Pacer(config.preview_seconds)
    best: _Run | None = None
    timed_out = False
    for restart in range(config.restarts):
        if restart > 0 and _now() >= setup.deadline:
            timed_out = True  # no time left for another restart
            break
        init = initial_images(config, setup.batch_size, config.image_shape, gen)
        run = yield from _restart(setup, config, labels, init, gen, restart, pacer)
        if best is None or run.best_loss < best.best_loss:
            best = run
        timed_out = run.stop_reason == "time_budget"
        if run.stop_reason in ("tolerance", "time_budget"):
            break
    assert best is not None
    return best, timed_out


def _result(best: _Run, config: DlgConfig, labels: torch.Tensor | None, timed_out: bool,
            *, seconds: float) -> DlgResult:
    """The best restart as the attacker's result (no ground truth involved)."""
    assert best.best_images is not None
    if config.method == "dlg":
        assert best.best_soft is not None
        rec_labels = best.best_soft.argmax(dim=-1).cpu()
    elif config.method in ("idlg", "ig"):
        assert labels is not None
        rec_labels = labels.cpu()
    else:
        raise ValueError(f"unknown method {config.method!r}")
    return DlgResult(
        images=best.best_images.clamp(0, 1).cpu(),
        labels=rec_labels,
        losses=tuple(best.losses),
        converged_iteration=best.converged_iteration,
        stop_reason="time_budget" if timed_out else best.stop_reason,
        frames=tuple(best.frames),
        seconds=seconds,
    )


# ---------------------------------------------------------------------------
# One restart


@dataclass
class _Run:
    """The state of one restart (kept out of the generator for readability)."""

    losses: list[float] = field(default_factory=list)
    frames: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    best_loss: float = math.inf
    best_images: torch.Tensor | None = None
    best_soft: torch.Tensor | None = None
    stop_reason: str = "budget"
    converged_iteration: int | None = None

    def stop(self, reason: str, iteration: int) -> None:
        self.stop_reason, self.converged_iteration = reason, iteration


class _Pacer:
    """When to send what: preview frames at most every ``preview_seconds`` (all restarts),
    heartbeats after :data:`HEARTBEAT_SECONDS` without an event."""

    def __init__(self, preview_seconds: float) -> None:
        self.preview_seconds = preview_seconds
        self.last_preview = -math.inf
        self.last_event = time.perf_counter()

    def take(self, frame: torch.Tensor | None) -> torch.Tensor | None:
        """The frame if one is due (the caller sends an event now)."""
        now = self.last_event = time.perf_counter()
        if frame is None or now - self.last_preview < self.preview_seconds:
            return None
        self.last_preview = now
        return frame

    def heartbeat_due(self) -> bool:
        """Whether a heartbeat is due (if so, the caller sends one now)."""
        now = time.perf_counter()
        if now - self.last_event < HEARTBEAT_SECONDS:
            return False
        self.last_event = now
        return True


def _restart(
    setup: Setup,
    config: DlgConfig,
    labels: torch.Tensor | None,
    init: torch.Tensor,
    gen: torch.Generator,
    restart: int,
    pacer: _Pacer,
) -> Generator[DlgEvent, None, _Run]:
    """One random restart: optimise from ``init`` until a stop rule fires."""
    problem = make_problem(setup, config, labels, init, gen)
    run = _Run()
    run.frames.append((0, problem.x.detach().clamp(0, 1).cpu().clone()))
    yield from _iterate(setup, config, run, problem, restart, pacer)
    _score_last_iterate(run, problem, init.to(setup.device))
    log.debug("restart %d: %s after %d iterations, best loss %.3g",
              restart, run.stop_reason, len(run.losses), run.best_loss)
    return run


def _iterate(
    setup: Setup, config: DlgConfig, run: _Run, problem: Problem, restart: int, pacer: _Pacer
) -> Iterator[DlgEvent]:
    """The optimisation loop of one restart: one :class:`DlgStep` per iteration."""
    x, soft = problem.x, problem.soft
    since_best = stalled = 0
    plateau_ref = math.inf
    for it in range(1, config.iterations + 1):
        if _now() >= setup.deadline:
            run.stop("time_budget", it - 1)
            break
        snapshot = x.detach().clone()
        soft_snapshot = soft.detach().clone() if soft is not None else None
        loss = float((yield from _step_with_heartbeats(problem, pacer, it, restart)).detach())
        run.losses.append(loss)
        if not math.isfinite(loss):
            run.stop("diverged", it)
            break
        if loss < run.best_loss:
            run.best_loss, run.best_images, run.best_soft = loss, snapshot, soft_snapshot
        if loss < plateau_ref * (1 - config.min_improvement):
            plateau_ref, since_best = loss, 0
        else:
            since_best += 1
        stalled = stalled + 1 if run.losses[-2:-1] == [loss] else 0
        frame = None
        if it % config.preview_every == 0:
            frame = x.detach().clamp(0, 1).cpu().clone()
            run.frames.append((it, frame))
        yield DlgStep(iteration=it, restart=restart, loss=loss, preview=pacer.take(frame))
        if loss <= setup.tolerance:
            run.stop("tolerance", it)
            break
        if (config.patience and since_best >= config.patience) or stalled >= STALLED_STEPS:
            run.stop("plateau", it)
            break


def _step_with_heartbeats(
    problem: Problem, pacer: _Pacer, iteration: int, restart: int
) -> Generator[DlgEvent, None, torch.Tensor]:
    """One optimizer iteration; a :class:`DlgProgress` whenever one is due between evaluations."""
    evaluations = 0
    steps = problem.step()
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        evaluations += 1
        if pacer.heartbeat_due():
            yield DlgProgress(iteration=iteration, restart=restart, evaluations=evaluations)


def _score_last_iterate(run: _Run, problem: Problem, init: torch.Tensor) -> None:
    """Score the iterate after the last step (often the best) and keep the best frame."""
    x, soft = problem.x, problem.soft
    if run.stop_reason != "diverged":
        final_loss = float(problem.objective().detach())
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
