"""Lesson-sized settings for the app (the CLI keeps :class:`~dlg.config.DlgConfig`'s defaults).

A class watches the run live, so the app stops as soon as the picture stops changing
instead of polishing decibels nobody sees. Measured on LeNet (100 classes), the sample
images, one thread, CPU seconds on the shared 2-core machine (busy, so a quiet
machine's wall time is lower still), before -> after:

* gradient matching (ig), one image: 23-27 s, 34 dB (three restarts, the last to the
  budget) -> 4.0-5.2 s, 32.5-35.0 dB (five images);
* iDLG, a batch of 4: 68 s, 31.2 dB (three restarts, each to a plateau) -> 13.5-16.8 s,
  30.3-31.4 dB;
* iDLG, one image: unchanged (it stops at the tolerance, 31-33 dB).

Two things changed. A restart only helps when the loss can reach zero: then a run
that stops on a plateau has stalled, and a new start escapes it. With a prior in the
loss (gradient matching's total variation, the batch prior of dlg/idlg) the plateau is
the prior's floor and every restart lands on it (measured 31.2 / 31.2 / 31.2 dB at
B=4), so such runs get one restart. And the plateau rule asks for 1% in 10 iterations
rather than 0.1% in 40: PSNR rose 32 -> 34 dB over the last 40 iterations of a
gradient-matching run, which nobody sees at 32x32.
"""

from __future__ import annotations

from dlg.config import DlgConfig

LESSON_PATIENCE = 10
"""Iterations without :data:`LESSON_MIN_IMPROVEMENT` before the app stops on a plateau."""

LESSON_MIN_IMPROVEMENT = 1e-2
"""Relative loss improvement that counts as progress in the app."""

LESSON_PREVIEW_SECONDS = 0.15
"""At most one preview frame per this many seconds (a frame is recorded every iteration,
so the previews and the GIF are smooth)."""


def has_floor(method: str, batch_size: int) -> bool:
    """Whether the loss has a prior that keeps it above zero (so a plateau is the end).

    Raises:
        ValueError: for an unknown method.
    """
    if method == "ig":
        return True  # total variation
    if method in ("dlg", "idlg"):
        return batch_size > 1  # the batch prior (DlgConfig.batch_tv)
    raise ValueError(f"unknown method {method!r}")


def lesson_config(
    *,
    method: str,
    batch_size: int,
    iterations: int,
    time_budget_s: float | None,
    image_shape: tuple[int, int, int],
    device: str = "cpu",
) -> DlgConfig:
    """The app's settings for one image run (see the module docstring for the figures).

    Args:
        method: ``"dlg"``, ``"idlg"`` or ``"ig"``.
        batch_size: images in the shared update (the server knows it).
        iterations: the visitor's iteration budget.
        time_budget_s: the app's per-run time cap.
        image_shape: the model's input shape.
        device: ``"cpu"`` or ``"cuda"``.
    """
    restarts = 1 if has_floor(method, batch_size) else DlgConfig.restarts
    return DlgConfig(
        method=method,
        iterations=iterations,
        restarts=restarts,
        patience=LESSON_PATIENCE,
        min_improvement=LESSON_MIN_IMPROVEMENT,
        preview_every=1,
        preview_seconds=LESSON_PREVIEW_SECONDS,
        time_budget_s=time_budget_s,
        image_shape=image_shape,
        device=device,
    )
